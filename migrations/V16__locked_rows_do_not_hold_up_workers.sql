-- V16: a row that another session holds locked (an operator's UPDATE or SELECT ... FOR UPDATE in a
-- transaction left open) no longer holds up the workers.
--
-- The claim takes back an expired lease only where it can lock the message's row as well as the
-- queue's, skipping one held elsewhere (it waited on it before, and every claim after it waited
-- too). The row is taken back once that transaction ends. The body is V15's otherwise.
--
-- The completion of successes gives up waiting for a row after 5 s (lock_timeout); redrive then
-- completes the batch's other rows at once, and the held row's completion again every few
-- seconds, without waiting, until it goes through (see src/store/complete.rs).

ALTER FUNCTION redrive.delete_succeeded(uuid[], uuid[]) SET lock_timeout = '5s';

CREATE OR REPLACE FUNCTION redrive.claim(grp text, lim bigint, lease float8, worker text, ahead float8)
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
            JOIN redrive.retry_messages r ON r.id = m.id
            WHERE m.consumer_group = grp AND m.state = 'running' AND m.lease_expires_at < now()
            LIMIT 1000
            FOR UPDATE OF m, r SKIP LOCKED
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
