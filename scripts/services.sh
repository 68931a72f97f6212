#!/usr/bin/env bash
# Makes sure what Penora Credits needs runs on this machine: PostgreSQL and
# RabbitMQ (and node with npm, for the integration guide's JavaScript test and the SDK; Python 3 with
# venv, for scripts/fuzz.sh and scripts/chaos.sh). Starts a
# service that is installed but stopped; installs one that is missing with
# apt-get (Debian/Ubuntu, as root or with sudo). Safe to run again and again.
set -euo pipefail

log() { printf '[services] %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
apt_updated=0
apt_install() {
  if ! command -v apt-get >/dev/null; then
    log "missing $*, and there is no apt-get here: install $* yourself"; exit 1
  fi
  if [ "$apt_updated" -eq 0 ]; then as_root apt-get update -qq; apt_updated=1; fi
  log "installing $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)); local what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then log "$what did not come up"; return 1; fi
    sleep 1
  done
}

ensure_postgres() {
  if ! command -v pg_ctlcluster >/dev/null; then apt_install postgresql; fi
  if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    local version
    version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$version" ]; then
      version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
      log "creating PostgreSQL $version cluster"
      as_root pg_createcluster "$version" main >/dev/null
    fi
    log "starting PostgreSQL $version"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    wait_for 60 "PostgreSQL" pg_isready -q -h 127.0.0.1 -p 5432
  fi
  # The tests and the quick start connect as postgres over TCP without a
  # password. A fresh Debian install asks for one: trust local TCP (dev machines only).
  if ! psql -h 127.0.0.1 -U postgres -d postgres -w -Atqc 'select 1' >/dev/null 2>&1; then
    local hba
    hba=$(as_root su postgres -c "psql -Atqc 'show hba_file'")
    log "allowing passwordless TCP logins from 127.0.0.1 in $hba (development machine)"
    as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
    as_root su postgres -c "psql -qc 'select pg_reload_conf()'" >/dev/null
    wait_for 10 "PostgreSQL login" psql -h 127.0.0.1 -U postgres -d postgres -w -Atqc 'select 1'
  fi
  log "PostgreSQL is up on 127.0.0.1:5432"
}

# Whether the broker on 5672 answers an AMQP 0-9-1 protocol header with its
# connection.start frame within 10 s (an open port alone is not enough: a
# wedged RabbitMQ 3.10 node was seen accepting TCP and answering nothing).
amqp_answers() {
  (
    exec 3<>/dev/tcp/127.0.0.1/5672 || exit 1
    printf 'AMQP\x00\x00\x09\x01' >&3
    [ -n "$(timeout 10 head -c 1 <&3 | od -An -tx1)" ]
  ) 2>/dev/null
}

# Open files the node gets. RabbitMQ keeps ~90 % of its limit for sockets
# and blocks a new connection's handshake, TCP already accepted, while none
# is free: with Debian's 1024 (what `su rabbitmq` leaves it) the tests'
# connections ran out (832 sockets) and every client hung.
RABBITMQ_NOFILE=65536

# The default node's open-files limit, or nothing when it is not running.
rabbitmq_nofile() {
  local pidfile pid
  for pidfile in /var/lib/rabbitmq/mnesia/*.pid; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    awk '/^Max open files/ {print $4}' "/proc/$pid/limits" 2>/dev/null && return
  done
}

start_rabbitmq() {
  log "starting RabbitMQ"
  if [ -d /usr/lib/rabbitmq/bin ] && id rabbitmq >/dev/null 2>&1; then
    # As the Debian wrapper does, with the limit raised first.
    as_root su rabbitmq -s /bin/sh -c \
      "ulimit -n $RABBITMQ_NOFILE 2>/dev/null || ulimit -n \$(ulimit -Hn); cd /var/lib/rabbitmq && /usr/lib/rabbitmq/bin/rabbitmq-server -detached" \
      >/dev/null 2>&1 || true
  else
    as_root rabbitmq-server -detached >/dev/null 2>&1 || true
  fi
  wait_for 120 "RabbitMQ" port_open 5672
  as_root rabbitmqctl await_startup >/dev/null 2>&1 || true
  # Queues left by killed runs are recovered before the first handshake.
  wait_for 180 "RabbitMQ's AMQP handshake" amqp_answers || true
}

# The default node only (its pid file), never a node of scripts/cluster.sh.
kill_default_rabbitmq() {
  local pidfile
  as_root timeout 60 rabbitmqctl stop >/dev/null 2>&1 || true
  for pidfile in /var/lib/rabbitmq/mnesia/*.pid; do
    [ -f "$pidfile" ] && as_root kill -9 "$(cat "$pidfile")" 2>/dev/null || true
  done
  wait_for 30 "RabbitMQ's end" sh -c '! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null' || true
}

ensure_rabbitmq() {
  if ! command -v rabbitmq-server >/dev/null; then apt_install rabbitmq-server; fi
  if ! port_open 5672; then start_rabbitmq; fi
  local nofile
  nofile=$(rabbitmq_nofile)
  if [ -n "$nofile" ] && [ "$nofile" != unlimited ] && [ "$nofile" -lt 8192 ]; then
    log "RabbitMQ runs with $nofile open files (too few for the tests' connections): restarting it with more"
    kill_default_rabbitmq
    start_rabbitmq
  fi
  if ! amqp_answers; then
    log "RabbitMQ accepts connections on 5672 but answers no AMQP handshake: restarting it"
    kill_default_rabbitmq
    start_rabbitmq
    if ! amqp_answers; then
      # Seen twice on 3.10.8: the node's database wedged; only a fresh one
      # cured it. Its old data is kept beside it.
      local aside
      aside=/var/lib/rabbitmq/mnesia.wedged-$(date +%s)
      log "RabbitMQ still answers no handshake: moving its data aside to $aside and starting afresh"
      kill_default_rabbitmq
      as_root mv /var/lib/rabbitmq/mnesia "$aside"
      start_rabbitmq
      amqp_answers || { log "RabbitMQ answers no AMQP handshake on 5672"; exit 1; }
    fi
  fi
  # The management API gives `penora-ops queues` its message rates (and the UI on :15672).
  if ! port_open 15672; then
    as_root rabbitmq-plugins enable --quiet rabbitmq_management >/dev/null 2>&1 || log "could not enable the management plugin (rates will show as -)"
  fi
  log "RabbitMQ is up on 127.0.0.1:5672"
}

# node 18 or newer with npm: the guide's JavaScript test and the TypeScript
# SDK (scripts/sdk.sh installs the SDK's packages from the npm registry).
ensure_node() {
  if ! command -v node >/dev/null; then apt_install nodejs; fi
  if ! command -v npm >/dev/null; then apt_install npm; fi
  local major
  major=$(node -p 'process.versions.node.split(".")[0]')
  if [ "$major" -lt 18 ]; then log "node $major is too old: the SDK needs node 18 or newer"; exit 1; fi
}

# scripts/fuzz.sh (schemathesis in a virtualenv) and scripts/chaos.sh need Python 3 with venv.
ensure_python() {
  if ! command -v python3 >/dev/null || ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    apt_install python3 python3-venv
  fi
}

ensure_postgres
ensure_rabbitmq
ensure_node
ensure_python
