#!/usr/bin/env bash
# Runs the Postgres server that the demo and the tests use.
#
#   scripts/postgres.sh start   install Postgres from Debian's packages if missing, start the cluster,
#                               create the role and the database, print DATABASE_URL=...
#   scripts/postgres.sh stop    stop the cluster
#   scripts/postgres.sh stop-if-started
#                               stop the cluster only if `start` was the one that started it
#   scripts/postgres.sh url     print the DATABASE_URL only
#   scripts/postgres.sh restart stop and start the cluster (fault injection)
#
# REDRIVE_PG_CLUSTER and REDRIVE_PG_PORT pick another cluster of the same server version, so
# `make chaos` runs on a Postgres of its own and never disturbs the test services.
#
# The role may create databases and roles: the tests give each test a fresh database, and the role
# tests create login roles in the groups of sql/roles.sql. Every command is idempotent.
set -euo pipefail

PG_ROLE="${REDRIVE_PG_ROLE:-redrive}"
PG_PASSWORD="${REDRIVE_PG_PASSWORD:-redrive}"
PG_DB="${REDRIVE_PG_DB:-redrive}"
PG_PORT="${REDRIVE_PG_PORT:-5432}"
PG_CLUSTER="${REDRIVE_PG_CLUSTER:-main}"
URL="postgres://$PG_ROLE:$PG_PASSWORD@127.0.0.1:$PG_PORT/$PG_DB"
# Marks a cluster that this script started, so `stop-if-started` leaves a user's own server alone.
STARTED_MARK="${TMPDIR:-/tmp}/redrive-postgres-started-$PG_CLUSTER"

log() { printf 'postgres: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else die "need root (or sudo) to run: $*"; fi
}
as_postgres() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"
  else sudo -u postgres "$@"; fi
}

install() {
  if command -v pg_lsclusters >/dev/null && ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    return 0
  fi
  log "installing Postgres from Debian's packages"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null \
    || die "apt-get install postgresql failed"
}

# The newest installed major version, and its cluster (created if the package made none).
cluster() {
  local version
  version="$(ls /usr/lib/postgresql | sort -n | tail -n 1)"
  if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -qx "$version $PG_CLUSTER"; then
    log "creating cluster $version/$PG_CLUSTER"
    as_root pg_createcluster "$version" "$PG_CLUSTER" --port "$PG_PORT" >/dev/null
  fi
  echo "$version"
}

start() {
  install
  local version; version="$(cluster)"
  if ! pg_lsclusters -h | awk -v v="$version" -v c="$PG_CLUSTER" '$1==v && $2==c {print $4}' | grep -q online; then
    log "starting cluster $version/$PG_CLUSTER"
    as_root pg_ctlcluster "$version" "$PG_CLUSTER" start || die "pg_ctlcluster $version $PG_CLUSTER start failed; see /var/log/postgresql/"
    touch "$STARTED_MARK"
  fi
  for _ in $(seq 1 60); do
    pg_isready -q -h 127.0.0.1 -p "$PG_PORT" && break
    sleep 0.5
  done
  pg_isready -q -h 127.0.0.1 -p "$PG_PORT" || die "the server does not accept connections on 127.0.0.1:$PG_PORT"
  as_postgres psql -q -v ON_ERROR_STOP=1 -p "$PG_PORT" -d postgres <<SQL >/dev/null
DO \$\$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_ROLE') THEN
    CREATE ROLE "$PG_ROLE" LOGIN CREATEDB CREATEROLE PASSWORD '$PG_PASSWORD';
  ELSE
    ALTER ROLE "$PG_ROLE" LOGIN CREATEDB CREATEROLE PASSWORD '$PG_PASSWORD';
  END IF;
END
\$\$;
SQL
  if ! as_postgres psql -tA -p "$PG_PORT" -d postgres -c "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'" | grep -q 1; then
    as_postgres createdb -p "$PG_PORT" -O "$PG_ROLE" "$PG_DB"
  fi
  log "ready on 127.0.0.1:$PG_PORT"
  echo "DATABASE_URL=$URL"
}

stop() {
  command -v pg_lsclusters >/dev/null || return 0
  pg_lsclusters -h | while read -r version name _port status _rest; do
    if [ "$name" = "$PG_CLUSTER" ] && [ "$status" = online ]; then
      log "stopping cluster $version/$PG_CLUSTER"
      as_root pg_ctlcluster "$version" "$PG_CLUSTER" stop
    fi
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop; rm -f "$STARTED_MARK" ;;
  stop-if-started) if [ -f "$STARTED_MARK" ]; then stop; rm -f "$STARTED_MARK"; fi ;;
  url) echo "$URL" ;;
  restart) stop; start >/dev/null ;;
  *) echo "usage: $0 start|stop|stop-if-started|restart|url" >&2; exit 2 ;;
esac
