-- V30: the DLQ outbox is read through an index of its own, whatever the statistics say.
--
-- The publisher locks the oldest unpublished dead rows of its group (`Store::outbox_batch`). Its
-- statement said `state = 'dead'`, which every index of dead rows also has in its predicate, and
-- the planner chose among them by the statistics. While many dead rows wait for the DLQ broker,
-- as in a storm of permanent errors or after a DLQ outage, the statistics say nearly every dead
-- row is unpublished, and the planner took `retry_messages_dead` (the smallest): it walked every
-- dead row already published, from the oldest, before the first it could send. Each round read
-- more than the one before; at 100,000 dead rows the publisher sent 1,944 rows/s and Postgres
-- spent 430 µs on each (BENCHMARKS.md, "The DLQ outbox read through its own index").
--
-- The new index's predicate compares the state under the "C" collation. Equality of text is the
-- same under every deterministic collation, so it holds the same rows, but the planner proves an
-- index's predicate from a statement's conditions only under the same collation. The outbox's
-- statements, which now compare the same way, can use this index and none of the indexes of dead
-- rows whose predicates compare under the default one; no other statement can use this one.
CREATE INDEX retry_messages_unpublished ON redrive.retry_messages (consumer_group, dead_at)
    WHERE state = 'dead' COLLATE "C" AND dlq_published_at IS NULL AND dlq_refused_at IS NULL;

-- V3's `retry_messages_dlq_outbox` stays: the builds before this one read the outbox through it,
-- and a rolling deploy runs them beside this one's. Without it their rounds, and their row gauges,
-- would read every dead row. It costs a death one more index entry; a later migration can drop it
-- once no build before V30 runs anywhere.
