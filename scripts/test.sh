#!/usr/bin/env bash
# Runs every test: unit tests and the integration tests against the real
# PostgreSQL (each test in a database of its own). Starts the services first.
# Extra arguments go to the test runner (e.g. a filter).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
cargo build --workspace --all-targets --locked
if cargo nextest --version >/dev/null 2>&1; then
  exec cargo nextest run --workspace --locked --no-fail-fast "$@"
else
  exec cargo test --workspace --locked --no-fail-fast "$@"
fi
