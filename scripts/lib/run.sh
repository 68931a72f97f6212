# Shared by scripts/bench.sh, scripts/fuzz.sh and scripts/sdk.sh, which each run the services
# on a database and a queue prefix of their own. Source it; it defines:
#
#   new_run NAME [PORT]            set db, prefix and admin for a run of its
#                                  own and export the services' environment
#                                  for it (random bootstrap key, no rate limit
#                                  to speak of, JSON logs, ports chosen by the OS,
#                                  a webhook key, local receivers allowed);
#                                  PostgreSQL on 127.0.0.1:PORT (default 5432)
#   drop_run ADMIN_URL DB PREFIX   drop the run's database and every queue and
#                                  exchange named with its prefix
#   start_run                      create the run's database and migrate it;
#                                  on exit, stop what `spawn` started and
#                                  drop the run (drop_run)
#   spawn LOG CMD...               start CMD in the background, its output in LOG
#   api_address LOG                wait until penora-api logs its address in
#                                  LOG and print it (exit status 1 if it never does)

new_run() {
  local stamp port=${2:-5432}
  stamp=$(date +%s)_$$
  db=penora_$1_$stamp
  prefix=$1${stamp}_
  admin=postgres://postgres@127.0.0.1:$port/postgres
  export DATABASE_URL=postgres://postgres@127.0.0.1:$port/$db
  export AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
  export AMQP_PREFIX=$prefix
  # The local broker's management API (penora-ops sees unacknowledged
  # messages and rates through it; nothing derives it from AMQP_URL).
  export RABBITMQ_MANAGEMENT_URL=${RABBITMQ_MANAGEMENT_URL:-http://127.0.0.1:15672}
  export PENORA_API_KEY=$1-key-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
  export RATE_LIMIT_PER_SEC=10000000 RATE_LIMIT_BURST=10000000
  # Fuzzing sends missing and unknown keys on purpose, all from 127.0.0.1:
  # the per-address budget of failures would answer most of them 429.
  export AUTH_FAILURES_PER_SEC=10000000 AUTH_FAILURE_BURST=10000000
  export LOG_FORMAT=json RUST_LOG=warn
  export BIND_ADDR=127.0.0.1:0 WORKER_METRICS_ADDR=127.0.0.1:0
  # Webhooks: a key of the run's own for the endpoints' secrets, and local
  # receivers (127.0.0.1, http) allowed: the runs subscribe their own.
  export WEBHOOK_SECRET_KEY=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
  export WEBHOOK_ALLOW_PRIVATE=true
}

drop_run() {
  psql "$1" -qc "DROP DATABASE IF EXISTS $2 WITH (FORCE)" >/dev/null 2>&1 || true
  command -v rabbitmqctl >/dev/null || return 0
  local name
  for name in $(rabbitmqctl list_queues -q name 2>/dev/null | grep "^$3" || true); do
    rabbitmqctl delete_queue "$name" >/dev/null 2>&1 || true
  done
  for name in $(rabbitmqctl list_exchanges -q name 2>/dev/null | grep "^$3" || true); do
    rabbitmqadmin -q delete exchange name="$name" >/dev/null 2>&1 || true
  done
}

start_run() {
  psql "$admin" -qc "CREATE DATABASE $db"
  run_pids=()
  trap stop_run EXIT
  ./target/debug/penora-ops migrate >/dev/null
}

stop_run() {
  local p
  for p in "${run_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  drop_run "$admin" "$db" "$prefix"
}

spawn() {
  local log=$1
  shift
  "$@" >"$log" 2>&1 &
  run_pids+=($!)
}

api_address() {
  local address _
  for _ in $(seq 1 100); do
    address=$(grep -o 'penora-api listening on http://[0-9.:]*' "$1" | sed 's/penora-api listening on //' || true)
    if [ -n "$address" ]; then echo "$address"; return 0; fi
    sleep 0.2
  done
  return 1
}
