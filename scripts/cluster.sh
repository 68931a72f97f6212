#!/usr/bin/env bash
# Penora Credits beyond one machine, on one machine: every node a real process
# on its own ports and data directory, nothing shared with the developer's
# default PostgreSQL (5432) and RabbitMQ (5672), which it never touches.
#
#   scripts/cluster.sh up            3 RabbitMQ nodes in one cluster (quorum queues),
#                                    a PostgreSQL primary with a synchronous streaming
#                                    standby, 2 APIs and 2 workers
#   scripts/cluster.sh status        the nodes, their roles and the processes
#   scripts/cluster.sh stop          tear it all down (data directories removed)
#   scripts/cluster.sh chaos [--quick]
#                                    up, the cluster tests, then penora-chaos spreading
#                                    requests over both APIs while faults are injected
#                                    (a RabbitMQ node killed, an API and a worker killed,
#                                    a PostgreSQL failover and the old primary rebuilt as
#                                    the new standby); every invariant checked; stop
#   scripts/cluster.sh citus         Citus (built from ../shared/vendor when citus.so is
#                                    missing): a coordinator and 2 workers, the schema
#                                    distributed by user_id, the money tests and a
#                                    chaos run against it
#   scripts/cluster.sh fault KIND    one fault, used by penora-chaos (see below)
#
# Ports (PENORA_CLUSTER_DIR, default /tmp/penora-cluster, holds data and logs):
#   RabbitMQ   AMQP 5721-5723, distribution 25721-25723 (nodes penora-c1..3@localhost)
#   PostgreSQL 5811 and 5812 (whichever is primary), database penora
#   APIs       127.0.0.1:5801 and :5802; workers' metrics :5803 and :5804
#   Citus      coordinator 5831, workers 5832 and 5833
#
# The services' environment is in $PENORA_CLUSTER_DIR/env (DATABASE_URL with
# both PostgreSQL hosts and target_session_attrs=read-write, AMQP_URL with the
# three nodes, the bootstrap API key): `. /tmp/penora-cluster/env` to use it.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
dir=${PENORA_CLUSTER_DIR:-/tmp/penora-cluster}
pg_bin=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
rabbit_nodes=(1 2 3)
pg_nodes=(a b)

log() { printf '[cluster] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
as_postgres() { runuser -u postgres -- "$@"; }
# RabbitMQ's own scripts, as its user, with its cookie (shared with the
# default node, which only lets the CLI reach our nodes; it joins nothing).
as_rabbitmq() { runuser -u rabbitmq -- env HOME=/var/lib/rabbitmq "$@"; }
now_ms() { date +%s%3N; }

# ---------------------------------------------------------------- RabbitMQ

rabbit_name() { echo "penora-c$1@localhost"; }
rabbit_port() { echo $((5720 + $1)); }
rabbitmqctl_on() { local n=$1; shift; as_rabbitmq /usr/lib/rabbitmq/bin/rabbitmqctl -n "$(rabbit_name "$n")" "$@"; }

rabbit_start() {
  local n=$1 d=$dir/rabbit/$1
  mkdir -p "$d"
  printf 'listeners.tcp.default = %s\nloopback_users = none\n' "$(rabbit_port "$n")" >"$d/rabbitmq.conf"
  echo '[].' >"$d/enabled_plugins"
  chown -R rabbitmq: "$d"
  as_rabbitmq env RABBITMQ_NODENAME="$(rabbit_name "$n")" RABBITMQ_NODE_PORT="$(rabbit_port "$n")" \
    RABBITMQ_DIST_PORT=$((25720 + n)) RABBITMQ_MNESIA_BASE="$d/mnesia" RABBITMQ_LOG_BASE="$d/log" \
    RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf" RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins" \
    /usr/lib/rabbitmq/bin/rabbitmq-server -detached >/dev/null 2>&1
  local deadline=$((SECONDS + 90))
  until rabbitmqctl_on "$n" -q await_startup --timeout 5 >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || die "RabbitMQ node $(rabbit_name "$n") did not start: see $d/log"
    sleep 1
  done
}

# The node's Erlang VM, found by the node name in its environment.
rabbit_pid() {
  local p
  for p in $(pgrep -f beam.smp || true); do
    if tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null | grep -qx "RABBITMQ_NODENAME=$(rabbit_name "$1")"; then
      echo "$p"; return 0
    fi
  done
  return 1
}

rabbit_kill() {
  local p
  p=$(rabbit_pid "$1") || return 0
  kill -9 "$p" 2>/dev/null || true
  while kill -0 "$p" 2>/dev/null; do sleep 0.1; done
}

rabbit_up() {
  local n
  for n in "${rabbit_nodes[@]}"; do
    port_open "$(rabbit_port "$n")" && die "port $(rabbit_port "$n") is taken: is a cluster already up? (scripts/cluster.sh stop)"
  done
  log "RabbitMQ: starting 3 nodes"
  local pids=()
  for n in "${rabbit_nodes[@]}"; do rabbit_start "$n" & pids+=($!); done
  for n in "${pids[@]}"; do wait "$n" || die "a RabbitMQ node did not start"; done
  for n in 2 3; do
    rabbitmqctl_on "$n" -q stop_app >/dev/null
    rabbitmqctl_on "$n" -q join_cluster "$(rabbit_name 1)" >/dev/null
    rabbitmqctl_on "$n" -q start_app >/dev/null
  done
  log "RabbitMQ: $(rabbitmqctl_on 1 -q cluster_status --formatter json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["running_nodes"]))') nodes running in one cluster"
}

# ---------------------------------------------------------------- PostgreSQL

pg_port() { case $1 in a) echo 5811 ;; b) echo 5812 ;; c) echo 5831 ;; w1) echo 5832 ;; w2) echo 5833 ;; esac; }
pg_data() { echo "$dir/pg/$1"; }
pg_ctl_on() { local n=$1; shift; as_postgres "$pg_bin/pg_ctl" -D "$(pg_data "$n")" -l "$dir/logs/pg-$n.log" "$@"; }
psql_on() { local n=$1; shift; psql -h 127.0.0.1 -p "$(pg_port "$n")" -U postgres -X -Atq "$@"; }
primary() { cat "$dir/pg/primary"; }
other() { if [ "$1" = a ]; then echo b; else echo a; fi; }

pg_settings() { # pg_settings NODE: its port and what replication needs
  cat >>"$(pg_data "$1")/postgresql.conf" <<EOF
port = $(pg_port "$1")
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir/pg'
max_connections = 300
shared_buffers = 128MB
wal_level = replica
max_wal_senders = 10
wal_keep_size = 512MB
hot_standby = on
wal_log_hints = on
EOF
}

pg_wait() { # pg_wait NODE: until it accepts connections
  local deadline=$((SECONDS + 60))
  until psql_on "$1" -d postgres -c 'select 1' >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || die "PostgreSQL $1 did not start: see $dir/logs/pg-$1.log"
    sleep 0.2
  done
}

# A standby of the primary: a base backup streamed from it, told to follow it.
pg_standby() { # pg_standby NODE
  local n=$1 p
  p=$(primary)
  rm -rf "$(pg_data "$n")"
  as_postgres "$pg_bin/pg_basebackup" -h 127.0.0.1 -p "$(pg_port "$p")" -U postgres \
    -D "$(pg_data "$n")" -R -X stream -c fast >/dev/null
  sed -i "s/^port = .*/port = $(pg_port "$n")/" "$(pg_data "$n")/postgresql.conf"
  # Synchronous: a commit the primary acknowledges is on the standby too, so
  # a failover never loses an acknowledged movement.
  echo "primary_conninfo = 'host=127.0.0.1 port=$(pg_port "$p") user=postgres application_name=$n'" \
    >>"$(pg_data "$n")/postgresql.auto.conf"
  pg_ctl_on "$n" -w start >/dev/null
  pg_wait "$n"
  local deadline=$((SECONDS + 30))
  until [ "$(psql_on "$p" -d postgres -c "select count(*) from pg_stat_replication where application_name = '$n' and state = 'streaming'")" = 1 ]; do
    [ "$SECONDS" -lt "$deadline" ] || die "standby $n does not stream from $p"
    sleep 0.2
  done
  psql_on "$p" -d postgres -c "ALTER SYSTEM SET synchronous_standby_names = '$n'" -c 'SELECT pg_reload_conf()' >/dev/null
}

pg_up() {
  local n
  for n in "${pg_nodes[@]}"; do
    port_open "$(pg_port "$n")" && die "port $(pg_port "$n") is taken: is a cluster already up? (scripts/cluster.sh stop)"
  done
  mkdir -p "$dir/pg"; chown postgres: "$dir/pg" "$dir/logs"
  log "PostgreSQL: primary a on $(pg_port a), synchronous standby b on $(pg_port b)"
  as_postgres "$pg_bin/initdb" -D "$(pg_data a)" -U postgres --auth=trust >/dev/null
  pg_settings a
  echo a >"$dir/pg/primary"
  pg_ctl_on a -w start >/dev/null
  pg_wait a
  psql_on a -d postgres -c 'CREATE DATABASE penora'
  pg_standby b
}

# Stops the primary (fast: its sessions end, its last WAL reaches the
# standby), promotes the standby and waits until it takes writes.
pg_failover() {
  local old new
  old=$(primary); new=$(other "$old")
  pg_ctl_on "$old" -m fast -w stop >/dev/null
  pg_ctl_on "$new" -w promote >/dev/null
  until [ "$(psql_on "$new" -d postgres -c 'select pg_is_in_recovery()' 2>/dev/null)" = f ]; do sleep 0.1; done
  psql_on "$new" -d postgres -c "ALTER SYSTEM RESET synchronous_standby_names" -c 'SELECT pg_reload_conf()' >/dev/null
  echo "$new" >"$dir/pg/primary"
}

# ---------------------------------------------------------------- services

api_port() { echo $((5800 + $1)); }
worker_port() { echo $((5802 + $1)); }

write_env() {
  local key
  key=cluster-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
  cat >"$dir/env" <<EOF
export DATABASE_URL='postgres://postgres@127.0.0.1:$(pg_port a),127.0.0.1:$(pg_port b)/penora?target_session_attrs=read-write'
export AMQP_URL='amqp://guest:guest@127.0.0.1:5721/%2f,amqp://guest:guest@127.0.0.1:5722/%2f,amqp://guest:guest@127.0.0.1:5723/%2f'
export AMQP_PREFIX=''
export AMQP_QUEUE_TYPE=quorum
export PENORA_API_KEY='$key'
export RATE_LIMIT_PER_SEC=1000000 RATE_LIMIT_BURST=1000000
# The timer (window settlements, lot expiry) every 2 s: promotional lots
# expire during the run, and the checks wait for their entries.
export SETTLE_INTERVAL_SECS=2
export LOG_FORMAT=json RUST_LOG=warn
export DB_POOL_SIZE=16
# Webhooks: the chaos run subscribes a local receiver to every event; its
# refusals are retried within a second.
export WEBHOOK_SECRET_KEY='$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')'
# The receiver refuses the first arrival of one event in seven, so five
# refusals in a row, which open an endpoint's circuit, happen in some runs:
# it stays open 2 s here, not a minute, so the checks' wait covers it.
export WEBHOOK_ALLOW_PRIVATE=true WEBHOOK_RETRY_BASE_MS=500 WEBHOOK_RETRY_MAX_MS=2000 WEBHOOK_CIRCUIT_COOLDOWN_MS=2000
EOF
}

# Waits until GET http://127.0.0.1:PORT/health/live answers.
live() { # live PORT SECONDS
  local deadline=$((SECONDS + $2))
  until curl -fsS -m 1 "http://127.0.0.1:$1/health/live" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.1
  done
}

service_start() { # service_start api|worker N
  local kind=$1 n=$2
  (
    # shellcheck source=/dev/null
    . "$dir/env"
    export BIND_ADDR=127.0.0.1:$(api_port "$n") WORKER_METRICS_ADDR=127.0.0.1:$(worker_port "$n")
    nohup "$repo/target/debug/penora-$kind" >>"$dir/logs/$kind-$n.log" 2>&1 &
    echo $! >"$dir/$kind-$n.pid"
  )
  local port
  if [ "$kind" = api ]; then port=$(api_port "$n"); else port=$(worker_port "$n"); fi
  live "$port" 60 || die "penora-$kind $n did not come up: see $dir/logs/$kind-$n.log"
}

service_kill() { # service_kill api|worker N
  local pid
  pid=$(cat "$dir/$1-$2.pid" 2>/dev/null) || return 0
  kill -9 "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
}

services_up() {
  local n
  for n in 1 2; do
    port_open "$(api_port "$n")" && die "port $(api_port "$n") is taken"
    port_open "$(worker_port "$n")" && die "port $(worker_port "$n") is taken"
  done
  (. "$dir/env"; "$repo/target/debug/penora-ops" migrate >/dev/null)
  for n in 1 2; do service_start api "$n"; service_start worker "$n"; done
  log "services: APIs on 127.0.0.1:$(api_port 1) and :$(api_port 2), workers' metrics on :$(worker_port 1) and :$(worker_port 2)"
}

# ---------------------------------------------------------------- commands

build() {
  cargo build --locked --bin penora-api --bin penora-worker --bin penora-ops --bin penora-chaos >&2
}

preflight() {
  [ "$(id -u)" -eq 0 ] || die "run as root: nodes run as the postgres and rabbitmq users"
  command -v rabbitmq-server >/dev/null && [ -x "$pg_bin/initdb" ] || scripts/services.sh
  command -v curl >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl >/dev/null \
    || die "curl is needed (apt-get install curl)"
}

up() {
  preflight
  [ -e "$dir/env" ] && die "a cluster is up in $dir (scripts/cluster.sh stop first)"
  build
  rm -rf "$dir"; mkdir -p "$dir/logs"
  rabbit_up
  pg_up
  write_env
  services_up
  status
}

stop() {
  local n kind
  for kind in api worker; do for n in 1 2; do service_kill "$kind" "$n"; done; done
  for n in "${rabbit_nodes[@]}"; do rabbit_kill "$n"; done
  for n in a b c w1 w2; do
    [ -d "$(pg_data "$n")" ] && as_postgres "$pg_bin/pg_ctl" -D "$(pg_data "$n")" -m immediate -w stop >/dev/null 2>&1 || true
  done
  rm -rf "$dir"
  log "stopped; $dir removed"
}

status() {
  local n role pid
  echo "RabbitMQ:"
  for n in "${rabbit_nodes[@]}"; do
    if pid=$(rabbit_pid "$n") && rabbitmqctl_on "$n" -q ping >/dev/null 2>&1; then
      echo "  $(rabbit_name "$n")  amqp 127.0.0.1:$(rabbit_port "$n")  running (pid $pid)"
    else
      echo "  $(rabbit_name "$n")  amqp 127.0.0.1:$(rabbit_port "$n")  down"
    fi
  done
  echo "PostgreSQL:"
  for n in "${pg_nodes[@]}"; do
    case $(psql_on "$n" -d postgres -c 'select pg_is_in_recovery()' 2>/dev/null || echo down) in
      f) role=primary ;;
      t) role="standby ($(psql_on "$n" -d postgres -c 'select status from pg_stat_wal_receiver' 2>/dev/null || echo '?'))" ;;
      *) role=down ;;
    esac
    echo "  $n  127.0.0.1:$(pg_port "$n")  $role"
  done
  echo "Services:"
  for n in 1 2; do
    for kind in api worker; do
      local port
      if [ "$kind" = api ]; then port=$(api_port "$n"); else port=$(worker_port "$n"); fi
      if live "$port" 0; then echo "  penora-$kind $n  127.0.0.1:$port  live (pid $(cat "$dir/$kind-$n.pid"))"; else echo "  penora-$kind $n  127.0.0.1:$port  down"; fi
    done
  done
}

# One fault, for penora-chaos's controller. Each returns once the faulted
# part is back in service (or, for failover, once the new primary takes
# writes); what it did goes to stdout.
fault() {
  local kind=$1 arg=${2:-1} outage=${FAULT_OUTAGE_SECS:-2}
  case $kind in
    rabbit-node) # kill -9 a node, leave it down a while, start it again
      local n=$(( (arg - 1) % 3 + 1 ))
      rabbit_kill "$n"
      sleep "$outage"
      rabbit_start "$n"
      echo "RabbitMQ node $(rabbit_name "$n") killed and back" ;;
    rabbit-down) rabbit_kill "$arg"; echo "RabbitMQ node $(rabbit_name "$arg") killed" ;;
    rabbit-up) rabbit_start "$arg"; echo "RabbitMQ node $(rabbit_name "$arg") back" ;;
    queue-leader) # the node (1-3) leading quorum queue $arg
      local n
      for n in "${rabbit_nodes[@]}"; do
        if rabbitmqctl_on "$n" -q list_queues name leader 2>/dev/null | awk -v q="$arg" '$1 == q {print $2}' | grep -q .; then
          rabbitmqctl_on "$n" -q list_queues name leader | awk -v q="$arg" '$1 == q {print $2}' | sed 's/^penora-c\([0-9]\)@.*/\1/'
          return 0
        fi
      done
      die "no running node knows queue $arg" ;;
    api|worker)
      local n=$(( (arg - 1) % 2 + 1 ))
      service_kill "$kind" "$n"
      sleep 0.5
      service_start "$kind" "$n"
      echo "penora-$kind $n killed and restarted" ;;
    failover)
      local old
      old=$(primary)
      pg_failover
      echo "PostgreSQL: $old stopped, $(primary) promoted" ;;
    rebuild-standby) # the old primary follows the new one
      pg_standby "$(other "$(primary)")"
      echo "PostgreSQL: $(other "$(primary)") rebuilt as the synchronous standby of $(primary)" ;;
    *) die "unknown fault $kind (rabbit-node, rabbit-down, rabbit-up, queue-leader, api, worker, failover, rebuild-standby)" ;;
  esac
}

chaos() {
  local quick=0
  [ "${1:-}" = "--quick" ] && quick=1
  [ -e "$dir/env" ] && stop
  trap 'stop' EXIT
  up
  # shellcheck source=/dev/null
  . "$dir/env"
  log "cluster tests (a confirmed publish survives its node; a deduction across a failover)"
  PENORA_CLUSTER_DIR=$dir cargo nextest run --locked -p penora-worker --test cluster --no-fail-fast
  local args outage
  if [ "$quick" -eq 1 ]; then
    outage=2; args=(--secs 60 --fault-every 6 --clients 8 --users 20)
  else
    outage=3; args=(--secs 180 --fault-every 8 --clients 16 --users 40)
  fi
  mkdir -p target/cluster-chaos
  FAULT_OUTAGE_SECS=$outage ./target/debug/penora-chaos --outage-secs "$outage" \
    --cluster-script "$repo/scripts/cluster.sh" \
    --bind-addr "127.0.0.1:$(api_port 1),127.0.0.1:$(api_port 2)" \
    --ops-bin ./target/debug/penora-ops --log-dir "$dir/logs" "${args[@]}" | tee target/cluster-chaos/report.md
  status
}

case ${1:-} in
  up) up ;;
  stop) stop ;;
  status) status ;;
  chaos) shift; chaos "$@" ;;
  fault) shift; fault "$@" ;;
  citus) shift; exec "$repo/scripts/citus.sh" "$@" ;;
  *) sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
