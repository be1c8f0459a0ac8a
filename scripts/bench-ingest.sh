#!/usr/bin/env bash
# Ingest benchmark, one report (release build, local PostgreSQL, and an SQS emulator):
#
#   scripts/bench-ingest.sh [MESSAGES]               LocalStack (default 100000 messages)
#   scripts/bench-ingest.sh --fauxqs [MESSAGES]      fauxqs, a faster emulator (npm, Node 22)
#   scripts/bench-ingest.sh [--fauxqs] --latency-ms N [--receivers R] [MESSAGES]
#       (a) and (b) talk to the emulator through examples/latency-proxy, which adds N ms to every
#       call's round trip (real SQS answers in 10-30 ms; the emulators in well under 1 ms), and
#       (b') is `loader ingest --receivers 4`, the fixed concurrency of earlier versions.
#       --receivers R fixes (b) at R receive loops (default: adaptive, up to 32); (a) uses R,
#       else 32.
#
# With AWS_ENDPOINT_URL set, that endpoint is used instead.
#   (a) the emulator's ceiling: receive + delete, same concurrency as ingest, no database;
#   (b) `loader ingest`: messages/s, the loader's own CPU seconds per 100k messages, and its
#       maximum resident memory (GNU time's %M: flat with the backlog, since the channel and
#       one flush bound what is held);
#   (c) staging alone: pre-built batches into loader.raw_logins, rows/s;
#   (d) transform: `call loader.transform()` over the rows (b) staged, rows/s.
# Each of (a) and (b) drains its own freshly filled queue, with short polls (--wait-seconds 0)
# so that neither waits out a final empty long poll. Filling is not timed. (a) and (b) are
# timed the same way: the whole process, start-up included.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh
emulator=localstack
latency_ms=0
receivers=""
while [ $# -gt 0 ]; do
    case "$1" in
    --fauxqs) emulator=fauxqs; shift ;;
    --latency-ms) latency_ms="$2"; shift 2 ;;
    --receivers) receivers="$2"; shift 2 ;;
    *) break ;;
    esac
done
n="${1:-100000}"
if [ -z "${AWS_ENDPOINT_URL:-}" ]; then
    eval "$(bash "scripts/$emulator.sh")"
else
    emulator="$AWS_ENDPOINT_URL"
fi
eval "$(bash scripts/postgres.sh)"
admin_url="$DATABASE_URL"
export DATABASE_URL="${admin_url%/*}/loader_bench_ingest" AWS_ENDPOINT_URL AWS_REGION="${AWS_REGION:-us-east-1}"
export RUST_LOG=warn
cargo build --release --locked --quiet --bins --example latency-proxy
loader() { target/release/loader "$@"; }
PGOPTIONS="-c client_min_messages=warning" psql "$admin_url" -Xq \
    -c 'drop database if exists loader_bench_ingest' -c 'create database loader_bench_ingest'
loader migrate >/dev/null

tag="bench-$$"
# Through the delaying proxy when asked: (a) and (b) see the latency, filling does not.
direct="$AWS_ENDPOINT_URL"
timed_endpoint="$direct"
if [ "$latency_ms" -gt 0 ]; then
    proxy_port=4577
    target="${direct#*://}"
    target="${target%%/*}"
    # The binary itself in the background (not the `loader` function: $! would then name a
    # subshell), with no inherited stdout, so `kill` ends it and `$(...)` callers do not wait.
    target/release/examples/latency-proxy --listen "127.0.0.1:$proxy_port" --target "$target" \
        --latency-ms "$latency_ms" >/dev/null 2>&1 &
    proxy_pid=$!
    timed_endpoint="http://127.0.0.1:$proxy_port"
fi
timed() { # timed OUTPUT_FILE LOADER_ARGS...: wall, user, sys seconds and max RSS (KiB) of
    # `loader LOADER_ARGS...` through the proxy, into OUTPUT_FILE
    local out="$1"
    shift
    AWS_ENDPOINT_URL="$timed_endpoint" /usr/bin/time -f '%e %U %S %M' -o "$out" \
        target/release/loader "$@" >/dev/null 2>&1
}
times=$(mktemp)
trap 'rm -f "$times"; [ -n "${proxy_pid:-}" ] && kill "$proxy_pid" 2>/dev/null || true' EXIT

log "filling ${tag}-ceiling with $n messages"
loader --queue "${tag}-ceiling" send --generate "$n" >/dev/null
timed "$times" --queue "${tag}-ceiling" bench ceiling --wait-seconds 0 \
    --receivers "${receivers:-32}"
read -r c_wall c_user c_sys _ <"$times"

log "filling ${tag}-ingest with $n messages"
loader --queue "${tag}-ingest" send --generate "$n" --seed 2 >/dev/null
timed "$times" --queue "${tag}-ingest" ingest --wait-seconds 0 \
    ${receivers:+--receivers "$receivers"}
read -r wall user sys rss <"$times"
staged=$(psql "$DATABASE_URL" -XAtc "select count(*) from loader.raw_logins")

log "transform"
start=$(date +%s.%N)
psql "$DATABASE_URL" -XAtqc "call loader.transform()" >/dev/null
end=$(date +%s.%N)

staging=$(loader bench staging --rows "$n")

fixed=""
if [ -z "$receivers" ]; then
    log "filling ${tag}-fixed with $n messages"
    loader --queue "${tag}-fixed" send --generate "$n" --seed 3 >/dev/null
    timed "$times" --queue "${tag}-fixed" ingest --wait-seconds 0 --receivers 4
    read -r f_wall _ _ _ <"$times"
    fixed=$(awk -v n="$n" -v w="$f_wall" 'BEGIN { printf "%.2f s, %.0f messages/s", w, n / w }')
fi

echo "machine: $(nproc) cores; emulator: $emulator ($AWS_ENDPOINT_URL); messages: $n;" \
    "added round trip: $latency_ms ms; receivers: ${receivers:-adaptive}"
awk -v n="$n" -v w="$c_wall" -v u="$c_user" -v s="$c_sys" 'BEGIN {
    printf "(a) ceiling, receive+delete (no database): %.2f s, %.0f messages/s; CPU %.2f s per 100k\n",
        w, n / w, (u + s) * 100000 / n }'
awk -v n="$staged" -v w="$wall" -v u="$user" -v s="$sys" -v cw="$c_wall" -v rss="$rss" 'BEGIN {
    printf "(b) loader ingest: %d messages in %.2f s, %.0f messages/s = %.0f%% of (a); loader CPU %.2f s per 100k; max RSS %.1f MB\n",
        n, w, n / w, 100 * cw / w, (u + s) * 100000 / n, rss / 1024 }'
[ -n "$fixed" ] && echo "(b') loader ingest --receivers 4 (fixed): $fixed"
echo "(c) $staging"
awk -v n="$staged" -v a="$start" -v b="$end" 'BEGIN {
    printf "(d) transform: %d rows in %.2f s, %.0f rows/s\n", n, b - a, n / (b - a) }'
