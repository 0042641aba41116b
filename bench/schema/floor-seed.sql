-- The floors' tables: `scripts/bench.sh claim-floor`'s with N due rows, and `insert-floor`'s, empty.
DROP TABLE IF EXISTS floor_claim;
CREATE TABLE floor_claim (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, state text NOT NULL, due timestamptz NOT NULL, payload bytea);
CREATE INDEX ON floor_claim (due) WHERE state = 'pending';
INSERT INTO floor_claim (state, due, payload) SELECT 'pending', now(), convert_to(repeat('x', 1024), 'UTF8') FROM generate_series(1, :n);
VACUUM ANALYZE floor_claim;
DROP TABLE IF EXISTS floor_insert;
CREATE TABLE floor_insert (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, topic text, kafka_offset bigint, key bytea,
    payload bytea, headers jsonb, last_error text);
