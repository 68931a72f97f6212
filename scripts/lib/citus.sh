# Citus for scripts/cluster.sh: Debian 12 has no package, so build the
# vendored release (../shared/vendor, or CITUS_TARBALL) into the machine's
# PostgreSQL when citus.so is missing. About 4 minutes on 2 cores.
# Source it; it defines:
#
#   citus_ensure   build and install Citus unless citus.so is there already

citus_ensure() {
  local pg_bin=${PG_BIN:-/usr/lib/postgresql/15/bin}
  local libdir
  libdir=$("$pg_bin/pg_config" --pkglibdir 2>/dev/null || echo /usr/lib/postgresql/15/lib)
  if [ -f "$libdir/citus.so" ]; then return 0; fi
  # The vendored release: CITUS_TARBALL, else ../shared/vendor beside the
  # checkout, else the workplace's /work/shared/vendor.
  local tarball candidate
  for candidate in "${CITUS_TARBALL:-}" \
    "$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/../shared/vendor/citus-12.1.12.tar.gz" \
    /work/shared/vendor/citus-12.1.12.tar.gz; do
    if [ -n "$candidate" ] && [ -f "$candidate" ]; then tarball=$candidate; break; fi
  done
  if [ -z "${tarball:-}" ]; then
    echo "citus: citus-12.1.12.tar.gz not found (../shared/vendor); set CITUS_TARBALL to it" >&2
    return 1
  fi
  if ! echo "a344da15513601e718a268d907e1c86e43a69eb243398b929f65a4580723f552  $tarball" | sha256sum -c --quiet; then
    echo "citus: $tarball does not have the vendored release's sha256" >&2
    return 1
  fi
  echo "citus: citus.so missing in $libdir; building $(basename "$tarball") (about 4 minutes)" >&2
  if ! command -v pg_config >/dev/null || [ ! -d /usr/include/postgresql/15/server ]; then
    local packages=(postgresql-server-dev-15 libcurl4-openssl-dev liblz4-dev libzstd-dev libkrb5-dev
      libssl-dev libxml2-dev libxslt1-dev libpam0g-dev libreadline-dev libselinux1-dev libicu-dev
      autoconf flex bison)
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}" >/dev/null 2>&1 || {
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}" >/dev/null
    }
  fi
  local build
  build=$(mktemp -d /tmp/citus-build.XXXXXX)
  tar xzf "$tarball" -C "$build"
  (cd "$build"/citus-* && ./configure --quiet PG_CONFIG="$pg_bin/pg_config" >/dev/null \
    && make -s -j"$(nproc)" >/dev/null && make -s install >/dev/null) || {
    echo "citus: build failed in $build" >&2
    return 1
  }
  rm -rf "$build"
  [ -f "$libdir/citus.so" ]
}
