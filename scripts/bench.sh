#!/usr/bin/env bash
# Throughput benchmarks (not tests): see BENCHMARKS.md for the figures and how they were made.
#   scripts/bench.sh [CASE[,CASE...]|all] [MESSAGES]     (BENCH_RUNS=3 rounds unless set)
# Cases: bare happy happy-keys happy-fewkeys happy-http insert-floor capture capture-keys capture-parked
# claim-floor dispatch retry dispatch-lines replay purge produce-floor dlq storm timing
# timing-defaults footprint operators outage console.
# MESSAGES defaults to 1,000,000 for
# bare, the in-process happy paths and footprint, 500,000 for insert-floor, capture,
# capture-parked and storm, 10,000
# for timing and 100,000 for the rest; operators loads 10M dead
# and 1M pending rows into the database redrive_bench_ops once, and reuses them after; console
# loads 1M dead and 100k pending rows into redrive_bench_console the same way. Run as root,
# operators also times a status from a cold cache each round: it restarts the Postgres cluster
# of scripts/postgres.sh and drops the kernel's page cache first.
# Needs the services from `make services`; builds the benchmark in release mode.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export SQLX_OFFLINE="${SQLX_OFFLINE:-true}" REDRIVE_LOG="${REDRIVE_LOG:-warn}"
cargo build --release --example bench --bin redrive
"${CARGO_TARGET_DIR:-target}/release/examples/bench" "${1:-all}" ${2:+"$2"}
