#!/usr/bin/env bash
# Screenshots of the web console in docs/, taken by headless Chromium from the demo's data: runs
# `redrive-demo run --console` (the demo, stopped before the replay, with the console up), shoots
# the pages with examples/console-screenshots.rs, then stops the demo.
#
#   scripts/screenshots.sh        (make screenshots; needs `cargo build --bins --examples`)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
target="${CARGO_TARGET_DIR:-target}"
addr="127.0.0.1:${REDRIVE_SCREENSHOT_PORT:-8089}"
log="$(mktemp)"
"$target/debug/redrive-demo" run --console "$addr" >"$log" 2>&1 &
demo=$!
trap 'kill -TERM "$demo" 2>/dev/null || true; wait "$demo" 2>/dev/null || true; rm -f "$log"' EXIT
deadline=$((SECONDS + 180))
until grep -q "The web console serves" "$log"; do
  if ! kill -0 "$demo" 2>/dev/null; then cat "$log" >&2; echo "screenshots: the demo exited" >&2; exit 1; fi
  if [ "$SECONDS" -ge "$deadline" ]; then cat "$log" >&2; echo "screenshots: no console within 180 s" >&2; exit 1; fi
  sleep 1
done
"$target/debug/examples/console-screenshots" "http://$addr" docs
