-- V20: the successes' completion and the key lines' functions keep one plan per connection.
--
-- Since V18 redrive's sessions plan every statement with its values on each run
-- (`plan_cache_mode = force_custom_plan`), and the statements inside PL/pgSQL functions follow the
-- session's setting. Three functions on the path of every success paid for it on every call:
-- `redrive.delete_succeeded` (about 0.19 ms of planning), `redrive.release_lines`, which the
-- queue's trigger calls when rows in key lines leave (0.44 ms), and the `redrive.lock_lines` it
-- calls (0.09 ms). Dispatch in key lines, with completions of a few rows, spent more time planning
-- these than running them, and ran a quarter slower than before V18.
--
-- So each keeps one generic plan per connection, as `redrive.claim` does, and its statements are
-- written so that such a plan reads only their rows at any size of the tables, even when it was
-- made while they were nearly empty: the rows to change are named by `id = ANY (ARRAY(...))`,
-- which only the primary key answers once sequential scans are priced out. Joined to its rows
-- instead, as before, the release's plan made on a small table hashed or filtered the whole
-- primary key: 20,000 rows read to change one. `lock_lines` reads no table.

-- V19's body, with the message rows named by id.
CREATE OR REPLACE FUNCTION redrive.delete_succeeded(ids uuid[], tokens uuid[])
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET lock_timeout = '5s' SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    deleted bigint;
BEGIN
    PERFORM set_config('redrive.queue_in_step', 'on', true);
    WITH done AS (
        DELETE FROM redrive.queue q
        USING unnest(delete_succeeded.ids, delete_succeeded.tokens) AS f(id, token)
        WHERE q.id = ANY (delete_succeeded.ids) AND q.id = f.id AND q.claim_token = f.token
        RETURNING q.id)
    DELETE FROM redrive.retry_messages r WHERE r.id = ANY (ARRAY(SELECT d.id FROM done d));
    GET DIAGNOSTICS deleted = ROW_COUNT;
    PERFORM set_config('redrive.queue_in_step', 'off', true);
    RETURN deleted;
END
$$;

-- V11's body, with the rows to release named by id, and checked to be waiting still when another
-- transaction changed them first.
CREATE OR REPLACE FUNCTION redrive.release_lines(grp text[], topics text[], parts integer[], okeys bytea[])
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET enable_sort = off
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    released bigint;
BEGIN
    PERFORM redrive.lock_lines(grp, topics, parts, okeys);
    UPDATE redrive.retry_messages r SET state = 'pending', next_attempt_at = now(), updated_at = now()
    WHERE r.state = 'waiting' AND r.id = ANY (ARRAY(
        SELECT first.id
        FROM (SELECT DISTINCT u.g, u.t, u.p, u.k FROM unnest(grp, topics, parts, okeys) AS u(g, t, p, k)) l,
             LATERAL (SELECT w.id, w.state FROM redrive.retry_messages w
                      WHERE w.consumer_group = l.g AND w.topic = l.t AND w."partition" = l.p
                        AND w.order_key = l.k
                        AND (w.state IN ('pending', 'paused', 'waiting')
                             OR (w.state = 'dead' AND w.order_on_dead = 'block'))
                      ORDER BY w.kafka_offset
                      LIMIT 1) first
        WHERE first.state = 'waiting'));
    GET DIAGNOSTICS released = ROW_COUNT;
    RETURN released;
END
$$;

ALTER FUNCTION redrive.lock_lines(text[], text[], integer[], bytea[])
    SET plan_cache_mode = force_generic_plan;
