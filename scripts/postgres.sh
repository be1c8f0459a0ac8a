#!/usr/bin/env bash
# Find or start PostgreSQL and print the environment to use.
#
#   scripts/postgres.sh          reuse $DATABASE_URL (or the local server on 127.0.0.1:5432)
#                                when it answers; else start a private cluster under target/
#   scripts/postgres.sh stop     stop the private cluster this script started
#   scripts/postgres.sh cron     start (or reuse) a second private cluster with pg_cron loaded
#                                (Debian's postgresql-15-cron, installed when missing), for
#                                `loader schedule` and its test, set up as pg_cron's docs say for
#                                a role that is not a superuser (loader_cron_owner owns database
#                                loader_cron and has usage on schema cron); prints
#                                LOADER_CRON_DATABASE_URL (the superuser's, for the DBA's part)
#   scripts/postgres.sh cron-stop
#
# Prints `export DATABASE_URL=...` on stdout; progress goes to stderr. The URL must name a role
# that may create databases and roles: the tests give each test its own database.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PG_DIR="$LOADER_RUN/pg"
# As root the cluster runs as the postgres user, who must be able to reach its directory; a
# clone under a private home directory cannot be, so the cluster goes to /tmp then.
if [ "$(id -u)" = 0 ] && id postgres >/dev/null 2>&1 &&
    ! runuser -u postgres -- test -x "$LOADER_RUN" 2>/dev/null; then
    PG_DIR="/tmp/loader-dev-pg-$(id -u)"
fi
PG_DATA="$PG_DIR/data"
PG_SOCK="$PG_DIR"
PRIVATE_URL="postgres://postgres@127.0.0.1:$LOADER_PG_PORT/postgres"
DEFAULT_URL="${LOADER_PG_DEFAULT_URL:-postgres://postgres@127.0.0.1:5432/postgres}"

answers() { psql "$1" -XAtqc 'select 1' >/dev/null 2>&1; }

pg_bin() {
    local dir
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        [ -x "$dir/initdb" ] && { echo "$dir"; return 0; }
    done
    command -v initdb >/dev/null 2>&1 && { dirname "$(command -v initdb)"; return 0; }
    return 1
}

ensure_installed() {
    command -v psql >/dev/null 2>&1 && pg_bin >/dev/null && return 0
    [ "$(id -u)" = 0 ] || die "PostgreSQL is not installed: apt-get install postgresql"
    log "installing PostgreSQL from Debian packages"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql postgresql-contrib >&2
}

# initdb and postgres refuse to run as root: run them as the postgres system user then.
as_owner() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# start_private [DIR PORT EXTRA_POSTGRES_OPTIONS]: initdb (once) and start a cluster.
start_private() {
    local PG_DIR="${1:-$PG_DIR}" port="${2:-$LOADER_PG_PORT}" extra="${3:-}"
    local PG_DATA="$PG_DIR/data" PG_SOCK="$PG_DIR"
    ensure_installed
    local bin
    bin="$(pg_bin)" || die "initdb not found even after installing PostgreSQL"
    if [ "$(id -u)" = 0 ]; then
        id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql postgres
        mkdir -p "$PG_SOCK" && chown postgres "$PG_SOCK"
    fi
    if [ ! -f "$PG_DATA/PG_VERSION" ]; then
        log "creating a private cluster in $PG_DATA"
        as_owner "$bin/initdb" -D "$PG_DATA" -U postgres --auth=trust --encoding=UTF8 \
            --locale=C.UTF-8 >"$PG_DIR/initdb.log" 2>&1 ||
            die "initdb failed; see $PG_DIR/initdb.log"
    fi
    log "starting the private cluster on 127.0.0.1:$port"
    as_owner "$bin/pg_ctl" -D "$PG_DATA" -l "$PG_SOCK/postgres.log" -w -t 60 start \
        -o "-p $port -k $PG_SOCK -c listen_addresses=127.0.0.1 -c fsync=off $extra" >&2 ||
        die "PostgreSQL did not start; see $PG_SOCK/postgres.log"
}

start() {
    local url=""
    if [ -n "${DATABASE_URL:-}" ] && answers "$DATABASE_URL"; then
        url="$DATABASE_URL"
    elif answers "$DEFAULT_URL"; then
        url="$DEFAULT_URL"
    elif answers "$PRIVATE_URL"; then
        url="$PRIVATE_URL"
    else
        [ -n "${DATABASE_URL:-}" ] && log "DATABASE_URL does not answer; starting a private cluster"
        start_private
        url="$PRIVATE_URL"
        answers "$url" || die "the private cluster does not answer at $url"
    fi
    log "PostgreSQL answering at ${url%%\?*}"
    echo "export DATABASE_URL='$url'"
}

stop() {
    local data="${1:-$PG_DATA}"
    [ -f "$data/postmaster.pid" ] || { log "no private cluster running"; return 0; }
    as_owner "$(pg_bin)/pg_ctl" -D "$data" -m fast stop >&2
}

# The pg_cron cluster: pg_cron in shared_preload_libraries, its jobs kept in (and run against)
# the database loader_cron, so loader's schedule can run there with no loader process.
CRON_DIR="${PG_DIR%/pg}/pg-cron"
[ "$PG_DIR" = "${PG_DIR%/pg}" ] && CRON_DIR="$PG_DIR-cron"
CRON_PORT="${LOADER_PG_CRON_PORT:-55433}"
CRON_URL="postgres://postgres@127.0.0.1:$CRON_PORT/loader_cron"

cron() {
    ensure_installed
    local bin version
    bin="$(pg_bin)"
    version="$("$bin/postgres" --version | sed -E 's/.* ([0-9]+)\..*/\1/')"
    if ! [ -f "/usr/share/postgresql/$version/extension/pg_cron.control" ]; then
        log "installing pg_cron from the distribution's packages (postgresql-$version-cron)"
        { as_root apt-get update -qq >&2 &&
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "postgresql-$version-cron" >&2; } ||
            die "pg_cron is not installed: apt-get install postgresql-$version-cron"
    fi
    if ! answers "${CRON_URL%/*}/postgres"; then
        start_private "$CRON_DIR" "$CRON_PORT" \
            "-c shared_preload_libraries=pg_cron -c cron.database_name=loader_cron"
    fi
    # The DBA's part, once: the owner (no superuser, no createrole), the loader roles, and the
    # extension with usage on its schema.
    psql "${CRON_URL%/*}/postgres" -Xq -v ON_ERROR_STOP=1 >&2 <<'SQL'
select 'create role loader_cron_owner login nosuperuser nocreaterole nocreatedb'
 where not exists (select from pg_roles where rolname = 'loader_cron_owner') \gexec
select 'create role loader_ingest nologin' where not exists (select from pg_roles where rolname = 'loader_ingest') \gexec
select 'create role loader_analyst nologin' where not exists (select from pg_roles where rolname = 'loader_analyst') \gexec
select 'create role loader_pii_reader nologin' where not exists (select from pg_roles where rolname = 'loader_pii_reader') \gexec
select 'create role loader_transformer nologin' where not exists (select from pg_roles where rolname = 'loader_transformer') \gexec
select 'create database loader_cron owner loader_cron_owner'
 where not exists (select from pg_database where datname = 'loader_cron') \gexec
alter database loader_cron owner to loader_cron_owner;
SQL
    psql "$CRON_URL" -Xq -v ON_ERROR_STOP=1 -c "create extension if not exists pg_cron" \
        -c "grant usage on schema cron to loader_cron_owner" >&2
    log "PostgreSQL with pg_cron answering at $CRON_URL"
    echo "export LOADER_CRON_DATABASE_URL='$CRON_URL'"
}

case "${1:-start}" in
start) start ;;
stop) stop ;;
cron) cron ;;
cron-stop) stop "$CRON_DIR/data" ;;
*) die "usage: $0 [start|stop|cron|cron-stop]" ;;
esac
