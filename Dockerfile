# syntax=docker/dockerfile:1
# backup-worker: multi-stage build. The runtime image carries the dump/restore tools of every
# engine we back up, each from its vendor's repository so they are at least as new as the servers
# the platform runs (pg_dump refuses to dump a newer server). Redis restores need no server: the
# worker cuts the RDB into DUMP payloads itself.

ARG RUST_VERSION=1.95
ARG DEBIAN=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN} AS build
# ISA-L (the deflate behind GZIP_LEVEL 1-7) is built from the isal-sys crate's bundled source and
# linked statically: its assembler and autotools are needed here, nothing in the runtime image.
RUN apt-get update \
 && apt-get install -y --no-install-recommends nasm autoconf automake libtool make \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY src ./src
COPY migrations ./migrations
COPY plans.yaml ./
RUN cargo build --release --locked --bin backup-worker \
 && install -m 0755 target/release/backup-worker /usr/local/bin/backup-worker \
 && ! ldd /usr/local/bin/backup-worker | grep -q libisal

FROM debian:${DEBIAN}-slim AS runtime
ARG DEBIAN
# Newest Postgres major the platform runs (pg_dump/pg_restore must be >= the server).
ARG PG_MAJOR=18
ARG MONGODB_TOOLS_SERIES=8.0
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates curl gnupg tini; \
    install -d -m 0755 /usr/share/keyrings; \
    curl -fsSL https://www.postgresql.org/media/keys/ACCC4CF8.asc | gpg --dearmor -o /usr/share/keyrings/pgdg.gpg; \
    echo "deb [signed-by=/usr/share/keyrings/pgdg.gpg] https://apt.postgresql.org/pub/repos/apt ${DEBIAN}-pgdg main" > /etc/apt/sources.list.d/pgdg.list; \
    curl -fsSL "https://pgp.mongodb.com/server-${MONGODB_TOOLS_SERIES}.asc" | gpg --dearmor -o /usr/share/keyrings/mongodb.gpg; \
    echo "deb [signed-by=/usr/share/keyrings/mongodb.gpg] https://repo.mongodb.org/apt/debian ${DEBIAN}/mongodb-org/${MONGODB_TOOLS_SERIES} main" > /etc/apt/sources.list.d/mongodb.list; \
    curl -fsSL https://packages.redis.io/gpg | gpg --dearmor -o /usr/share/keyrings/redis.gpg; \
    echo "deb [signed-by=/usr/share/keyrings/redis.gpg] https://packages.redis.io/deb ${DEBIAN} main" > /etc/apt/sources.list.d/redis.list; \
    apt-get update; \
    apt-get install -y --no-install-recommends \
        "postgresql-client-${PG_MAJOR}" mongodb-database-tools redis-tools; \
    apt-get purge -y curl gnupg; apt-get autoremove -y; rm -rf /var/lib/apt/lists/*; \
    pg_dump --version; pg_restore --version; mongodump --version; mongorestore --version; \
    redis-cli --version; \
    useradd --system --uid 10001 --home-dir /var/lib/backup-worker --create-home --shell /usr/sbin/nologin backup-worker

COPY --from=build /usr/local/bin/backup-worker /usr/local/bin/backup-worker
USER 10001:10001
WORKDIR /var/lib/backup-worker
ENV LOG_FORMAT=json \
    METRICS_ADDR=0.0.0.0:9090 \
    TMPDIR=/tmp
EXPOSE 9090
# tini reaps any grandchild a dump tool leaves and forwards SIGTERM to the daemon.
ENTRYPOINT ["/usr/bin/tini", "--", "backup-worker"]
CMD ["run"]
