-- What each part of redrive's table costs capture's statement, beside the INSERT floor, measured
-- inside one backend (scripts/capture-parts.sh). The rows are built once into arrays, 500 to a
-- batch as `Store::capture` sends them, so each loop times only the statements: capture's plain
-- INSERT (`Store::insert_new`, the same text with the arrays in place of its parameters) and the
-- floor's (`bench insert-floor`). Each loop is one transaction: commits are not timed.
\set ON_ERROR_STOP on
SET client_min_messages = warning;

-- 500 rows a batch: time-ordered ids (UUIDv7, as `Store::capture` makes them) and offsets.
CREATE TABLE parts_batches AS
SELECT b, array_agg(id ORDER BY i) AS ids, array_agg(b::int8 * 1000 + i ORDER BY i) AS offs
FROM (SELECT b, i, (lpad(to_hex((extract(epoch FROM clock_timestamp()) * 1000)::int8 + b), 12, '0')
                    || '7' || substr(md5(b || '/' || i), 1, 19))::uuid AS id
      FROM generate_series(1, :batches) b, generate_series(1, 500) i) s
GROUP BY b;

-- The columns alike in every batch: 1 KiB payloads, four partitions, one error.
CREATE TABLE parts_columns AS SELECT
    array_agg('bench-topic-' || md5('t')) AS topics, array_agg(i % 4) AS parts,
    array_agg(now()) AS ts, array_agg(convert_to(i::text, 'UTF8')) AS keys,
    array_agg(convert_to(repeat('x', 1024), 'UTF8')) AS payloads, array_agg('[]'::jsonb) AS headers,
    array_agg('pending'::text) AS states, array_agg(10) AS max_attempts,
    array_agg(3600 + (i % 32)::float8) AS retry_in, array_agg('benchmark failure'::text) AS errors,
    array_agg('retryable'::text) AS kinds, array_agg(NULL::text) AS traces, array_agg(1) AS entries
FROM generate_series(1, 500) i;

CREATE TABLE floor_insert (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic text, kafka_offset bigint, key bytea, payload bytea, headers jsonb, last_error text);

-- Seconds to write every batch: capture's statement (`what` = capture), or the floor's.
CREATE FUNCTION parts_time(what text) RETURNS float8 LANGUAGE plpgsql AS $$
DECLARE
    c parts_columns;
    r record;
    started timestamptz := clock_timestamp();
BEGIN
    SELECT * INTO c FROM parts_columns;
    FOR r IN SELECT * FROM parts_batches ORDER BY b LOOP
        IF what = 'capture' THEN
            INSERT INTO redrive.retry_messages (
                id, consumer_group, topic, "partition", kafka_offset, kafka_timestamp, key, payload,
                headers, state, attempts, max_attempts, next_attempt_at, last_error, error_kind,
                error_history, first_failed_at, updated_at, dead_at, trace_context)
            SELECT t.id, 'bench-group', t.topic, t.part, t.off, t.ts, t.key, t.payload,
                   t.headers, t.state, 1, t.max_attempts, now() + make_interval(secs => t.retry_in),
                   t.err, t.kind,
                   (SELECT array_agg(to_jsonb(ARRAY[ROW(now(), 1, e.kind, e.err)::redrive.history_entry])
                                     ORDER BY e.n)
                    FROM UNNEST(ARRAY['retryable'], ARRAY['benchmark failure']) WITH ORDINALITY AS e(kind, err, n))[t.entry],
                   now(), now(), CASE WHEN t.state = 'dead' THEN now() END, t.trace
            FROM UNNEST(r.ids, c.topics, c.parts, r.offs, c.ts, c.keys, c.payloads, c.headers,
                        c.states, c.max_attempts, c.retry_in, c.errors, c.kinds, c.traces, c.entries)
                 AS t(id, topic, part, off, ts, key, payload, headers, state, max_attempts,
                      retry_in, err, kind, trace, entry);
        ELSE
            INSERT INTO floor_insert (topic, kafka_offset, key, payload, headers, last_error)
            SELECT 'bench', o, k, p, '[]'::jsonb, 'benchmark failure'
            FROM unnest(r.offs, c.keys, c.payloads) AS u(o, k, p);
        END IF;
    END LOOP;
    RETURN extract(epoch FROM clock_timestamp() - started);
END
$$;
