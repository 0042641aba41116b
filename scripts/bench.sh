#!/usr/bin/env bash
# Throughput benchmarks (not tests): see BENCHMARKS.md for the figures and how they were made.
#   scripts/bench.sh [happy|happy-http|capture|dispatch|replay|purge|all] [MESSAGES]
# Needs the services from `make services`; builds the benchmark in release mode.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export SQLX_OFFLINE="${SQLX_OFFLINE:-true}" REDRIVE_LOG="${REDRIVE_LOG:-warn}"
cargo build --release --example bench
"${CARGO_TARGET_DIR:-target}/release/examples/bench" "${1:-all}" "${2:-100000}"
