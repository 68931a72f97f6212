#!/usr/bin/env bash
# Penora Credits on Citus (PostgreSQL distributed by user_id), on one machine:
# a coordinator and two workers, each a PostgreSQL of its own, on their own
# ports and data directories; the developer's default PostgreSQL is never
# touched. Builds Citus from ../shared/vendor first when citus.so is missing
# (about 4 minutes; Debian has no package). Called as `scripts/cluster.sh citus`.
#
#   scripts/citus.sh [run] [--quick]  up, the money tests and a chaos run against it, stop
#   scripts/citus.sh money            the money tests against a Citus that is up
#   scripts/citus.sh chaos [--quick]  the chaos run against a Citus that is up
#   scripts/citus.sh add-worker       a third worker (5834) joins and the shards are rebalanced
#   scripts/citus.sh bench [--one-postgres]
#                                     penora-bench deduct and hot at 64 connections on it
#                                     (or on a database of the default PostgreSQL)
#   scripts/citus.sh up               coordinator 5831, workers 5832 and 5833, database penora
#   scripts/citus.sh status           the nodes and the shards per worker
#   scripts/citus.sh stop             tear it down (data directories removed)
#
# The migrations see the citus extension and create the schema distributed
# by user_id (migration V8). Environment: $PENORA_CITUS_DIR/env.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
dir=${PENORA_CITUS_DIR:-/tmp/penora-citus}
pg_bin=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
nodes=(c w1 w2)
# shellcheck source=scripts/lib/citus.sh
. "$repo/scripts/lib/citus.sh"

log() { printf '[citus] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
as_postgres() { runuser -u postgres -- "$@"; }
port_of() { case $1 in c) echo 5831 ;; w1) echo 5832 ;; w2) echo 5833 ;; w3) echo 5834 ;; esac; }
psql_on() { local n=$1; shift; psql -h 127.0.0.1 -p "$(port_of "$n")" -U postgres -X -Atq -v ON_ERROR_STOP=1 "$@"; }

node_up() {
  local n=$1 d=$dir/$1
  as_postgres "$pg_bin/initdb" -D "$d" -U postgres --auth=trust >/dev/null
  cat >>"$d/postgresql.conf" <<EOF
port = $(port_of "$n")
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir'
shared_preload_libraries = 'citus'
max_connections = 300
shared_buffers = 128MB
max_prepared_transactions = 200
wal_level = logical
citus.max_client_connections = 250
EOF
  as_postgres "$pg_bin/pg_ctl" -D "$d" -l "$dir/$n.log" -w start >/dev/null
  psql_on "$n" -d postgres -c 'CREATE DATABASE penora'
  psql_on "$n" -d penora -c 'CREATE EXTENSION citus'
}

up() {
  [ "$(id -u)" -eq 0 ] || die "run as root: the nodes run as the postgres user"
  [ -e "$dir/env" ] && die "Citus is up in $dir (scripts/citus.sh stop first)"
  local n
  for n in "${nodes[@]}"; do port_open "$(port_of "$n")" && die "port $(port_of "$n") is taken"; done
  command -v psql >/dev/null && [ -x "$pg_bin/initdb" ] || scripts/services.sh
  citus_ensure
  rm -rf "$dir"; mkdir -p "$dir"; chown postgres: "$dir"
  for n in "${nodes[@]}"; do node_up "$n"; done
  psql_on c -d penora -c "SELECT citus_set_coordinator_host('127.0.0.1', $(port_of c))" \
    -c "SELECT citus_add_node('127.0.0.1', $(port_of w1))" \
    -c "SELECT citus_add_node('127.0.0.1', $(port_of w2))" >/dev/null
  cat >"$dir/env" <<EOF
export DATABASE_URL='postgres://postgres@127.0.0.1:$(port_of c)/penora'
export CITUS_ADMIN_URL='postgres://postgres@127.0.0.1:$(port_of c)/postgres'
EOF
  log "Citus $(psql_on c -d penora -c "select extversion from pg_extension where extname = 'citus'"): coordinator 127.0.0.1:$(port_of c), workers :$(port_of w1) and :$(port_of w2)"
}

# The procedure of docs/scaling.md: a third worker joins, the shards are
# rebalanced online (logical replication), and reconcile checks the money.
add_worker() {
  [ -e "$dir/env" ] || die "Citus is not up (scripts/cluster.sh citus up)"
  port_open "$(port_of w3)" && die "port $(port_of w3) is taken"
  node_up w3
  local started=$SECONDS
  psql_on c -d penora -c "SELECT citus_add_node('127.0.0.1', $(port_of w3))" >/dev/null
  psql_on c -d penora -c "SELECT citus_rebalance_start()" >/dev/null
  until [ "$(psql_on c -d penora -c "SELECT state FROM citus_rebalance_status() ORDER BY job_id DESC LIMIT 1")" = finished ]; do
    [ $((SECONDS - started)) -lt 600 ] || die "the rebalance did not finish in 10 minutes"
    sleep 1
  done
  log "worker w3 added and shards rebalanced in $((SECONDS - started)) s"
  status
  (. "$dir/env"; ./target/debug/penora-ops reconcile)
}

stop() {
  local n
  for n in "${nodes[@]}" w3; do
    [ -d "$dir/$n" ] && as_postgres "$pg_bin/pg_ctl" -D "$dir/$n" -m immediate -w stop >/dev/null 2>&1 || true
  done
  rm -rf "$dir"
  log "stopped; $dir removed"
}

status() {
  psql_on c -d penora -c "SELECT nodename || ':' || nodeport || '  ' || CASE WHEN groupid = 0 THEN 'coordinator' ELSE 'worker' END FROM pg_dist_node ORDER BY groupid"
  psql_on c -d penora -c "SELECT nodename || ':' || nodeport || '  ' || count(*) || ' shards' FROM citus_shards GROUP BY nodename, nodeport ORDER BY 1"
}

# The money tests: concurrency (200 deducts on one balance, 50 with one key,
# saves and deletes against the quota), refunds, batches against one by one,
# reconcile and audit verify, the worker's refunds by event, credit lots and
# partial refunds (API and worker), the refund window on every way back, the
# quota with titles and metadata and the projects cap.
money_tests='test(/^(credits|batching|storage|lots|refund_window)::|^workspace::concurrent_deletes|^reconcile::|^uploads::(forty_concurrent|title_and_metadata)|^hostile_events::no_event_gives|^a_failure_event_refunds_once|^a_success_event_settles|^a_worker_killed/) | binary_id(penora-ledger::batching)'

# Each test's database is made on every node (testing.rs, TEST_CITUS_WORKERS).
money() {
  log "money tests on Citus (a database per test on all three nodes)"
  TEST_DATABASE_URL=postgres://postgres@127.0.0.1:$(port_of c)/postgres \
  TEST_CITUS_WORKERS=127.0.0.1:$(port_of w1),127.0.0.1:$(port_of w2) \
    cargo nextest run --locked -p penora-api -p penora-worker -p penora-ops -p penora-ledger \
      --test integration --test pipeline --test cli --test batching \
      -j 3 --no-fail-fast -E "$money_tests"
}

# penora-chaos against the services on Citus (database `penora`, a vhost of
# its own on the local RabbitMQ), as scripts/chaos.sh does on one PostgreSQL.
chaos() {
  local quick=$1 vhost port args
  vhost=penora_citus_chaos_$(date +%s)_$$
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  rabbitmqctl -q add_vhost "$vhost" >/dev/null
  rabbitmqctl -q set_permissions -p "$vhost" guest '.*' '.*' '.*' >/dev/null
  if [ "$quick" -eq 1 ]; then
    args=(--secs 42 --fault-every 4 --outage-secs 2 --clients 8 --users 20)
  else
    args=(--secs 180 --fault-every 8 --outage-secs 3 --clients 16 --users 40)
  fi
  mkdir -p target/citus
  local status=0
  (
    # shellcheck source=/dev/null
    . "$dir/env"
    export AMQP_URL=amqp://guest:guest@127.0.0.1:5672/$vhost AMQP_PREFIX=""
    export PENORA_API_KEY=citus-chaos-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
    export RATE_LIMIT_PER_SEC=1000000 RATE_LIMIT_BURST=1000000 LOG_FORMAT=json RUST_LOG=warn
    export BIND_ADDR=127.0.0.1:$port WORKER_METRICS_ADDR=127.0.0.1:0
    ./target/debug/penora-ops migrate >/dev/null
    ./target/debug/penora-chaos --api-bin ./target/debug/penora-api --worker-bin ./target/debug/penora-worker \
      --ops-bin ./target/debug/penora-ops --vhost "$vhost" --log-dir target/citus "${args[@]}" | tee target/citus/chaos.md
  ) || status=$?
  rabbitmqctl -q delete_vhost "$vhost" >/dev/null 2>&1 || true
  return "$status"
}

# penora-bench's deduct and hot workloads at 64 connections against the
# services on Citus (release builds; database `penora`), beside its raw
# baseline on the same Citus. `scripts/bench.sh` gives the same on one
# PostgreSQL; docs/scaling.md compares them.
bench() {
  local where=citus
  if [ "${1:-}" = "--one-postgres" ]; then where=postgres; shift; fi
  [ "$where" = postgres ] || [ -e "$dir/env" ] || die "Citus is not up (scripts/cluster.sh citus up)"
  cargo build --release --locked --bin penora-api --bin penora-worker --bin penora-ops --bin penora-bench >&2
  # shellcheck source=scripts/lib/run.sh
  . scripts/lib/run.sh
  new_run citusbench
  if [ "$where" = citus ]; then
    # shellcheck source=/dev/null
    . "$dir/env"
  else
    psql "$admin" -qc "CREATE DATABASE $db"
  fi
  mkdir -p target/citus
  ./target/release/penora-ops migrate >/dev/null
  DB_POOL_SIZE=20 ./target/release/penora-api >target/citus/api.log 2>&1 &
  local api_pid=$!
  DB_POOL_SIZE=8 ./target/release/penora-worker >target/citus/worker.log 2>&1 &
  local worker_pid=$!
  # shellcheck disable=SC2064
  trap "kill $api_pid $worker_pid 2>/dev/null; drop_run $admin $db $prefix" EXIT
  local api
  api=$(api_address target/citus/api.log) || { cat target/citus/api.log; die "penora-api did not start"; }
  ./target/release/penora-bench --api "$api" --api-pid "$api_pid" --worker-pid "$worker_pid" \
    --workloads deduct,hot --concurrency 64 --secs "${BENCH_SECS:-10}" --users 100000 \
    --markdown "target/citus/benchmarks-$where.md" --command "scripts/cluster.sh citus bench" "$@"
}

run() {
  local quick=0
  [ "${1:-}" = "--quick" ] && quick=1
  [ -e "$dir/env" ] && stop
  trap stop EXIT
  up
  cargo build --locked --workspace --all-targets >&2
  money
  chaos "$quick"
  status
}

case ${1:-run} in
  up) up ;;
  money) money ;;
  add-worker) add_worker ;;
  chaos) [ "${2:-}" = "--quick" ] && chaos 1 || chaos 0 ;;
  bench) shift; bench "$@" ;;
  stop) stop ;;
  status) status ;;
  run|--quick) [ "${1:-}" = run ] && shift; run "$@" ;;
  *) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
