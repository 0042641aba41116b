-- Capture as redrive writes it (the plain INSERT of `Store::capture`), 500 rows of 1 KiB per
-- statement; the rows are made in SQL instead of sent as arrays, alike for every layout. Their ids
-- are ordered by time, as `Store::capture` makes them (UUIDv7: milliseconds, then random bits).
\set base random(1, 1000000000)
INSERT INTO redrive.retry_messages (
    id, consumer_group, topic, "partition", kafka_offset, kafka_timestamp, key, payload,
    headers, state, attempts, max_attempts, next_attempt_at, last_error, error_kind,
    error_history, first_failed_at, updated_at, dead_at)
SELECT (lpad(to_hex((extract(epoch FROM clock_timestamp()) * 1000)::int8), 12, '0') || '7'
        || substr(md5(random()::text || i), 1, 19))::uuid,
       'bench', 'bench-topic', i % 4, :base::int8 * 1000 + i, now(), convert_to(i::text, 'UTF8'),
       convert_to(repeat('x', 1024), 'UTF8'), '[]', 'pending', 1, 10, now() + make_interval(secs => 1),
       'benchmark failure', 'retryable',
       to_jsonb(ARRAY[ROW(now(), 1, 'retryable', 'benchmark failure')::redrive.history_entry]),
       now(), now(), NULL
FROM generate_series(1, 500) i;
