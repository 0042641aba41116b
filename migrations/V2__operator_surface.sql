-- The operator surface: paused and replayed states, the replay audit, topic pauses, views for
-- reading rows as text, and the SQL functions that `redrive replay`, `status` and `purge` share
-- with operators who work in SQL. docs/operators.md documents every object here.

-- States. paused: waiting, but skipped by workers until set back to pending (out of the claim
-- index, like dead rows). replayed: a dead row whose record `redrive replay --to-topic` produced
-- back to Kafka; kept, like a dead row, until purged.
ALTER TABLE redrive.retry_messages DROP CONSTRAINT retry_messages_state_check;
ALTER TABLE redrive.retry_messages ADD CONSTRAINT retry_messages_state_check
    CHECK (state IN ('pending', 'running', 'paused', 'dead', 'replayed'));
-- A replayed row keeps the time it died.
ALTER TABLE redrive.retry_messages DROP CONSTRAINT retry_messages_dead_at;
ALTER TABLE redrive.retry_messages ADD CONSTRAINT retry_messages_dead_at
    CHECK ((state IN ('dead', 'replayed')) = (dead_at IS NOT NULL));

-- The replay audit, next to replay_count, last_replayed_at and last_replayed_by.
ALTER TABLE redrive.retry_messages
    ADD COLUMN last_replay_reason text,
    -- Where `replay --to-topic` produced the record; NULL when the row was re-enqueued.
    ADD COLUMN replayed_to_topic  text;

-- Dead and replayed rows by time: the chunks of `redrive purge` (and of replay) walk it in order.
CREATE INDEX retry_messages_finished ON redrive.retry_messages (dead_at, id)
    WHERE state IN ('dead', 'replayed');

-- Topic pauses. While a topic is paused (for one consumer group, or for all with '*'), every row
-- of it that would become pending becomes paused instead: new failures, rescheduled attempts,
-- released claims, replays. redrive.pause() and redrive.resume() manage this table.
CREATE TABLE redrive.paused_topics (
    consumer_group text        NOT NULL DEFAULT '*',
    topic          text        NOT NULL,
    paused_at      timestamptz NOT NULL DEFAULT now(),
    paused_by      text        NOT NULL DEFAULT session_user,
    reason         text,
    PRIMARY KEY (consumer_group, topic)
);

-- Statement-level, so a batch of captured or completed rows costs one check, not one per row: an
-- empty pause table is all that most statements see.
CREATE FUNCTION redrive.hold_paused() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- The nested UPDATE below changes rows to paused only, so it ends the recursion here.
    IF EXISTS (SELECT 1 FROM redrive.paused_topics) AND EXISTS (SELECT 1 FROM changed WHERE state = 'pending') THEN
        UPDATE redrive.retry_messages r SET state = 'paused'
        FROM changed c
        WHERE r.id = c.id AND c.state = 'pending' AND r.state = 'pending'
          AND EXISTS (SELECT 1 FROM redrive.paused_topics p
                      WHERE p.topic = r.topic AND p.consumer_group IN (r.consumer_group, '*'));
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER retry_messages_hold_paused_insert
    AFTER INSERT ON redrive.retry_messages REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION redrive.hold_paused();
CREATE TRIGGER retry_messages_hold_paused_update
    AFTER UPDATE ON redrive.retry_messages REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION redrive.hold_paused();

-- Pauses a topic's retries: its pending rows become paused now, and later ones on arrival.
-- Rows being attempted right now finish their attempt. Returns how many rows were paused now.
CREATE FUNCTION redrive.pause(topic text, consumer_group text DEFAULT '*', reason text DEFAULT NULL)
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
      AND (pause.consumer_group = '*' OR r.consumer_group = pause.consumer_group);
    GET DIAGNOSTICS paused = ROW_COUNT;
    RETURN paused;
END
$$;

-- Resumes a topic: removes its pause ('*' removes the pauses of every group) and makes its paused
-- rows pending, due when they were due. Workers are woken by NOTIFY. Rows still covered by another
-- pause stay paused. Returns how many rows became pending.
CREATE FUNCTION redrive.resume(topic text, consumer_group text DEFAULT '*')
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    resumed bigint;
BEGIN
    DELETE FROM redrive.paused_topics p
    WHERE p.topic = resume.topic
      AND (resume.consumer_group = '*' OR p.consumer_group = resume.consumer_group);
    UPDATE redrive.retry_messages r SET state = 'pending', updated_at = now()
    WHERE r.topic = resume.topic AND r.state = 'paused'
      AND (resume.consumer_group = '*' OR r.consumer_group = resume.consumer_group)
      AND NOT EXISTS (SELECT 1 FROM redrive.paused_topics p
                      WHERE p.topic = r.topic AND p.consumer_group IN (r.consumer_group, '*'));
    GET DIAGNOSTICS resumed = ROW_COUNT;
    RETURN resumed;
END
$$;

-- Rows matching the filters of `redrive replay` and `redrive purge`. Every argument is optional
-- (NULL matches everything) and compared as a value, never as SQL. `key` matches the key's UTF-8
-- bytes; `error_contains` is a case-insensitive substring of last_error; `error_kinds` are
-- error_kind values (retryable, permanent, timeout). Use it in SQL too:
--   SELECT id, last_error FROM redrive.find(topics => '{orders}', error_contains => 'timeout');
CREATE FUNCTION redrive.find(
    states          text[]      DEFAULT '{dead}',
    ids             uuid[]      DEFAULT NULL,
    topics          text[]      DEFAULT NULL,
    consumer_groups text[]      DEFAULT NULL,
    key             text        DEFAULT NULL,
    error_contains  text        DEFAULT NULL,
    error_kinds     text[]      DEFAULT NULL,
    dead_since      timestamptz DEFAULT NULL,
    dead_before     timestamptz DEFAULT NULL)
RETURNS SETOF redrive.retry_messages LANGUAGE sql STABLE AS $$
    SELECT * FROM redrive.retry_messages r
    WHERE r.state = ANY (find.states)
      AND (find.ids IS NULL OR r.id = ANY (find.ids))
      AND (find.topics IS NULL OR r.topic = ANY (find.topics))
      AND (find.consumer_groups IS NULL OR r.consumer_group = ANY (find.consumer_groups))
      AND (find.key IS NULL OR r.key = convert_to(find.key, 'UTF8'))
      AND (find.error_contains IS NULL OR strpos(lower(r.last_error), lower(find.error_contains)) > 0)
      AND (find.error_kinds IS NULL OR r.error_kind = ANY (find.error_kinds))
      AND (find.dead_since IS NULL OR r.dead_at >= find.dead_since)
      AND (find.dead_before IS NULL OR r.dead_at < find.dead_before)
$$;

-- Re-enqueues dead rows: pending, due now, attempts back to 0 (a fresh budget; max_attempts can be
-- raised at the same time), the error history kept, the audit columns set. Rows that are not dead
-- are left alone. Returns the ids it re-enqueued. Replay by predicate with:
--   SELECT count(*) FROM redrive.replay(ARRAY(SELECT id FROM redrive.dead_messages WHERE ...));
CREATE FUNCTION redrive.replay(
    ids          uuid[],
    replayed_by  text    DEFAULT session_user,
    reason       text    DEFAULT NULL,
    max_attempts integer DEFAULT NULL)
RETURNS SETOF uuid LANGUAGE sql AS $$
    UPDATE redrive.retry_messages r
    SET state = 'pending', attempts = 0, max_attempts = coalesce(replay.max_attempts, r.max_attempts),
        next_attempt_at = now(), dead_at = NULL, dlq_published_at = NULL, dlq_topic = NULL,
        lease_expires_at = NULL, locked_by = NULL, updated_at = now(),
        replay_count = r.replay_count + 1, last_replayed_at = now(),
        last_replayed_by = replay.replayed_by, last_replay_reason = replay.reason,
        replayed_to_topic = NULL
    WHERE r.id = ANY (replay.ids) AND r.state = 'dead'
    RETURNING r.id
$$;

-- Successful attempts are deleted through this function, fenced like every completion (I3). It
-- runs as the schema owner, so the worker role needs no DELETE privilege and cannot purge (I5).
CREATE FUNCTION redrive.delete_succeeded(ids uuid[], attempts integer[])
RETURNS bigint LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH deleted AS (
        DELETE FROM redrive.retry_messages r
        USING unnest(delete_succeeded.ids, delete_succeeded.attempts) AS f(id, attempt)
        WHERE r.id = f.id AND r.attempts = f.attempt AND r.state = 'running'
        RETURNING 1)
    SELECT count(*) FROM deleted
$$;
REVOKE ALL ON FUNCTION redrive.delete_succeeded(uuid[], integer[]) FROM PUBLIC;

-- Every row, key and payload as text where they are valid UTF-8 (NULL otherwise; the bytes are in
-- key and payload).
CREATE VIEW redrive.messages AS
SELECT id, consumer_group, topic, "partition", kafka_offset, kafka_timestamp, state,
       redrive.utf8_or_null(key) AS key_text, redrive.utf8_or_null(payload) AS payload_text,
       attempts, max_attempts, next_attempt_at, lease_expires_at, locked_by,
       last_error, error_kind, error_history, first_failed_at, updated_at, dead_at,
       dlq_topic, dlq_published_at, replay_count, last_replayed_at, last_replayed_by,
       last_replay_reason, replayed_to_topic, key, payload, headers
FROM redrive.retry_messages;

-- Rows still to be attempted: pending (due or not), running, paused.
CREATE VIEW redrive.pending_messages AS
SELECT id, consumer_group, topic, "partition", kafka_offset, kafka_timestamp, state,
       redrive.utf8_or_null(key) AS key_text, redrive.utf8_or_null(payload) AS payload_text,
       attempts, max_attempts, next_attempt_at, state = 'pending' AND next_attempt_at <= now() AS due,
       lease_expires_at, locked_by, last_error, error_kind, error_history, first_failed_at,
       updated_at, replay_count, key, payload, headers
FROM redrive.retry_messages
WHERE state IN ('pending', 'running', 'paused');

-- The dead view of V1, with the new audit columns at the end.
CREATE OR REPLACE VIEW redrive.dead_messages AS
SELECT id, consumer_group, topic, "partition", kafka_offset, kafka_timestamp,
       redrive.utf8_or_null(key) AS key_text, redrive.utf8_or_null(payload) AS payload_text,
       key, payload, headers, attempts, max_attempts, last_error, error_kind, error_history,
       first_failed_at, dead_at, dlq_topic, dlq_published_at, replay_count, last_replayed_at, last_replayed_by,
       last_replay_reason
FROM redrive.retry_messages
WHERE state = 'dead';

-- One row per recorded failed attempt of the rows in the table (each keeps its last 10), newest
-- first within a row: the source of "top errors".
CREATE VIEW redrive.errors AS
SELECT r.id, r.consumer_group, r.topic, r.state,
       (e ->> 'at')::timestamptz AS at, (e ->> 'attempt')::integer AS attempt,
       e ->> 'kind' AS kind, e ->> 'error' AS error
FROM redrive.retry_messages r, jsonb_array_elements(r.error_history) AS e;
