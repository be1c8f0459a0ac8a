#!/usr/bin/env bash
# loader through PgBouncer against a direct connection, one report (release build, the local
# PostgreSQL, the PgBouncers of scripts/pgbouncer.sh, LocalStack):
#
#   scripts/bench-pooler.sh [ROWS [MESSAGES]]     default 200000 rows, 20000 messages
#
# For each of direct, transaction pooling and session pooling, in a scratch database
# (loader_pooler, recreated): staging alone (`loader bench staging`, ROWS rows in flushes of
# 500), the transform of ROWS staged rows (`loader transform`, default workers, from the same
# "nothing transformed" state each time), and `loader ingest` draining MESSAGES messages sent
# to a fresh queue.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh
rows="${1:-200000}"
messages="${2:-20000}"
eval "$(bash scripts/services.sh)"
export AWS_ENDPOINT_URL AWS_REGION
admin_url="$DATABASE_URL"
eval "$(bash scripts/pgbouncer.sh)"
cargo build --release --locked --quiet
loader() { target/release/loader "$@"; }
PGOPTIONS="-c client_min_messages=warning" psql "$admin_url" -Xq \
    -c 'drop database if exists loader_pooler' -c 'create database loader_pooler'
direct="${admin_url%/*}/loader_pooler"
transaction="${LOADER_PGBOUNCER_TRANSACTION_URL%/*}/loader_pooler"
session="${LOADER_PGBOUNCER_SESSION_URL%/*}/loader_pooler"
DATABASE_URL="$direct" loader migrate >/dev/null
sql() { psql "$direct" -XAtq -v ON_ERROR_STOP=1 "$@"; }
now() { date +%s.%N; }
rate() { awk -v n="$1" -v a="$2" -v b="$3" 'BEGIN { printf "%7.2f s %9.0f/s", b - a, n / (b - a) }'; }

echo "cores: $(nproc); rows: $rows; messages: $messages; $(psql --version | head -n1); $(pgbouncer --version | head -n1)"
for mode in direct transaction session; do
    url="${!mode}"
    out=$(DATABASE_URL="$url" loader bench staging --rows "$rows" --flush-messages 500)
    staging=$(grep -Eo '[0-9]+ messages/s' <<<"$out" | sed 's/ messages/ rows/')

    sql -c "truncate loader.raw_logins, loader.transform_queue, public.user_logins, loader.login_rejects cascade" \
        -c "$(synthetic_logins_sql "$rows" pool "now() - interval '1 day'")" \
        -c "vacuum analyze loader.raw_logins" -c "vacuum analyze loader.transform_queue"
    t0=$(now)
    DATABASE_URL="$url" loader transform >/dev/null
    t1=$(now)

    queue="bench-pooler-$mode-$$"
    DATABASE_URL="$url" SQS_QUEUE="$queue" loader send --generate "$messages" >/dev/null
    t2=$(now)
    DATABASE_URL="$url" SQS_QUEUE="$queue" loader ingest --wait-seconds 0 >/dev/null
    t3=$(now)
    printf '%-12s staging %14s   transform %s   ingest %s\n' "$mode:" "$staging" \
        "$(rate "$rows" "$t0" "$t1")" "$(rate "$messages" "$t2" "$t3")"
done
