#!/usr/bin/env bash
# redrive's dispatch beside its peers, in the same run, on the same machine and Postgres:
#   - River (Go), with its defaults and tuned (200 workers, the shortest fetch cooldown);
#   - graphile-worker (Node), unbatched and with its documented batching (local queue of 500,
#     batched completions);
#   - PgQueuer (Python), in drain mode.
# Each run gets a fresh database and N due no-op jobs, and is timed until every job is done.
# BENCH_RUNS rounds (3 unless set) run every system once each, interleaved, so a machine that slows
# down slows them all alike; the table gives each one's median and range, and redrive's ratio to it.
# Dependencies come from the Go module proxy, npm and PyPI, all pinned.
#   scripts/bench-peers.sh [N]          (N = 100,000 unless set)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
N="${1:-100000}"
RUNS="${BENCH_RUNS:-3}"
CACHE="${REDRIVE_CACHE:-$HOME/.cache/redrive}"
PEERS=bench/peers
mkdir -p "$CACHE"

# A new, empty database named $1; prints its URL.
fresh() { scripts/fresh-db.sh "$1"; }

echo "bench-peers: building redrive's benchmark and the peers" >&2
export SQLX_OFFLINE="${SQLX_OFFLINE:-true}" REDRIVE_LOG="${REDRIVE_LOG:-warn}"
cargo build --release --example bench --bin redrive >&2
BENCH="${CARGO_TARGET_DIR:-target}/release/examples/bench"
systems=(redrive)
if command -v go >/dev/null; then
  (cd "$PEERS/river" && go build -o "$CACHE/river-bench" .)
  systems+=(river-default river-tuned)
else
  echo "bench-peers: Go is not installed: River is skipped" >&2
fi
if command -v npm >/dev/null; then
  (cd "$PEERS/graphile" && npm ci --silent --no-audit --no-fund)
  systems+=(graphile-unbatched graphile-batched)
else
  echo "bench-peers: Node is not installed: graphile-worker is skipped" >&2
fi
if [ ! -x "$CACHE/pgqueuer-venv/bin/python" ]; then
  python3 -m venv "$CACHE/pgqueuer-venv"
fi
"$CACHE/pgqueuer-venv/bin/pip" install -q -r "$PEERS/pgqueuer/requirements.txt"
systems+=(pgqueuer)

# One run of one system; prints "name jobs seconds".
run() {
  local url
  case "$1" in
    redrive)
      # The benchmark's own dispatch case (it makes its database); its per-run line goes to stderr.
      BENCH_RUNS=1 "$BENCH" dispatch "$N" 2>&1 >/dev/null |
        sed -n 's/^round 1\/1: dispatch: \([0-9]*\) in \([0-9.]*\) s.*/redrive \1 \2/p' ;;
    river-*) url="$(fresh redrive_bench_river)" && "$CACHE/river-bench" "$url" "$N" "${1#river-}" ;;
    graphile-*) url="$(fresh redrive_bench_graphile)" && node "$PEERS/graphile/bench.mjs" "$url" "$N" "${1#graphile-}" ;;
    pgqueuer) url="$(fresh redrive_bench_pgqueuer)" && "$CACHE/pgqueuer-venv/bin/python" "$PEERS/pgqueuer/bench.py" "$url" "$N" ;;
  esac
}

results="$(mktemp)"
trap 'rm -f "$results"' EXIT
for round in $(seq 1 "$RUNS"); do
  for system in "${systems[@]}"; do
    line="$(run "$system")"
    [ -n "$line" ] || { echo "bench-peers: $system printed no result" >&2; exit 1; }
    echo "round $round/$RUNS: $line" >&2
    echo "$line" >>"$results"
  done
done

python3 - "$results" "$RUNS" <<'EOF'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    name, jobs, secs = line.split()
    runs.setdefault(name, []).append(int(jobs) / float(secs))
mine = statistics.median(runs["redrive"])
print(f"| system | jobs per second, median [range] of {sys.argv[2]} | redrive / it |")
print("|---|---|---|")
for name, rates in runs.items():
    mid = statistics.median(rates)
    ratio = "–" if name == "redrive" else f"{mine / mid:.2f}"
    print(f"| {name} | {mid:,.0f} [{min(rates):,.0f}–{max(rates):,.0f}] | {ratio} |")
EOF
