#!/usr/bin/env bash
# Validates the deployment files offline (no Docker engine needed):
#   docker-compose.yml            with `docker compose config`, else Debian's docker-compose
#   every file the compose mounts exists
#   the deployment defaults       every port on 127.0.0.1, api and worker as the application
#                                 role without migrating, `migrate` as the owner, the roles
#                                 made by deploy/postgres's init script (scripts/lib/compose_check.py)
#   deploy/prometheus/*.yml       with promtool (Debian's prometheus package)
#   deploy/grafana/**/*.json      parses as JSON, and each dashboard query names a metric we export
#   Dockerfile                    its build stage's files, alone, build with its cargo command (offline)
#
#   scripts/check-deploy.sh --self-test   also proves the build check fails on a Dockerfile missing a
#                                         member, and the defaults' check on broken copies of the compose file
set -euo pipefail
cd "$(dirname "$0")/.."
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
apt_updated=0
need() { # need COMMAND PACKAGE
  command -v "$1" >/dev/null && return
  if [ "$apt_updated" -eq 0 ]; then as_root apt-get update -qq; apt_updated=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2" >/dev/null
}

export PENORA_API_KEY=${PENORA_API_KEY:-check-only-key-0123456789abcdef0123}
if docker compose version >/dev/null 2>&1; then
  docker compose config --quiet
else
  need docker-compose docker-compose
  docker-compose config --quiet
fi
echo "docker-compose.yml is valid"

# Every host path the compose file mounts must exist.
missing=0
for path in $(grep -oE '^\s+- \./[^:]+' docker-compose.yml | sed -E 's/^\s+- //'); do
  if [ ! -e "$path" ]; then echo "mounted but missing: $path"; missing=1; fi
done
[ "$missing" -eq 0 ] || exit 1
echo "every mounted file exists"

# The deployment defaults (issue 24): nothing published beyond 127.0.0.1,
# the services as the application role, migrations as the owner.
need python3 python3
if ! python3 -c 'import yaml' 2>/dev/null; then
  if [ "$apt_updated" -eq 0 ]; then as_root apt-get update -qq; apt_updated=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-yaml >/dev/null
fi
python3 scripts/lib/compose_check.py docker-compose.yml
if [ "${1:-}" = "--self-test" ]; then
  python3 scripts/lib/compose_check.py --self-test docker-compose.yml
fi

need promtool prometheus
promtool check config deploy/prometheus/prometheus.yml
promtool check rules deploy/prometheus/alerts.yml

need python3 python3
python3 - <<'PY'
import json, pathlib, re, subprocess, sys
exported = set()
for src in [*pathlib.Path(".").glob("*/src/**/*.rs"), *pathlib.Path(".").glob("common/*/src/**/*.rs")]:
    exported.update(re.findall(r'metrics::(?:counter|gauge|histogram)!\(\s*"([a-z_]+)"', src.read_text()))
bad = 0
for f in pathlib.Path("deploy/grafana").rglob("*.json"):
    dash = json.loads(f.read_text())
    for panel in dash.get("panels", []):
        for t in panel.get("targets", []):
            for name in re.findall(r'\b(penora_[a-z_]+)', t["expr"]):
                base = re.sub(r'_(bucket|sum|count)$', '', name)
                if base not in exported:
                    print(f"{f}: panel '{panel['title']}' uses {name}, which no service exports"); bad = 1
    print(f"{f}: valid JSON, {len(dash.get('panels', []))} panels")
rules = pathlib.Path("deploy/prometheus/alerts.yml").read_text()
for name in set(re.findall(r'\b(penora_[a-z_]+)', rules)):
    if re.sub(r'_(bucket|sum|count)$', '', name) not in exported:
        print(f"alerts.yml uses {name}, which no service exports"); bad = 1
sys.exit(bad)
PY
# The image's build: the files the Dockerfile's build stage COPYs, alone in a
# directory, must build with the same cargo command, offline (no Docker
# engine here). A missing workspace member, a crate that reads a file not
# copied, a lock file out of date: each fails here as it would in
# `docker compose up --build`. Registry crates come from the local cache; the
# compiled ones are shared with target/ (only the members are rebuilt).
build_context() { # build_context DOCKERFILE DIR
  local dockerfile=$1 ctx=$2 workdir=/ cmd started
  # Emptied first: a file left from an earlier run must not hide a missing
  # COPY. Copies keep their times, so a second run rebuilds nothing.
  rm -rf "$ctx" && mkdir -p "$ctx"
  # The build stage: from the first FROM to the next one.
  local stage
  stage=$(awk '/^FROM /{n++} n==1' "$dockerfile")
  while read -r word rest; do
    case "$word" in
      WORKDIR) workdir=$rest ;;
      COPY)
        case "$rest" in --from=*) continue ;; esac
        # shellcheck disable=SC2086
        set -- $rest
        local dest=${!#} n=$(($# - 1)) src
        local into="$ctx/${workdir#/}/${dest#./}"
        [ "${dest:0:1}" = "/" ] && into="$ctx$dest"
        for src in "${@:1:$n}"; do
          if [ "$n" -gt 1 ] || [ "${dest: -1}" = "/" ]; then
            mkdir -p "$into" && cp -Rp "$src" "$into/"
          else
            mkdir -p "$(dirname "$into")" && cp -Rp "$src" "$into"
          fi
        done
        ;;
      RUN) case "$rest" in *"cargo build"*) cmd=$rest ;; esac ;;
    esac
  done <<<"$stage"
  [ -n "${cmd:-}" ] || { echo "$dockerfile: no cargo build in the build stage"; return 1; }
  echo "building the image's context as the Dockerfile does: $cmd --offline"
  started=$(date +%s)
  # Offline needs the registry cache: a fresh machine fetches it first.
  (cd "$repo" && cargo fetch --locked -q) || return 1
  local built=0
  (cd "$ctx/${workdir#/}" && CARGO_TARGET_DIR="$repo/target" eval "$cmd --offline") || built=$?
  # The members' fingerprints now name the copies' sources (cargo gives a
  # member the same unit hash wherever it lies): left there, a later build
  # of the repository would take the copies' artifacts as fresh, even after
  # its own sources changed. Forgotten, the members are rebuilt from the
  # repository next time (the registry crates stay shared).
  rm -rf "$repo"/target/release/.fingerprint/penora-*
  [ "$built" -eq 0 ] || return "$built"
  echo "the image's build context builds ($(( $(date +%s) - started )) s)"
}
repo=$PWD

if [ "${1:-}" = "--self-test" ]; then
  # The check must fail on a Dockerfile that misses a member.
  broken=$(mktemp)
  grep -v '^COPY bench bench' Dockerfile >"$broken"
  if build_context "$broken" target/deploy-context-broken >"$broken.log" 2>&1; then
    echo "check-deploy: a Dockerfile without bench/ built; the check is broken"; cat "$broken.log"; exit 1
  fi
  grep -q "bench" "$broken.log" || { echo "check-deploy: failed, but not on the missing member:"; cat "$broken.log"; exit 1; }
  echo "check-deploy self-test: a Dockerfile missing a workspace member fails the build check"
  rm -rf "$broken" "$broken.log" target/deploy-context-broken
fi
build_context Dockerfile target/deploy-context
echo "deployment files are valid"
