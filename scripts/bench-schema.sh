#!/usr/bin/env bash
# Capture's and dispatch's SQL alone, on redrive's table and on other layouts of it, beside their
# floors: what a schema change could gain, without building it. Every layout starts from a fresh
# database. Capture: one pgbench client inserts N rows of 1 KiB, 500 per statement, as
# `Store::capture` does (rows made in SQL, their ids ordered by time). Dispatch: 4 clients each
# claim up to 100 due rows and delete them, as the workers and the completer do, until N rows are
# done; the due rows sit behind INFLIGHT rows held by a worker. Prepared statements throughout. Prints
# rows/s and Postgres's CPU per row (every local postgres process), median and range of
# BENCH_RUNS interleaved rounds (3 unless set), and each layout's ratio to the floor.
#   scripts/bench-schema.sh [N]    or make bench-schema    (N = 100,000 unless set, a multiple of 500;
#                                                          INFLIGHT = 400 unless set)
# Layouts (LAYOUTS picks some, space-separated):
#   redrive        the schema as redrive writes and claims it today (V8: the queue of its own)
#   no-source-key  without its unique source key (which the dedupe of I2 needs: a bound)
#   no-triggers    with the wake-up and pause triggers disabled (which redrive needs: a bound);
#                  the triggers that keep the queue in step stay
#   row-alone      capture only: the message table with its primary key and nothing else (no
#                  queue row, no source key, no other index, check or trigger): what writing the
#                  message row alone costs, the bound of any layout that stores it
#   floor          the floors of `scripts/bench.sh insert-floor` and `claim-floor`
# BENCHMARKS.md has the figures of layouts measured before V8 (a HOT claim; the queue split, which
# V8 built).
# Needs the services from `make services`; pgbench comes with Debian's postgresql package.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/median.sh
N="${1:-100000}"
RUNS="${BENCH_RUNS:-3}"
# Capture writes 500 rows a transaction, so N counts whole transactions.
((N > 0 && N % 500 == 0)) || { echo "bench-schema: N must be a positive multiple of 500, not $N" >&2; exit 2; }
INFLIGHT="${INFLIGHT:-400}"
BASE="$(scripts/postgres.sh url)"
DB=redrive_bench_schema
URL="${BASE%/*}/$DB"
SQL=bench/schema
export SQLX_OFFLINE="${SQLX_OFFLINE:-true}"
cargo build --release --bin redrive >&2
REDRIVE="${CARGO_TARGET_DIR:-target}/release/redrive"
CONFIG="$(mktemp)" LOG="$(mktemp)"
trap 'rm -f "$CONFIG" "$LOG"' EXIT
printf '[postgres]\nurl = "%s"\n' "$URL" >"$CONFIG"
TICK_US=$((1000000 / $(getconf CLK_TCK)))

# CPU ticks of every postgres process, the exited backends included (the postmaster's cutime).
postgres_ticks() {
  local total=0 rest stat f
  for stat in /proc/[0-9]*/stat; do
    read -r rest 2>/dev/null <"$stat" || continue
    [[ "$rest" == *"(postgres) "* ]] || continue
    rest="${rest##*) }"
    read -r -a f <<<"$rest"
    total=$((total + f[11] + f[12] + f[13] + f[14]))
  done
  echo "$total"
}

# CPU ticks and wall time of one pgbench run: "rows/s µs-per-row" for ROWS rows.
timed() {
  local rows=$1 before start end after
  shift
  before=$(postgres_ticks)
  start=$(date +%s.%N)
  timeout 600 pgbench -n -M prepared "$@" "$URL" >"$LOG" 2>&1 ||
    { echo "bench-schema: pgbench $* failed or passed 10 minutes:" >&2; tail -5 "$LOG" >&2; exit 1; }
  end=$(date +%s.%N)
  after=$(postgres_ticks)
  awk -v d="$rows" -v s="$start" -v e="$end" -v t=$(((after - before) * TICK_US)) \
    'BEGIN { printf "%.0f %.0f", d / (e - s), t / d }'
}

# One layout on a fresh database: capture N rows, then dispatch N rows.
# Prints "capture-rows/s capture-µs dispatch-rows/s dispatch-µs".
run() {
  local layout=$1 seed=seed.sql capture=capture.sql script=claim.sql alter=""
  local table=redrive.queue
  case "$layout" in
    redrive) ;;
    no-source-key) alter="ALTER TABLE redrive.retry_messages DROP CONSTRAINT retry_messages_source_key" ;;
    no-triggers)
      local t
      for t in hold_paused_insert hold_paused_update notify_insert notify_update; do
        alter+="ALTER TABLE redrive.retry_messages DISABLE TRIGGER retry_messages_$t;"
      done
      ;;
    row-alone)
      alter="ALTER TABLE redrive.retry_messages DISABLE TRIGGER USER;
        DO \$\$ DECLARE o record; BEGIN
          FOR o IN SELECT conname FROM pg_constraint
                   WHERE conrelid = 'redrive.retry_messages'::regclass AND contype IN ('c', 'u') LOOP
            EXECUTE format('ALTER TABLE redrive.retry_messages DROP CONSTRAINT %I', o.conname);
          END LOOP;
          FOR o IN SELECT indexrelid::regclass AS i FROM pg_index
                   WHERE indrelid = 'redrive.retry_messages'::regclass AND NOT indisprimary LOOP
            EXECUTE format('DROP INDEX %s', o.i);
          END LOOP;
        END \$\$"
      ;;
    floor) seed=floor-seed.sql capture=floor-capture.sql script=floor.sql table=floor_claim ;;
  esac
  scripts/fresh-db.sh "$DB" >/dev/null
  REDRIVE_LOG=warn "$REDRIVE" --config "$CONFIG" migrate >/dev/null
  [[ -n "$alter" ]] && psql -q "$URL" -v ON_ERROR_STOP=1 -c "$alter" >/dev/null
  seed() {
    psql -q "$URL" -v ON_ERROR_STOP=1 -v n="$1" -v inflight="$2" \
      -c "SET client_min_messages = warning" -f "$SQL/$seed" >/dev/null
  }
  seed 0 0 # the tables, empty
  local captured
  captured=$(timed "$N" -c 1 -t $((N / 500)) -f "$SQL/$capture")
  if [[ "$layout" == row-alone ]]; then
    local rows
    rows=$(psql -Atq "$URL" -c "SELECT count(*) FROM redrive.retry_messages")
    ((rows == N)) || { echo "bench-schema: $layout: $rows of $N rows were stored" >&2; exit 1; }
    echo "$captured - -" # nothing to dispatch: no queue
    return
  fi
  [[ "$seed" == seed.sql ]] && psql -q "$URL" -v ON_ERROR_STOP=1 \
    -c "TRUNCATE redrive.retry_messages, redrive.queue" >/dev/null
  seed "$N" "$INFLIGHT"
  local due="SELECT count(*) FROM $table WHERE claim_token IS NULL" dispatched
  [[ "$layout" == floor ]] && due="SELECT count(*) FROM floor_claim WHERE state = 'pending'"
  # Each transaction claims up to 100 rows, so N/400 per client, rounded up, is N rows when every
  # claim is full; a claim that finds nothing left deletes nothing.
  dispatched=$(timed "$N" -c 4 -j 4 -t $(((N + 399) / 400)) -f "$SQL/$script")
  local left
  left=$(psql -Atq "$URL" -c "$due")
  ((left == 0)) || { echo "bench-schema: $layout: $left of $N rows were not claimed" >&2; exit 1; }
  echo "$captured $dispatched"
}

layouts=(${LAYOUTS:-redrive no-source-key no-triggers row-alone floor})
declare -A results
for round in $(seq 1 "$RUNS"); do
  for layout in "${layouts[@]}"; do
    out=$(run "$layout")
    read -r crate ccpu drate dcpu <<<"$out"
    echo "round $round/$RUNS: $layout: capture $crate rows/s, Postgres $ccpu µs per row;" \
      "dispatch $drate rows/s, Postgres $dcpu µs per row" >&2
    results[$layout]+="$out"$'\n'
  done
done
# column K of a layout's rounds: "median [lowest–highest]", or the median alone with "mid"
stat() { median_range "$(echo -n "${results[$1]}" | awk -v k="$2" '{print $k}')" "${3:-}"; }
for path in capture dispatch; do
  k=1
  [[ $path == dispatch ]] && k=3
  echo
  echo "| $path, layout | rows/s, median [range] of $RUNS | Postgres µs per row | / floor |"
  echo "|---|---|---|---|"
  for layout in "${layouts[@]}"; do
    [[ "$(stat "$layout" $k mid)" == - ]] && continue # row-alone has no dispatch
    ratio=$(awk -v a="$(stat "$layout" $k mid)" -v b="$(stat floor $k mid)" 'BEGIN { printf "%.2f", a / b }')
    echo "| $layout | $(stat "$layout" $k) | $(stat "$layout" $((k + 1))) | $ratio |"
  done
done
