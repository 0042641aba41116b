#!/usr/bin/env bash
# The dispatch benchmark's peers, on the same machine and Postgres: River (Go), graphile-worker
# (Node) and PgQueuer (Python). Each gets a fresh database, N due no-op jobs, and is timed until
# its workers have finished them all. Dependencies come from the Go module proxy, npm and PyPI.
#   scripts/bench-peers.sh [N]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../bench/peers"
N="${1:-100000}"
BASE="$(../../scripts/postgres.sh url)"
CACHE="${REDRIVE_CACHE:-$HOME/.cache/redrive}"

fresh() {
  psql -q "$BASE" -c "DROP DATABASE IF EXISTS $1 WITH (FORCE)" -c "CREATE DATABASE $1" 2>/dev/null
  echo "${BASE%/*}/$1"
}

echo "| peer | jobs | seconds | per second |"
echo "|---|---|---|---|"
if command -v go >/dev/null; then
  (cd river && go build -o "$CACHE/river-bench" .) && "$CACHE/river-bench" "$(fresh redrive_bench_river)" "$N"
else
  echo "| river | skipped: Go is not installed | | |"
fi
if command -v npm >/dev/null; then
  (cd graphile && npm ci --silent --no-audit --no-fund) && node graphile/bench.mjs "$(fresh redrive_bench_graphile)" "$N"
else
  echo "| graphile-worker | skipped: Node is not installed | | |"
fi
if [ ! -x "$CACHE/pgqueuer-venv/bin/python" ]; then
  python3 -m venv "$CACHE/pgqueuer-venv"
fi
"$CACHE/pgqueuer-venv/bin/pip" install -q -r pgqueuer/requirements.txt
"$CACHE/pgqueuer-venv/bin/python" pgqueuer/bench.py "$(fresh redrive_bench_pgqueuer)" "$N"
