#!/usr/bin/env bash
# Retention at scale: whole days dropped against the batched purge, on the same rows in the same
# run (docs/benchmarks.md "Retention by day"):
#
#   scripts/bench-retention.sh [ROWS]      (default 1000000)
#
# Two scratch databases hold the same ROWS synthetic logins spread over the last 60 days, each
# row with an outcome (a reject: the drop's count looks both outcome tables up whatever the
# outcome is) and the work list empty:
#   loader_days: a partition per UTC day, as loader keeps raw_logins since V20;
#   loader_flat: no partition for those days, so every row is in one table (the default
#                partition), which the batched purge works through as it did before V20.
# Then `loader purge --older-than-days 30` in each: its output, seconds, WAL, and the size of
# raw_logins (all partitions, indexes included) before and after.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh
rows="${1:-1000000}"
export RUST_LOG=warn
report() { printf '%-44s %s\n' "$1" "$2"; }
raw_size() {
    sql -c "select pg_size_pretty(sum(pg_total_relation_size(i.inhrelid)))
              from pg_inherits i where i.inhparent = 'loader.raw_logins'::regclass"
}

# prepare DAYS: the rows, with a partition per past day when DAYS is true.
prepare() {
    if [ "$1" = true ]; then
        sql -c "select loader._add_staging_partition('raw_logins_p' || to_char(d, 'YYYYMMDD'),
                           d::timestamp at time zone 'UTC', (d + 1)::timestamp at time zone 'UTC')
                  from (select g::date as d
                          from generate_series((now() at time zone 'UTC')::date - 61,
                                               (now() at time zone 'UTC')::date - 1, interval '1 day') g) x" \
            >/dev/null
    fi
    local t
    t=$(now)
    sql -c "$(synthetic_logins_sql "$rows" scale "now() - (($rows - g) * interval '60 days' / $rows)")" \
        -c "insert into loader.login_rejects (message_id, reason, detail, staged_on)
            select message_id, 'bench', 'bench', (staged_at at time zone 'UTC')::date from loader.raw_logins" \
        -c "truncate loader.transform_queue" \
        -c "vacuum analyze loader.raw_logins" -c "vacuum analyze loader.login_rejects" -c "checkpoint"
    report "  staged $rows rows with their outcomes" "$(took "$t"); raw_logins $(raw_size)"
}

# purge LABEL: loader purge --older-than-days 30, timed.
purge() {
    local t w before out
    before=$(raw_size)
    t=$(now); w=$(wal)
    out=$(loader purge --older-than-days 30 | tr '\n' ';')
    report "  $1" "$(took "$t"); WAL $(wal_since "$w"); raw_logins $before -> $(raw_size)"
    echo "    ($out)"
}

echo "cores: $(nproc); rows: $rows; $(psql --version | head -n1); autovacuum $(sql -c 'show autovacuum' 2>/dev/null || echo '?')"
echo "day partitions (since V20):"
scratch_database loader_days release
prepare true
purge "purge 30 days: whole days dropped"
echo "one table (before V20):"
scratch_database loader_flat release
prepare false
purge "purge 30 days: batches of 10,000 bodies"
