#!/usr/bin/env bash
# Benchmarks Penora Credits against raw PostgreSQL and RabbitMQ in one run:
# a fresh database and queue prefix, penora-api and penora-worker in release
# mode, 100,000 seeded users, every workload at 1, 16 and 64 connections, the
# service and the raw baseline back to back on the same data.
#
#   scripts/bench.sh            full run (~10 s per point, 60 s sustained points); writes docs/benchmarks.md and docs/benchmarks.svg
#   scripts/bench.sh --quick    every workload, 2 s per point, at 64 connections (saves at 1), < 2 minutes; writes target/bench/ only
#   scripts/bench.sh --quick --workloads hot --concurrency 64   one point (extra arguments go to penora-bench)
#
# The `limits` workload (issue 27) sets two spend limits on each of 10,000
# users of its own through the API (2,000 with --quick), then runs `deduct` on them and on as many
# users without a limit, in turns, and reports the limits' overhead.
#
# Not part of the test suite: the figures are printed, never asserted.
#
# Database work per movement (commits, WAL, statement time) needs
# pg_stat_statements, which a server loads only at start. When the server on
# 127.0.0.1:5432 already loads it, the run uses it; otherwise the run starts a
# private PostgreSQL instance of its own (PostgreSQL's defaults, but for the
# settings written below), on a free port, and removes it at the end. It never
# restarts a server it did not start. BENCH_PG=shared uses the server on
# 5432 as it is (the statement figures then read n/a).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/run.sh
quick=0
[ "${1:-}" = "--quick" ] && { quick=1; shift; }
# Anything else is passed to penora-bench, e.g. `--workloads hot --concurrency 64`
# to measure one point while working on it.
extra=("$@")

scripts/services.sh
# The services run as deployed (the Dockerfile's setting): glibc's mmap
# threshold fixed, so freed request bodies and images leave the RSS.
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-131072} MALLOC_ARENA_MAX=${MALLOC_ARENA_MAX:-2}
cargo build --release --locked --bin penora-api --bin penora-worker --bin penora-bench

# A private PostgreSQL instance with pg_stat_statements, unless the shared
# server already has it (or BENCH_PG=shared).
pg_port=5432
private_pg=
preloads=$(psql -h 127.0.0.1 -U postgres -d postgres -Atc "SHOW shared_preload_libraries")
if [[ "$preloads" != *pg_stat_statements* && "${BENCH_PG:-private}" != shared ]]; then
  pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  as_pg=(); [ "$(id -u)" -eq 0 ] && as_pg=(runuser -u postgres --)
  private_pg=$(mktemp -d /tmp/penora-bench-pg.XXXXXX)
  [ "$(id -u)" -eq 0 ] && chown postgres "$private_pg"
  pg_port=5490
  while (exec 3<>"/dev/tcp/127.0.0.1/$pg_port") 2>/dev/null; do pg_port=$((pg_port + 1)); done
  "${as_pg[@]}" "$pg_bin/initdb" -D "$private_pg/data" -A trust -U postgres >"$private_pg/initdb.log"
  # Checkpoints far apart, so that the WAL figures count the work and not
  # whether a checkpoint's full-page images fell into a phase.
  cat >>"$private_pg/data/postgresql.conf" <<EOF
port = $pg_port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$private_pg'
shared_preload_libraries = 'pg_stat_statements'
pg_stat_statements.track_utility = on
pg_stat_statements.track = all
max_connections = 200
checkpoint_timeout = 30min
max_wal_size = 8GB
EOF
  "${as_pg[@]}" "$pg_bin/pg_ctl" -D "$private_pg/data" -l "$private_pg/server.log" -w start >/dev/null
  echo "bench: private PostgreSQL with pg_stat_statements on 127.0.0.1:$pg_port ($private_pg)"
fi
stop_private_pg() {
  [ -n "$private_pg" ] || return 0
  "${as_pg[@]}" "$pg_bin/pg_ctl" -D "$private_pg/data" -m fast -w stop >/dev/null 2>&1 || true
  rm -rf "$private_pg"
}
trap stop_private_pg EXIT

new_run bench "$pg_port"
# PostgreSQL connections: the API's pool, the worker's, and the raw baseline's
# (64 at the highest concurrency, + 4) must fit in max_connections (100 by
# default), or the services' new connections are refused in the middle of a
# raw phase and their work goes through retries.
api_pool=${API_DB_POOL_SIZE:-20}
worker_pool=${WORKER_DB_POOL_SIZE:-8}
out=target/bench; mkdir -p "$out"

psql "$admin" -qc "CREATE DATABASE $db"
psql "$DATABASE_URL" -qc "CREATE EXTENSION IF NOT EXISTS pg_stat_statements" 2>/dev/null ||
  echo "bench: pg_stat_statements is not available: statement figures will read n/a"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  drop_run "$admin" "$db" "$prefix"
  stop_private_pg
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
  # Enough to keep the harness from rotting in CI: every workload once.
  # 2,000 limited users: their 4,000 limits are set through the API in seconds.
  args=(--secs 2 --concurrency 64 --save-concurrency 1 --users 100000 --refund-events 1000 --limit-users 2000
    --markdown "$out/benchmarks.md" --svg "$out/benchmarks.svg" --command "scripts/bench.sh --quick")
else
  args=(--secs 10 --sustained-secs 60 --users 100000 --refund-events 5000 --markdown docs/benchmarks.md --svg docs/benchmarks.svg --command "scripts/bench.sh")
fi
./target/release/penora-bench --api "$api" --api-pid "$api_pid" --worker-pid "$worker_pid" \
  --image-cgroup "${IMAGE_CPU_CGROUP:-none}" "${args[@]}" "${extra[@]}"
# The services' own view of the run (batch sizes, fallbacks, lags), for whoever tunes them.
curl -fsS "$api/metrics" >"$out/api-metrics.txt" 2>/dev/null || true
worker_metrics=$(grep -o 'metrics on http://[0-9.:]*' "$out/worker.log" | head -1 | sed 's/metrics on //' || true)
[ -n "$worker_metrics" ] && curl -fsS "$worker_metrics/metrics" >"$out/worker-metrics.txt" 2>/dev/null || true
echo "service metrics: $out/api-metrics.txt $out/worker-metrics.txt"
