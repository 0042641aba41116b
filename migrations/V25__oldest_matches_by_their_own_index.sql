-- V25: `redrive.find_oldest`, the oldest rows a filter matches, read through the index of the
-- topic or group it names.
--
-- Each chunk of `redrive replay` and `redrive purge`, and the sample of their dry runs, took its
-- rows as `redrive.find(…) ORDER BY dead_at, id LIMIT n`. For a filter by topic or group the
-- planner may walk the deaths' index from the oldest and test each row, because it assumes the
-- matches are spread evenly through it: it expects to stop after n of them. When the matches are
-- the newest rows, as an incident's topic is in a table of older deaths, that walk reads nearly
-- the whole table, again for every chunk: a chunk of 1,000 rows of a topic of 20,000 read 981,781
-- rows of a table of a million (BENCHMARKS.md, "Replay's and purge's chunks read a topic's rows
-- through its own index").
--
-- `redrive.find_oldest` reads each named topic's rows (or, without topics, each named group's) in
-- the order of `retry_messages_finished_topic` (or `_group`) and merges them, so a chunk reads about
-- as many rows as it returns, whatever the statistics say. A list of ids is read by primary key.
-- Other filters (a key, an error's text or kind, death times) walk the deaths' index, as before:
-- no index serves them better. Its filters are `redrive.find`'s, and `with_unpublished` (false:
-- leave out dead rows the DLQ broker has not acknowledged) and `lim` (the most rows returned).
CREATE FUNCTION redrive.find_oldest(
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
