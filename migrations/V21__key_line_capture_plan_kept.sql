-- V21: a capture in key lines keeps one plan per connection, as the completions do since V20.
--
-- The capture of a batch with key lines was a client statement, so since V18 it was planned with
-- its values on every run: about 0.6 ms of planning for a batch of about 140 rows, and
-- `capture-parked` ran a seventh slower than before V17. It is now a function whose statements
-- keep one generic plan per connection. That plan must read only the lines it asks about at any
-- size of the table, even when it was made while the table was nearly empty: sequential scans are
-- priced out, so a line is found through `retry_messages_key_line`, whose predicate is the
-- question's. The lines' locks are taken inside it, so the whole capture is one statement: the
-- locks first, then a statement with a snapshot of its own that sees every line as its last writer
-- left it (READ COMMITTED, as in V11). It runs as the caller, with the worker's grants
-- (sql/roles.sql); its statement is the client's, word for word.
CREATE FUNCTION redrive.capture_in_lines(
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
                       WHERE r.consumer_group = grp AND r.topic = u.topic
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
REVOKE ALL ON FUNCTION redrive.capture_in_lines(text, uuid[], text[], integer[], bigint[],
    timestamptz[], bytea[], bytea[], jsonb[], text[], integer[], float8[], text[], text[], bytea[],
    text[], text[], text[], text[], integer[]) FROM PUBLIC;
