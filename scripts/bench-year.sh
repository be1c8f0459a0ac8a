#!/usr/bin/env bash
# A year's retention cycle, simulated (docs/benchmarks.md "A year on one node"):
#
#   scripts/bench-year.sh [ROWS]      (default 4000000: 10,000 logins a day)
#
# In a scratch database (loader_year, recreated): ROWS synthetic logins (UUID message ids, as
# SQS's) spread evenly over the last 400 days, each in its day's partition, their ids in weekly generations of
# loader.staged_ids as a year of stagings would have left them, every one transformed. Then
# `loader purge --older-than-days 30 --masked-older-than-months 12`, as the daily job runs it
# for the first time: its seconds and WAL, and the size of each table (indexes included) and
# its rows before and after. What is left is what a deployment keeps at any time once the
# cycle turns (30 days of bodies, a year of masked rows, the ids SQS can still redeliver), so
# bytes a row, times the rows a day at 30 logins a second, gives the sizes at 10^9 a year.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh
rows="${1:-4000000}"
export RUST_LOG=warn
report() { printf '%-52s %s\n' "$1" "$2"; }
scratch_database loader_year release

# tables: each table's size (its partitions and indexes included) and rows.
tables() {
    local t
    for t in loader.raw_logins loader.staged_ids public.user_logins loader.login_rejects; do
        sql -c "select format('  %-22s %10s %12s rows %6s bytes a row', '$t', pg_size_pretty(b), n,
                              case when n > 0 then round(b::numeric / n) end)
                  from (select coalesce((select sum(pg_total_relation_size(p.relid))
                                           from pg_partition_tree('$t'::regclass) p),
                                        pg_total_relation_size('$t'::regclass)) as b,
                               (select count(*) from $t) as n) x"
    done
}

echo "cores: $(nproc); rows: $rows over 400 days; $(psql --version | head -n1)"
t0=$(sql -c "select now()")
t=$(now)
past_days 401
sql >/dev/null <<SQL
-- A generation a week, the last one current (as the weekly switch leaves them).
update loader.staged_id_generations
   set started_at = '$t0'::timestamptz - interval '401 days',
       ended_at = '$t0'::timestamptz - interval '394 days'
 where generation = 1;
insert into loader.staged_id_generations (generation, started_at, ended_at)
select w + 1, '$t0'::timestamptz - interval '401 days' + w * interval '7 days',
       case when w < 57 then '$t0'::timestamptz - interval '401 days' + (w + 1) * interval '7 days' end
  from generate_series(1, 57) w;
select format('create table loader.staged_ids_g%s partition of loader.staged_ids for values in (%s)', w + 1, w + 1)
  from generate_series(1, 57) w
\gexec
SQL
sql -c "$(synthetic_logins_sql "$rows" year "'$t0'::timestamptz - (($rows - g) * interval '400 days' / $rows) - interval '1 hour'" uuid)" \
    -c "insert into loader.staged_ids (message_id, generation)
        select r.message_id,
               1 + floor(extract(epoch from r.staged_at - ('$t0'::timestamptz - interval '401 days')) / (7 * 86400))::int
          from loader.raw_logins r" \
    -c "vacuum analyze loader.raw_logins" -c "vacuum analyze loader.transform_queue" >/dev/null
report "stage $rows rows over 400 days" "$(took "$t")"
t=$(now); loader transform >/dev/null; report "transform them" "$(took "$t")"
sql -c "vacuum analyze" -c "checkpoint" >/dev/null
echo "before the first purge:"
tables

t=$(now); w=$(wal)
out=$(loader purge --older-than-days 30 --masked-older-than-months 12 | tr '\n' ';')
report "purge --older-than-days 30 --masked-older-than-months 12" "$(took "$t"); WAL $(wal_since "$w")"
echo "  ($out)"
sql -c "vacuum analyze" >/dev/null
echo "after it (vacuumed: the ended masked rows' space is free for new rows, not returned):"
tables
report "  staged days left / id generations left" \
    "$(sql -c "select (select count(*) from pg_inherits i join pg_class c on c.oid = i.inhrelid
                        where i.inhparent = 'loader.raw_logins'::regclass and c.relname ~ '^raw_logins_p[0-9]{8}$'
                          and c.relname <= 'raw_logins_p' || to_char('$t0'::timestamptz at time zone 'UTC', 'YYYYMMDD'))
                    || ' / ' || (select count(*) from loader.staged_id_generations)")"

# The daily job the day after: one day's drop, and a day's masked rows (the steady state).
sql -c "update loader.staged_id_generations set started_at = started_at - interval '1 day',
               ended_at = ended_at - interval '1 day'" >/dev/null
t=$(now); w=$(wal)
out=$(loader purge --older-than-days 29 --masked-older-than-months 12 | tr '\n' ';')
report "the next day's purge (one day more of bodies)" "$(took "$t"); WAL $(wal_since "$w")"
echo "  ($out)"
tables
