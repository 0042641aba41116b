-- Hardening: no single record can stall the DLQ publisher, completions are fenced by a token that
-- belongs to one claim, and a reused offset does not pass for a redelivery. docs/operators.md documents every object here.

-- A dead row the DLQ broker refused for good (too large for the DLQ topic, an invalid topic name),
-- or a row whose stored message cannot be read back (headers written by hand, say). The publisher
-- records why and moves on; the row stays dead and in the table (I4). An operator who has fixed the
-- cause sets both columns back to NULL to publish it again, or replays the row.
ALTER TABLE redrive.retry_messages
    ADD COLUMN dlq_error      text,
    ADD COLUMN dlq_refused_at timestamptz,
    -- A fresh random value on every claim. A completion or a release is accepted only with the
    -- token of the claim it belongs to (I3, I11): attempt numbers repeat after a replay or a
    -- release, tokens do not.
    ADD COLUMN claim_token    uuid,
    -- Which message at these coordinates: 0, unless the topic was deleted and recreated (or its log
    -- truncated) and a different message came at an offset that already had a row. Then the new
    -- message is kept as the next incarnation instead of being taken for a redelivery (I2, I10).
    ADD COLUMN incarnation    integer NOT NULL DEFAULT 0 CHECK (incarnation >= 0);

ALTER TABLE redrive.retry_messages DROP CONSTRAINT retry_messages_source_key;
ALTER TABLE redrive.retry_messages ADD CONSTRAINT retry_messages_source_key
    UNIQUE (consumer_group, topic, "partition", kafka_offset, incarnation);

-- The outbox holds only rows the publisher may still send, so refused rows never sit at its head.
DROP INDEX redrive.retry_messages_dlq_outbox;
CREATE INDEX retry_messages_dlq_outbox ON redrive.retry_messages (consumer_group, dead_at)
    WHERE state = 'dead' AND dlq_published_at IS NULL AND dlq_refused_at IS NULL;

-- Successful attempts are deleted through this function, fenced on the claim token. It runs as the
-- schema owner, so the worker role needs no DELETE privilege and cannot purge (I5).
CREATE FUNCTION redrive.delete_succeeded(ids uuid[], tokens uuid[])
RETURNS bigint LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH deleted AS (
        DELETE FROM redrive.retry_messages r
        USING unnest(delete_succeeded.ids, delete_succeeded.tokens) AS f(id, token)
        WHERE r.id = f.id AND r.claim_token = f.token AND r.state = 'running'
        RETURNING 1)
    SELECT count(*) FROM deleted
$$;
REVOKE ALL ON FUNCTION redrive.delete_succeeded(uuid[], uuid[]) FROM PUBLIC;

-- The views of V2, with the new columns at the end.
CREATE OR REPLACE VIEW redrive.messages AS
SELECT id, consumer_group, topic, "partition", kafka_offset, kafka_timestamp, state,
       redrive.utf8_or_null(key) AS key_text, redrive.utf8_or_null(payload) AS payload_text,
       attempts, max_attempts, next_attempt_at, lease_expires_at, locked_by,
       last_error, error_kind, error_history, first_failed_at, updated_at, dead_at,
       dlq_topic, dlq_published_at, replay_count, last_replayed_at, last_replayed_by,
       last_replay_reason, replayed_to_topic, key, payload, headers, dlq_error, dlq_refused_at, incarnation
FROM redrive.retry_messages;

CREATE OR REPLACE VIEW redrive.dead_messages AS
SELECT id, consumer_group, topic, "partition", kafka_offset, kafka_timestamp,
       redrive.utf8_or_null(key) AS key_text, redrive.utf8_or_null(payload) AS payload_text,
       key, payload, headers, attempts, max_attempts, last_error, error_kind, error_history,
       first_failed_at, dead_at, dlq_topic, dlq_published_at, replay_count, last_replayed_at, last_replayed_by,
       last_replay_reason, dlq_error, dlq_refused_at, incarnation
FROM redrive.retry_messages
WHERE state = 'dead';
