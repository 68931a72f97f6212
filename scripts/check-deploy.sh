#!/usr/bin/env bash
# Validates the deployment files offline (no Docker engine needed):
#   docker-compose.yml            with `docker compose config`, else Debian's docker-compose
#   every file the compose mounts exists
#   deploy/prometheus/*.yml       with promtool (Debian's prometheus package)
#   deploy/grafana/**/*.json      parses as JSON, and each dashboard query names a metric we export
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

need promtool prometheus
promtool check config deploy/prometheus/prometheus.yml
promtool check rules deploy/prometheus/alerts.yml

need python3 python3
python3 - <<'PY'
import json, pathlib, re, subprocess, sys
exported = set()
for src in pathlib.Path(".").glob("*/src/**/*.rs"):
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
# The image's build context: cargo loads the whole workspace, so the
# Dockerfile must copy every member (a missing one fails `docker compose up --build`).
members=$(sed -n 's/^members = \[\(.*\)\]/\1/p' Cargo.toml | tr -d '" ' | tr ',' ' ')
for m in $members; do
  grep -qE "^COPY $m $m\b" Dockerfile || { echo "Dockerfile does not copy workspace member $m"; exit 1; }
done
echo "Dockerfile copies every workspace member: $members"
echo "deployment files are valid"
