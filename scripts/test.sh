#!/usr/bin/env bash
# Runs every test: the TypeScript SDK's against the running service
# (scripts/sdk.sh), the support console's in headless Chromium
# (scripts/console.sh), then the workspace's unit tests and integration tests
# against the real PostgreSQL and RabbitMQ (each test with a database and a
# queue prefix of its own). Starts the services first. Extra arguments go to
# nextest (e.g. a filter) and leave the SDK's and the browser's tests out.
#
# nextest runs each test in its own process (the metrics tests compare
# increases, so they hold either way); it is installed from crates.io when
# missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "[test] installing cargo-nextest from crates.io (once)" >&2
  cargo install --locked cargo-nextest
fi
cargo build --workspace --all-targets --locked
# The TypeScript SDK against the real service (scripts/sdk.sh: its types
# against the API's document, tsc, node's test runner, the packed tarball);
# left out when arguments pick tests, or with PENORA_SKIP_SDK=1.
if [ "$#" -eq 0 ] && [ "${PENORA_SKIP_SDK:-0}" != 1 ]; then
  scripts/sdk.sh test
fi
# The support console in headless Chromium (scripts/console.sh: Debian's
# chromium, installed when missing; screenshots in target/console/screenshots);
# left out when arguments pick tests, or with PENORA_SKIP_BROWSER=1.
if [ "$#" -eq 0 ] && [ "${PENORA_SKIP_BROWSER:-0}" != 1 ]; then
  scripts/console.sh
fi
# The cluster tests (worker/tests/cluster) need the cluster of
# scripts/cluster.sh; `scripts/cluster.sh chaos` runs them (CI does too).
exec cargo nextest run --workspace --locked --no-fail-fast \
  -E 'not binary_id(penora-worker::cluster)' "$@"
