#!/usr/bin/env bash
# A new, empty database named $1 on the services' Postgres, for the benchmark scripts; prints its
# URL. A drop that an autovacuum worker still connected to the old one refuses (the redrive role
# may not end it) is tried again, for up to 60 s.
#   scripts/fresh-db.sh NAME
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[[ $# == 1 && "$1" =~ ^[a-z_][a-z0-9_]*$ ]] || { echo "usage: scripts/fresh-db.sh NAME (lower case, digits, _)" >&2; exit 2; }
BASE="$(scripts/postgres.sh url)"
deadline=$((SECONDS + 60))
until psql -q "$BASE" -v ON_ERROR_STOP=1 -c "SET client_min_messages = warning" \
  -c "DROP DATABASE IF EXISTS $1 WITH (FORCE)" >/dev/null 2>&1; do
  ((SECONDS < deadline)) || { echo "fresh-db: could not drop $1 within 60 s" >&2; exit 1; }
  sleep 1
done
psql -q "$BASE" -v ON_ERROR_STOP=1 -c "CREATE DATABASE $1" >/dev/null
echo "${BASE%/*}/$1"
