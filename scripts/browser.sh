#!/usr/bin/env bash
# Installs the headless browser that the console's tests drive: Debian's Chromium and its
# WebDriver server (chromium-driver). Idempotent.
#
#   scripts/browser.sh install   install both if missing, print their versions
set -euo pipefail

log() { printf 'browser: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else die "need root (or sudo) to run: $*"; fi
}

install() {
  if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    return 0
  fi
  log "installing chromium and chromium-driver from Debian's packages"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null \
    || die "apt-get install chromium chromium-driver failed"
}

case "${1:-}" in
  install)
    install
    log "$(chromium --version 2>/dev/null | head -n 1); $(chromedriver --version | head -n 1)"
    ;;
  *)
    echo "usage: $0 install" >&2
    exit 2
    ;;
esac
