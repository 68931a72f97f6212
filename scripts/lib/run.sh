# Shared by scripts/bench.sh and scripts/fuzz.sh, which each run the services
# on a database and a queue prefix of their own. Source it; it defines:
#
#   drop_run ADMIN_URL DB PREFIX   drop the run's database and every queue and
#                                  exchange named with its prefix
#   api_address LOG                wait until penora-api logs its address in
#                                  LOG and print it (exit status 1 if it never does)

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

api_address() {
  local address _
  for _ in $(seq 1 100); do
    address=$(grep -o 'penora-api listening on http://[0-9.:]*' "$1" | sed 's/penora-api listening on //' || true)
    if [ -n "$address" ]; then echo "$address"; return 0; fi
    sleep 0.2
  done
  return 1
}
