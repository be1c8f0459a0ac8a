#!/usr/bin/env bash
# Ingest benchmark, one report (release build, local PostgreSQL, the SQS endpoint in
# AWS_ENDPOINT_URL or LocalStack started by scripts/localstack.sh):
#
#   scripts/bench-ingest.sh [MESSAGES]     (default 100000)
#
#   (a) the emulator's ceiling: receive + delete, same concurrency as ingest, no database;
#   (b) `loader ingest`: messages/s, and the loader's own CPU seconds per 100k messages;
#   (c) staging alone: pre-built batches into loader.raw_logins, rows/s;
#   (d) transform: `call loader.transform()` over the rows (b) staged, rows/s.
# Each of (a) and (b) drains its own freshly filled queue. Filling is not timed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh
n="${1:-100000}"
if [ -z "${AWS_ENDPOINT_URL:-}" ]; then
    eval "$(bash scripts/localstack.sh)"
fi
eval "$(bash scripts/postgres.sh)"
admin_url="$DATABASE_URL"
export DATABASE_URL="${admin_url%/*}/loader_bench_ingest" AWS_ENDPOINT_URL AWS_REGION="${AWS_REGION:-us-east-1}"
export RUST_LOG=warn
cargo build --release --locked --quiet
loader() { target/release/loader "$@"; }
PGOPTIONS="-c client_min_messages=warning" psql "$admin_url" -Xq \
    -c 'drop database if exists loader_bench_ingest' -c 'create database loader_bench_ingest'
loader migrate >/dev/null

tag="bench-$$"
log "filling ${tag}-ceiling with $n messages"
loader --queue "${tag}-ceiling" send --generate "$n" >/dev/null
ceiling=$(loader --queue "${tag}-ceiling" bench ceiling)

log "filling ${tag}-ingest with $n messages"
loader --queue "${tag}-ingest" send --generate "$n" --seed 2 >/dev/null
TIMEFORMAT='%R %U %S'
{ time loader --queue "${tag}-ingest" ingest --wait-seconds 1 >/dev/null 2>&1; } 2>/tmp/loader-bench-time.$$
read -r wall user sys </tmp/loader-bench-time.$$
rm -f /tmp/loader-bench-time.$$
staged=$(psql "$DATABASE_URL" -XAtc "select count(*) from loader.raw_logins")

log "transform"
start=$(date +%s.%N)
psql "$DATABASE_URL" -XAtqc "call loader.transform()" >/dev/null
end=$(date +%s.%N)

staging=$(loader bench staging --rows "$n")

echo "machine: $(nproc) cores; endpoint: $AWS_ENDPOINT_URL; messages: $n"
echo "(a) ceiling, $ceiling"
awk -v n="$staged" -v w="$wall" -v u="$user" -v s="$sys" 'BEGIN {
    printf "(b) loader ingest: %d messages in %.2f s, %.0f messages/s; loader CPU %.2f s (%.2f s per 100k)\n",
        n, w, n / w, u + s, (u + s) * 100000 / n }'
echo "(c) $staging"
awk -v n="$staged" -v a="$start" -v b="$end" 'BEGIN {
    printf "(d) transform: %d rows in %.2f s, %.0f rows/s\n", n, b - a, n / (b - a) }'
