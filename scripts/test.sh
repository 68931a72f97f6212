#!/usr/bin/env bash
# Runs every test: unit tests and the integration tests against the real
# PostgreSQL and RabbitMQ (each test with a database and a queue prefix of its
# own). Starts the services first. Extra arguments go to nextest (e.g. a filter).
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
# The cluster tests (worker/tests/cluster) need the cluster of
# scripts/cluster.sh; `scripts/cluster.sh chaos` runs them (CI does too).
exec cargo nextest run --workspace --locked --no-fail-fast \
  -E 'not binary_id(penora-worker::cluster)' "$@"
