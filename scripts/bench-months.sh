#!/usr/bin/env bash
# A key rotation over a year of masks with a month of bodies kept (docs/benchmarks.md "A
# rotation that copies the recent months"):
#
#   LOADER_BEFORE=/abs/path/to/an/older/loader scripts/bench-months.sh [ROWS]   (default 1000000)
#
# In a scratch database (loader_months, made again for each binary): ROWS synthetic logins
# spread over the last 365 days, each UTC day in its partition of raw_logins (and, where the
# binary partitions user_logins by month, each month in its own, as a year of running would
# have made them), transformed (timed: the write into a table of 14 partitions against one);
# then `loader purge --older-than-days 30` (335 days dropped).
# Then `loader keys rotate`, timed, with the WAL it wrote and what it says it copies: first with
# LOADER_BEFORE's binary, when given, then with this checkout's build. LOADER_PROFILE=release
# for release builds (debug by default: the rotation's work is the server's).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh
rows="${1:-1000000}"
export RUST_LOG=warn
report() { printf '%-52s %s\n' "$1" "$2"; }
profile="${LOADER_PROFILE:-debug}"
current=$LOADER_ROOT/target/$profile/loader
base_url="${DATABASE_URL:-}"
if [ "$profile" = release ]; then cargo build --release --locked --quiet; else cargo build --locked --quiet; fi

# rotate_a_year LABEL BINARY
rotate_a_year() {
    local t w out
    # The server's own URL again (scratch_database left DATABASE_URL naming the last database).
    if [ -n "$base_url" ]; then export DATABASE_URL="$base_url"; else unset DATABASE_URL; fi
    LOADER_BIN="$2" scratch_database loader_months
    t=$(now)
    past_days 366
    if [ "$(sql -c "select to_regprocedure('loader._add_masked_month(regclass,text,text,date)') is not null")" = t ]; then
        sql -c "select count(loader._add_masked_month('public.user_logins', 'loader', 'user_logins_m' || to_char(m, 'YYYYMM'), m))
                  from (select g::date as m
                          from generate_series(date_trunc('month', now() at time zone 'UTC') - interval '13 months',
                                               date_trunc('month', now() at time zone 'UTC'), interval '1 month') g) x
                 where to_regclass('loader.user_logins_m' || to_char(m, 'YYYYMM')) is null" >/dev/null
    fi
    sql -c "$(synthetic_logins_sql "$rows" mon "now() - (($rows - g) * interval '365 days' / $rows)" uuid)" \
        -c "vacuum analyze loader.raw_logins" -c "vacuum analyze loader.transform_queue" >/dev/null
    local tt
    tt=$(now)
    loader transform >/dev/null
    report "$1: transform of $rows rows" "$(took "$tt")"
    loader purge --older-than-days 30 >/dev/null
    sql -c "vacuum analyze public.user_logins" -c "vacuum analyze loader.login_rejects" -c "checkpoint"
    report "$1: $rows rows over 365 days, 30 kept" \
        "$(took "$t"); user_logins $(sql -c "select pg_size_pretty(coalesce(sum(pg_total_relation_size(relid)), pg_total_relation_size('public.user_logins'))) from pg_partition_tree('public.user_logins')")"
    w=$(wal)
    t=$(now)
    out=$(loader keys rotate 2>&1 | tr '\n' ' ')
    report "  key rotation" "$(took "$t"); WAL $(wal_since "$w")"
    echo "  ($out)"
}
if [ -n "${LOADER_BEFORE:-}" ]; then
    rotate_a_year "before ($LOADER_BEFORE)" "$LOADER_BEFORE"
fi
rotate_a_year "this checkout" "$current"
