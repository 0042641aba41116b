#!/usr/bin/env bash
# Installs promtool, which checks the shipped Prometheus rules (deploy/prometheus/): Debian's
# `prometheus` package ships it. Idempotent.
#
#   scripts/promtool.sh install   install it if missing, print its version
set -euo pipefail

log() { printf 'promtool: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else die "need root (or sudo) to run: $*"; fi
}

case "${1:-}" in
  install)
    if ! command -v promtool >/dev/null; then
      log "installing Debian's prometheus package (for promtool)"
      as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null \
        || die "apt-get install prometheus failed"
      # Only promtool is wanted: the package's server is stopped where systemd started it.
      as_root systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
    log "$(promtool --version 2>&1 | head -n 1)"
    ;;
  *)
    echo "usage: $0 install" >&2
    exit 2
    ;;
esac
