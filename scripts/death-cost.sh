#!/usr/bin/env bash
# What a death costs in SQL alone, with the dead rows' key index (schema V26), kind index (V29)
# and V3's outbox index (kept by V30 beside its own) and without each: N pending rows (100,000
# unless set) with 1 KiB payloads and keys `customer-0` to `customer-4999`, killed 1,000 per
# statement (`UPDATE … SET state = 'dead'`), as the table `migrate` makes it, with
# `retry_messages_finished_key` dropped, with `retry_messages_finished_kind` dropped and with
# `retry_messages_dlq_outbox` dropped. Each run is on a fresh copy of one loaded database, the
# four alternately, BENCH_RUNS rounds (3 unless set). Prints seconds (median [range]) and µs per
# death. Needs the services from `make services`.
#   scripts/death-cost.sh [N]
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/median.sh
N="${1:-100000}"
RUNS="${BENCH_RUNS:-3}"
export SQLX_OFFLINE="${SQLX_OFFLINE:-true}" REDRIVE_LOG="${REDRIVE_LOG:-warn}"
cargo build --release --bin redrive >&2
REDRIVE="${CARGO_TARGET_DIR:-target}/release/redrive"

TEMPLATE="$(scripts/fresh-db.sh death_cost_template)"
REDRIVE_POSTGRES__URL="$TEMPLATE" "$REDRIVE" migrate >&2
psql -q "$TEMPLATE" -v ON_ERROR_STOP=1 -v n="$N" >&2 <<'SQL'
INSERT INTO redrive.retry_messages (id, consumer_group, topic, "partition", kafka_offset, key,
       payload, state, attempts, max_attempts, next_attempt_at, last_error, error_kind)
SELECT gen_random_uuid(), 'g', 'orders', 0, i, convert_to('customer-' || (i % 5000), 'UTF8'),
       convert_to(repeat('x', 1024), 'UTF8'), 'pending', 1, 5, now() + interval '1 hour',
       'HTTP 503', 'retryable'
FROM generate_series(0, :n - 1) AS i;
VACUUM ANALYZE redrive.retry_messages;
VACUUM ANALYZE redrive.queue;
SQL

declare -A take_away=(
  [as-migrated]=""
  [without-key-index]="DROP INDEX redrive.retry_messages_finished_key"
  [without-kind-index]="DROP INDEX redrive.retry_messages_finished_kind"
  [without-v3-outbox-index]="DROP INDEX redrive.retry_messages_dlq_outbox"
)
variants=(as-migrated without-key-index without-kind-index without-v3-outbox-index)
declare -A secs
for round in $(seq 1 "$RUNS"); do
  for v in "${variants[@]}"; do
    url="${TEMPLATE%/*}/death_cost"
    # A fresh copy, tried again while an autovacuum worker is still connected to either database.
    deadline=$((SECONDS + 60))
    until psql -q "${TEMPLATE%/*}/postgres" -c "DROP DATABASE IF EXISTS death_cost WITH (FORCE)" \
      -c "CREATE DATABASE death_cost TEMPLATE death_cost_template" >/dev/null 2>&1; do
      ((SECONDS < deadline)) || { echo "death-cost: could not copy the template within 60 s" >&2; exit 1; }
      sleep 1
    done
    [[ -z "${take_away[$v]}" ]] || psql -q "$url" -v ON_ERROR_STOP=1 -c "${take_away[$v]}"
    s="$(psql -qAt "$url" -v ON_ERROR_STOP=1 -v n="$N" <<'SQL'
SET death_cost.n = :'n';
SELECT clock_timestamp() AS started \gset
DO $$
DECLARE b int;
BEGIN
  FOR b IN 0 .. (current_setting('death_cost.n')::int - 1) / 1000 LOOP
    UPDATE redrive.retry_messages SET state = 'dead', dead_at = now(), updated_at = now()
    WHERE kafka_offset >= b * 1000 AND kafka_offset < (b + 1) * 1000;
    COMMIT;
  END LOOP;
END $$;
SELECT round(extract(epoch FROM clock_timestamp() - :'started')::numeric, 3);
SQL
)"
    echo "round $round/$RUNS: $v: $s s" >&2
    secs[$v]+="$s"$'\n'
  done
done
psql -q "$(scripts/postgres.sh url)" -c "DROP DATABASE IF EXISTS death_cost" \
  -c "DROP DATABASE IF EXISTS death_cost_template" >/dev/null

echo
echo "| table | seconds for $N deaths, median [range] of $RUNS | µs per death |"
echo "|---|---|---|"
for v in "${variants[@]}"; do
  awk -v v="$v" -v s="$(median_range "${secs[$v]}" %.3f)" -v m="$(median_range "${secs[$v]}" mid)" \
    -v n="$N" 'BEGIN { printf "| %s | %s | %.1f |\n", v, s, m * 1e6 / n }'
done
