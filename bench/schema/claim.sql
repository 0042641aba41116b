-- redrive's claim of up to 100 due rows (`redrive.claim`, as `Store::claim_ahead` calls it), then
-- the completer's fenced delete of the same rows through `redrive.delete_succeeded`.
WITH c AS (SELECT * FROM redrive.claim('bench', 100, 30, 'w', 0.04))
SELECT coalesce(array_agg(id), '{}')::text AS ids, coalesce(array_agg(claim_token), '{}')::text AS toks, sum(length(payload)) AS bytes FROM c \gset
SELECT redrive.delete_succeeded(:ids::uuid[], :toks::uuid[]);
