-- N due rows of 1 KiB on redrive's table, behind INFLIGHT rows held by a worker (running, their
-- leases an hour away), as a worker with that many slots busy would leave them. :ff is the
-- fillfactor. With :hot = 1 held rows stay pending, with a claim token (for claim-hot.sql).
ALTER TABLE redrive.retry_messages SET (fillfactor = :ff);
INSERT INTO redrive.retry_messages (id, consumer_group, topic, "partition", kafka_offset, kafka_timestamp, key, payload,
    headers, state, attempts, max_attempts, next_attempt_at, last_error, error_kind, error_history, first_failed_at, updated_at, claim_token, lease_expires_at)
SELECT gen_random_uuid(), 'bench', 'bench-topic', (i % 4)::int, i, now(), convert_to(i::text,'UTF8'),
       convert_to(repeat('x', 1024), 'UTF8'), '[]', CASE WHEN i <= :inflight AND :hot = 0 THEN 'running' ELSE 'pending' END, 1, 10,
       CASE WHEN i <= :inflight THEN now() - interval '1 hour' ELSE now() - interval '1 s' END,
       'benchmark failure', 'retryable',
       jsonb_build_array(jsonb_build_object('at', now(), 'attempt', 1, 'kind', 'retryable', 'error', 'benchmark failure')),
       now(), now(),
       CASE WHEN i <= :inflight THEN gen_random_uuid() END,
       CASE WHEN i <= :inflight THEN now() + interval '1 hour' END
FROM generate_series(1, :n + :inflight) i;
VACUUM ANALYZE redrive.retry_messages;
