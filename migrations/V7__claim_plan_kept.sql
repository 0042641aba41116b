-- V7: the claim keeps one plan for the session.
--
-- As a prepared statement the claim was planned again on every call: with `LIMIT $2` the generic
-- plan is costed for a tenth of the due rows, so Postgres always preferred a custom plan, whose
-- planning took 0.3-0.4 ms of a 100-row claim's 2.5-4 ms. The plan is the same either way (the
-- claim index in due order, then the rows by id), so this function forces the generic one, which
-- PL/pgSQL keeps for the session.
--
-- Claims up to `lim` rows of `grp` that are due within `ahead` seconds, earliest first, for a lease
-- of `lease` seconds counted from when each is due, and in the same statement rescues expired
-- leases (pending again, or dead when that was the last attempt). Returns each claimed row with
-- its message and how many seconds until it is due (0 when it is due already). The claim's commit
-- does not wait for its WAL flush: lost in a crash, the row is pending again and its completion is
-- refused by the token fence (I3). Runs as the caller, with the caller's privileges.
CREATE FUNCTION redrive.claim(grp text, lim bigint, lease float8, worker text, ahead float8)
RETURNS TABLE (id uuid, attempts integer, claim_token uuid, max_attempts integer, topic text,
               "partition" integer, kafka_offset bigint, kafka_timestamp timestamptz, key bytea,
               payload bytea, headers jsonb, first_failed_at timestamptz, wait float8)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    RETURN QUERY
    WITH rescued AS (
        UPDATE redrive.retry_messages r
        SET state = CASE WHEN r.attempts >= r.max_attempts THEN 'dead' ELSE 'pending' END,
            dead_at = CASE WHEN r.attempts >= r.max_attempts THEN now() END,
            next_attempt_at = now(), lease_expires_at = NULL, locked_by = NULL, claim_token = NULL,
            error_kind = 'timeout', updated_at = now(), dlq_published_at = NULL, dlq_topic = NULL,
            dlq_error = NULL, dlq_refused_at = NULL,
            last_error = format('lease expired: worker %s did not finish attempt %s',
                                coalesce(r.locked_by, '?'), r.attempts)
        WHERE r.id = ANY(ARRAY(
            SELECT m.id FROM redrive.retry_messages m
            WHERE m.consumer_group = grp AND m.state = 'running' AND m.lease_expires_at < now()
            LIMIT 1000
            FOR UPDATE SKIP LOCKED))
        RETURNING r.id
    )
    UPDATE redrive.retry_messages r
    SET state = 'running', attempts = r.attempts + 1, locked_by = worker, updated_at = now(),
        lease_expires_at = greatest(r.next_attempt_at, now()) + make_interval(secs => lease),
        claim_token = gen_random_uuid()
    WHERE r.id = ANY(ARRAY(
        SELECT m.id FROM redrive.retry_messages m
        WHERE m.consumer_group = grp AND m.state = 'pending'
          AND m.next_attempt_at <= now() + make_interval(secs => ahead)
        ORDER BY m.next_attempt_at
        LIMIT lim
        FOR UPDATE SKIP LOCKED))
    RETURNING r.id, r.attempts, r.claim_token, r.max_attempts, r.topic, r."partition",
              r.kafka_offset, r.kafka_timestamp, r.key, r.payload, r.headers, r.first_failed_at,
              greatest(extract(epoch FROM r.next_attempt_at - now()), 0)::float8;
END
$$;
