-- V27: a message's large values are compressed with lz4, where this Postgres has it.
--
-- A value that makes its row wider than about 2 kB (an event of a few KiB, a long error) is
-- compressed as it is stored, with `pglz` unless a column says otherwise. For a JSON order event of
-- 8.7 kB, pglz cost capture twice the Postgres CPU of lz4 (147 against 74 µs per row) and held it
-- to 11,059 messages/s, against 19,215 with lz4; pglz stored the event in 2.7 kB, lz4 in 3.1 kB
-- (BENCHMARKS.md, "Large events compressed with lz4"). A row is written once and read a few times,
-- so redrive takes the faster method and the slightly larger rows.
--
-- Only values stored from now on use lz4: rows already in the table keep theirs, and both are
-- read alike. The change is to the catalog alone, and is instant whatever the table's size.
--
-- lz4 needs PostgreSQL 14 or later, built with it (`--with-lz4`; Debian's packages and the
-- official images are). Without it the values stay with pglz, and the migration says so. The
-- statement is run by EXECUTE, so that a Postgres too old to parse it reaches the warning too.
DO $$
BEGIN
    IF current_setting('server_version_num')::int < 140000 THEN
        RAISE WARNING 'redrive: PostgreSQL % cannot choose a column''s compression (14 can): large '
            'payloads, headers and errors stay compressed with pglz, which costs capture more CPU',
            current_setting('server_version');
        RETURN;
    END IF;
    EXECUTE 'ALTER TABLE redrive.retry_messages
        ALTER COLUMN payload SET COMPRESSION lz4,
        ALTER COLUMN key SET COMPRESSION lz4,
        ALTER COLUMN headers SET COMPRESSION lz4,
        ALTER COLUMN last_error SET COMPRESSION lz4,
        ALTER COLUMN error_history SET COMPRESSION lz4';
EXCEPTION WHEN feature_not_supported THEN
    RAISE WARNING 'redrive: this Postgres was built without lz4 (%): large payloads, headers and '
        'errors stay compressed with pglz, which costs capture more CPU', SQLERRM;
END
$$;
