-- V8: the queue. Rows still to be attempted have a narrow row of their own in redrive.queue, and
-- claims, leases and their rescue change only that row. A claim used to rewrite the whole row of
-- retry_messages, message included (about 1.3 KB for a 1 KiB payload), and add an entry to each of
-- its indexes; it now rewrites about 100 bytes and reads the message by primary key.
--
-- retry_messages keeps every row with its message, errors, times and audit. Its `state` is
-- `pending` for every row in the queue, whether or not a worker is attempting it right now; the
-- queue says which (`running`, with the lease). The views show `running` as before.
--
-- A row is in the queue exactly while retry_messages says `pending`. Triggers keep it so for every
-- statement on retry_messages: new pending rows join the queue, rows set to another state leave it,
-- a new `next_attempt_at` of a waiting row reaches it, and deleted rows leave it. So the operator
-- surface (replay, pause, resume, rescheduling by UPDATE) works on retry_messages as before.

CREATE TABLE redrive.queue (
    id               uuid        PRIMARY KEY,
    consumer_group   text        NOT NULL,
    -- pending: waiting for next_attempt_at; running: claimed by a worker until lease_expires_at.
    state            text        NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'running')),
    -- Attempts started so far, the claimed one included; a completion writes it to retry_messages.
    attempts         integer     NOT NULL CHECK (attempts >= 0),
    next_attempt_at  timestamptz NOT NULL,
    lease_expires_at timestamptz,
    locked_by        text,
    -- A fresh random value on every claim: completions and releases are fenced on it (I3, I11).
    claim_token      uuid,
    CONSTRAINT queue_lease CHECK (state <> 'running' OR (lease_expires_at IS NOT NULL AND claim_token IS NOT NULL))
);

-- The claim reads waiting rows of its group in due order; the rescue reads leases that may expire.
CREATE INDEX queue_claim ON redrive.queue (consumer_group, next_attempt_at) WHERE state = 'pending';
CREATE INDEX queue_leases ON redrive.queue (consumer_group, lease_expires_at) WHERE state = 'running';

-- The rows being attempted now move with their lease; the rows of retry_messages no longer say
-- `running`. The pause and wake-up triggers stay out of this move: a row in the queue keeps its
-- claim, and nothing new became due.
INSERT INTO redrive.queue (id, consumer_group, state, attempts, next_attempt_at, lease_expires_at, locked_by, claim_token)
SELECT id, consumer_group, state, attempts, next_attempt_at, lease_expires_at, locked_by,
       CASE WHEN state = 'running' THEN coalesce(claim_token, gen_random_uuid()) END
FROM redrive.retry_messages
WHERE state IN ('pending', 'running');

ALTER TABLE redrive.retry_messages DISABLE TRIGGER retry_messages_hold_paused_update;
ALTER TABLE redrive.retry_messages DISABLE TRIGGER retry_messages_notify_update;
UPDATE redrive.retry_messages SET state = 'pending' WHERE state = 'running';
ALTER TABLE redrive.retry_messages ENABLE TRIGGER retry_messages_hold_paused_update;
ALTER TABLE redrive.retry_messages ENABLE TRIGGER retry_messages_notify_update;

-- The views of V3 read the columns that move; they come back below, reading them from the queue.
DROP VIEW redrive.messages;
DROP VIEW redrive.pending_messages;

-- The lease lives in the queue only. Dropping the columns drops the lease index and check.
ALTER TABLE redrive.retry_messages
    DROP COLUMN lease_expires_at,
    DROP COLUMN locked_by,
    DROP COLUMN claim_token;
DROP INDEX redrive.retry_messages_claim;
ALTER TABLE redrive.retry_messages DROP CONSTRAINT retry_messages_state_check;
ALTER TABLE redrive.retry_messages ADD CONSTRAINT retry_messages_state_check
    CHECK (state IN ('pending', 'paused', 'dead', 'replayed'));

-- Rows of retry_messages that are pending and not in the queue yet join it, due when the row says.
-- Rows no longer pending leave it, and a waiting row takes a new next_attempt_at. A row being
-- attempted keeps its claim while it stays pending: its completion writes its outcome.
-- SECURITY DEFINER, so the roles that change retry_messages need no privileges on the queue.
CREATE FUNCTION redrive.sync_queue() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        DELETE FROM redrive.queue q USING gone g WHERE q.id = g.id;
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        -- A new row cannot be in the queue yet: a plain INSERT costs less than one with ON CONFLICT.
        INSERT INTO redrive.queue (id, consumer_group, attempts, next_attempt_at)
        SELECT c.id, c.consumer_group, c.attempts, c.next_attempt_at FROM changed c WHERE c.state = 'pending';
        RETURN NULL;
    END IF;
    DELETE FROM redrive.queue q USING changed c WHERE q.id = c.id AND c.state <> 'pending';
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

-- Statement triggers fire in the order of their names: the queue is in step before
-- retry_messages_hold_paused_* pauses a row (whose nested UPDATE then takes it out again).
CREATE TRIGGER retry_messages_enqueue_insert
    AFTER INSERT ON redrive.retry_messages REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION redrive.sync_queue();
CREATE TRIGGER retry_messages_enqueue_update
    AFTER UPDATE ON redrive.retry_messages REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION redrive.sync_queue();
CREATE TRIGGER retry_messages_enqueue_delete
    AFTER DELETE ON redrive.retry_messages REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION redrive.sync_queue();

-- Pausing leaves the rows being attempted to finish their attempt, as before: a failed one is
-- rescheduled, and the pause then holds it.
CREATE OR REPLACE FUNCTION redrive.pause(topic text, consumer_group text DEFAULT '*', reason text DEFAULT NULL)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    paused bigint;
BEGIN
    INSERT INTO redrive.paused_topics (consumer_group, topic, reason)
    VALUES (pause.consumer_group, pause.topic, pause.reason)
    ON CONFLICT ON CONSTRAINT paused_topics_pkey
    DO UPDATE SET reason = EXCLUDED.reason, paused_at = now(), paused_by = session_user;
    UPDATE redrive.retry_messages r SET state = 'paused', updated_at = now()
    WHERE r.topic = pause.topic AND r.state = 'pending'
      AND (pause.consumer_group = '*' OR r.consumer_group = pause.consumer_group)
      AND NOT EXISTS (SELECT 1 FROM redrive.queue q WHERE q.id = r.id AND q.state = 'running');
    GET DIAGNOSTICS paused = ROW_COUNT;
    RETURN paused;
END
$$;

-- The claim of V7 on the queue: the same arguments, result and statement. The claim changes only
-- the queue; the rescue writes a rescued row's attempt and error to retry_messages too.
CREATE OR REPLACE FUNCTION redrive.claim(grp text, lim bigint, lease float8, worker text, ahead float8)
RETURNS TABLE (id uuid, attempts integer, claim_token uuid, max_attempts integer, topic text,
               "partition" integer, kafka_offset bigint, kafka_timestamp timestamptz, key bytea,
               payload bytea, headers jsonb, first_failed_at timestamptz, wait float8)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    RETURN QUERY
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
    ), recorded AS (
        UPDATE redrive.retry_messages r
        SET state = CASE WHEN s.attempts >= r.max_attempts THEN 'dead' ELSE 'pending' END,
            dead_at = CASE WHEN s.attempts >= r.max_attempts THEN now() END,
            attempts = s.attempts, next_attempt_at = now(), error_kind = 'timeout',
            updated_at = now(), dlq_published_at = NULL, dlq_topic = NULL, dlq_error = NULL,
            dlq_refused_at = NULL,
            last_error = format('lease expired: worker %s did not finish attempt %s',
                                coalesce(s.locked_by, '?'), s.attempts)
        FROM rescued s
        WHERE r.id = s.id
    ), claimed AS (
        UPDATE redrive.queue q
        SET state = 'running', attempts = q.attempts + 1, locked_by = worker,
            lease_expires_at = greatest(q.next_attempt_at, now()) + make_interval(secs => lease),
            claim_token = gen_random_uuid()
        WHERE q.id = ANY(ARRAY(
            SELECT m.id FROM redrive.queue m
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

-- The replay of V2, without the lease columns, which are the queue's now.
CREATE OR REPLACE FUNCTION redrive.replay(
    ids          uuid[],
    replayed_by  text    DEFAULT session_user,
    reason       text    DEFAULT NULL,
    max_attempts integer DEFAULT NULL)
RETURNS SETOF uuid LANGUAGE sql AS $$
    UPDATE redrive.retry_messages r
    SET state = 'pending', attempts = 0, max_attempts = coalesce(replay.max_attempts, r.max_attempts),
        next_attempt_at = now(), dead_at = NULL, dlq_published_at = NULL, dlq_topic = NULL,
        updated_at = now(), replay_count = r.replay_count + 1, last_replayed_at = now(),
        last_replayed_by = replay.replayed_by, last_replay_reason = replay.reason,
        replayed_to_topic = NULL
    WHERE r.id = ANY (replay.ids) AND r.state = 'dead'
    RETURNING r.id
$$;

-- Same contract as V6's: deletes the rows whose claims are current, and returns how many.
CREATE OR REPLACE FUNCTION redrive.delete_succeeded(ids uuid[], tokens uuid[])
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    deleted bigint;
BEGIN
    WITH done AS (
        DELETE FROM redrive.queue q
        USING unnest(delete_succeeded.ids, delete_succeeded.tokens) AS f(id, token)
        WHERE q.id = f.id AND q.claim_token = f.token AND q.state = 'running'
        RETURNING q.id)
    DELETE FROM redrive.retry_messages r USING done d WHERE r.id = d.id;
    GET DIAGNOSTICS deleted = ROW_COUNT;
    RETURN deleted;
END
$$;

-- The views of V3, the state, attempt and lease of a row in the queue read from it.
CREATE VIEW redrive.messages AS
SELECT r.id, r.consumer_group, r.topic, r."partition", r.kafka_offset, r.kafka_timestamp,
       coalesce(q.state, r.state) AS state,
       redrive.utf8_or_null(r.key) AS key_text, redrive.utf8_or_null(r.payload) AS payload_text,
       coalesce(q.attempts, r.attempts) AS attempts, r.max_attempts,
       coalesce(q.next_attempt_at, r.next_attempt_at) AS next_attempt_at, q.lease_expires_at, q.locked_by,
       r.last_error, r.error_kind, r.error_history, r.first_failed_at, r.updated_at, r.dead_at,
       r.dlq_topic, r.dlq_published_at, r.replay_count, r.last_replayed_at, r.last_replayed_by,
       r.last_replay_reason, r.replayed_to_topic, r.key, r.payload, r.headers, r.dlq_error,
       r.dlq_refused_at, r.incarnation
FROM redrive.retry_messages r LEFT JOIN redrive.queue q ON q.id = r.id;

CREATE VIEW redrive.pending_messages AS
SELECT r.id, r.consumer_group, r.topic, r."partition", r.kafka_offset, r.kafka_timestamp,
       coalesce(q.state, r.state) AS state,
       redrive.utf8_or_null(r.key) AS key_text, redrive.utf8_or_null(r.payload) AS payload_text,
       coalesce(q.attempts, r.attempts) AS attempts, r.max_attempts,
       coalesce(q.next_attempt_at, r.next_attempt_at) AS next_attempt_at,
       coalesce(q.state, r.state) = 'pending' AND coalesce(q.next_attempt_at, r.next_attempt_at) <= now() AS due,
       q.lease_expires_at, q.locked_by, r.last_error, r.error_kind, r.error_history, r.first_failed_at,
       r.updated_at, r.replay_count, r.key, r.payload, r.headers
FROM redrive.retry_messages r LEFT JOIN redrive.queue q ON q.id = r.id
WHERE r.state IN ('pending', 'paused');
