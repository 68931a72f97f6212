#!/usr/bin/env bash
# Benchmarks Penora Credits against raw PostgreSQL and RabbitMQ in one run:
# a fresh database and queue prefix, penora-api and penora-worker in release
# mode, 100,000 seeded users, every workload at 1, 16 and 64 connections, the
# service and the raw baseline back to back on the same data.
#
#   scripts/bench.sh            full run (~10 s per point); writes docs/benchmarks.md and docs/benchmarks.svg
#   scripts/bench.sh --quick    a few seconds per point (< 2 minutes); writes target/bench/ only
#   scripts/bench.sh --quick --workloads hot --concurrency 64   one point (extra arguments go to penora-bench)
#
# Not part of the test suite: the figures are printed, never asserted.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/run.sh
quick=0
[ "${1:-}" = "--quick" ] && { quick=1; shift; }
# Anything else is passed to penora-bench, e.g. `--workloads hot --concurrency 64`
# to measure one point while working on it.
extra=("$@")

scripts/services.sh
cargo build --release --locked --bin penora-api --bin penora-worker --bin penora-bench

new_run bench
# PostgreSQL connections: the API's pool, the worker's, and the raw baseline's
# (64 at the highest concurrency, + 4) must fit in max_connections (100 by
# default), or the services' new connections are refused in the middle of a
# raw phase and their work goes through retries.
api_pool=${API_DB_POOL_SIZE:-20}
worker_pool=${WORKER_DB_POOL_SIZE:-8}
out=target/bench; mkdir -p "$out"

psql "$admin" -qc "CREATE DATABASE $db"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  drop_run "$admin" "$db" "$prefix"
}
trap cleanup EXIT

max_conn=$(psql "$admin" -Atc "SHOW max_connections")
if [ $((api_pool + worker_pool + 64 + 4 + 2)) -gt "$max_conn" ]; then
  echo "bench: API pool $api_pool + worker pool $worker_pool + 68 bench connections exceed PostgreSQL max_connections=$max_conn;" >&2
  echo "bench: lower API_DB_POOL_SIZE / WORKER_DB_POOL_SIZE or raise max_connections" >&2
  exit 1
fi
# Image work (the API's WebP encoding, the worker's thumbnails) runs on
# threads at nice 19, but nice only orders threads within one scheduling
# group: on this shared machine the services' group would still take CPU from
# PostgreSQL's. Where the machine allows it (root, cgroup v1 cpu controller),
# the image threads join a cgroup with cpu.idle = 1 (IMAGE_CPU_CGROUP), as a
# deployment that shares a machine with its database should do.
if [ -z "${IMAGE_CPU_CGROUP:-}" ] && [ -w /sys/fs/cgroup/cpu ]; then
  cg=/sys/fs/cgroup/cpu/penora-images
  if mkdir -p "$cg" 2>/dev/null && { echo 1 >"$cg/cpu.idle" || echo 2 >"$cg/cpu.shares"; } 2>/dev/null; then
    export IMAGE_CPU_CGROUP=$cg
  fi
fi
echo "bench: image threads' cgroup: ${IMAGE_CPU_CGROUP:-none (nice 19 only)}"
DB_POOL_SIZE=$api_pool ./target/release/penora-api >"$out/api.log" 2>&1 &
pids+=($!); api_pid=$!
DB_POOL_SIZE=$worker_pool ./target/release/penora-worker >"$out/worker.log" 2>&1 &
pids+=($!); worker_pid=$!
api=$(api_address "$out/api.log") || { echo "penora-api did not start:"; cat "$out/api.log"; exit 1; }

if [ "$quick" -eq 1 ]; then
  args=(--secs 2 --users 100000 --refund-events 1000 --markdown "$out/benchmarks.md" --svg "$out/benchmarks.svg" --command "scripts/bench.sh --quick")
else
  args=(--secs 10 --users 100000 --refund-events 5000 --markdown docs/benchmarks.md --svg docs/benchmarks.svg --command "scripts/bench.sh")
fi
./target/release/penora-bench --api "$api" --api-pid "$api_pid" --worker-pid "$worker_pid" \
  --image-cgroup "${IMAGE_CPU_CGROUP:-none}" "${args[@]}" "${extra[@]}"
# The services' own view of the run (batch sizes, fallbacks, lags), for whoever tunes them.
curl -fsS "$api/metrics" >"$out/api-metrics.txt" 2>/dev/null || true
worker_metrics=$(grep -o 'metrics on http://[0-9.:]*' "$out/worker.log" | head -1 | sed 's/metrics on //' || true)
[ -n "$worker_metrics" ] && curl -fsS "$worker_metrics/metrics" >"$out/worker-metrics.txt" 2>/dev/null || true
echo "service metrics: $out/api-metrics.txt $out/worker-metrics.txt"
