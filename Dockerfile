# syntax=docker/dockerfile:1
# backup-worker: multi-stage build. The runtime image carries the dump/restore tools of every
# engine we back up, each from its vendor's repository so they are at least as new as the servers
# the platform runs (pg_dump refuses to dump a newer server). Redis restores need no server: the
# worker cuts the RDB into DUMP payloads itself. Point-in-time restores (DESIGN §14) do need one:
# the tenant's base backup is replayed in a private Postgres of the tenant's own major, so the
# server binaries of every supported major are here too (PG_BIN_DIR=/usr/lib/postgresql/{major}/bin).

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
# Every Postgres major a tenant may run: each gets its server (initdb, postgres, pg_ctl,
# pg_receivewal, pg_basebackup under /usr/lib/postgresql/N/bin) for PITR restores and WAL streams.
ARG PG_MAJORS="13 14 15 16 17 18"
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
    # postgresql-common would create (and start) a "main" cluster per server package installed:
    # the image must hold no cluster, the worker makes its private servers itself.
    mkdir -p /etc/postgresql-common/createcluster.d; \
    echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.d/no-main.conf; \
    # Per major, the server and the extensions a tenant's database may use: pg_dump reading their
    # data out of the private server calls their types' functions (vector.so, postgis-3.so, ...).
    # bookworm-pgdg has all three for every major; for 13 its pg_partman is the 4.7 series.
    pg_packages=""; \
    for v in ${PG_MAJORS}; do \
        pg_packages="$pg_packages postgresql-$v postgresql-$v-pgvector postgresql-$v-postgis-3 postgresql-$v-partman"; \
    done; \
    apt-get install -y --no-install-recommends \
        "postgresql-client-${PG_MAJOR}" $pg_packages mongodb-database-tools redis-tools; \
    apt-get purge -y curl gnupg; apt-get autoremove -y; rm -rf /var/lib/apt/lists/*; \
    # pg_dump/pg_restore on PATH are pg_wrapper's: with no cluster it runs the newest major's (18).
    pg_dump --version | grep -q " ${PG_MAJOR}\."; pg_restore --version | grep -q " ${PG_MAJOR}\."; \
    pg_dump --version; pg_restore --version; mongodump --version; mongorestore --version; \
    redis-cli --version; \
    test -z "$(pg_lsclusters -h)"; \
    for v in ${PG_MAJORS}; do /usr/lib/postgresql/$v/bin/postgres --version; done; \
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
