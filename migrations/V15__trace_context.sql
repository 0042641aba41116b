-- V15: a row keeps the trace context of its first delivery. With traces exported, the consumer
-- stores the W3C `traceparent` (and `tracestate`) of the span that handled the message first; each
-- retry's span is its child, the DLQ publish is too, and a DLQ record whose message carried no
-- `traceparent` gets this one. So one message's whole life is one trace, whether or not its
-- producer started one. NULL when traces are off. The column has no default: adding it rewrites
-- nothing.

ALTER TABLE redrive.retry_messages ADD COLUMN trace_context text;

-- The view shows it last (a view can only gain columns at its end).
CREATE OR REPLACE VIEW redrive.messages AS
SELECT r.id, r.consumer_group, r.topic, r."partition", r.kafka_offset, r.kafka_timestamp,
       coalesce(q.state, r.state) AS state,
       redrive.utf8_or_null(r.key) AS key_text, redrive.utf8_or_null(r.payload) AS payload_text,
       coalesce(q.attempts, r.attempts) AS attempts, r.max_attempts,
       coalesce(q.next_attempt_at, r.next_attempt_at) AS next_attempt_at, q.lease_expires_at, q.locked_by,
       r.last_error, r.error_kind, r.error_history, r.first_failed_at, r.updated_at, r.dead_at,
       r.dlq_topic, r.dlq_published_at, r.replay_count, r.last_replayed_at, r.last_replayed_by,
       r.last_replay_reason, r.replayed_to_topic, r.key, r.payload, r.headers, r.dlq_error,
       r.dlq_refused_at, r.incarnation, r.trace_context
FROM redrive.retry_messages r LEFT JOIN redrive.queue q ON q.id = r.id;

-- The claim returns it with the message. Its result gains a column, so it is made anew; its body is
-- V14's.
DROP FUNCTION redrive.claim(text, bigint, float8, text, float8);
CREATE FUNCTION redrive.claim(grp text, lim bigint, lease float8, worker text, ahead float8)
RETURNS TABLE (id uuid, attempts integer, claim_token uuid, max_attempts integer, topic text,
               "partition" integer, kafka_offset bigint, kafka_timestamp timestamptz, key bytea,
               payload bytea, headers jsonb, first_failed_at timestamptz, wait float8,
               trace_context text)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
DECLARE
    token uuid := gen_random_uuid();
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    IF EXISTS (SELECT 1 FROM redrive.queue m
               WHERE m.consumer_group = grp AND m.state = 'running' AND m.lease_expires_at < now()) THEN
        WITH expired AS (
            SELECT m.id, m.locked_by FROM redrive.queue m
            WHERE m.consumer_group = grp AND m.state = 'running' AND m.lease_expires_at < now()
            LIMIT 1000
            FOR UPDATE SKIP LOCKED
        ), rescued AS (
            UPDATE redrive.queue q
            SET state = 'pending', next_attempt_at = now(), lease_expires_at = NULL, locked_by = NULL,
                claim_token = NULL
            FROM expired e
            WHERE q.id = e.id
            RETURNING q.id, q.attempts, e.locked_by
        )
        UPDATE redrive.retry_messages r
        SET state = CASE WHEN s.attempts >= r.max_attempts THEN 'dead' ELSE 'pending' END,
            dead_at = CASE WHEN s.attempts >= r.max_attempts THEN now() END,
            attempts = s.attempts, next_attempt_at = now(), error_kind = 'timeout',
            updated_at = now(), dlq_published_at = NULL, dlq_topic = NULL, dlq_error = NULL,
            dlq_refused_at = NULL,
            last_error = format('lease expired: worker %s did not finish attempt %s',
                                coalesce(s.locked_by, '?'), s.attempts)
        FROM rescued s
        WHERE r.id = s.id;
    END IF;
    RETURN QUERY
    WITH claimed AS (
        UPDATE redrive.queue q
        SET state = 'running', attempts = q.attempts + 1, locked_by = worker,
            lease_expires_at = greatest(q.next_attempt_at, now()) + make_interval(secs => lease),
            claim_token = token
        WHERE q.ctid = ANY(ARRAY(
            SELECT m.ctid FROM redrive.queue m
            WHERE m.consumer_group = grp AND m.state = 'pending'
              AND m.next_attempt_at <= now() + make_interval(secs => ahead)
            ORDER BY m.next_attempt_at
            LIMIT lim
            FOR UPDATE SKIP LOCKED))
        RETURNING q.id, q.attempts, q.claim_token, q.next_attempt_at
    )
    SELECT c.id, c.attempts, c.claim_token, r.max_attempts, r.topic, r."partition",
           r.kafka_offset, r.kafka_timestamp, r.key, r.payload, r.headers, r.first_failed_at,
           extract(epoch FROM c.next_attempt_at - now())::float8, r.trace_context
    FROM claimed c JOIN redrive.retry_messages r ON r.id = c.id;
END
$$;
