#!/usr/bin/env bash
# Brings Penora Credits up on this machine: starts (or installs) PostgreSQL and
# RabbitMQ, creates the database, builds, starts penora-api and penora-worker in the background,
# prints its URL and a ready key, and runs the integration guide's curl example.
#
#   scripts/up.sh          start (or restart) the API
#   scripts/up.sh stop     stop it
#
# Environment: BIND_ADDR (default 127.0.0.1:5000), DATABASE_URL (default the
# local `penora` database), PENORA_API_KEY (default: a random key kept in
# .penora-dev-key so it survives restarts).
set -euo pipefail
cd "$(dirname "$0")/.."
run_dir=target/run
mkdir -p "$run_dir"
pid_file=$run_dir/penora-api.pid
worker_pid_file=$run_dir/penora-worker.pid

stop_one() { # stop_one PIDFILE NAME
  if [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; then
    kill "$(cat "$1")"
    for _ in $(seq 1 150); do kill -0 "$(cat "$1")" 2>/dev/null || break; sleep 0.2; done
    echo "stopped $2"
  fi
  rm -f "$1"
}
stop() { stop_one "$worker_pid_file" penora-worker; stop_one "$pid_file" penora-api; }
if [ "${1:-}" = "stop" ]; then stop; exit 0; fi

scripts/services.sh

export BIND_ADDR=${BIND_ADDR:-127.0.0.1:5000}
export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/penora}
export AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
# The local broker's management API (penora-ops sees unacknowledged
# messages and rates through it; nothing derives it from AMQP_URL).
export RABBITMQ_MANAGEMENT_URL=${RABBITMQ_MANAGEMENT_URL:-http://127.0.0.1:15672}
export LOG_FORMAT=${LOG_FORMAT:-json}
db_name=${DATABASE_URL##*/}; db_name=${db_name%%\?*}
admin_url=${DATABASE_URL%/*}/postgres
if ! psql "$admin_url" -Atqc "select 1 from pg_database where datname = '$db_name'" | grep -q 1; then
  psql "$admin_url" -qc "CREATE DATABASE \"$db_name\""
  echo "created database $db_name"
fi
if [ -z "${PENORA_API_KEY:-}" ]; then
  if [ ! -s .penora-dev-key ]; then
    (umask 077; printf 'pnr_dev_%s\n' "$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')" > .penora-dev-key)
  fi
  PENORA_API_KEY=$(cat .penora-dev-key)
fi
export PENORA_API_KEY
# The webhook secrets' key (kept in .penora-dev-webhook-key like the API key,
# so endpoints registered before a restart still sign); local development
# allows private targets and http (receivers on this machine).
if [ -z "${WEBHOOK_SECRET_KEY:-}" ]; then
  if [ ! -s .penora-dev-webhook-key ]; then
    (umask 077; od -An -N32 -tx1 /dev/urandom | tr -d ' \n' > .penora-dev-webhook-key)
  fi
  WEBHOOK_SECRET_KEY=$(cat .penora-dev-webhook-key)
fi
export WEBHOOK_SECRET_KEY
export WEBHOOK_ALLOW_PRIVATE=${WEBHOOK_ALLOW_PRIVATE:-true}

export WORKER_METRICS_ADDR=${WORKER_METRICS_ADDR:-127.0.0.1:9091}
# As the Dockerfile sets it: freed request bodies and images leave the RSS.
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-131072} MALLOC_ARENA_MAX=${MALLOC_ARENA_MAX:-2}
cargo build --locked --bin penora-api --bin penora-worker --bin penora-ops
stop
./target/debug/penora-ops migrate >/dev/null
nohup ./target/debug/penora-api >"$run_dir/penora-api.log" 2>&1 &
echo $! > "$pid_file"
nohup ./target/debug/penora-worker >"$run_dir/penora-worker.log" 2>&1 &
echo $! > "$worker_pid_file"
base="http://$BIND_ADDR"
for _ in $(seq 1 100); do
  if curl -fsS "$base/health" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$(cat "$pid_file")" 2>/dev/null; then
    echo "penora-api exited; its log:"; tail -n 20 "$run_dir/penora-api.log"; exit 1
  fi
  sleep 0.2
done
curl -fsS "$base/health" >/dev/null

# A demo user so the guide's example has credits to spend (granted once).
./target/debug/penora-ops credits grant TEST_USER_ID 100 --reason "demo credits" --reference demo-TEST_USER_ID >/dev/null

cat <<INFO

Penora Credits is up.
  API:      $base   (docs: $base/api/unified/docs, health: $base/health, metrics: $base/metrics)
  worker:   http://$WORKER_METRICS_ADDR/health, http://$WORKER_METRICS_ADDR/metrics
  API key:  $PENORA_API_KEY
  console:  $base/console   (sign in with the API key above, or any key of scope read/admin)
  logs:     $run_dir/penora-api.log, $run_dir/penora-worker.log      stop with: scripts/up.sh stop

The integration guide's curl example, against this API:
INFO
set -x
curl -sS -X GET "$base/api/unified/user-info?user_id=TEST_USER_ID" \
     -H "X-API-Key: $PENORA_API_KEY"
{ set +x; } 2>/dev/null; echo
set -x
curl -sS -X POST "$base/api/unified/deduct-credits" \
     -H "X-API-Key: $PENORA_API_KEY" \
     -H "Content-Type: application/json" \
     -d '{"user_id":"TEST_USER_ID","amount":2,"app_name":"imagegene","description":"Test deduction"}'
{ set +x; } 2>/dev/null; echo
