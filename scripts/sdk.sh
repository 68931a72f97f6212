#!/usr/bin/env bash
# The TypeScript SDK (sdk/typescript, the npm package @penora/credits),
# against the real service: starts PostgreSQL and RabbitMQ (scripts/services.sh),
# installs the SDK's packages from the npm registry (`npm ci`, the lock file's
# versions), builds the services and runs them on a database and a queue
# prefix of their own, then
#
#   scripts/sdk.sh [test]     checks that src/openapi.ts equals a fresh
#                             generation from the running API's OpenAPI
#                             document, type-checks the SDK and its tests
#                             (tsc --noEmit, strict), builds it, runs its tests
#                             (node --test), packs it (npm pack), and installs
#                             the tarball in an app of its own (consumer/) that
#                             type-checks against it and runs
#   scripts/sdk.sh generate   writes src/openapi.ts from the running API's
#                             document (after a change to the API)
#
# Two APIs run: the main one, and a constrained one on the same database
# (rate limit of a few requests a second, one save slot) where the tests meet
# real `429 rate_limited` and `503 busy` answers.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/run.sh
mode=${1:-test}
case "$mode" in test | generate) ;; *) echo "usage: scripts/sdk.sh [test|generate]" >&2; exit 2 ;; esac
sdk=sdk/typescript

scripts/services.sh
(cd "$sdk" && npm ci --no-audit --no-fund --loglevel=error)
cargo build --locked --bin penora-api --bin penora-worker --bin penora-ops

out=target/sdk
mkdir -p "$out"
new_run sdk
# The document must be the default configuration's (MAX_DEDUCT_AMOUNT is in it).
unset MAX_DEDUCT_AMOUNT
start_run
spawn "$out/api.log" ./target/debug/penora-api
spawn "$out/worker.log" ./target/debug/penora-worker
spawn "$out/api-constrained.log" env RATE_LIMIT_PER_SEC=2 RATE_LIMIT_BURST=3 \
  MAX_CONCURRENT_SAVES=1 SAVE_QUEUE_WAIT_MS=200 ./target/debug/penora-api
api=$(api_address "$out/api.log") || { echo "sdk: penora-api did not start:"; cat "$out/api.log"; exit 1; }
constrained=$(api_address "$out/api-constrained.log") || {
  echo "sdk: the constrained penora-api did not start:"; cat "$out/api-constrained.log"; exit 1
}

curl -fsS "$api/api/unified/openapi.json" >"$out/openapi.json"
(cd "$sdk" && node scripts/generate.mjs "../../$out/openapi.json" "../../$out/openapi.ts")
if [ "$mode" = generate ]; then
  cp "$out/openapi.ts" "$sdk/src/openapi.ts"
  echo "sdk: wrote $sdk/src/openapi.ts from $api/api/unified/openapi.json"
  exit 0
fi
if ! diff -u "$sdk/src/openapi.ts" "$out/openapi.ts" >"$out/openapi.diff"; then
  head -n 60 "$out/openapi.diff"
  echo "sdk: $sdk/src/openapi.ts differs from the running API's document; run scripts/sdk.sh generate and commit it"
  exit 1
fi
echo "sdk: $sdk/src/openapi.ts equals a fresh generation from the running API"

cd "$sdk"
npx tsc --noEmit -p tsconfig.test.json
rm -rf build dist
npx tsc -p tsconfig.test.json
npx tsc -p tsconfig.json
# One file at a time, each test within 2 minutes (node 18, Debian 12's, has
# neither flag; its runner takes the files one by one anyway).
runner=()
[ "$(node -p 'process.versions.node.split(".")[0]')" -ge 20 ] && runner=(--test-concurrency=1 --test-timeout=120000)
PENORA_BASE_URL=$api PENORA_CONSTRAINED_URL=$constrained PENORA_API_KEY=$PENORA_API_KEY \
  PENORA_OPS="$OLDPWD/target/debug/penora-ops" \
  node --test "${runner[@]}" build/test/*.test.js
rm -f "$OLDPWD/$out"/penora-credits-*.tgz
npm pack --pack-destination "$OLDPWD/$out" --loglevel=error >/dev/null
cd "$OLDPWD"
tarball=$(ls "$out"/penora-credits-*.tgz)
echo "sdk: packed $tarball"
# An app that installs the tarball (and not amqplib) type-checks against its
# declarations and runs.
consumer=$out/consumer
rm -rf "$consumer"
mkdir -p "$consumer"
cp "$sdk/consumer/index.ts" "$sdk/consumer/tsconfig.json" "$consumer/"
echo '{"name": "consumer", "private": true, "type": "module"}' >"$consumer/package.json"
(cd "$consumer" && npm install --no-audit --no-fund --loglevel=error "../$(basename "$tarball")" >/dev/null)
"$sdk/node_modules/.bin/tsc" -p "$consumer/tsconfig.json"
(cd "$consumer" && PENORA_BASE_URL=$api node index.js)
