#!/usr/bin/env bash
# What each part of redrive's table costs capture, beside the INSERT floor: capture's own statement
# (`Store::insert_new`, 500 rows of 1 KiB a statement) timed inside one backend, first on the table
# as `migrate` makes it and then with its parts taken away one after another, each step beside the
# floor's INSERT in the same database. The last step is the message row alone, with its primary
# key. Rows are built into arrays before the clock starts, and each loop is one transaction, so
# neither the client nor commits are timed: this is the statements' own cost, the part of capture
# that a layout decides (bench/parts/capture.sql).
#   scripts/capture-parts.sh [N]    (N = 100,000 rows unless set; BENCH_RUNS = 3 rounds unless set)
# Each round starts from a fresh database. Prints, per step, capture's seconds (median [range]),
# microseconds per row, the floor's seconds, and capture's ratio to the floor (of the medians).
# Needs the services from `make services`.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/median.sh
N="${1:-100000}"
RUNS="${BENCH_RUNS:-3}"
((N >= 500 && N % 500 == 0)) || { echo "capture-parts: N must be a multiple of 500" >&2; exit 1; }
BASE="$(scripts/postgres.sh url)"
DB=redrive_bench_parts
URL="${BASE%/*}/$DB"
export SQLX_OFFLINE="${SQLX_OFFLINE:-true}"
cargo build --release --bin redrive >&2
REDRIVE="${CARGO_TARGET_DIR:-target}/release/redrive"
CONFIG="$(mktemp)"
trap 'rm -f "$CONFIG"' EXIT
printf '[postgres]\nurl = "%s"\n' "$URL" >"$CONFIG"

steps=(redrive no-wake-or-pause no-queue-row no-source-key no-other-indexes row-alone)
declare -A what=(
  [redrive]="the table as \`migrate\` makes it"
  [no-wake-or-pause]="without the wake-up and pause triggers"
  [no-queue-row]="and without the queue row (its trigger)"
  [no-source-key]="and without the source key (I2)"
  [no-other-indexes]="and without the partial indexes"
  [row-alone]="and without the checks: the message row alone"
)
# The SQL that takes a step's part away, after the steps before it.
take_away() {
  local t=redrive.retry_messages
  case "$1" in
    redrive) ;;
    no-wake-or-pause)
      echo "ALTER TABLE $t DISABLE TRIGGER retry_messages_notify_insert;
            ALTER TABLE $t DISABLE TRIGGER retry_messages_hold_paused_insert" ;;
    no-queue-row) echo "ALTER TABLE $t DISABLE TRIGGER retry_messages_enqueue_insert" ;;
    no-source-key) echo "ALTER TABLE $t DROP CONSTRAINT retry_messages_source_key" ;;
    no-other-indexes)
      echo "DO \$\$ DECLARE o record; BEGIN
              FOR o IN SELECT indexrelid::regclass AS i FROM pg_index
                       WHERE indrelid = '$t'::regclass AND NOT indisprimary LOOP
                EXECUTE format('DROP INDEX %s', o.i);
              END LOOP;
            END \$\$" ;;
    row-alone)
      echo "DO \$\$ DECLARE o record; BEGIN
              FOR o IN SELECT conname FROM pg_constraint
                       WHERE conrelid = '$t'::regclass AND contype = 'c' LOOP
                EXECUTE format('ALTER TABLE $t DROP CONSTRAINT %I', o.conname);
              END LOOP;
            END \$\$" ;;
  esac
}
sql() { psql -Atq "$URL" -v ON_ERROR_STOP=1 -c "$1"; }

declare -A capture floor
for round in $(seq 1 "$RUNS"); do
  scripts/fresh-db.sh "$DB" >/dev/null
  REDRIVE_LOG=warn "$REDRIVE" --config "$CONFIG" migrate >/dev/null
  psql -q "$URL" -v batches=$((N / 500)) -f bench/parts/capture.sql >/dev/null
  for step in "${steps[@]}"; do
    alter="$(take_away "$step")"
    [[ -n "$alter" ]] && sql "$alter" >/dev/null
    sql "TRUNCATE redrive.retry_messages, redrive.queue, floor_insert" >/dev/null
    c=$(sql "SELECT parts_time('capture')")
    f=$(sql "SELECT parts_time('floor')")
    rows=$(sql "SELECT (SELECT count(*) FROM redrive.retry_messages) + (SELECT count(*) FROM floor_insert)")
    ((rows == 2 * N)) || { echo "capture-parts: $step: $rows of $((2 * N)) rows were written" >&2; exit 1; }
    echo "round $round/$RUNS: $step: capture $c s, floor $f s" >&2
    capture[$step]+="$c"$'\n'
    floor[$step]+="$f"$'\n'
  done
done

# seconds: "median [lowest–highest]", or the median alone with "mid"
stat() { median_range "$1" "${2:-%.3f}"; }
echo
echo "| step | capture, s for $N rows, median [range] of $RUNS | µs per row | INSERT floor, s | / floor |"
echo "|---|---|---|---|---|"
for step in "${steps[@]}"; do
  cm=$(stat "${capture[$step]}" mid)
  fm=$(stat "${floor[$step]}" mid)
  awk -v s="$step" -v w="${what[$step]}" -v c="$(stat "${capture[$step]}")" -v cm="$cm" \
    -v f="$(stat "${floor[$step]}")" -v fm="$fm" -v n="$N" \
    'BEGIN { printf "| %s (%s) | %s | %.1f | %s | %.2f |\n", s, w, c, cm * 1e6 / n, f, fm / cm }'
done
