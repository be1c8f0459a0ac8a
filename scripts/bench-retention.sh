#!/usr/bin/env bash
# Retention at scale: whole days dropped against the batched purge, on the same rows in the same
# run (docs/benchmarks.md "Retention by day"):
#
#   scripts/bench-retention.sh [ROWS]      (default 1000000)
#
# Two scratch databases hold the same ROWS synthetic logins spread over the last 60 days, each
# row with its outcome from `loader transform` (99% loaded, 1% rejected) and the work list
# empty; message ids are UUIDs, as SQS's are (so a day's ids are spread over the whole of each
# message_id index, not side by side):
#   loader_days: a partition per UTC day, as loader keeps raw_logins since V20;
#   loader_flat: no partition for those days, so every row is in one table (the default
#                partition), which the batched purge works through as it did before V20.
# Then `loader purge --older-than-days 30` in each: its output, seconds, WAL, and the size of
# raw_logins (all partitions, indexes included) before and after. In loader_days, first the
# proof the drop made before V23 (each row looked up in both outcome tables and the work list),
# read-only over the same days, as the reference for the proof by day that replaced it, and
# that proof alone (drop_staged_day's dry run): each first with the page cache emptied (lib.sh
# `cold`), as for tables larger than memory, then again. RETENTION_FLAT=no leaves out the
# database without days.
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
        past_days 61
    fi
    local t
    t=$(now)
    sql -c "$(synthetic_logins_sql "$rows" scale "now() - (($rows - g) * interval '60 days' / $rows)" uuid)" \
        -c "vacuum analyze loader.raw_logins" -c "vacuum analyze loader.transform_queue" >/dev/null
    loader transform >/dev/null
    sql -c "vacuum analyze loader.raw_logins" -c "vacuum analyze public.user_logins" \
        -c "vacuum analyze loader.login_rejects" -c "vacuum analyze loader.transform_queue" -c "checkpoint"
    report "  staged and transformed $rows rows" "$(took "$t"); raw_logins $(raw_size)"
}

# proofs: the count drop_staged_day made before V23, and its dry run since, over the days the
# purge drops; each with the page cache emptied first (a table larger than memory), then again.
proofs() {
    local t state run
    for run in 1 2; do
        state=warm; [ "$run" = 2 ] || state=$(cold)
        t=$(now)
        sql >/dev/null <<'SQL'
select format('select count(*) filter (where o.pending), count(*) filter (where o.loaded), count(*) filter (where o.rejected)
                 from loader.%I r
                cross join lateral (
                      select exists (select from public.user_logins u where u.message_id = r.message_id) as loaded,
                             exists (select from loader.login_rejects j where j.message_id = r.message_id) as rejected,
                             exists (select from loader.transform_queue q where q.raw_id = r.id) as pending) o', c.relname)
  from pg_inherits i join pg_class c on c.oid = i.inhrelid
 where i.inhparent = 'loader.raw_logins'::regclass and c.relname ~ '^raw_logins_p[0-9]{8}$'
   and to_date(substr(c.relname, 13), 'YYYYMMDD') < (now() at time zone 'UTC' - interval '30 days')::date
\gexec
SQL
        report "  the proof before V23 (a lookup per row), $state" "$(took "$t")"
        [ "$run" = 2 ] || state=$(cold)
        t=$(now)
        sql -c "select count(*) filter (where loader.drop_staged_day(d, true) = 'droppable')
                  from loader._staged_days_due(now() - interval '30 days') d" >/dev/null
        report "  the proof by day (drop_staged_day's dry run), $state" "$(took "$t")"
    done
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
proofs
purge "purge 30 days: whole days dropped"
[ "${RETENTION_FLAT:-yes}" = yes ] || exit 0
echo "one table (before V20):"
scratch_database loader_flat release
prepare false
purge "purge 30 days: batches of 10,000 bodies"
