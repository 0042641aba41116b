-- The queue split: the claim rewrites a narrow queue row and reads the message from a table of
-- its own; the fenced delete removes both.
WITH rescued AS (
    UPDATE q_queue r SET state = 'pending', next_attempt_at = now(), lease_expires_at = NULL, locked_by = NULL, claim_token = NULL
    WHERE r.id = ANY(ARRAY(SELECT id FROM q_queue WHERE consumer_group = 'bench' AND state = 'running' AND lease_expires_at < now() LIMIT 1000 FOR UPDATE SKIP LOCKED))
    RETURNING r.id),
  q AS (UPDATE q_queue r
  SET state = 'running', attempts = r.attempts + 1, locked_by = 'w',
      lease_expires_at = greatest(r.next_attempt_at, now()) + make_interval(secs => 30),
      claim_token = gen_random_uuid()
  WHERE r.id = ANY(ARRAY(
      SELECT id FROM q_queue
      WHERE consumer_group = 'bench' AND state = 'pending' AND next_attempt_at <= now() + make_interval(secs => 0.04)
      ORDER BY next_attempt_at LIMIT 100 FOR UPDATE SKIP LOCKED))
    AND (SELECT set_config('synchronous_commit', 'off', true)) = 'off'
  RETURNING r.id, r.attempts, r.claim_token, greatest(extract(epoch FROM r.next_attempt_at - now()), 0)::float8 AS wait),
  c AS (SELECT q.*, m.max_attempts, m.topic, m."partition", m.kafka_offset, m.kafka_timestamp, m.key, m.payload, m.headers, m.first_failed_at
        FROM q JOIN q_msg m USING (id))
SELECT array_agg(id)::text AS ids, array_agg(claim_token)::text AS toks, sum(length(payload)) AS bytes FROM c \gset
WITH d AS (DELETE FROM q_queue r USING unnest(:ids::uuid[], :toks::uuid[]) AS f(id, token) WHERE r.id = f.id AND r.claim_token = f.token AND r.state = 'running' RETURNING r.id)
DELETE FROM q_msg m USING d WHERE m.id = d.id;
