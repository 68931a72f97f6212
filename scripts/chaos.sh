#!/usr/bin/env bash
# Chaos under load: penora-chaos drives mixed traffic (grants, reads,
# deductions retried with the same project_code, refunds by HTTP and by
# generation.failed event, saves) while it SIGKILLs and restarts the API and
# the worker, closes every broker connection, takes the database away and
# pauses each process with SIGSTOP/SIGCONT, in turn. Then it waits for the
# pipeline to drain and checks every invariant: balances = ledger sums = the
# client's own record, each reservation charged once and ended as the client
# left it, no refund twice, every event processed once, every save stored,
# every ledger entry audited, nothing dead-lettered, reconcile clean, and
# every event the ledger implies delivered to a subscribed webhook receiver
# (none for a change that did not commit). A quarter of the users have spend
# limits the traffic hits (403 spend_limit_exceeded is a final answer): no
# limit's spending in its current period, counted from the reservations,
# passes it, GET /limits shows the same, and spend_days agrees with the
# reservations per app and day.
#
#   scripts/chaos.sh           full run (3 minutes of traffic, a fault every 8 s)
#   scripts/chaos.sh --quick   CI run (42 s, a fault every 4 s: each kind at least once)
#
# A fresh database and a private RabbitMQ vhost per run; both removed after.
# Exit status: 0 when there is no violation.
set -euo pipefail
cd "$(dirname "$0")/.."
quick=0
[ "${1:-}" = "--quick" ] && quick=1

scripts/services.sh
cargo build --locked --bin penora-api --bin penora-worker --bin penora-ops --bin penora-chaos

out=target/chaos
rm -rf "$out"; mkdir -p "$out"
stamp=$(date +%s)_$$
db=penora_chaos_$stamp
vhost=penora_chaos_$stamp
admin=postgres://postgres@127.0.0.1:5432/postgres
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$db
export AMQP_URL=amqp://guest:guest@127.0.0.1:5672/$vhost
export AMQP_PREFIX=""
# The local broker's management API (penora-ops sees unacknowledged
# messages and rates through it; nothing derives it from AMQP_URL).
export RABBITMQ_MANAGEMENT_URL=${RABBITMQ_MANAGEMENT_URL:-http://127.0.0.1:15672}
export PENORA_API_KEY=chaos-boot-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
export RATE_LIMIT_PER_SEC=1000000 RATE_LIMIT_BURST=1000000
# The timer (window settlements, lot expiry) every 2 s: promotional lots
# expire during the run, and the checks wait for their entries.
export SETTLE_INTERVAL_SECS=2
export LOG_FORMAT=json RUST_LOG=warn
export BIND_ADDR=127.0.0.1:$port WORKER_METRICS_ADDR=127.0.0.1:0
# Webhooks: penora-chaos subscribes a local receiver to every event and
# checks them against the ledger; its refusals are retried within a second.
export WEBHOOK_SECRET_KEY=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
# The receiver refuses the first arrival of one event in seven, so five
# refusals in a row, which open an endpoint's circuit, happen in some runs:
# it stays open 2 s here, not a minute, so the checks' wait covers it.
export WEBHOOK_ALLOW_PRIVATE=true WEBHOOK_RETRY_BASE_MS=500 WEBHOOK_RETRY_MAX_MS=2000 WEBHOOK_CIRCUIT_COOLDOWN_MS=2000

cleanup() {
  pkill -CONT -f "target/debug/penora-(api|worker)" 2>/dev/null || true
  psql "$admin" -qc "ALTER DATABASE $db ALLOW_CONNECTIONS true" >/dev/null 2>&1 || true
  psql "$admin" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  rabbitmqctl -q delete_vhost "$vhost" >/dev/null 2>&1 || true
}
trap cleanup EXIT

psql "$admin" -qc "CREATE DATABASE $db"
rabbitmqctl -q add_vhost "$vhost" >/dev/null
rabbitmqctl -q set_permissions -p "$vhost" guest '.*' '.*' '.*' >/dev/null
./target/debug/penora-ops migrate >/dev/null

if [ "$quick" -eq 1 ]; then
  args=(--secs 42 --fault-every 4 --outage-secs 2 --clients 8 --users 20)
else
  args=(--secs 180 --fault-every 8 --outage-secs 3 --clients 16 --users 40)
fi
./target/debug/penora-chaos \
  --api-bin ./target/debug/penora-api \
  --worker-bin ./target/debug/penora-worker \
  --ops-bin ./target/debug/penora-ops \
  --vhost "$vhost" --log-dir "$out" "${args[@]}" | tee "$out/report.md"
