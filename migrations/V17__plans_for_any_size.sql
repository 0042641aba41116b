-- V17: the claim and the workers' wake-up keep their index paths however stale the queue's
-- statistics are.
--
-- `redrive.claim` plans its statements once per connection (V7, plan_cache_mode), with the
-- statistics of that moment. A queue analyzed while nearly empty (by `migrate`, or by autovacuum
-- between two retry storms) then grows by thousands of rows a second, and autovacuum analyzes it
-- again only after up to a minute. Until it does, the claim's plan is the one for an empty table:
-- a sequential scan and a sort of the whole queue to find the due rows, and a second sequential
-- scan for the rows it updates, on every claim. The wake-up's min() read every pending row of the
-- group the same way. Both ran once for each capture statement's NOTIFY, so a storm cost Postgres
-- work that grew with the queue.
--
-- With sequential scans, sorts and hash and merge joins priced out inside these functions, the
-- only plans left are the index paths that the queue's indexes were made for, whatever the
-- statistics say: the claim and the wake-up read the rows they return, and a few index pages.

ALTER FUNCTION redrive.claim(text, bigint, float8, text, float8)
    SET enable_seqscan = off
    SET enable_sort = off
    SET enable_hashjoin = off
    SET enable_mergejoin = off;

-- How long until `lead` seconds before the group's next row is due, or until its next lease
-- expires, by the database's clock; NULL when nothing is waiting. Each is the first row of its
-- index (`queue_claim`, `queue_leases`) in order, not a min() that a plan for a small table
-- computes by reading them all.
CREATE FUNCTION redrive.next_wake(grp text, lead float8) RETURNS float8
LANGUAGE plpgsql STABLE
SET enable_seqscan = off
SET enable_sort = off
AS $$
BEGIN
    RETURN extract(epoch FROM least(
        (SELECT q.next_attempt_at FROM redrive.queue q
          WHERE q.consumer_group = grp AND q.state = 'pending'
          ORDER BY q.next_attempt_at LIMIT 1) - make_interval(secs => lead),
        (SELECT q.lease_expires_at FROM redrive.queue q
          WHERE q.consumer_group = grp AND q.state = 'running'
          ORDER BY q.lease_expires_at LIMIT 1)) - now())::float8;
END
$$;
