# redrive: the two commands a new user runs are `make demo` and `make test`.
#
# Both start their own services: Postgres (installed from Debian's packages if missing) and a
# single-node Apache Kafka broker (jars fetched from Maven Central into ~/.cache/redrive).

SHELL := /bin/bash
CARGO ?= cargo
# Queries are checked against the committed .sqlx/ data, so no database is needed to build.
export SQLX_OFFLINE ?= true
export REDRIVE_TEST_DATABASE_URL ?= postgres://redrive:redrive@127.0.0.1:5432/redrive
export REDRIVE_TEST_KAFKA ?= 127.0.0.1:9092
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)

.PHONY: all build build-deps browser promtool k8s-check console-demo screenshots test chaos demo bench bench-peers bench-schema services services-stop prepare prepare-check lint clean-test-dbs

all: build

build: build-deps
	$(CARGO) build --bins

## librdkafka is built with TLS and SASL, against the system OpenSSL.
build-deps:
	@pkg-config --exists openssl 2>/dev/null || { \
	  echo "installing libssl-dev and pkg-config from Debian's packages"; \
	  apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q libssl-dev pkg-config >/dev/null; }

## Start Postgres and Kafka (idempotent).
services:
	@scripts/postgres.sh start >/dev/null
	@scripts/kafka.sh start >/dev/null

## Headless Chromium and chromedriver, for the console's browser tests (idempotent).
browser:
	@scripts/browser.sh install

## The offline check of the Kubernetes manifests (deploy/kubernetes/check, Go), built once so the
## test that runs it finds it compiled; the Go module proxy serves its modules.
k8s-check:
	cd deploy/kubernetes/check && go build -o /dev/null .

## promtool, which checks the shipped alert rules (idempotent).
promtool:
	@scripts/promtool.sh install

## Stop them again.
services-stop:
	@scripts/kafka.sh stop
	@scripts/postgres.sh stop

## The whole suite: two short fault-injection runs (the second keeping key order) on services of
## their own, then unit and integration tests on the real Postgres and Kafka broker, the console's
## in headless Chromium.
test: build-deps services browser promtool k8s-check clean-test-dbs
	$(CARGO) build --bins --tests
	scripts/chaos.sh short
	scripts/chaos.sh short --key-order
	scripts/test.sh

## The long fault-injection run (BENCHMARKS.md has its figures), on services of its own.
chaos: build-deps
	$(CARGO) build --bins
	scripts/chaos.sh long

## The Knative seed experiment, end to end, with a printed timeline.
demo: build-deps services
	$(CARGO) build --bins
	@status=0; $(TARGET_DIR)/debug/redrive-demo run || status=$$?; \
	  scripts/kafka.sh stop; scripts/postgres.sh stop-if-started; exit $$status

## The demo, stopped before the fix, with the web console serving its dead rows until Ctrl-C.
console-demo: build-deps services
	$(CARGO) build --bins
	@status=0; $(TARGET_DIR)/debug/redrive-demo run --console || status=$$?; \
	  scripts/kafka.sh stop; scripts/postgres.sh stop-if-started; exit $$status

## The console's screenshots in docs/, taken by headless Chromium from the demo's data.
screenshots: build-deps services browser
	$(CARGO) build --bins --examples
	scripts/screenshots.sh

## Throughput figures for BENCHMARKS.md.
bench: build-deps services clean-test-dbs
	scripts/bench.sh

## redrive's dispatch beside its peers (River, graphile-worker, PgQueuer), in the same run.
bench-peers: build-deps services clean-test-dbs
	scripts/bench-peers.sh

## Capture's and dispatch's SQL on other layouts of the table, beside their floors (pgbench).
bench-schema: build-deps services clean-test-dbs
	scripts/bench-schema.sh

## Regenerate .sqlx/ (offline query data) from a database built from the migrations.
prepare:
	@scripts/postgres.sh start >/dev/null
	rm -rf .sqlx && mkdir .sqlx
	touch src/lib.rs
	DATABASE_URL="$$(scripts/sqlx-db.sh)" SQLX_OFFLINE=false SQLX_OFFLINE_DIR="$(CURDIR)/.sqlx" \
	  $(CARGO) check --lib --tests --bins

## Fail when .sqlx/ is stale: what `cargo sqlx prepare --check` does.
prepare-check:
	@scripts/postgres.sh start >/dev/null
	rm -rf "$(TARGET_DIR)/sqlx-check" && mkdir -p "$(TARGET_DIR)/sqlx-check"
	touch src/lib.rs
	DATABASE_URL="$$(scripts/sqlx-db.sh)" SQLX_OFFLINE=false SQLX_OFFLINE_DIR="$(abspath $(TARGET_DIR))/sqlx-check" \
	  $(CARGO) check --lib --tests --bins
	diff -r .sqlx "$(TARGET_DIR)/sqlx-check"

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

## Drop the per-test databases and login roles earlier runs left behind (the roles test's logins
## were named login_<32 hex digits> before they had the prefix).
clean-test-dbs:
	@psql -qtA "$(REDRIVE_TEST_DATABASE_URL)" -c \
	  "SELECT datname FROM pg_database WHERE datname LIKE 'redrive_test_%'" | \
	  while read -r db; do psql -q "$(REDRIVE_TEST_DATABASE_URL)" -c "DROP DATABASE IF EXISTS \"$$db\"" >/dev/null; done
	@psql -qtA "$(REDRIVE_TEST_DATABASE_URL)" -c \
	  "SELECT rolname FROM pg_roles WHERE rolname LIKE 'redrive\_test\_login\_%' OR rolname ~ '^login_[0-9a-f]{32}$$'" | \
	  while read -r role; do psql -q "$(REDRIVE_TEST_DATABASE_URL)" -c "DROP ROLE IF EXISTS \"$$role\"" >/dev/null \
	    || echo "could not drop the test role $$role" >&2; done
