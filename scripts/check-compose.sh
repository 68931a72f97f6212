#!/usr/bin/env bash
# Validates docker-compose.yml offline (no Docker engine needed): with
# `docker compose` when the plugin is there, else with Debian's docker-compose.
set -euo pipefail
cd "$(dirname "$0")/.."
export PENORA_API_KEY=${PENORA_API_KEY:-check-only-key-0123456789abcdef0123}
if docker compose version >/dev/null 2>&1; then
  docker compose config --quiet
elif command -v docker-compose >/dev/null; then
  docker-compose config --quiet
else
  as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null
  docker-compose config --quiet
fi
echo "docker-compose.yml is valid"
