-- V29: the dead and replayed rows of an error kind, read through an index of their own.
--
-- A permanent error dies at once (DESIGN §3), and once its cause is fixed the operator's command
-- is `redrive replay --error-kind permanent`. It walked every death from the oldest and tested each
-- row's kind, and its count read the whole table: at 10M dead rows, a dry run for the 1,000
-- permanent ones took 44 s with the table out of memory (BENCHMARKS.md, "An error kind's deaths
-- through an index of their own").
--
-- `retry_messages_finished_kind` holds the kind of each dead or replayed row, with its death time
-- and id. Rows that are pending or running are not in it, so capture and claims do not pay for it;
-- a death adds one entry.
CREATE INDEX retry_messages_finished_kind
    ON redrive.retry_messages (error_kind, dead_at, id)
    WHERE state IN ('dead', 'replayed') AND error_kind IS NOT NULL;

-- `redrive.find_oldest` as in V26, with a branch for the kinds after the groups': each kind's
-- oldest rows through the new index, bounded on both sides and ordered by it first, merged, as V25
-- does for a topic. A topic or a group named beside a kind still takes its own branch: the
-- operator names them to narrow a command, and their indexes came first.
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
    ELSIF find_oldest.error_kinds IS NOT NULL AND find_oldest.states <@ '{dead,replayed}' THEN
        -- Each kind's oldest rows, through `retry_messages_finished_kind`, merged, as above.
        RETURN QUERY
        SELECT m.* FROM (SELECT DISTINCT unnest(find_oldest.error_kinds) AS kind) k
        CROSS JOIN LATERAL (
            SELECT f.* FROM redrive.find(find_oldest.states, NULL, NULL, NULL, find_oldest.key,
                                         find_oldest.error_contains, NULL,
                                         find_oldest.dead_since, find_oldest.dead_before) f
            WHERE f.error_kind >= k.kind AND f.error_kind <= k.kind
              AND f.error_kind IS NOT NULL AND f.state IN ('dead', 'replayed')
              AND (find_oldest.with_unpublished OR f.state <> 'dead' OR f.dlq_published_at IS NOT NULL)
            ORDER BY f.error_kind, f.dead_at, f.id
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
