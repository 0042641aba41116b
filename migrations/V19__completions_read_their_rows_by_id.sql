-- V19: the completion of successes reads the rows it finishes by id, however many others run.
--
-- `redrive.delete_succeeded` names its rows by id and claim token, and said `state = 'running'`
-- as well. That condition is the lease index's predicate, so the planner could read the rows
-- through the lease index instead: every running row of every group, hashed against the batch. It
-- did so whenever the statistics were from a time when few rows ran (`migrate` analyzes the empty
-- queue), for any number running: a completion of 100 rows among 3,000 running read all 3,000,
-- and one of 200 among 6,000 took twice as long as reading its 200 by id.
--
-- A claim token is set only while a row runs, and the constraint below makes that a rule: the
-- token alone fences a completion (I3). So the DELETE drops the state condition, names its rows
-- with `id = ANY(...)` as well, and prices out sequential scans, as the claim and the queue's
-- trigger do: only the primary key answers it, at any size of the queue.

-- No row has a token outside a claim; any that did would have it taken away here.
UPDATE redrive.queue SET claim_token = NULL WHERE state <> 'running' AND claim_token IS NOT NULL;
ALTER TABLE redrive.queue ADD CONSTRAINT queue_token_only_while_running
    CHECK (state = 'running' OR claim_token IS NULL);

-- V9's body otherwise, with V16's lock timeout. CREATE OR REPLACE keeps the grants of sql/roles.sql.
CREATE OR REPLACE FUNCTION redrive.delete_succeeded(ids uuid[], tokens uuid[])
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET lock_timeout = '5s' SET enable_seqscan = off AS $$
DECLARE
    deleted bigint;
BEGIN
    PERFORM set_config('redrive.queue_in_step', 'on', true);
    WITH done AS (
        DELETE FROM redrive.queue q
        USING unnest(delete_succeeded.ids, delete_succeeded.tokens) AS f(id, token)
        WHERE q.id = ANY (delete_succeeded.ids) AND q.id = f.id AND q.claim_token = f.token
        RETURNING q.id)
    DELETE FROM redrive.retry_messages r USING done d WHERE r.id = d.id;
    GET DIAGNOSTICS deleted = ROW_COUNT;
    PERFORM set_config('redrive.queue_in_step', 'off', true);
    RETURN deleted;
END
$$;
