-- V24: a failure's completion does not write its queue rows twice.
--
-- `redrive.fail_attempts` reschedules its rows in the queue first (fenced on their claim tokens),
-- then updates the message rows to match. The queue's trigger then upserted a queue row for every
-- message row left pending: an INSERT … ON CONFLICT whose update changed nothing, since the queue
-- rows already held the same due time. It was 6 % of the instructions of a claim and its failure
-- (BENCHMARKS.md, "A failure's completion without its trigger's no-op upsert").
--
-- So the function now says that its rows are in step already, with a flag of its own
-- (`redrive.queue_rescheduled`), and the trigger skips that upsert. It is not V9's
-- `redrive.queue_in_step`: that one stays on while `redrive.delete_succeeded`'s rows release the
-- key lines behind them, and those updates need their upserts. The flag is used once: the trigger
-- clears it at the first UPDATE it follows, which is the function's own (its UPDATE of the queue
-- fires no trigger). The updates that trigger then makes itself (the rows of key lines released,
-- rows of paused topics held) and any later statement of the transaction upsert as before, since
-- their rows change state and need their queue rows. Rows the statement made dead still leave the
-- queue, and the lines behind them are still released.

-- V11's body, with the flag read in the UPDATE branch. The settings are V11's and V18's.
CREATE OR REPLACE FUNCTION redrive.sync_queue() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET enable_seqscan = off AS $$
DECLARE
    l record;
BEGIN
    IF TG_OP = 'DELETE' THEN
        -- `redrive.delete_succeeded` has taken its rows out of the queue already; their lines
        -- are released here all the same.
        IF current_setting('redrive.queue_in_step', true) IS DISTINCT FROM 'on' THEN
            DELETE FROM redrive.queue q WHERE q.id = ANY (ARRAY(SELECT g.id FROM gone g));
        END IF;
        SELECT array_agg(g.consumer_group) AS grp, array_agg(g.topic) AS t,
               array_agg(g."partition") AS p, array_agg(g.order_key) AS k
        INTO l FROM gone g WHERE g.order_key IS NOT NULL;
        IF l.k IS NOT NULL THEN
            PERFORM redrive.release_lines(l.grp, l.t, l.p, l.k);
        END IF;
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        -- A new row cannot be in the queue yet: a plain INSERT costs less than one with ON CONFLICT.
        INSERT INTO redrive.queue (id, consumer_group, attempts, next_attempt_at)
        SELECT c.id, c.consumer_group, c.attempts, c.next_attempt_at FROM changed c WHERE c.state = 'pending';
        RETURN NULL;
    END IF;
    DELETE FROM redrive.queue q
    WHERE q.id = ANY (ARRAY(SELECT c.id FROM changed c WHERE c.state <> 'pending'));
    IF current_setting('redrive.queue_rescheduled', true) = 'on' THEN
        -- `redrive.fail_attempts` has put its pending rows' queue rows in step already.
        PERFORM set_config('redrive.queue_rescheduled', 'off', true);
    ELSIF EXISTS (SELECT 1 FROM changed WHERE state = 'pending') THEN
        INSERT INTO redrive.queue AS q (id, consumer_group, attempts, next_attempt_at)
        SELECT c.id, c.consumer_group, c.attempts, c.next_attempt_at FROM changed c WHERE c.state = 'pending'
        ON CONFLICT (id) DO UPDATE SET next_attempt_at = EXCLUDED.next_attempt_at
        WHERE q.state = 'pending' AND q.next_attempt_at IS DISTINCT FROM EXCLUDED.next_attempt_at;
    END IF;
    SELECT array_agg(c.consumer_group) AS grp, array_agg(c.topic) AS t,
           array_agg(c."partition") AS p, array_agg(c.order_key) AS k
    INTO l FROM changed c
    WHERE c.order_key IS NOT NULL
      AND (c.state = 'replayed' OR (c.state = 'dead' AND c.order_on_dead = 'skip'));
    IF l.k IS NOT NULL THEN
        PERFORM redrive.release_lines(l.grp, l.t, l.p, l.k);
    END IF;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION redrive.sync_queue() FROM PUBLIC;

-- V19's body, with the flag set before its UPDATE of the message rows. CREATE OR REPLACE keeps the
-- grants of sql/roles.sql.
CREATE OR REPLACE FUNCTION redrive.fail_attempts(ids uuid[], tokens uuid[], attempts integer[], states text[],
                                                 retry_in float8[], errors text[], kinds text[])
RETURNS SETOF text LANGUAGE sql SET enable_seqscan = off AS $$
    SELECT set_config('redrive.queue_rescheduled', 'on', true);
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
        RETURNING q.id, q.attempts, q.next_attempt_at, f.attempt, f.state, f.err, f.kind)
    UPDATE redrive.retry_messages r
    SET state = f.state, attempts = f.attempts, next_attempt_at = f.next_attempt_at,
        last_error = f.err, error_kind = f.kind, updated_at = now(),
        dead_at = CASE WHEN f.state = 'dead' THEN now() END,
        dlq_published_at = NULL, dlq_topic = NULL, dlq_error = NULL, dlq_refused_at = NULL,
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
