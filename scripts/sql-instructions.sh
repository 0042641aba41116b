#!/usr/bin/env bash
# The instructions Postgres executes per row for capture's, dispatch's and a failed retry's
# statements, beside the floors of the first two, counted by valgrind's callgrind in one single-user
# backend: a count that does not move with the machine's speed or its other load, so two forms of a
# statement compare in one run each.
#   scripts/sql-instructions.sh [dispatch|capture|retry|all] [N]
# dispatch: N due rows (20,000 unless set) behind 400 held ones, claimed 100 at a time by
#   `redrive.claim` and deleted by `redrive.delete_succeeded`, against the claim floor's UPDATE and
#   DELETE (bench/schema/floor.sql's statements); each transaction commits, as the workers' do.
# retry: N due rows (10,000 unless set) behind 400 held ones, claimed 100 at a time by
#   `redrive.claim` and each failed by `redrive.fail_attempts`, rescheduled an hour on (the path of
#   a retry storm); no floor.
# capture: N rows (10,000 unless set) inserted 500 per statement by bench/schema/capture.sql,
#   against bench/schema/floor-capture.sql.
# BENCH_AFTER_MIGRATE_SQL, if set, is SQL run after `migrate`, as for `bench`: to count another form
# of a function.
# Each count is the backend's whole run less that of a run that only starts and stops, divided by N.
# The schema is migrated by the release `redrive` (built if needed) into a cluster of its own in a
# temporary directory, on REDRIVE_CALLGRIND_PORT (5497 unless set; the tests use 5432 and 5499);
# the statements then run in `postgres --single` under callgrind, without autovacuum. Needs
# Postgres's server binaries (scripts/postgres.sh installs them) and valgrind (installed from
# Debian's packages if missing).
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CASES="${1:-all}"
N_ARG="${2:-}"
PORT="${REDRIVE_CALLGRIND_PORT:-5497}"
SQL=bench/schema

die() { echo "sql-instructions: $*" >&2; exit 1; }
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else die "need root (or sudo) to run: $*"; fi
}
# Postgres refuses to run as root: as root, the cluster belongs to the postgres user.
as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

if ! command -v valgrind >/dev/null; then
  echo "sql-instructions: installing valgrind from Debian's packages" >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q valgrind >/dev/null \
    || die "apt-get install valgrind failed"
fi
BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
[[ -x "$BIN/postgres" ]] ||
  die "no Postgres server binaries in /usr/lib/postgresql/*/bin: run scripts/postgres.sh start"

export SQLX_OFFLINE="${SQLX_OFFLINE:-true}"
cargo build --release --bin redrive >&2
REDRIVE="$(pwd)/${CARGO_TARGET_DIR:-target}/release/redrive"

if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
  die "port $PORT is taken; set REDRIVE_CALLGRIND_PORT to a free one"
fi
WORK="$(mktemp -d)"
DATA="$WORK/data"
chmod 755 "$WORK"
[ "$(id -u)" = 0 ] && chown postgres "$WORK"
stop() { as_owner "$BIN/pg_ctl" -D "$DATA" stop -m immediate >/dev/null 2>&1 || true; }
trap 'stop; rm -rf "$WORK"' EXIT
URL="postgres://postgres@127.0.0.1:$PORT/bench"

# A new cluster with redrive's schema and SEED run with n = N and inflight = HELD, then stopped.
cluster() {
  local seed=$1 n=$2 held=$3
  stop
  rm -rf "$DATA"
  as_owner "$BIN/initdb" -D "$DATA" -A trust -U postgres >/dev/null
  as_owner "$BIN/pg_ctl" -D "$DATA" -w -l "$WORK/server.log" start \
    -o "-p $PORT -k $WORK -c listen_addresses=127.0.0.1 -c autovacuum=off" >/dev/null \
    || die "the cluster did not start on port $PORT; see its log: $(tail -3 "$WORK/server.log")"
  psql -q "${URL%/*}/postgres" -c "CREATE DATABASE bench" >/dev/null
  printf '[postgres]\nurl = "%s"\n' "$URL" >"$WORK/config.toml"
  REDRIVE_LOG=warn "$REDRIVE" --config "$WORK/config.toml" migrate >/dev/null
  psql -q "$URL" -v ON_ERROR_STOP=1 -v n="$n" -v inflight="$held" \
    -c "SET client_min_messages = warning" -f "$seed" >/dev/null
  if [[ -n "${BENCH_AFTER_MIGRATE_SQL:-}" ]]; then
    psql -q "$URL" -v ON_ERROR_STOP=1 -c "$BENCH_AFTER_MIGRATE_SQL" >/dev/null
  fi
  psql -q "$URL" -c "CHECKPOINT" >/dev/null
  as_owner "$BIN/pg_ctl" -D "$DATA" -w stop >/dev/null
}

# Instructions of one single-user backend running SCRIPT (commands end with a blank line).
instructions() {
  as_owner valgrind --tool=callgrind --callgrind-out-file="$WORK/callgrind.%p" \
    "$BIN/postgres" --single -j -D "$DATA" -c autovacuum=off bench \
    <"$1" >"$WORK/single.log" 2>"$WORK/valgrind.log"
  if grep -q 'ERROR:' "$WORK/single.log" "$WORK/valgrind.log"; then
    die "a statement failed: $(grep -h 'ERROR:' "$WORK/single.log" "$WORK/valgrind.log" | head -1)"
  fi
  grep -o 'Collected : [0-9]*' "$WORK/valgrind.log" | awk '{print $3}'
}

# Instructions per row of SCRIPT, which does ROWS rows' work and must leave LEFT rows, on a
# cluster made by `cluster SEED N HELD`.
per_row() {
  local seed=$1 n=$2 held=$3 script=$4 rows=$5 left=$6 empty loop
  printf 'SELECT 1;\n\n' >"$WORK/empty.sql"
  cluster "$seed" "$n" "$held"
  cp -a "$DATA" "$WORK/fresh"
  empty=$(instructions "$WORK/empty.sql")
  rm -rf "$DATA" && mv "$WORK/fresh" "$DATA"
  loop=$(instructions "$script")
  local remaining
  remaining=$(grep -o 'left_rows = "[0-9]*"' "$WORK/single.log" | grep -o '[0-9]*')
  [[ "$remaining" == "$left" ]] || die "$script left $remaining rows, not $left"
  awk -v e="$empty" -v l="$loop" -v n="$rows" 'BEGIN { printf "%.0f", (l - e) / n }'
}

dispatch() {
  local n=${N_ARG:-20000} redrive floor
  cat >"$WORK/dispatch.sql" <<'SQL'
DO $$ DECLARE ids uuid[]; tokens uuid[]; BEGIN LOOP
    SELECT array_agg(c.id), array_agg(c.claim_token) INTO ids, tokens
    FROM redrive.claim('bench', 100, 30, 'w', 0.04) c;
    EXIT WHEN ids IS NULL;
    COMMIT;
    PERFORM redrive.delete_succeeded(ids, tokens);
    COMMIT;
END LOOP; END $$;

SELECT count(*) AS left_rows FROM redrive.queue;

SQL
  cat >"$WORK/dispatch-floor.sql" <<'SQL'
DO $$ DECLARE ids bigint[]; BEGIN LOOP
    WITH c AS (UPDATE floor_claim f SET state = 'running'
               FROM (SELECT id FROM floor_claim WHERE state = 'pending' AND due <= now()
                     ORDER BY due LIMIT 100 FOR UPDATE SKIP LOCKED) d
               WHERE f.id = d.id RETURNING f.id, f.payload)
    SELECT array_agg(id) INTO ids FROM c;
    EXIT WHEN ids IS NULL;
    COMMIT;
    DELETE FROM floor_claim WHERE id = ANY (ids);
    COMMIT;
END LOOP; END $$;

SELECT count(*) AS left_rows FROM floor_claim;

SQL
  redrive=$(per_row "$SQL/seed.sql" "$n" 400 "$WORK/dispatch.sql" "$n" 400)
  floor=$(per_row "$SQL/floor-seed.sql" "$n" 0 "$WORK/dispatch-floor.sql" "$n" 0)
  report dispatch "$n" "$redrive" "$floor"
}

retry() {
  local n=${N_ARG:-10000} redrive
  cat >"$WORK/retry.sql" <<'SQL'
DO $$ DECLARE ids uuid[]; tokens uuid[]; attempts int[]; k int; BEGIN LOOP
    SELECT array_agg(c.id), array_agg(c.claim_token), array_agg(c.attempts), count(*)
    INTO ids, tokens, attempts, k
    FROM redrive.claim('bench', 100, 30, 'w', 0.04) c;
    EXIT WHEN ids IS NULL;
    COMMIT;
    PERFORM redrive.fail_attempts(ids, tokens, attempts, array_fill('pending'::text, ARRAY[k]),
        array_fill(3600::float8, ARRAY[k]), array_fill('benchmark failure'::text, ARRAY[k]),
        array_fill('retryable'::text, ARRAY[k]));
    COMMIT;
END LOOP; END $$;

SELECT count(*) AS left_rows FROM redrive.queue WHERE next_attempt_at < now() + interval '30 minutes';

SQL
  redrive=$(per_row "$SQL/seed.sql" "$n" 400 "$WORK/retry.sql" "$n" 400)
  printf 'retry, %d rows: redrive %d instructions per row (a claim and a failure each)\n' "$n" "$redrive"
}

capture() {
  local n=${N_ARG:-10000} redrive floor i
  ((n % 500 == 0)) || die "capture takes a multiple of 500 rows, not $n"
  : >"$WORK/capture.sql"
  : >"$WORK/capture-floor.sql"
  for ((i = 1; i <= n / 500; i++)); do
    grep -v '^\\set\|^--' "$SQL/capture.sql" | sed "s/:base::int8/$i::int8/" >>"$WORK/capture.sql"
    grep -v '^\\set\|^--' "$SQL/floor-capture.sql" | sed "s/:base::int8/$i::int8/" >>"$WORK/capture-floor.sql"
    printf '\n' | tee -a "$WORK/capture.sql" >>"$WORK/capture-floor.sql"
  done
  printf 'SELECT count(*) AS left_rows FROM redrive.queue;\n\n' >>"$WORK/capture.sql"
  printf 'SELECT count(*) - %d AS left_rows FROM floor_insert;\n\n' "$n" >>"$WORK/capture-floor.sql"
  # Both start from empty tables: the seeds are run for no rows.
  redrive=$(per_row "$SQL/seed.sql" 0 0 "$WORK/capture.sql" "$n" "$n")
  floor=$(per_row "$SQL/floor-seed.sql" 0 0 "$WORK/capture-floor.sql" "$n" 0)
  report capture "$n" "$redrive" "$floor"
}

report() {
  awk -v p="$1" -v n="$2" -v r="$3" -v f="$4" 'BEGIN {
    printf "%s, %d rows: redrive %d instructions per row, its floor %d (floor / redrive: %.2f)\n", p, n, r, f, f / r }'
}

case "$CASES" in
  dispatch) dispatch ;;
  capture) capture ;;
  retry) retry ;;
  all) dispatch; capture; retry ;;
  *) die "unknown case '$CASES': dispatch, capture, retry or all" ;;
esac
