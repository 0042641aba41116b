-- V10: the type of one entry of `error_history`, so a statement can make entries without
-- `jsonb_build_object`. That function takes its arguments as "any" and looks up each one's type on
-- every call: for capture's first entry it cost about 23,000 instructions per row, a sixth of the
-- insert, and `to_jsonb` of this type about 13,000. The entries are the same jsonb values as before.
CREATE TYPE redrive.history_entry AS (
    "at"    timestamptz,
    attempt integer,
    kind    text,
    error   text
);
