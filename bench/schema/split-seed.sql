-- The queue split's two tables, seeded as seed.sql seeds redrive's.
DROP TABLE IF EXISTS q_msg, q_queue;
CREATE TABLE q_msg (id uuid PRIMARY KEY, consumer_group text NOT NULL, topic text NOT NULL, "partition" int NOT NULL, kafka_offset bigint NOT NULL,
  incarnation int NOT NULL DEFAULT 0, kafka_timestamp timestamptz, key bytea, payload bytea, headers jsonb NOT NULL DEFAULT '[]',
  max_attempts int NOT NULL, last_error text, error_kind text, error_history jsonb NOT NULL DEFAULT '[]', first_failed_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now(), dead_at timestamptz, dlq_published_at timestamptz, dlq_topic text, replay_count int NOT NULL DEFAULT 0,
  CONSTRAINT q_src UNIQUE (consumer_group, topic, "partition", kafka_offset, incarnation));
CREATE TABLE q_queue (id uuid PRIMARY KEY, consumer_group text NOT NULL, state text NOT NULL, attempts int NOT NULL, next_attempt_at timestamptz NOT NULL,
  lease_expires_at timestamptz, locked_by text, claim_token uuid);
CREATE INDEX ON q_queue (consumer_group, next_attempt_at) WHERE state = 'pending';
CREATE INDEX ON q_queue (consumer_group, lease_expires_at) WHERE state = 'running';
INSERT INTO q_msg (id, consumer_group, topic, "partition", kafka_offset, kafka_timestamp, key, payload, max_attempts, last_error, error_kind, error_history)
SELECT md5(i::text)::uuid, 'bench', 'bench-topic', (i % 4)::int, i, now(), convert_to(i::text,'UTF8'), convert_to(repeat('x', 1024), 'UTF8'), 10,
  'benchmark failure', 'retryable', jsonb_build_array(jsonb_build_object('at', now(), 'attempt', 1, 'kind', 'retryable', 'error', 'benchmark failure'))
FROM generate_series(1, :n + :inflight) i;
INSERT INTO q_queue (id, consumer_group, state, attempts, next_attempt_at, lease_expires_at, claim_token)
SELECT md5(i::text)::uuid, 'bench', CASE WHEN i <= :inflight THEN 'running' ELSE 'pending' END, 1, now() - interval '1 s',
  CASE WHEN i <= :inflight THEN now() + interval '1 hour' END, CASE WHEN i <= :inflight THEN gen_random_uuid() END
FROM generate_series(1, :n + :inflight) i;
VACUUM ANALYZE q_msg; VACUUM ANALYZE q_queue;
