-- V19: a completion reads the rows it finishes by id, however many others run.
--
-- The completions (`redrive.delete_succeeded`, the failures' UPDATE, the release at shutdown)
-- named their rows by id and claim token, and by `state = 'running'` as well. That condition is
-- the lease index's predicate, so the planner could read the rows through the lease index instead:
-- every running row of every group, hashed against the batch. It did so whenever the statistics
-- were from a time when few rows ran (`migrate` analyzes the empty queue), for any number running:
-- a completion of 100 rows among 3,000 running read all 3,000, and one of 200 among 6,000 took
-- twice as long as reading its 200 by id.
--
-- A claim token is set only while a row runs, and the constraint below makes that a rule: the
-- token alone fences a completion (I3). So the completions drop the state condition, name their
-- rows with `id = ANY(...)` as well, and price out sequential scans, as the claim and the queue's
-- trigger do: only the primary key answers them, at any size of the queue. The failures' UPDATE
-- and the release were sent by the client, where nothing can price the scan out (the planner's
-- cost of 100 look-ups by key, at random_page_cost 4, is above that of reading a queue of 20,000
-- rows whole), so they are functions now, running as the caller with the worker's grants
-- (sql/roles.sql), their statements otherwise the client's.

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

-- Reschedules failed attempts or marks them dead, fenced on their claim tokens, each with its
-- error added to a history of the last 10. Returns the new state of each row it changed.
CREATE FUNCTION redrive.fail_attempts(ids uuid[], tokens uuid[], attempts integer[], states text[],
                                      retry_in float8[], errors text[], kinds text[])
RETURNS SETOF text LANGUAGE sql SET enable_seqscan = off AS $$
    WITH f AS (
        SELECT * FROM unnest(fail_attempts.ids, fail_attempts.tokens, fail_attempts.attempts,
                             fail_attempts.states, fail_attempts.retry_in, fail_attempts.errors,
                             fail_attempts.kinds)
             AS f(id, token, attempt, state, retry_in, err, kind)
    ), ended AS (
        UPDATE redrive.queue q
        SET state = 'pending', next_attempt_at = now() + make_interval(secs => f.retry_in),
            lease_expires_at = NULL, locked_by = NULL, claim_token = NULL
        FROM f
        WHERE q.id = ANY (fail_attempts.ids) AND q.id = f.id AND q.claim_token = f.token
        -- The completion's columns come along, so the rows are joined once: a second join to `f`
        -- was a nested loop over it (the planner takes UNNEST for 10 rows), half of this statement
        -- at 100 rows and growing with the square of the batch.
        RETURNING q.id, q.attempts, q.next_attempt_at, f.attempt, f.state, f.err, f.kind)
    UPDATE redrive.retry_messages r
    SET state = f.state, attempts = f.attempts, next_attempt_at = f.next_attempt_at,
        last_error = f.err, error_kind = f.kind, updated_at = now(),
        dead_at = CASE WHEN f.state = 'dead' THEN now() END,
        dlq_published_at = NULL, dlq_topic = NULL, dlq_error = NULL, dlq_refused_at = NULL,
        -- A history of fewer than 10 entries takes the new one on its end; only a full one (or one
        -- an operator rewrote into something else) is taken apart and cut to its last 10, which
        -- cost a fifth of this statement when done for every row.
        error_history = CASE
            WHEN (CASE WHEN jsonb_typeof(r.error_history) = 'array'
                       THEN jsonb_array_length(r.error_history) END) < 10
            THEN r.error_history || h.entry
            ELSE (
                SELECT jsonb_agg(e ORDER BY n) FROM (
                    SELECT e, n FROM jsonb_array_elements(r.error_history || h.entry)
                        WITH ORDINALITY AS all_of(e, n)
                    ORDER BY n DESC LIMIT 10) AS recent)
        END
    FROM ended f,
         LATERAL (SELECT jsonb_build_array(jsonb_build_object(
                      'at', now(), 'attempt', f.attempt, 'kind', f.kind, 'error', f.err))
                  AS entry) h
    WHERE r.id = f.id
    RETURNING r.state
$$;
REVOKE ALL ON FUNCTION redrive.fail_attempts(uuid[], uuid[], integer[], text[], float8[], text[], text[]) FROM PUBLIC;

-- Gives claimed-but-abandoned rows back: pending, due now (or when it was due, for a row claimed
-- ahead of that), the attempt returned; a row claimed by someone else since is left alone.
-- Returns how many it gave back.
CREATE FUNCTION redrive.release_claims(ids uuid[], tokens uuid[])
RETURNS bigint LANGUAGE sql SET enable_seqscan = off AS $$
    WITH released AS (
        UPDATE redrive.queue q
        SET state = 'pending', attempts = q.attempts - 1,
            next_attempt_at = greatest(q.next_attempt_at, now()), lease_expires_at = NULL,
            locked_by = NULL, claim_token = NULL
        FROM unnest(release_claims.ids, release_claims.tokens) AS f(id, token)
        WHERE q.id = ANY (release_claims.ids) AND q.id = f.id AND q.claim_token = f.token
        RETURNING q.id, q.attempts, q.next_attempt_at
    ), recorded AS (
        UPDATE redrive.retry_messages r
        SET attempts = q.attempts, next_attempt_at = q.next_attempt_at, updated_at = now()
        FROM released q
        WHERE r.id = q.id
        RETURNING 1)
    SELECT count(*) FROM recorded
$$;
REVOKE ALL ON FUNCTION redrive.release_claims(uuid[], uuid[]) FROM PUBLIC;
