-- redrive's claim of up to 100 due rows (V6, as `Store::claim_ahead` sends it), then the
-- completer's fenced delete of the same rows through `redrive.delete_succeeded`.
WITH rescued AS (
    UPDATE redrive.retry_messages r
    SET state = CASE WHEN r.attempts >= r.max_attempts THEN 'dead' ELSE 'pending' END,
        dead_at = CASE WHEN r.attempts >= r.max_attempts THEN now() END,
        next_attempt_at = now(), lease_expires_at = NULL, locked_by = NULL, claim_token = NULL,
        error_kind = 'timeout', updated_at = now(), dlq_published_at = NULL, dlq_topic = NULL,
        dlq_error = NULL, dlq_refused_at = NULL,
        last_error = format('lease expired: worker %s did not finish attempt %s', coalesce(r.locked_by, '?'), r.attempts)
    WHERE r.id = ANY(ARRAY(
        SELECT id FROM redrive.retry_messages
        WHERE consumer_group = 'bench' AND state = 'running' AND lease_expires_at < now()
        LIMIT 1000 FOR UPDATE SKIP LOCKED))
    RETURNING r.id),
  c AS (UPDATE redrive.retry_messages r
  SET state = 'running', attempts = r.attempts + 1, locked_by = 'w', updated_at = now(),
      lease_expires_at = greatest(r.next_attempt_at, now()) + make_interval(secs => 30),
      claim_token = gen_random_uuid()
  WHERE r.id = ANY(ARRAY(
      SELECT id FROM redrive.retry_messages
      WHERE consumer_group = 'bench' AND state = 'pending' AND next_attempt_at <= now() + make_interval(secs => 0.04)
      ORDER BY next_attempt_at LIMIT 100 FOR UPDATE SKIP LOCKED))
    AND (SELECT set_config('synchronous_commit', 'off', true)) = 'off'
  RETURNING r.id, r.attempts, r.claim_token, r.max_attempts, r.topic, r."partition", r.kafka_offset,
            r.kafka_timestamp, r.key, r.payload, r.headers, r.first_failed_at,
            greatest(extract(epoch FROM r.next_attempt_at - now()), 0)::float8 AS wait)
SELECT array_agg(id)::text AS ids, array_agg(claim_token)::text AS toks, sum(length(payload)) AS bytes FROM c \gset
SELECT redrive.delete_succeeded(:ids::uuid[], :toks::uuid[]);
