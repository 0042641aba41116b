-- V22: a key line is looked up through the lines' index alone, whatever the table's statistics.
--
-- Every question about a line (does it hold a row; which row is its first; which lines does a
-- partition hold) names its group, topic, partition and key. The lines' index
-- (`retry_messages_key_line`) answers it, and so does the source key, which begins with the same
-- three columns, with the key as a filter over every row of the partition. On a table that has
-- not been analyzed since it grew (`migrate` analyzes it empty), the planner estimates one row
-- either way and takes the smaller index: on a table of about 22,000 rows in lines that was the
-- source key. A capture with a key per message then read 45,000 rows per message (43 s for one
-- statement of 500), and `capture-keys` in `make bench` ran at 4,000 msg/s instead of 25,000.
--
-- So the lines' index is rebuilt on the group compared under the "C" collation, and every reader
-- of a line compares it so. The source key holds the group under the database's collation, which
-- is another collation for the planner even where the two sort alike, so it cannot answer that
-- comparison: only the lines' index can. Equality of text is the same under every deterministic
-- collation, so each reader finds the rows it found before.
--
-- The index also holds each row's state, so that `redrive status` can count a line's waiting rows
-- and tell whether its head is dead from the index alone, and read only the heads it lists: it
-- read every line's head before, 1.5 s at 100,000 lines. No update that was HOT stops being one:
-- one that changes a row's state never was, as the index's predicate names that column.
--
-- The build reads the whole table once, holding off writes to it (not reads) meanwhile.

CREATE INDEX retry_messages_key_line_c
    ON redrive.retry_messages (consumer_group COLLATE "C", topic, "partition", order_key, kafka_offset)
    INCLUDE (state)
    WHERE order_key IS NOT NULL
      AND (state IN ('pending', 'paused', 'waiting') OR (state = 'dead' AND order_on_dead = 'block'));
DROP INDEX redrive.retry_messages_key_line;
ALTER INDEX redrive.retry_messages_key_line_c RENAME TO retry_messages_key_line;

-- V21's body, with the line's probe under the index's collation.
CREATE OR REPLACE FUNCTION redrive.capture_in_lines(
    grp text, ids uuid[], topics text[], parts integer[], offs bigint[], tss timestamptz[],
    keys bytea[], vals bytea[], hdrs jsonb[], states text[], budgets integer[], delays float8[],
    errs text[], kinds text[], lines bytea[], on_deads text[], traces text[], entry_kinds text[],
    entry_errs text[], entry_of integer[])
RETURNS TABLE (captured_id uuid, line_open boolean) LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    PERFORM redrive.lock_lines(array_fill(grp, ARRAY[cardinality(ids)]), topics, parts, lines);
    RETURN QUERY
    WITH t AS (
        SELECT u.*, u.state = 'waiting' AS parked,
               u.line IS NOT NULL AND (
                   coalesce(bool_or(u.state <> 'waiting'
                                    AND (u.state <> 'dead' OR u.on_dead = 'block')) OVER (
                       PARTITION BY u.topic, u.part, u.line ORDER BY u.off
                       ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), false)
                   -- OFFSET 0 keeps this a probe of the line's index per row: as a hashed
                   -- subplan, Postgres read every row in every line of the group on each
                   -- statement (145 µs of CPU per parked row at 500,000).
                   OR EXISTS (
                       SELECT 1 FROM redrive.retry_messages r
                       WHERE r.consumer_group = grp COLLATE "C" AND r.topic = u.topic
                         AND r."partition" = u.part AND r.order_key = u.line
                         AND (r.state IN ('pending', 'paused', 'waiting')
                              OR (r.state = 'dead' AND r.order_on_dead = 'block'))
                       OFFSET 0)
               ) AS behind
        FROM unnest(ids, topics, parts, offs, tss, keys, vals, hdrs, states, budgets, delays, errs,
                    kinds, lines, on_deads, traces, entry_of)
             AS u(id, topic, part, off, ts, key, payload, headers, state, max_attempts,
                  retry_in, err, kind, line, on_dead, trace, entry)
    ), stored AS (
        INSERT INTO redrive.retry_messages (
            id, consumer_group, topic, "partition", kafka_offset, kafka_timestamp, key,
            payload, headers, state, attempts, max_attempts, next_attempt_at, last_error,
            error_kind, error_history, first_failed_at, updated_at, dead_at, order_key,
            order_on_dead, trace_context)
        SELECT t.id, grp, t.topic, t.part, t.off, t.ts, t.key, t.payload, t.headers,
               -- A dead row keeps its place in its line dead: a permanent error, or a row kept
               -- in its safe form, which must never be attempted (I10).
               CASE WHEN t.behind AND t.state <> 'dead' THEN 'waiting' ELSE t.state END,
               CASE WHEN t.parked THEN 0 ELSE 1 END, t.max_attempts,
               CASE WHEN t.parked THEN now() ELSE now() + make_interval(secs => t.retry_in) END,
               CASE WHEN NOT t.parked THEN t.err END, CASE WHEN NOT t.parked THEN t.kind END,
               -- The first history entry as in Store::insert_new: once per distinct error.
               CASE WHEN t.parked THEN '[]'::jsonb
                    ELSE (SELECT array_agg(to_jsonb(ARRAY[ROW(now(), 1, e.kind, e.err)::redrive.history_entry])
                                           ORDER BY e.n)
                          FROM unnest(entry_kinds, entry_errs) WITH ORDINALITY AS e(kind, err, n))[t.entry]
               END,
               now(), now(), CASE WHEN t.state = 'dead' THEN now() END, t.line, t.on_dead, t.trace
        FROM t
        WHERE t.behind OR NOT t.parked
        ON CONFLICT (consumer_group, topic, "partition", kafka_offset, incarnation) DO NOTHING
        RETURNING redrive.retry_messages.id
    )
    SELECT s.id, false FROM stored s
    UNION ALL
    SELECT t.id, true FROM t WHERE t.parked AND NOT t.behind;
END
$$;

-- V20's body, with each line's first row found under the index's collation.
CREATE OR REPLACE FUNCTION redrive.release_lines(grp text[], topics text[], parts integer[], okeys bytea[])
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET enable_sort = off
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    released bigint;
BEGIN
    PERFORM redrive.lock_lines(grp, topics, parts, okeys);
    UPDATE redrive.retry_messages r SET state = 'pending', next_attempt_at = now(), updated_at = now()
    WHERE r.state = 'waiting' AND r.id = ANY (ARRAY(
        SELECT first.id
        FROM (SELECT DISTINCT u.g, u.t, u.p, u.k FROM unnest(grp, topics, parts, okeys) AS u(g, t, p, k)) l,
             LATERAL (SELECT w.id, w.state FROM redrive.retry_messages w
                      WHERE w.consumer_group = l.g COLLATE "C" AND w.topic = l.t AND w."partition" = l.p
                        AND w.order_key = l.k
                        AND (w.state IN ('pending', 'paused', 'waiting')
                             OR (w.state = 'dead' AND w.order_on_dead = 'block'))
                      ORDER BY w.kafka_offset
                      LIMIT 1) first
        WHERE first.state = 'waiting'));
    GET DIAGNOSTICS released = ROW_COUNT;
    RETURN released;
END
$$;

-- V12's view, with each line's head found under the index's collation.
CREATE OR REPLACE VIEW redrive.key_lines AS
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
    WHERE r.consumer_group = l.consumer_group COLLATE "C" AND r.topic = l.topic
      AND r."partition" = l."partition" AND r.order_key = l.order_key
      AND (r.state IN ('pending', 'paused', 'waiting')
           OR (r.state = 'dead' AND r.order_on_dead = 'block'))
    ORDER BY r.kafka_offset
    LIMIT 1
) h;

-- V12's body, with a replayed row's line asked about under the index's collation.
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
                        WHERE o.consumer_group = r.consumer_group COLLATE "C" AND o.topic = r.topic
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
