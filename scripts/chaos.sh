#!/usr/bin/env bash
# The fault-injection suite (src/bin/redrive-chaos) on a Postgres cluster and a Kafka broker of its
# own, on other ports, so it never disturbs the services of the tests and the demo.
#   scripts/chaos.sh short   about two minutes; part of `make test`
#   scripts/chaos.sh long    the full run of `make chaos` (BENCHMARKS.md has its figures)
# Further arguments go to `redrive-chaos run` and override the presets (`scripts/chaos.sh long
# --help` lists them), e.g. `scripts/chaos.sh long --faults kill --fault-every 5s --static-membership`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export REDRIVE_PG_CLUSTER=chaos REDRIVE_PG_PORT=5499 KAFKA_PORT=9192 KAFKA_CONTROLLER_PORT=9193
export CHAOS_KAFKA=127.0.0.1:9192
export CHAOS_POSTGRES=postgres://redrive:redrive@127.0.0.1:5499/redrive
mode="${1:-long}"
shift || true
case "$mode" in
  short) args=(--messages 4000 --duration 50s --fault-every 5s --settle-within 3m) ;;
  long) args=(--messages 100000 --duration 10m --fault-every 7s) ;;
  *) echo "usage: $0 short|long [redrive-chaos run options]" >&2; exit 2 ;;
esac
chaos="${CARGO_TARGET_DIR:-target}/debug/redrive-chaos"
for a in "$@"; do
  case "$a" in -h|--help) exec "$chaos" run --help ;; esac
done
stop_services() {
  scripts/kafka.sh stop >/dev/null 2>&1 || true
  scripts/postgres.sh stop >/dev/null 2>&1 || true
}
trap stop_services EXIT
scripts/postgres.sh start >/dev/null
# Each run starts its broker with no data. Kept, the topics of every earlier run (two per run)
# were all loaded again at each of the run's broker restarts: 718 partitions, 2.1 GB, on one
# machine. In one run the broker came back from such a restart unable to hand out producer ids
# (its controller refused the broker's registration while the logs were still loading), so every
# idempotent producer, the run's own included, waited on it (see the deadline in `run`).
scripts/kafka.sh stop >/dev/null 2>&1 || true
rm -rf "${KAFKA_RUN_DIR:-/tmp/redrive-kafka-$KAFKA_PORT}/data"
scripts/kafka.sh start >/dev/null
"$chaos" run "${args[@]}" "$@"
