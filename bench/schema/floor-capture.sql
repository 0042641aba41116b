-- The floor of `scripts/bench.sh insert-floor`: 500 rows as wide as a captured message per
-- statement, into a table with one index.
\set base random(1, 1000000000)
INSERT INTO floor_insert (topic, kafka_offset, key, payload, headers, last_error)
SELECT 'bench', :base::int8 * 1000 + i, convert_to(i::text, 'UTF8'), convert_to(repeat('x', 1024), 'UTF8'), '[]'::jsonb,
       'benchmark failure'
FROM generate_series(1, 500) i;
