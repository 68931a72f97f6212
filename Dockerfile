# Multi-stage build of the Penora Credits binaries.
# Stage 1 compiles with the Rust toolchain; stage 2 is a small Debian image
# holding only the binaries, running as an unprivileged user.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock clippy.toml ./
# Every workspace member, or cargo cannot load the workspace.
COPY api api
COPY bench bench
COPY common common
COPY ops ops
COPY worker worker
COPY migrations migrations
RUN cargo build --release --locked --bin penora-api --bin penora-worker --bin penora-ops

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home penora
COPY --from=build /src/target/release/penora-api /src/target/release/penora-worker /src/target/release/penora-ops /usr/local/bin/
USER penora
# A fixed mmap threshold (glibc): every block of 128 KiB or more (request
# bodies, decoded images) goes back to the system when freed, instead of
# staying in the heap of the thread that freed it once glibc has raised its
# threshold; and two heaps for all threads, not eight per core
# (docs/operations.md, "Memory").
ENV BIND_ADDR=0.0.0.0:5000 \
    LOG_FORMAT=json \
    MALLOC_MMAP_THRESHOLD_=131072 \
    MALLOC_ARENA_MAX=2
EXPOSE 5000
# Liveness only: a database outage must never restart the container
# (/ready is the readiness check; the compose file waits on it).
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD curl -fsS http://127.0.0.1:5000/health/live || exit 1
CMD ["penora-api"]
