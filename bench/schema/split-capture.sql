-- Capture into the queue split: the message row and its queue row, 500 of each per statement.
\set base random(1, 1000000000)
WITH m AS (
  INSERT INTO q_msg (id, consumer_group, topic, "partition", kafka_offset, kafka_timestamp, key, payload,
      max_attempts, last_error, error_kind, error_history)
  SELECT gen_random_uuid(), 'bench', 'bench-topic', i % 4, :base::int8 * 1000 + i, now(), convert_to(i::text, 'UTF8'),
         convert_to(repeat('x', 1024), 'UTF8'), 10, 'benchmark failure', 'retryable',
         jsonb_build_array(jsonb_build_object('at', n.at, 'attempt', 1, 'kind', 'retryable', 'error', 'benchmark failure'))
  FROM (SELECT to_jsonb(now()) AS at) AS n, generate_series(1, 500) i
  RETURNING id)
INSERT INTO q_queue (id, consumer_group, state, attempts, next_attempt_at)
SELECT id, 'bench', 'pending', 1, now() + make_interval(secs => 1) FROM m;
