# Shared settings for the scripts in this folder. Source it; do not run it.
#
# Everything that is installed (the LocalStack virtualenv) lives in a cache directory outside the
# clone, so a fresh clone (CI) reuses it instead of reinstalling ~500 MB. Everything that runs
# (a private PostgreSQL cluster, LocalStack's state and log) lives under the clone's target/.

LOADER_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOADER_CACHE="${LOADER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/loader-dev}"
LOADER_RUN="${LOADER_RUN:-$LOADER_ROOT/target/services}"
mkdir -p "$LOADER_CACHE" "$LOADER_RUN"

# Ports of the services the scripts start themselves (when none is reachable already).
LOADER_PG_PORT="${LOADER_PG_PORT:-55432}"
LOADER_LOCALSTACK_ADDR="${LOADER_LOCALSTACK_ADDR:-127.0.0.1:4566}"

log() { printf '[%s] %s\n' "$(basename "$0")" "$*" >&2; }
die() { log "error: $*"; exit 1; }
# as_root COMMAND...: run it as root (directly, or through passwordless sudo, as on CI runners);
# fails when neither is possible.
as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo "$@"
    else return 1; fi
}

# start_daemon NAME STATE_DIR HEALTH_FN SECONDS COMMAND...: run COMMAND detached in its own
# session from STATE_DIR (log: STATE_DIR/NAME.log, pid: STATE_DIR/pid), then wait up to SECONDS
# for HEALTH_FN to succeed. Dies, pointing at the log, if it exits or never becomes healthy.
start_daemon() {
    local name="$1" state="$2" healthy="$3" seconds="$4"
    shift 4
    mkdir -p "$state"
    log "starting $name (log: $state/$name.log)"
    (
        cd "$state"
        setsid nohup "$@" >"$state/$name.log" 2>&1 </dev/null &
        echo $! >"$state/pid"
    )
    local tries=$((seconds * 2))
    for _ in $(seq 1 "$tries"); do
        "$healthy" && break
        kill -0 "$(cat "$state/pid")" 2>/dev/null || die "$name exited; see $state/$name.log"
        sleep 0.5
    done
    "$healthy" || die "$name not healthy after $seconds s; see $state/$name.log"
    log "$name healthy"
}

# stop_daemon NAME STATE_DIR: stop what start_daemon started there (its whole session).
stop_daemon() {
    local name="$1" state="$2"
    [ -f "$state/pid" ] || { log "no $name started by this script"; return 0; }
    local pid
    pid="$(cat "$state/pid")"
    kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
    rm -f "$state/pid"
    log "$name stopped"
}

# synthetic_logins_sql ROWS PREFIX STAGED_AT [uuid]: an INSERT of ROWS synthetic logins into
# loader.raw_logins (for the transform and scale benchmarks): message ids PREFIX-1..ROWS (with
# `uuid`, a UUID made from that, as SQS's MessageIds are: random, not in staging order), 1% not
# a login (rejected), 5% IPv6, a sixth without locale; STAGED_AT is an SQL expression of g (the
# row number) for staged_at and sent_at.
synthetic_logins_sql() {
    local rows="$1" prefix="$2" staged_at="$3" id="'$2-' || g"
    [ "${4:-}" != uuid ] || id="md5('$2-' || g)::uuid::text"
    cat <<SQL
insert into loader.raw_logins (message_id, body, body_is_json, sent_at, receive_count, queue, staged_at)
select $id,
       case when g % 100 = 0 then jsonb_build_object('foo', 'oops')
            else jsonb_build_object(
                'user_id', md5(g::text),
                'app_version', (g % 10) || '.' || (g % 37) || '.' || (g % 7),
                'device_type', case when g % 2 = 0 then 'android' else 'ios' end,
                'ip', case when g % 20 = 0 then '2001:db8:' || to_hex(g % 65536) || '::' || to_hex(g % 999)
                           else (1 + g % 223) || '.' || (g / 7 % 256) || '.' || (g / 3 % 256) || '.' || (1 + g % 254) end,
                'locale', case when g % 6 = 0 then null else 'FR' end,
                'device_id', lpad((g % 900000)::text, 6, '0') || '-' || (g % 97)) end,
       true, $staged_at, 1, '$prefix', $staged_at
  from generate_series(1, $rows) as g
SQL
}

# For the benchmarks (scripts/bench-*.sh). scratch_database NAME [release]: the PostgreSQL that
# postgres.sh finds (or starts), with a new, empty database NAME in it (dropped first) that
# DATABASE_URL names (admin_url: the server's own), loader built (debug, or release) and
# migrated there; `loader` runs that build, or the binary LOADER_BIN names (an absolute path:
# another commit's build, to compare with in the same run).
scratch_database() {
    eval "$(bash scripts/postgres.sh)"
    admin_url="$DATABASE_URL"
    export DATABASE_URL="${admin_url%/*}/$1"
    if [ -n "${LOADER_BIN:-}" ]; then
        # Another build's binary (to compare with it in the same run): no build here.
        loader_bin="$LOADER_BIN"
    elif [ "${2:-}" = release ]; then
        cargo build --release --locked --quiet
        loader_bin=target/release/loader
    else
        cargo build --locked --quiet
        loader_bin=target/debug/loader
    fi
    PGOPTIONS="-c client_min_messages=warning" psql "$admin_url" -Xq \
        -c "drop database if exists $1" -c "create database $1"
    loader migrate >/dev/null
}
loader() { case "$loader_bin" in /*) "$loader_bin" "$@" ;; *) "$LOADER_ROOT/$loader_bin" "$@" ;; esac; }
# sql ARGS...: psql in DATABASE_URL, unaligned, stopping at the first error.
sql() { PGOPTIONS="-c client_min_messages=warning" psql "$DATABASE_URL" -XAtq -v ON_ERROR_STOP=1 "$@"; }
now() { date +%s.%N; }
# took START: seconds since START (a `now`), with $took_digits decimals (default 1).
took() { awk -v a="$1" -v b="$(now)" -v d="${took_digits:-1}" 'BEGIN { printf "%.*f s", d, b - a }'; }
# batch_seconds LOG: from a retention command's debug log (JSON lines with "ms"), the mean
# seconds per batch by tenth of the batches run: a rate that falls as it advances shows.
batch_seconds() {
    { grep -o '"ms":[0-9]*' "$1" || true; } | cut -d: -f2 | awk '
        { ms[NR] = $1 }
        END { if (NR == 0) exit; line = "";
              for (d = 0; d < 10; d++) { lo = int(d * NR / 10) + 1; hi = int((d + 1) * NR / 10); s = 0; n = 0;
                  for (i = lo; i <= hi; i++) { s += ms[i]; n++ }
                  if (n) line = line sprintf(" %.2f", s / n / 1000) }
              printf "  seconds per batch, by tenth of the %d batches:%s\n", NR, line }'
}
# wal, wal_since LSN: the WAL position, and the WAL written since LSN.
wal() { sql -c "select pg_current_wal_lsn()"; }
wal_since() { sql -c "select pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), '$1'))"; }
# past_days DAYS: a partition of loader.raw_logins for each of the last DAYS UTC days (those a
# benchmark stages into, as the days ahead of them were once made).
past_days() {
    sql -c "select count(loader._add_staging_partition('raw_logins_p' || to_char(d, 'YYYYMMDD'),
                       d::timestamp at time zone 'UTC', (d + 1)::timestamp at time zone 'UTC'))
              from (select g::date as d
                      from generate_series((now() at time zone 'UTC')::date - $1,
                                           (now() at time zone 'UTC')::date - 1, interval '1 day') g) x" \
        >/dev/null
}
# cold: empties the kernel's page cache (root only) so the next read comes from disk, as it would
# for tables larger than memory; prints "cold", or "warm" where it may not (shared_buffers keeps
# what it holds either way).
cold() { { sync && echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null && echo cold || echo warm; }
