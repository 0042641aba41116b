-- V13: the circuit breakers (I13) seen and held from Postgres.
--
-- Each running process decides its breakers' states from its own calls. These two tables let
-- operators see those states and override them: every process of the group reads the holds and
-- writes its states every few seconds (`redrive breaker status|open|close|release`).

-- Operators' holds. A hold names a consumer group ('*': every group) and a breaker: 'default' (the
-- breaker of every topic without a [breaker.topics."…"] entry), a topic that has such an entry, or
-- '*' (every breaker). 'open' keeps the breaker open: the consumer holds its topics back in Kafka
-- and the workers claim nothing of them, probes included. 'closed' keeps it closed whatever the
-- calls say. Without a hold the calls decide. Where several holds match a breaker, the one that
-- names its group comes first, then the one that names the breaker.
CREATE TABLE redrive.breaker_holds (
    consumer_group text        NOT NULL DEFAULT '*',
    breaker        text        NOT NULL DEFAULT '*',
    hold           text        NOT NULL CHECK (hold IN ('open', 'closed')),
    held_at        timestamptz NOT NULL DEFAULT now(),
    held_by        text        NOT NULL DEFAULT session_user,
    reason         text,
    PRIMARY KEY (consumer_group, breaker)
);

-- What each running process last reported of each of its breakers. A process writes its rows every
-- few seconds and on every change, and deletes them when it stops; a row that is not refreshed
-- belongs to a process that is gone (reported_at says since when). `decides` is true for a process
-- that consumes, whose breakers decide from the first deliveries it makes. A process that runs only
-- retry workers makes none, so its breakers follow the group's deciding processes instead: open
-- while any of them reports the same breaker open (and not held), so that an outage costs its rows
-- no attempts either, then half-open, to find out with probes of its own.
CREATE TABLE redrive.breaker_states (
    consumer_group text        NOT NULL,
    breaker        text        NOT NULL,
    process        text        NOT NULL,
    state          text        NOT NULL CHECK (state IN ('closed', 'open', 'half_open')),
    held           boolean     NOT NULL DEFAULT false,
    decides        boolean     NOT NULL DEFAULT true,
    since          timestamptz NOT NULL,
    cause          text,
    open_until     timestamptz,
    reported_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, breaker, process)
);

-- Holds a breaker open or closed. Running processes take the hold within a few seconds.
CREATE FUNCTION redrive.hold_breaker(hold text, breaker text DEFAULT '*', consumer_group text DEFAULT '*',
                                     reason text DEFAULT NULL)
RETURNS void LANGUAGE sql AS $$
    INSERT INTO redrive.breaker_holds (consumer_group, breaker, hold, reason)
    VALUES (hold_breaker.consumer_group, hold_breaker.breaker, hold_breaker.hold, hold_breaker.reason)
    ON CONFLICT ON CONSTRAINT breaker_holds_pkey
    DO UPDATE SET hold = EXCLUDED.hold, reason = EXCLUDED.reason, held_at = now(), held_by = session_user;
$$;

-- Lifts holds: the one on exactly this (group, breaker), or with '*' for either, every hold it
-- covers. The calls decide again, from a closed breaker. Returns how many holds were lifted.
CREATE FUNCTION redrive.release_breaker(breaker text DEFAULT '*', consumer_group text DEFAULT '*')
RETURNS bigint LANGUAGE sql AS $$
    WITH gone AS (
        DELETE FROM redrive.breaker_holds h
        WHERE (release_breaker.breaker = '*' OR h.breaker = release_breaker.breaker)
          AND (release_breaker.consumer_group = '*' OR h.consumer_group = release_breaker.consumer_group)
        RETURNING 1
    )
    SELECT count(*) FROM gone;
$$;
