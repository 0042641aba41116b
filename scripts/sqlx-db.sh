#!/usr/bin/env bash
# Recreates the database that sqlx's query macros check against at compile time, from the
# migration files in order, and prints its URL. `make prepare` uses it to refresh .sqlx/.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BASE="$("$HERE/postgres.sh" url)"
DB="redrive_sqlx"
URL="${BASE%/*}/$DB"
psql -q "$BASE" -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB" >/dev/null
for f in $(ls "$HERE"/../migrations/V*__*.sql | sort -V); do
  psql -q -v ON_ERROR_STOP=1 "$URL" -f "$f" >/dev/null
done
echo "$URL"
