-- V28: a topic's rows are found through the source key, one group at a time.
--
-- The source key, `(consumer_group, topic, partition, kafka_offset, incarnation)`, is the only
-- index that holds the topic of every row. A statement that names a topic but no group could not
-- seek in it: Postgres read the whole index, or the whole table. At 10M dead and 1M pending rows,
-- `redrive.pause` of a topic with no pending row took 0.9 s with the table in memory and 16 s
-- without (BENCHMARKS.md, "Pausing a topic at 10M rows").
--
-- `redrive.consumer_groups()` lists the groups that have rows by a walk of the source key's first
-- column: one index probe per group, however many rows each has. Naming them beside the topic
-- lets a statement read each (group, topic) range of the index alone. That is the way for a
-- topic of few rows; for one of many, the rows it reads in the index's order cost more than reading
-- the table in its own (a topic of 1.1M rows: a pause took 7.0-7.8 s against 4.7-5.2 s).
-- `redrive.few_rows_of()` tells the two apart by counting the topic's index entries, up to a
-- bound.

CREATE FUNCTION redrive.consumer_groups() RETURNS text[] LANGUAGE sql STABLE AS $$
    SELECT ARRAY(
        WITH RECURSIVE g AS (
            (SELECT r.consumer_group FROM redrive.retry_messages r
             ORDER BY r.consumer_group LIMIT 1)
            UNION ALL
            SELECT (SELECT r.consumer_group FROM redrive.retry_messages r
                    WHERE r.consumer_group > g.consumer_group
                    ORDER BY r.consumer_group LIMIT 1)
            FROM g WHERE g.consumer_group IS NOT NULL)
        SELECT g.consumer_group FROM g WHERE g.consumer_group IS NOT NULL)
$$;

-- Whether the topics have at most 100,000 rows in the groups (every group when NULL), counted in
-- the source key up to one past that.
CREATE FUNCTION redrive.few_rows_of(topics text[], consumer_groups text[] DEFAULT NULL)
RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT count(*) <= 100000 FROM (
        SELECT FROM redrive.retry_messages r
        WHERE r.consumer_group = ANY (coalesce(few_rows_of.consumer_groups, redrive.consumer_groups()))
          AND r.topic = ANY (few_rows_of.topics)
        LIMIT 100001) s
$$;

-- V8's body, with the groups named when the topic has few rows. The groups are listed inside the
-- UPDATE, so it sees the same rows as before: a group whose first row commits while the pause runs
-- is in both or neither. CREATE OR REPLACE keeps the grants of sql/roles.sql.
CREATE OR REPLACE FUNCTION redrive.pause(topic text, consumer_group text DEFAULT '*', reason text DEFAULT NULL)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    paused bigint;
    groups text[] := CASE WHEN pause.consumer_group <> '*' THEN ARRAY[pause.consumer_group] END;
BEGIN
    INSERT INTO redrive.paused_topics (consumer_group, topic, reason)
    VALUES (pause.consumer_group, pause.topic, pause.reason)
    ON CONFLICT ON CONSTRAINT paused_topics_pkey
    DO UPDATE SET reason = EXCLUDED.reason, paused_at = now(), paused_by = session_user;
    IF redrive.few_rows_of(ARRAY[pause.topic], groups) THEN
        UPDATE redrive.retry_messages r SET state = 'paused', updated_at = now()
        WHERE r.consumer_group = ANY (coalesce(groups, redrive.consumer_groups()))
          AND r.topic = pause.topic AND r.state = 'pending'
          AND NOT EXISTS (SELECT 1 FROM redrive.queue q WHERE q.id = r.id AND q.state = 'running');
    ELSE
        UPDATE redrive.retry_messages r SET state = 'paused', updated_at = now()
        WHERE r.topic = pause.topic AND r.state = 'pending'
          AND (pause.consumer_group = '*' OR r.consumer_group = pause.consumer_group)
          AND NOT EXISTS (SELECT 1 FROM redrive.queue q WHERE q.id = r.id AND q.state = 'running');
    END IF;
    GET DIAGNOSTICS paused = ROW_COUNT;
    RETURN paused;
END
$$;
