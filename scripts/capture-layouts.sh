#!/usr/bin/env bash
# What capture would gain end to end from a narrower write, beside the INSERT floor: the `capture`
# case of `bench` (the broker, the consumer and redrive's capturer, 500,000 messages unless set) on
# the table as `migrate` makes it, and with parts of it taken away after `migrate`
# (BENCH_AFTER_MIGRATE_SQL): the queue row (its insert trigger), the source key (I2), and both;
# and with the source key's integer columns first. Each taken-away table breaks something redrive
# needs (dispatch reads the queue; I2 needs the key; `redrive status` walks the key's
# (consumer_group, topic) prefix), so these are prices for a layout decision, not configurations.
#   scripts/capture-layouts.sh [N]    (BENCH_RUNS = 3 rounds unless set)
# LAYOUTS picks some (space-separated): as-migrated no-queue-row no-source-key neither key-ints-first
# Each round runs the floor and then every layout, one run each, every run on a fresh database.
# Prints, per layout, messages/s (median [range]), Postgres µs per row (median) and the ratio of
# the medians to the floor's. Needs the services from `make services`.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/median.sh
N="${1:-500000}"
RUNS="${BENCH_RUNS:-3}"
export SQLX_OFFLINE="${SQLX_OFFLINE:-true}" REDRIVE_LOG="${REDRIVE_LOG:-warn}" BENCH_RUNS=1
T=redrive.retry_messages
layouts=(${LAYOUTS:-as-migrated no-queue-row no-source-key neither})
declare -A take_away=(
  [as-migrated]=""
  [no-queue-row]="ALTER TABLE $T DISABLE TRIGGER retry_messages_enqueue_insert"
  [no-source-key]="ALTER TABLE $T DROP CONSTRAINT retry_messages_source_key"
  [neither]="ALTER TABLE $T DISABLE TRIGGER retry_messages_enqueue_insert;
             ALTER TABLE $T DROP CONSTRAINT retry_messages_source_key"
  [key-ints-first]="ALTER TABLE $T DROP CONSTRAINT retry_messages_source_key;
             ALTER TABLE $T ADD CONSTRAINT retry_messages_source_key
               UNIQUE (\"partition\", kafka_offset, incarnation, consumer_group, topic)"
)
for l in "${layouts[@]}"; do
  [[ -v "take_away[$l]" ]] || { echo "capture-layouts: no layout $l; there are: ${!take_away[*]}" >&2; exit 2; }
done
cargo build --release --example bench --bin redrive >&2
BENCH="${CARGO_TARGET_DIR:-target}/release/examples/bench"

# One run of a case: "rows/s µs-per-row", from bench's round line.
run() {
  local line
  line="$(BENCH_AFTER_MIGRATE_SQL="$2" "$BENCH" "$1" "$N" 2>&1 | grep "^round 1/1: $1:")" || {
    echo "capture-layouts: $1 ($3) did not finish; run \`$BENCH $1 $N\` to see why" >&2
    exit 1
  }
  sed -E 's/.* ([0-9]+)\/s;.* ([0-9]+) µs per row$/\1 \2/' <<<"$line"
}

declare -A rate cpu
for round in $(seq 1 "$RUNS"); do
  read -r r c < <(run insert-floor "" floor)
  echo "round $round/$RUNS: floor $r rows/s, $c µs per row" >&2
  rate[floor]+="$r"$'\n'
  cpu[floor]+="$c"$'\n'
  for l in "${layouts[@]}"; do
    read -r r c < <(run capture "${take_away[$l]}" "$l")
    echo "round $round/$RUNS: $l $r msg/s, $c µs per row" >&2
    rate[$l]+="$r"$'\n'
    cpu[$l]+="$c"$'\n'
  done
done

floor_mid=$(median_range "${rate[floor]}" mid)
echo
echo "| layout | per second, median [range] of $RUNS | Postgres µs per row, median | / floor |"
echo "|---|---|---|---|"
for l in floor "${layouts[@]}"; do
  awk -v l="$l" -v s="$(median_range "${rate[$l]}")" -v m="$(median_range "${rate[$l]}" mid)" \
    -v c="$(median_range "${cpu[$l]}" mid)" -v f="$floor_mid" \
    'BEGIN { printf "| %s | %s | %d | %.2f |\n", l, s, c, m / f }'
done
