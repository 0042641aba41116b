-- V23: a statement that changes many key lines at once locks their partitions, not each line.
--
-- `redrive.lock_lines` took one advisory lock per line, held to the end of the transaction. The
-- locks of every session share one table in Postgres's shared memory, of about
-- max_locks_per_transaction × max_connections entries (6,400 by default), with some room to spare.
-- An operator's statement that changed tens of thousands of key lines (a DELETE or an UPDATE of
-- rows in lines, which the queue's trigger follows with `redrive.release_lines`) failed with "out
-- of shared memory": the first rows of 30,000 lines did, of 8,000 did not. While it took its locks,
-- every other session of the cluster could fail the same way, redrive's captures and completions
-- among them.
--
-- Now a call that names more than 1,000 lines takes one exclusive lock per partition (group, topic,
-- partition) instead. Every other call takes a shared lock on each of its lines' partitions and
-- then the lines' own locks, as before. A writer of a line therefore still waits for any other
-- writer of that line, whichever of the two ways either took: the one that locks second sees what
-- the first committed (V11). Partition locks come before line locks, each kind in one order, so
-- the two kinds cannot deadlock each other. The cost of the coarse lock is that the large statement
-- waits for, and holds up, every change to any line of its partitions until its transaction ends;
-- redrive's own statements name at most a capture or completion batch of lines (500 and 200 by
-- default), and `redrive purge` and `replay` work in chunks of 1,000 rows.

CREATE OR REPLACE FUNCTION redrive.lock_lines(grp text[], topics text[], parts integer[], okeys bytea[])
RETURNS void LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    -- The lines' lock numbers, each once, in order.
    lines integer[] := ARRAY(
        SELECT DISTINCT hashtext(u.g || '/' || u.t || '/' || u.p || '/' || encode(u.k, 'hex'))
        FROM unnest(grp, topics, parts, okeys) AS u(g, t, p, k)
        WHERE u.k IS NOT NULL
        ORDER BY 1);
    -- Their partitions' lock numbers, each once, in order.
    partitions integer[];
BEGIN
    IF cardinality(lines) = 0 THEN
        RETURN;
    END IF;
    partitions := ARRAY(
        SELECT DISTINCT hashtext(u.g || '/' || u.t || '/' || u.p)
        FROM unnest(grp, topics, parts, okeys) AS u(g, t, p, k)
        WHERE u.k IS NOT NULL
        ORDER BY 1);
    IF cardinality(lines) > 1000 THEN
        PERFORM pg_advisory_xact_lock(1919247475, h) FROM unnest(partitions) AS h;
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock_shared(1919247475, h) FROM unnest(partitions) AS h;
    PERFORM pg_advisory_xact_lock(1919247474, h) FROM unnest(lines) AS h;
END
$$;
