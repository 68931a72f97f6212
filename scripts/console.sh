#!/usr/bin/env bash
# The support console (/console, contract §17) in headless Chromium: starts
# PostgreSQL and RabbitMQ (scripts/services.sh), installs Debian's chromium
# when it is missing (apt-get; puppeteer-core drives it and downloads no
# browser), installs the test's packages from the npm registry (`npm ci`),
# builds the services and runs penora-api on a database and a queue prefix of
# its own (the test starts and stops penora-worker itself), then runs
# api/tests/browser/console.test.mjs with node's test runner.
#
# Screenshots of the user page and the operations page, 1280 and 390 px wide,
# are written to target/console/screenshots/ on every run.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/run.sh

scripts/services.sh
if ! command -v chromium >/dev/null; then
  echo "console: installing chromium (Debian's package)"
  export DEBIAN_FRONTEND=noninteractive
  as_root=()
  [ "$(id -u)" -eq 0 ] || as_root=(sudo)
  "${as_root[@]}" apt-get install -y -q chromium >/dev/null ||
    { "${as_root[@]}" apt-get update -q >/dev/null && "${as_root[@]}" apt-get install -y -q chromium >/dev/null; }
fi
browser_tests=api/tests/browser
(cd "$browser_tests" && npm ci --no-audit --no-fund --loglevel=error)
cargo build --locked --bin penora-api --bin penora-worker --bin penora-ops

out=target/console
rm -rf "$out/screenshots"
mkdir -p "$out/screenshots"
new_run console
start_run
spawn "$out/api.log" ./target/debug/penora-api
api=$(api_address "$out/api.log") || { echo "console: penora-api did not start:"; cat "$out/api.log"; exit 1; }

runner=()
[ "$(node -p 'process.versions.node.split(".")[0]')" -ge 20 ] && runner=(--test-concurrency=1 --test-timeout=180000)
PENORA_BASE_URL=$api CHROMIUM=$(command -v chromium) SCREENSHOTS="$PWD/$out/screenshots" \
  PENORA_WORKER="$PWD/target/debug/penora-worker" PENORA_OPS="$PWD/target/debug/penora-ops" \
  node --test "${runner[@]}" "$browser_tests/console.test.mjs"
echo "console: screenshots in $out/screenshots:"
ls -1 "$out/screenshots"
