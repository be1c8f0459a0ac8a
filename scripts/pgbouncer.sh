#!/usr/bin/env bash
# Start (or reuse) two PgBouncers in front of $DATABASE_URL's server, one in transaction pooling
# mode and one in session mode, and print the URLs that reach them:
#
#   eval "$(DATABASE_URL=... scripts/pgbouncer.sh)"     LOADER_PGBOUNCER_TRANSACTION_URL,
#                                                       LOADER_PGBOUNCER_SESSION_URL
#   scripts/pgbouncer.sh stop
#
# Debian's pgbouncer (1.18 on Debian 12) is installed when missing. Every database of the server
# is reachable through both (a `*` entry), as the roles listed in the auth file (the tests'
# owner and DATABASE_URL's superuser; trust: no passwords here). Progress goes to stderr.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[ -n "${DATABASE_URL:-}" ] || die "DATABASE_URL is not set (eval \"\$(scripts/postgres.sh)\" first)"
BOUNCER_DIR="$LOADER_RUN/pgbouncer"
# As root pgbouncer runs as the postgres user, who must be able to reach its directory (see
# postgres.sh): /tmp then, when the clone is under a private home.
if [ "$(id -u)" = 0 ] && id postgres >/dev/null 2>&1 &&
    ! runuser -u postgres -- test -x "$LOADER_RUN" 2>/dev/null; then
    BOUNCER_DIR="/tmp/loader-dev-pgbouncer-$(id -u)"
fi
TRANSACTION_PORT="${LOADER_PGBOUNCER_TRANSACTION_PORT:-56432}"
SESSION_PORT="${LOADER_PGBOUNCER_SESSION_PORT:-56433}"

# postgres://user@host:port/db?... -> its parts.
rest="${DATABASE_URL#*://}"
user="${rest%%@*}"
user="${user%%:*}"
hostport="${rest#*@}"
hostport="${hostport%%/*}"
db_host="${hostport%%:*}"
db_port="${hostport##*:}"
[ "$db_port" = "$hostport" ] && db_port=5432
database="${rest#*/}"
database="${database%%\?*}"

answers() { psql "postgres://$user@127.0.0.1:$1/$database" -XAtqc 'select 1' >/dev/null 2>&1; }

as_owner() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# start_one MODE PORT POOL_SIZE: the transaction pooler gets few server sessions per database
# (fewer than the sessions loader opens at once, so transactions move between them); the session
# pooler enough for every client to keep one.
start_one() {
    local mode="$1" port="$2" pool_size="$3" dir="$BOUNCER_DIR/$1"
    if answers "$port"; then
        log "PgBouncer ($mode) already answering on 127.0.0.1:$port"
        return 0
    fi
    mkdir -p "$dir"
    printf '"%s" ""\n"%s" ""\n' "$user" "loader_test_owner" >"$dir/users.txt"
    cat >"$dir/pgbouncer.ini" <<INI
[databases]
* = host=$db_host port=$db_port

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = trust
auth_file = $dir/users.txt
pool_mode = $mode
max_client_conn = 1000
default_pool_size = $pool_size
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
admin_users = $user
INI
    [ "$(id -u)" = 0 ] && chown -R postgres "$dir"
    log "starting PgBouncer ($mode pooling) on 127.0.0.1:$port (log: $dir/pgbouncer.log)"
    as_owner pgbouncer -d "$dir/pgbouncer.ini" >&2 || die "pgbouncer did not start; see $dir/pgbouncer.log"
    for _ in $(seq 1 40); do
        answers "$port" && return 0
        sleep 0.25
    done
    die "PgBouncer ($mode) does not answer on $port; see $dir/pgbouncer.log"
}

stop_one() {
    local pidfile="$BOUNCER_DIR/$1/pgbouncer.pid"
    [ -f "$pidfile" ] || return 0
    kill "$(cat "$pidfile")" 2>/dev/null || true
    log "PgBouncer ($1) stopped"
}

case "${1:-start}" in
start)
    if ! command -v pgbouncer >/dev/null 2>&1; then
        log "installing pgbouncer from the distribution's packages"
        { as_root apt-get update -qq >&2 &&
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >&2; } ||
            die "pgbouncer is not installed: apt-get install pgbouncer"
        # The package's own service (where an init system started it) is not ours.
        as_root service pgbouncer stop >/dev/null 2>&1 || true
    fi
    start_one transaction "$TRANSACTION_PORT" 3
    start_one session "$SESSION_PORT" 100
    echo "export LOADER_PGBOUNCER_TRANSACTION_URL='postgres://$user@127.0.0.1:$TRANSACTION_PORT/$database'"
    echo "export LOADER_PGBOUNCER_SESSION_URL='postgres://$user@127.0.0.1:$SESSION_PORT/$database'"
    ;;
stop)
    stop_one transaction
    stop_one session
    ;;
*) die "usage: $0 [start|stop]" ;;
esac
