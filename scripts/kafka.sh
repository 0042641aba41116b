#!/usr/bin/env bash
# Runs a single-node Apache Kafka broker (KRaft mode) on 127.0.0.1 for the demo and the tests.
#
#   scripts/kafka.sh start                  fetch the jars if needed, format, start, wait for metadata
#   scripts/kafka.sh stop                   stop the broker started by `start`
#   scripts/kafka.sh status                 exit 0 when the broker answers metadata requests
#   scripts/kafka.sh create-topic NAME [N]  create a topic with N partitions (default 1)
#
# The broker jars come from Maven Central (org.apache.kafka:kafka_2.13) and are cached in
# $REDRIVE_CACHE (default ~/.cache/redrive), outside the checkout. Every command is idempotent.
set -euo pipefail

KAFKA_VERSION="${KAFKA_VERSION:-4.1.1}"
KAFKA_PORT="${KAFKA_PORT:-9092}"
CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-9093}"
CACHE="${REDRIVE_CACHE:-$HOME/.cache/redrive}"
HOME_DIR="$CACHE/kafka-$KAFKA_VERSION"
RUN_DIR="${KAFKA_RUN_DIR:-/tmp/redrive-kafka-$KAFKA_PORT}"
BOOTSTRAP="127.0.0.1:$KAFKA_PORT"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

log() { printf 'kafka: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

need_java() {
  command -v java >/dev/null || die "java is not installed (Kafka $KAFKA_VERSION needs Java 17+): apt-get install openjdk-17-jre-headless"
  command -v mvn >/dev/null || die "mvn is not installed; it fetches the broker jars from Maven Central: apt-get install maven"
}

fetch() {
  [ -f "$HOME_DIR/libs/.complete" ] && return 0
  need_java
  log "fetching org.apache.kafka:kafka_2.13:$KAFKA_VERSION and its dependencies from Maven Central"
  mkdir -p "$HOME_DIR"
  rm -rf "$HOME_DIR/libs.partial"
  mvn -q -B -f "$HERE/kafka/pom.xml" -Dkafka.version="$KAFKA_VERSION" \
    dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$HOME_DIR/libs.partial" \
    || die "could not fetch the Kafka jars with Maven"
  rm -rf "$HOME_DIR/libs" && mv "$HOME_DIR/libs.partial" "$HOME_DIR/libs"
  touch "$HOME_DIR/libs/.complete"
}

admin() { java -Dorg.slf4j.simpleLogger.defaultLogLevel=off -cp "$HOME_DIR/libs/*" "$HERE/kafka/KafkaAdmin.java" "$@"; }

pid_alive() { [ -f "$RUN_DIR/kafka.pid" ] && kill -0 "$(cat "$RUN_DIR/kafka.pid")" 2>/dev/null; }

write_config() {
  mkdir -p "$RUN_DIR/data"
  cat > "$RUN_DIR/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$RUN_DIR/data
num.partitions=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
group.initial.rebalance.delay.ms=0
message.max.bytes=16777216
replica.fetch.max.bytes=16777216
PROPS
}

start() {
  if pid_alive; then
    admin ready "$BOOTSTRAP" 60 >&2 && { log "already running on $BOOTSTRAP"; echo "KAFKA_BOOTSTRAP=$BOOTSTRAP"; return 0; }
  fi
  fetch
  need_java
  write_config
  if [ ! -f "$RUN_DIR/data/meta.properties" ]; then
    log "formatting KRaft storage in $RUN_DIR/data"
    java -cp "$HOME_DIR/libs/*" kafka.tools.StorageTool format \
      -t "$(java -cp "$HOME_DIR/libs/*" kafka.tools.StorageTool random-uuid)" \
      -c "$RUN_DIR/server.properties" >"$RUN_DIR/format.log" 2>&1 \
      || { cat "$RUN_DIR/format.log" >&2; die "formatting the storage failed"; }
  fi
  log "starting broker $KAFKA_VERSION on $BOOTSTRAP (log: $RUN_DIR/kafka.log)"
  nohup java -Xms256m -Xmx1g -XX:+UseG1GC -Djava.awt.headless=true \
    -cp "$HOME_DIR/libs/*" kafka.Kafka "$RUN_DIR/server.properties" \
    >"$RUN_DIR/kafka.log" 2>&1 </dev/null &
  echo $! >"$RUN_DIR/kafka.pid"
  if ! admin ready "$BOOTSTRAP" 90 >&2; then
    tail -n 30 "$RUN_DIR/kafka.log" >&2 || true
    die "the broker did not answer metadata requests on $BOOTSTRAP"
  fi
  echo "KAFKA_BOOTSTRAP=$BOOTSTRAP"
}

stop() {
  if pid_alive; then
    local pid; pid="$(cat "$RUN_DIR/kafka.pid")"
    log "stopping broker (pid $pid)"
    kill "$pid"
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$RUN_DIR/kafka.pid"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  restart) stop; start >/dev/null ;;
  status) fetch; admin ready "$BOOTSTRAP" 5 ;;
  create-topic) fetch; admin create-topic "$BOOTSTRAP" "${2:?topic name}" "${3:-1}" ;;
  fetch) fetch ;;
  *) echo "usage: $0 start|stop|restart|status|fetch|create-topic NAME [PARTITIONS]" >&2; exit 2 ;;
esac
