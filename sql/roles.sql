-- Least-privilege roles for redrive. Run as the owner of the redrive schema (the role that ran
-- `redrive migrate`) or a superuser, after every `redrive migrate`; it is safe to run again.
--
--   psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f sql/roles.sql
--
-- It creates three group roles that cannot log in. Give them to login roles:
--
--   CREATE ROLE orders_worker LOGIN PASSWORD '...' IN ROLE redrive_worker;
--   GRANT redrive_operator TO alice;
--   GRANT redrive_readonly TO grafana;
--
-- redrive_worker    what `redrive run` needs: capture, claim, complete, publish to the DLQ.
--                   It cannot delete rows (successes are deleted by the fenced, SECURITY DEFINER
--                   function redrive.delete_succeeded), cannot purge, cannot rewrite a message's
--                   key, payload, headers or source, and cannot touch the replay audit.
-- redrive_operator  reads everything; replays (redrive.replay, `redrive replay`), pauses and
--                   resumes topics, reschedules rows, purges (`redrive purge`), holds circuit
--                   breakers open or closed (`redrive breaker`). It cannot insert
--                   rows, truncate, or change the schema.
-- redrive_readonly  reads the table, the views and `redrive status`; changes nothing.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'redrive_worker') THEN
        CREATE ROLE redrive_worker NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'redrive_operator') THEN
        CREATE ROLE redrive_operator NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'redrive_readonly') THEN
        CREATE ROLE redrive_readonly NOLOGIN;
    END IF;
END
$$;

GRANT CONNECT ON DATABASE :"DBNAME" TO redrive_worker, redrive_operator, redrive_readonly;
GRANT USAGE ON SCHEMA redrive TO redrive_worker, redrive_operator, redrive_readonly;

-- Start from nothing, so that running this again after a change removes what was taken away.
REVOKE ALL ON ALL TABLES IN SCHEMA redrive FROM redrive_worker, redrive_operator, redrive_readonly;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA redrive FROM redrive_worker, redrive_operator, redrive_readonly;

-- Read-only: every table and view.
GRANT SELECT ON ALL TABLES IN SCHEMA redrive TO redrive_readonly;
GRANT EXECUTE ON FUNCTION redrive.utf8_or_null(bytea),
    redrive.find(text[], uuid[], text[], text[], text, text, text[], timestamptz, timestamptz),
    redrive.find_oldest(text[], uuid[], text[], text[], text, text, text[], timestamptz,
                        timestamptz, boolean, bigint),
    redrive.consumer_groups(), redrive.few_rows_of(text[], text[])
    TO redrive_readonly;

-- Worker.
GRANT SELECT ON redrive.refinery_schema_history, redrive.paused_topics TO redrive_worker;
-- The circuit breakers: a process reads the operators' holds and reports its own states.
GRANT SELECT ON redrive.breaker_holds TO redrive_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON redrive.breaker_states TO redrive_worker;
GRANT SELECT, INSERT ON redrive.retry_messages TO redrive_worker;
-- Only the columns the rescue, the completer, the release at shutdown and the DLQ publisher set.
GRANT UPDATE (state, attempts, next_attempt_at, last_error, error_kind, error_history, updated_at,
              dead_at, dlq_published_at, dlq_topic, dlq_error, dlq_refused_at)
    ON redrive.retry_messages TO redrive_worker;
-- The queue: claims and leases. Rows join and leave it through a trigger of retry_messages that
-- runs as the schema owner, so the worker can neither add nor remove one.
GRANT SELECT ON redrive.queue TO redrive_worker;
GRANT UPDATE (state, attempts, next_attempt_at, lease_expires_at, locked_by, claim_token)
    ON redrive.queue TO redrive_worker;
GRANT EXECUTE ON FUNCTION redrive.delete_succeeded(uuid[], uuid[]),
    redrive.fail_attempts(uuid[], uuid[], integer[], text[], float8[], text[], text[]),
    redrive.release_claims(uuid[], uuid[]),
    redrive.claim(text, bigint, float8, text, float8),
    redrive.next_wake(text, float8),
    redrive.lock_lines(text[], text[], integer[], bytea[]),
    redrive.capture_in_lines(text, uuid[], text[], integer[], bigint[], timestamptz[], bytea[],
                             bytea[], jsonb[], text[], integer[], float8[], text[], text[], bytea[],
                             text[], text[], text[], text[], integer[])
    TO redrive_worker;

-- Operator: read-only, plus replay, reschedule, pause and purge.
GRANT redrive_readonly TO redrive_operator;
GRANT UPDATE, DELETE ON redrive.retry_messages TO redrive_operator;
GRANT INSERT, UPDATE, DELETE ON redrive.paused_topics TO redrive_operator;
GRANT INSERT, UPDATE, DELETE ON redrive.breaker_holds TO redrive_operator;
GRANT EXECUTE ON FUNCTION redrive.replay(uuid[], text, text, integer),
    redrive.pause(text, text, text), redrive.resume(text, text),
    redrive.hold_breaker(text, text, text, text), redrive.release_breaker(text, text),
    redrive.lock_lines(text[], text[], integer[], bytea[])
    TO redrive_operator;
