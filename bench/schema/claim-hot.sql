-- A claim that leaves `state` alone, so with room on the page its UPDATE is HOT (no index
-- entries): a claimed row is pending with a claim token, and the claim skips such rows unless
-- their lease has expired. The lease index is dropped for it.
WITH c AS (UPDATE redrive.retry_messages r
  SET attempts = r.attempts + 1, locked_by = 'w', updated_at = now(),
      lease_expires_at = greatest(r.next_attempt_at, now()) + make_interval(secs => 30),
      claim_token = gen_random_uuid()
  WHERE r.id = ANY(ARRAY(
      SELECT id FROM redrive.retry_messages
      WHERE consumer_group = 'bench' AND state = 'pending' AND next_attempt_at <= now() + make_interval(secs => 0.04)
        AND (claim_token IS NULL OR lease_expires_at < now())
      ORDER BY next_attempt_at LIMIT 100 FOR UPDATE SKIP LOCKED))
    AND (SELECT set_config('synchronous_commit', 'off', true)) = 'off'
  RETURNING r.id, r.attempts, r.claim_token, r.max_attempts, r.topic, r."partition", r.kafka_offset,
            r.kafka_timestamp, r.key, r.payload, r.headers, r.first_failed_at,
            greatest(extract(epoch FROM r.next_attempt_at - now()), 0)::float8 AS wait)
SELECT array_agg(id)::text AS ids, array_agg(claim_token)::text AS toks, sum(length(payload)) AS bytes FROM c \gset
DELETE FROM redrive.retry_messages r USING unnest(:ids::uuid[], :toks::uuid[]) AS f(id, token) WHERE r.id = f.id AND r.claim_token = f.token;
