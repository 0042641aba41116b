-- The floor of `scripts/bench.sh claim-floor`: claim 100 rows of a narrow table, delete them.
WITH c AS (UPDATE floor_claim f SET state = 'running' FROM (SELECT id FROM floor_claim
   WHERE state = 'pending' AND due <= now() ORDER BY due LIMIT 100 FOR UPDATE SKIP LOCKED) d WHERE f.id = d.id RETURNING f.id, f.payload)
SELECT coalesce(array_agg(id), '{}')::text AS ids, sum(length(payload)) AS bytes FROM c \gset
DELETE FROM floor_claim WHERE id = ANY(:ids::bigint[]);
