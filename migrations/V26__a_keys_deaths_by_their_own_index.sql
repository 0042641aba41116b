-- V26: a key's dead and replayed rows, read through an index of their own.
--
-- `redrive replay --key K` (docs/operators.md's example of a customer's outage), its dry run and
-- `redrive purge --key K` walked the deaths' index from the oldest and tested each row's key: at
-- 10M dead rows, a dry run for one key took 5.4–8.0 s (BENCHMARKS.md, "A key's deaths through an
-- index of their own").
--
-- `retry_messages_finished_key` holds the first 256 bytes of the key of each dead or replayed row
-- that has one. A prefix, not the key: a B-tree entry has a size limit (about 2.7 KB) that a Kafka
-- key does not, and a death must never fail on its key. Rows that are pending or running are not in
-- it, so capture and claims do not pay for it; a death adds one entry.
CREATE INDEX retry_messages_finished_key
    ON redrive.retry_messages (substr(key, 1, 256), dead_at, id)
    WHERE state IN ('dead', 'replayed') AND key IS NOT NULL;

-- `redrive.find` as in V2, with the key's prefix compared too, so that a count of a key's dead rows
-- (a dry run's) and the console's pages can read them through the index.
CREATE OR REPLACE FUNCTION redrive.find(
    states          text[]      DEFAULT '{dead}',
    ids             uuid[]      DEFAULT NULL,
    topics          text[]      DEFAULT NULL,
    consumer_groups text[]      DEFAULT NULL,
    key             text        DEFAULT NULL,
    error_contains  text        DEFAULT NULL,
    error_kinds     text[]      DEFAULT NULL,
    dead_since      timestamptz DEFAULT NULL,
    dead_before     timestamptz DEFAULT NULL)
RETURNS SETOF redrive.retry_messages LANGUAGE sql STABLE AS $$
    SELECT * FROM redrive.retry_messages r
    WHERE r.state = ANY (find.states)
      AND (find.ids IS NULL OR r.id = ANY (find.ids))
      AND (find.topics IS NULL OR r.topic = ANY (find.topics))
      AND (find.consumer_groups IS NULL OR r.consumer_group = ANY (find.consumer_groups))
      AND (find.key IS NULL OR (r.key = convert_to(find.key, 'UTF8')
                                AND substr(r.key, 1, 256) = substr(convert_to(find.key, 'UTF8'), 1, 256)))
      AND (find.error_contains IS NULL OR strpos(lower(r.last_error), lower(find.error_contains)) > 0)
      AND (find.error_kinds IS NULL OR r.error_kind = ANY (find.error_kinds))
      AND (find.dead_since IS NULL OR r.dead_at >= find.dead_since)
      AND (find.dead_before IS NULL OR r.dead_at < find.dead_before)
$$;

-- `redrive.find_oldest` as in V25, with a branch for a key ahead of the topics' and groups': a
-- key's rows are usually far fewer than a topic's. Its prefix is bounded on both sides and the rows
-- are ordered by it first, for the reason V25 gives for a topic.
CREATE OR REPLACE FUNCTION redrive.find_oldest(
    states           text[]      DEFAULT '{dead}',
    ids              uuid[]      DEFAULT NULL,
    topics           text[]      DEFAULT NULL,
    consumer_groups  text[]      DEFAULT NULL,
    key              text        DEFAULT NULL,
    error_contains   text        DEFAULT NULL,
    error_kinds      text[]      DEFAULT NULL,
    dead_since       timestamptz DEFAULT NULL,
    dead_before      timestamptz DEFAULT NULL,
    with_unpublished boolean     DEFAULT true,
    lim              bigint      DEFAULT NULL)
RETURNS SETOF redrive.retry_messages LANGUAGE plpgsql STABLE AS $$
DECLARE
    prefix bytea := substr(convert_to(find_oldest.key, 'UTF8'), 1, 256);
BEGIN
    IF find_oldest.ids IS NOT NULL THEN
        -- The named rows, by primary key; OFFSET 0 keeps their order from choosing the plan.
        RETURN QUERY
        SELECT m.* FROM (
            SELECT f.* FROM redrive.find(find_oldest.states, find_oldest.ids, find_oldest.topics,
                                         find_oldest.consumer_groups, find_oldest.key,
                                         find_oldest.error_contains, find_oldest.error_kinds,
                                         find_oldest.dead_since, find_oldest.dead_before) f
            WHERE find_oldest.with_unpublished OR f.state <> 'dead' OR f.dlq_published_at IS NOT NULL
            OFFSET 0) m
        ORDER BY m.dead_at, m.id
        LIMIT find_oldest.lim;
    ELSIF find_oldest.key IS NOT NULL AND find_oldest.states <@ '{dead,replayed}' THEN
        -- The key's oldest rows, in the order of its part of `retry_messages_finished_key`.
        RETURN QUERY
        SELECT f.* FROM redrive.find(find_oldest.states, NULL, find_oldest.topics,
                                     find_oldest.consumer_groups, find_oldest.key,
                                     find_oldest.error_contains, find_oldest.error_kinds,
                                     find_oldest.dead_since, find_oldest.dead_before) f
        WHERE substr(f.key, 1, 256) >= prefix AND substr(f.key, 1, 256) <= prefix
          AND f.key IS NOT NULL AND f.state IN ('dead', 'replayed')
          AND (find_oldest.with_unpublished OR f.state <> 'dead' OR f.dlq_published_at IS NOT NULL)
        ORDER BY substr(f.key, 1, 256), f.dead_at, f.id
        LIMIT find_oldest.lim;
    ELSIF find_oldest.topics IS NOT NULL AND find_oldest.states <@ '{dead,replayed}' THEN
        -- Each topic's oldest rows, in the order of its part of `retry_messages_finished_topic`,
        -- merged. The topic is bounded on both sides rather than compared for equality, and the
        -- rows are ordered by it first: an equality would make it a constant of the plan, and the
        -- planner could then walk the deaths' index in the same order, testing each row's topic.
        -- The literal states match the index's predicate whatever the plan.
        RETURN QUERY
        SELECT m.* FROM (SELECT DISTINCT unnest(find_oldest.topics) AS topic) t
        CROSS JOIN LATERAL (
            SELECT f.* FROM redrive.find(find_oldest.states, NULL, NULL,
                                         find_oldest.consumer_groups, find_oldest.key,
                                         find_oldest.error_contains, find_oldest.error_kinds,
                                         find_oldest.dead_since, find_oldest.dead_before) f
            WHERE f.topic >= t.topic AND f.topic <= t.topic AND f.state IN ('dead', 'replayed')
              AND (find_oldest.with_unpublished OR f.state <> 'dead' OR f.dlq_published_at IS NOT NULL)
            ORDER BY f.topic, f.dead_at, f.id
            LIMIT find_oldest.lim) m
        ORDER BY m.dead_at, m.id
        LIMIT find_oldest.lim;
    ELSIF find_oldest.consumer_groups IS NOT NULL AND find_oldest.states <@ '{dead,replayed}' THEN
        -- Each group's oldest rows, through `retry_messages_finished_group`, merged, as above.
        RETURN QUERY
        SELECT m.* FROM (SELECT DISTINCT unnest(find_oldest.consumer_groups) AS grp) g
        CROSS JOIN LATERAL (
            SELECT f.* FROM redrive.find(find_oldest.states, NULL, NULL, NULL, find_oldest.key,
                                         find_oldest.error_contains, find_oldest.error_kinds,
                                         find_oldest.dead_since, find_oldest.dead_before) f
            WHERE f.consumer_group >= g.grp AND f.consumer_group <= g.grp
              AND f.state IN ('dead', 'replayed')
              AND (find_oldest.with_unpublished OR f.state <> 'dead' OR f.dlq_published_at IS NOT NULL)
            ORDER BY f.consumer_group, f.dead_at, f.id
            LIMIT find_oldest.lim) m
        ORDER BY m.dead_at, m.id
        LIMIT find_oldest.lim;
    ELSE
        RETURN QUERY
        SELECT f.* FROM redrive.find(find_oldest.states, NULL, find_oldest.topics,
                                     find_oldest.consumer_groups, find_oldest.key,
                                     find_oldest.error_contains, find_oldest.error_kinds,
                                     find_oldest.dead_since, find_oldest.dead_before) f
        WHERE find_oldest.with_unpublished OR f.state <> 'dead' OR f.dlq_published_at IS NOT NULL
        ORDER BY f.dead_at, f.id
        LIMIT find_oldest.lim;
    END IF;
END
$$;
