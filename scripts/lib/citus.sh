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
  local tarball=${CITUS_TARBALL:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)/shared/vendor/citus-12.1.12.tar.gz}
  if [ ! -f "$tarball" ]; then
    echo "citus: $tarball not found; set CITUS_TARBALL to the vendored citus-12.1.12.tar.gz" >&2
    return 1
  fi
  echo "citus: citus.so missing in $libdir; building $(basename "$tarball") (about 4 minutes)" >&2
  if ! command -v pg_config >/dev/null || [ ! -d /usr/include/postgresql/15/server ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql-server-dev-15 libcurl4-openssl-dev \
      liblz4-dev libzstd-dev libkrb5-dev libssl-dev libxml2-dev libxslt1-dev libpam0g-dev \
      libreadline-dev libselinux1-dev libicu-dev autoconf flex bison >/dev/null
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
