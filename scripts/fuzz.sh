#!/usr/bin/env bash
# Fuzzes the live API from its own OpenAPI document with schemathesis (from
# PyPI, in a private virtualenv under target/): every route, examples,
# boundary values, random valid and invalid requests, and stateful sequences
# along the document's links (grant → deduct → refund / replay / save →
# content). Checks: no 5xx, every answer (status, content type, headers, body)
# as documented, valid requests accepted, invalid ones refused, the key
# enforced. Then the hostile inputs of scripts/fuzz/hostile.py (image bombs
# in metadata, stalled uploads, floods of bogus keys, bidirectional text…)
# must each get their documented answer. Afterwards the pipeline must drain
# and `penora-ops reconcile` and `penora-ops audit verify` must pass.
#
#   scripts/fuzz.sh            full run (300 cases per operation and phase, random seed)
#   scripts/fuzz.sh --quick    CI run (25 cases per operation and phase, fixed seed)
#   FUZZ_SEED=123 scripts/fuzz.sh   replay a run
#
# Exit status: 0 when schemathesis found nothing and every invariant holds.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/run.sh
quick=0
[ "${1:-}" = "--quick" ] && quick=1
schemathesis_version=4.32.5

scripts/services.sh
cargo build --locked --bin penora-api --bin penora-worker --bin penora-ops

out=target/fuzz
mkdir -p "$out"
venv=$out/venv
if ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -q "$schemathesis_version"; then
  rm -rf "$venv"
  python3 -m venv "$venv" # scripts/services.sh made sure python3 has venv
  "$venv/bin/pip" install -q --disable-pip-version-check "schemathesis==$schemathesis_version"
fi

# (The rate limit has its own tests; here it would only turn cases into 429s.)
new_run fuzz
start_run
spawn "$out/api.log" ./target/debug/penora-api
spawn "$out/worker.log" ./target/debug/penora-worker
api=$(api_address "$out/api.log") || { echo "fuzz: penora-api did not start:"; cat "$out/api.log"; exit 1; }

# ImageGene's kind of key: bound to its app, with every scope so that grants
# are fuzzed too. The users of the document's examples get credits, so that
# examples and stateful runs reach the ledger, not only the 404s.
key=$(./target/debug/penora-ops keys create --app imagegene --scopes read,spend,write,admin --name fuzz | grep -o 'pnr_[A-Za-z0-9_]*' | head -1)
[ -n "$key" ] || { echo "fuzz: could not create a key"; exit 1; }
for user in TEST_USER_ID 101902121794505144784; do
  ./target/debug/penora-ops credits grant "$user" 1000000 --reason "fuzz seed" --reference "fuzz-seed-$user" >/dev/null
done

if [ "$quick" -eq 1 ]; then
  examples=25
  seed=${FUZZ_SEED:-20261124}
else
  examples=300
  seed=${FUZZ_SEED:-$RANDOM$RANDOM}
fi
echo "fuzz: schemathesis $schemathesis_version against $api, $examples cases per operation and phase, seed $seed"
st_status=0
"$venv/bin/schemathesis" --config-file scripts/fuzz/schemathesis.toml run "$api/api/unified/openapi.json" \
  -H "X-API-Key: $key" \
  --max-examples "$examples" \
  --seed "$seed" \
  --workers 1 \
  --request-timeout 10 \
  --max-redirects 0 \
  --no-color \
  --report junit,ndjson --report-junit-path "$out/junit.xml" --report-ndjson-path "$out/events.ndjson" \
  >"$out/schemathesis.txt" 2>&1 || st_status=$?
sed -n '/=* SUMMARY =*/,$p' "$out/schemathesis.txt"

# Then the hostile inputs of issue 24 (metadata bombs, stalled uploads,
# floods of bogus keys and health checks, bidirectional text, huge and deep
# metadata, settlements for less): each must get its documented answer.
violations=0
python3 scripts/fuzz/hostile.py "$api" "$key" || violations=$((violations + 1))

# Afterwards: the pipeline drains and every invariant holds.
./target/debug/penora-ops wait-idle --timeout-secs 120 || violations=$((violations + 1))
./target/debug/penora-ops reconcile || violations=$((violations + 1))
./target/debug/penora-ops audit verify || violations=$((violations + 1))
dead=$(./target/debug/penora-ops queues --json | python3 -c '
import json, sys
print(sum(q["ready"] for q in json.load(sys.stdin) if q["queue"].endswith(".dead")))')

# The service's own count of what it answered.
metrics=$(curl -fsS "$api/metrics")
requests=$(printf '%s\n' "$metrics" | awk '/^penora_http_requests_total\{/ {n += $NF} END {print n + 0}')
server_errors=$(printf '%s\n' "$metrics" | awk '/^penora_http_requests_total\{.*status="5/ {n += $NF} END {print n + 0}')
cases=$(grep -oE '^ *[0-9]+ generated' "$out/schemathesis.txt" | head -1 | tr -dc '0-9')
echo
echo "fuzz: ${cases:-?} cases generated, $requests requests answered, $server_errors 5xx, $dead dead-lettered jobs, $violations invariant check(s) failed; seed $seed"
echo "fuzz: schemathesis output in $out/schemathesis.txt (reproduce a case with its curl line or FUZZ_SEED=$seed)"
if grep -q '"level":"ERROR"' "$out/api.log"; then
  echo "fuzz: the API logged errors:"; grep '"level":"ERROR"' "$out/api.log" | head -5
  violations=$((violations + 1))
fi
if [ "$st_status" -ne 0 ]; then
  grep -E "^(___|- ST|\[[0-9]{3}\])" "$out/schemathesis.txt" | head -40 || true
  echo "fuzz: schemathesis found failures (exit $st_status)"
  exit 1
fi
if [ "$server_errors" -ne 0 ] || [ "$violations" -ne 0 ] || [ "$dead" -ne 0 ]; then
  echo "fuzz: FAILED"
  exit 1
fi
echo "fuzz: passed"
