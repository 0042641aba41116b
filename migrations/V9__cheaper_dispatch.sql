-- V9: cheaper claims and completions. Every statement and function keeps its contract; only how
-- Postgres does the work changes. Counted in instructions of one backend claiming and deleting
-- 20,000 rows (scripts/sql-instructions.sh), a dispatched row cost 254,500 instructions before and
-- 117,800 after; the floor of DESIGN §2b, a bare claim and delete of one narrow table, 70,200.

-- The queue follows retry_messages by id arrays instead of joins: a join with the transition
-- table hashed every changed row, whole (payload included), and its plan read the queue, so a
-- statement's cost grew with the backlog. A delete by `redrive.delete_succeeded`, which has
-- already taken its rows out of the queue, says so with `redrive.queue_in_step` for its own
-- statement, and the trigger then has nothing to do. Any other delete (an operator's, a purge)
-- still takes its rows out of the queue here.
CREATE OR REPLACE FUNCTION redrive.sync_queue() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        IF current_setting('redrive.queue_in_step', true) = 'on' THEN
            RETURN NULL;
        END IF;
        DELETE FROM redrive.queue q WHERE q.id = ANY (ARRAY(SELECT g.id FROM gone g));
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        -- A new row cannot be in the queue yet: a plain INSERT costs less than one with ON CONFLICT.
        INSERT INTO redrive.queue (id, consumer_group, attempts, next_attempt_at)
        SELECT c.id, c.consumer_group, c.attempts, c.next_attempt_at FROM changed c WHERE c.state = 'pending';
        RETURN NULL;
    END IF;
    DELETE FROM redrive.queue q
    WHERE q.id = ANY (ARRAY(SELECT c.id FROM changed c WHERE c.state <> 'pending'));
    IF EXISTS (SELECT 1 FROM changed WHERE state = 'pending') THEN
        INSERT INTO redrive.queue AS q (id, consumer_group, attempts, next_attempt_at)
        SELECT c.id, c.consumer_group, c.attempts, c.next_attempt_at FROM changed c WHERE c.state = 'pending'
        ON CONFLICT (id) DO UPDATE SET next_attempt_at = EXCLUDED.next_attempt_at
        WHERE q.state = 'pending' AND q.next_attempt_at IS DISTINCT FROM EXCLUDED.next_attempt_at;
    END IF;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION redrive.sync_queue() FROM PUBLIC;

-- The claim of V8, with the same arguments and result, in three steps:
--  - the rescue of expired leases runs only when the lease index shows one: run on every claim, its
--    empty UPDATE of retry_messages fired three statement triggers each time;
--  - one fresh token per claim statement, shared by the rows it takes (the fence compares a row's id
--    and token together, I3): `gen_random_uuid()` per row cost a tenth of the claim;
--  - the claimed rows are updated by the ctid that locked them, not found again by primary key. A
--    locked row cannot move before the statement ends; a version that did (updated and committed
--    between the scan and the lock) fails the ctid test and is left for the next claim.
-- A rescued row is pending again before the claim looks, so the same call may take it.
CREATE OR REPLACE FUNCTION redrive.claim(grp text, lim bigint, lease float8, worker text, ahead float8)
RETURNS TABLE (id uuid, attempts integer, claim_token uuid, max_attempts integer, topic text,
               "partition" integer, kafka_offset bigint, kafka_timestamp timestamptz, key bytea,
               payload bytea, headers jsonb, first_failed_at timestamptz, wait float8)
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
           greatest(extract(epoch FROM c.next_attempt_at - now()), 0)::float8
    FROM claimed c JOIN redrive.retry_messages r ON r.id = c.id;
END
$$;

-- The fenced delete of V8. Its rows leave the queue first, fenced on their claims, so the trigger
-- on retry_messages is told that it has nothing to do for this statement.
CREATE OR REPLACE FUNCTION redrive.delete_succeeded(ids uuid[], tokens uuid[])
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    deleted bigint;
BEGIN
    PERFORM set_config('redrive.queue_in_step', 'on', true);
    WITH done AS (
        DELETE FROM redrive.queue q
        USING unnest(delete_succeeded.ids, delete_succeeded.tokens) AS f(id, token)
        WHERE q.id = f.id AND q.claim_token = f.token AND q.state = 'running'
        RETURNING q.id)
    DELETE FROM redrive.retry_messages r USING done d WHERE r.id = d.id;
    GET DIAGNOSTICS deleted = ROW_COUNT;
    PERFORM set_config('redrive.queue_in_step', 'off', true);
    RETURN deleted;
END
$$;
