-- N due rows of 1 KiB on redrive's table, behind INFLIGHT rows held by a worker (running in the
-- queue, their leases an hour away), as a worker with that many slots busy would leave them. The
-- ids are ordered by time, as `Store::capture` makes them (UUIDv7).
INSERT INTO redrive.retry_messages (id, consumer_group, topic, "partition", kafka_offset, kafka_timestamp, key, payload,
    headers, state, attempts, max_attempts, next_attempt_at, last_error, error_kind, error_history, first_failed_at, updated_at)
SELECT (lpad(to_hex((extract(epoch FROM clock_timestamp()) * 1000)::int8), 12, '0') || '7'
        || lpad(to_hex(i), 7, '0') || substr(md5(i::text), 1, 12))::uuid,
       'bench', 'bench-topic', (i % 4)::int, i, now(), convert_to(i::text,'UTF8'),
       convert_to(repeat('x', 1024), 'UTF8'), '[]', 'pending', 1, 10,
       CASE WHEN i <= :inflight THEN now() - interval '1 hour' ELSE now() - interval '1 s' END,
       'benchmark failure', 'retryable',
       jsonb_build_array(jsonb_build_object('at', now(), 'attempt', 1, 'kind', 'retryable', 'error', 'benchmark failure')),
       now(), now()
FROM generate_series(1, :n + :inflight) i;
UPDATE redrive.queue SET state = 'running', attempts = 2, locked_by = 'w', claim_token = gen_random_uuid(),
    lease_expires_at = now() + interval '1 hour'
WHERE next_attempt_at < now() - interval '30 minutes';
VACUUM ANALYZE redrive.retry_messages;
VACUUM ANALYZE redrive.queue;
