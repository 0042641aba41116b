-- V11: key order (I12). The rows of one key of a topic that keeps key order form a line, in offset
-- order, per (consumer_group, topic, partition, key). Only the line's first row is attempted; the
-- rows behind it wait, in the new state `waiting`, outside the queue. When the first row leaves the
-- line (its retry succeeded, it was purged, replayed to a topic, or went dead with the `skip`
-- policy), the next waiting row becomes due at once.
--
-- A row is in its line while it is pending, paused or waiting, or dead with the `block` policy.
-- Rows of other topics have no line: their order_key is NULL and nothing here touches them.
--
-- Every change to a line takes the line's lock first (`redrive.lock_lines`), in one order, and
-- then looks at the line in a statement of its own. So a capture that parks a row behind the
-- first one, and a completion that takes the first one away, cannot both miss each other: the one
-- that locks second sees what the first committed. This holds under READ COMMITTED, the default,
-- which redrive uses.

-- The key's SHA-256 (a key may be megabytes; an index entry may not), and what a dead row does to
-- its line. Existing rows have neither, so there is nothing to validate.
ALTER TABLE redrive.retry_messages
    ADD COLUMN order_key bytea,
    ADD COLUMN order_on_dead text;
ALTER TABLE redrive.retry_messages ADD CONSTRAINT retry_messages_order
    CHECK ((order_key IS NULL) = (order_on_dead IS NULL) AND order_on_dead IN ('block', 'skip')) NOT VALID;

-- `waiting`: parked behind an earlier row of its key; never attempted while it waits. Every
-- existing row is in one of the states before.
ALTER TABLE redrive.retry_messages DROP CONSTRAINT retry_messages_state_check;
ALTER TABLE redrive.retry_messages ADD CONSTRAINT retry_messages_state_check
    CHECK (state IN ('pending', 'paused', 'waiting', 'dead', 'replayed')) NOT VALID;

-- The rows in a line, in line order: a capture asks whether a key has one, a release finds the
-- next, and a consumer that is given a partition reads the keys that are blocked.
CREATE INDEX retry_messages_key_line
    ON redrive.retry_messages (consumer_group, topic, "partition", order_key, kafka_offset)
    WHERE order_key IS NOT NULL
      AND (state IN ('pending', 'paused', 'waiting') OR (state = 'dead' AND order_on_dead = 'block'));

-- Takes the transaction-scoped lock of each line, in one order (by the lock's number), so two
-- writers of the same lines cannot deadlock. The two-key form keeps redrive's locks apart from an
-- application's one-key advisory locks; two lines whose numbers are alike only wait for each other.
CREATE FUNCTION redrive.lock_lines(grp text[], topics text[], parts integer[], okeys bytea[])
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(1919247474, l.h) FROM (
        SELECT DISTINCT hashtext(u.g || '/' || u.t || '/' || u.p || '/' || encode(u.k, 'hex')) AS h
        FROM unnest(grp, topics, parts, okeys) AS u(g, t, p, k)
        WHERE u.k IS NOT NULL
        ORDER BY 1) l;
END
$$;

-- For each given line whose first row is waiting, that row becomes due now. Returns how many did.
-- The rows come out of `waiting` through an UPDATE, so the queue's trigger puts them in the queue
-- and the wake-up trigger tells the workers.
CREATE FUNCTION redrive.release_lines(grp text[], topics text[], parts integer[], okeys bytea[])
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    released bigint;
BEGIN
    PERFORM redrive.lock_lines(grp, topics, parts, okeys);
    UPDATE redrive.retry_messages r SET state = 'pending', next_attempt_at = now(), updated_at = now()
    FROM (SELECT DISTINCT u.g, u.t, u.p, u.k FROM unnest(grp, topics, parts, okeys) AS u(g, t, p, k)) l,
         LATERAL (SELECT w.id, w.state FROM redrive.retry_messages w
                  WHERE w.consumer_group = l.g AND w.topic = l.t AND w."partition" = l.p
                    AND w.order_key = l.k
                    AND (w.state IN ('pending', 'paused', 'waiting')
                         OR (w.state = 'dead' AND w.order_on_dead = 'block'))
                  ORDER BY w.kafka_offset
                  LIMIT 1) first
    WHERE r.id = first.id AND first.state = 'waiting';
    GET DIAGNOSTICS released = ROW_COUNT;
    RETURN released;
END
$$;
REVOKE ALL ON FUNCTION redrive.release_lines(text[], text[], integer[], bytea[]) FROM PUBLIC;

-- The queue's trigger of V9, which now also releases lines: after a delete of rows that were in
-- lines (the fenced delete of a success included), and after an update that took rows out of
-- theirs (replayed to a topic, or dead with the `skip` policy). Rows of topics without key order
-- cost one look at the statement's rows.
CREATE OR REPLACE FUNCTION redrive.sync_queue() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    l record;
BEGIN
    IF TG_OP = 'DELETE' THEN
        -- `redrive.delete_succeeded` has taken its rows out of the queue already; their lines
        -- are released here all the same. (Releasing them in that function instead, from the
        -- rows its DELETE returns, cost dispatch more: 123,600 instructions per row against
        -- 119,800, and 117,800 before lines.)
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
    IF EXISTS (SELECT 1 FROM changed WHERE state = 'pending') THEN
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

