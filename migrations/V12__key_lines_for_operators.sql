-- V12: key lines for operators (I12): a view of the lines, and a replay that keeps their order.

-- One row per line that holds rows: its head, the row the
-- others wait behind (the lowest offset of the line), and how many rows wait behind it. A waiting
-- row finds what it waits behind by its (consumer_group, topic, "partition", order_key):
--
--   SELECT w.kafka_offset, l.head_offset, l.head_state
--   FROM redrive.retry_messages w JOIN redrive.key_lines l USING (consumer_group, topic, "partition", order_key)
--   WHERE w.state = 'waiting';
--
-- `needs_operator` marks a line held by a dead row (the `block` policy): it waits until that row is
-- replayed or purged. Reads only the rows in lines, through the lines' index.
CREATE VIEW redrive.key_lines AS
SELECT l.consumer_group, l.topic, l."partition", l.order_key,
       h.id AS head_id, h.kafka_offset AS head_offset, h.state AS head_state,
       h.state = 'dead' AS needs_operator, h.last_error AS head_error,
       redrive.utf8_or_null(h.key) AS key_text, h.key,
       l.waiting, l.last_offset
FROM (
    SELECT consumer_group, topic, "partition", order_key,
           count(*) FILTER (WHERE state = 'waiting') AS waiting,
           max(kafka_offset) AS last_offset
    FROM redrive.retry_messages
    WHERE order_key IS NOT NULL
      AND (state IN ('pending', 'paused', 'waiting') OR (state = 'dead' AND order_on_dead = 'block'))
    GROUP BY consumer_group, topic, "partition", order_key
) l
CROSS JOIN LATERAL (
    SELECT r.id, r.kafka_offset, r.state, r.last_error, r.key
    FROM redrive.retry_messages r
    WHERE r.consumer_group = l.consumer_group AND r.topic = l.topic
      AND r."partition" = l."partition" AND r.order_key = l.order_key
      AND (r.state IN ('pending', 'paused', 'waiting')
           OR (r.state = 'dead' AND r.order_on_dead = 'block'))
    ORDER BY r.kafka_offset
    LIMIT 1
) h;

-- Replay keeps a line's order. A replayed dead row that blocked its line is the line's first row
-- again, and is due now as before. A dead row that its line had skipped, replayed while the line
-- holds another row under way (a pending, paused or dead first row), waits in the line instead:
-- it is the lowest offset of the line, so it goes as soon as that row leaves. Of several rows of
-- one line replayed together, the lowest goes first and the others wait. The lines' locks are
-- taken first, as every change to a line does.
CREATE OR REPLACE FUNCTION redrive.replay(
    ids          uuid[],
    replayed_by  text    DEFAULT session_user,
    reason       text    DEFAULT NULL,
    max_attempts integer DEFAULT NULL)
RETURNS SETOF uuid LANGUAGE plpgsql AS $$
DECLARE
    l record;
BEGIN
    SELECT array_agg(r.consumer_group) AS grp, array_agg(r.topic) AS t,
           array_agg(r."partition") AS p, array_agg(r.order_key) AS k
    INTO l FROM redrive.retry_messages r
    WHERE r.id = ANY (replay.ids) AND r.state = 'dead' AND r.order_key IS NOT NULL;
    IF l.k IS NOT NULL THEN
        PERFORM redrive.lock_lines(l.grp, l.t, l.p, l.k);
    END IF;
    RETURN QUERY
    UPDATE redrive.retry_messages r
    SET state = CASE
            WHEN r.order_key IS NOT NULL AND (
                EXISTS (SELECT 1 FROM redrive.retry_messages o
                        WHERE o.consumer_group = r.consumer_group AND o.topic = r.topic
                          AND o."partition" = r."partition" AND o.order_key = r.order_key
                          AND o.id <> r.id
                          AND (o.state IN ('pending', 'paused')
                               OR (o.state = 'dead' AND o.order_on_dead = 'block')))
                OR EXISTS (SELECT 1 FROM redrive.retry_messages o
                           WHERE o.id = ANY (replay.ids) AND o.state = 'dead'
                             AND o.consumer_group = r.consumer_group AND o.topic = r.topic
                             AND o."partition" = r."partition" AND o.order_key = r.order_key
                             AND o.kafka_offset < r.kafka_offset))
            THEN 'waiting' ELSE 'pending' END,
        attempts = 0, max_attempts = coalesce(replay.max_attempts, r.max_attempts),
        next_attempt_at = now(), dead_at = NULL, dlq_published_at = NULL, dlq_topic = NULL,
        updated_at = now(), replay_count = r.replay_count + 1, last_replayed_at = now(),
        last_replayed_by = replay.replayed_by, last_replay_reason = replay.reason,
        replayed_to_topic = NULL
    WHERE r.id = ANY (replay.ids) AND r.state = 'dead'
    RETURNING r.id;
END
$$;
