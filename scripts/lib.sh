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
