-- V18: the triggers read the rows they change however stale the tables' statistics are.
--
-- V17 gave the claim and the wake-up index paths that hold at any size. The statements around
-- them were still planned once per connection for the tables of that moment:
--   * a statement with parameters (`redrive.delete_succeeded`'s, the failures' UPDATE, the DLQ
--     outbox's) is planned anew for its first five runs, and then kept for good when the plan
--     without the values costs no more than those did, as it does on small tables;
--   * the triggers' statements have no parameters, so each connection plans them at their first
--     run and keeps that plan.
-- On tables that were empty or analyzed while nearly empty (by `migrate`, or by autovacuum before
-- a retry storm), those plans scan the tables whole. The tables then grow by thousands of rows a
-- second, and autovacuum analyzes them again only after up to a minute; until then every
-- completion batch, and every capture while a topic is paused, read both tables whole.
--
-- redrive's connections now plan each statement with parameters on every run, with its values
-- and the tables' sizes as they are (`plan_cache_mode`, set by the process). A trigger's
-- statements are planned once whatever that setting says, so here:
--   * `redrive.sync_queue` (the queue kept in step with `state`) prices out sequential scans: its
--     DELETE finds the rows it takes out of the queue through the queue's primary key;
--   * `redrive.hold_paused` (captured rows of a paused topic held) finds its rows by id, through
--     the primary key, instead of joining the transition table to the whole table, and prices
--     out sequential scans the same way;
--   * `redrive.next_wake` keeps one plan per connection: its index paths hold at any size (V17),
--     so planning it on every call would cost without changing it.

ALTER FUNCTION redrive.sync_queue() SET enable_seqscan = off;

ALTER FUNCTION redrive.next_wake(text, float8) SET plan_cache_mode = force_generic_plan;

CREATE OR REPLACE FUNCTION redrive.hold_paused() RETURNS trigger LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
BEGIN
    -- The nested UPDATE below changes rows to paused only, so it ends the recursion here.
    IF EXISTS (SELECT 1 FROM redrive.paused_topics) AND EXISTS (SELECT 1 FROM changed WHERE state = 'pending') THEN
        UPDATE redrive.retry_messages r SET state = 'paused'
        WHERE r.id = ANY (ARRAY(SELECT c.id FROM changed c WHERE c.state = 'pending'))
          AND r.state = 'pending'
          AND EXISTS (SELECT 1 FROM redrive.paused_topics p
                      WHERE p.topic = r.topic AND p.consumer_group IN (r.consumer_group, '*'));
    END IF;
    RETURN NULL;
END
$$;
