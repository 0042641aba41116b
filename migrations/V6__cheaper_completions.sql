-- V6: successful attempts deleted without planning the DELETE on every call.

-- Same contract as V3's: deletes the running rows whose claim tokens match, as the schema owner,
-- and returns how many. A non-inlined SQL function plans its statement on each call, which cost
-- more than the DELETE itself; PL/pgSQL keeps the plan for the session. CREATE OR REPLACE keeps the
-- grants of sql/roles.sql.
CREATE OR REPLACE FUNCTION redrive.delete_succeeded(ids uuid[], tokens uuid[])
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    deleted bigint;
BEGIN
    DELETE FROM redrive.retry_messages r
    USING unnest(delete_succeeded.ids, delete_succeeded.tokens) AS f(id, token)
    WHERE r.id = f.id AND r.claim_token = f.token AND r.state = 'running';
    GET DIAGNOSTICS deleted = ROW_COUNT;
    RETURN deleted;
END
$$;
