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
