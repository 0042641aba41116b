-- V12: the key lines for operators (I12). One row per line that holds rows: its head, the row the
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
