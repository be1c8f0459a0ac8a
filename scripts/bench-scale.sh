#!/usr/bin/env bash
# The database side at scale, one report (docs/benchmarks.md):
#
#   scripts/bench-scale.sh [ROWS]      (default 10000000)
#
# In a scratch database (loader_scale, recreated): stages ROWS synthetic logins (the generator
# of bench-transform.sh, spread over the last 60 days, each in its day's partition), then times,
# with table and index sizes before and after each step:
#   transform with 1 worker, then (reset) with the default workers;
#   an online key rotation (`loader keys rotate`) while a second process stages 1,000 new
#   logins a second and transforms them, reporting the longest any of them waited for its
#   outcome;
#   `loader purge --older-than-days 30` (about half the rows): the 30 days wholly before the
#   cutoff dropped (the proof, then the drop), the day at the cutoff purged in batches, with its
#   WAL, and the seconds a dropped day took;
#   `loader reconcile --skip-queue --since 1d` and the full audit (after the transform, and the
#   scoped one again at the end: a rotation gives every row a new loaded_at).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh
rows="${1:-10000000}"
export RUST_LOG=warn
scratch_database loader_scale release

sizes() {
    sql -c "select string_agg(format('%s %s', c.relname, pg_size_pretty(c.bytes)), ', ' order by c.relname)
              from (select 'raw_logins' as relname, (select sum(pg_total_relation_size(p.relid))
                                                       from pg_partition_tree('loader.raw_logins') p) as bytes
                    union all
                    select c.relname, pg_total_relation_size(c.oid)
                      from pg_class c where c.oid in ('public.user_logins'::regclass, 'loader.login_rejects'::regclass)) c"
}
report() { printf '%-58s %s\n' "$1" "$2"; }

echo "cores: $(nproc); rows: $rows; $(psql --version | head -n1); autovacuum $(sql -c 'show autovacuum')"
t=$(now)
past_days 61
sql -c "$(synthetic_logins_sql "$rows" scale "now() - (($rows - g) * interval '60 days' / $rows)")" \
    -c "vacuum analyze loader.raw_logins" -c "vacuum analyze loader.transform_queue"
report "stage $rows rows (one INSERT ... SELECT)" "$(took "$t"); $(sizes)"

reset() {
    sql -c "truncate public.user_logins, loader.login_rejects" \
        -c "insert into loader.transform_queue (raw_id, staged_at) select id, staged_at from loader.raw_logins" \
        -c "vacuum analyze loader.transform_queue" >/dev/null
}
t=$(now); loader transform --workers 1 >/dev/null; report "transform, 1 worker" "$(took "$t")"
reset
t=$(now); loader transform >/dev/null; report "transform, default workers ($(nproc) cores)" "$(took "$t"); $(sizes)"
# What autovacuum would have done by now (a cluster may run with it off, as this machine's
# does): without it the work list's statistics still count the 10^7 drained rows.
sql -c "vacuum analyze public.user_logins" -c "vacuum analyze loader.login_rejects" \
    -c "vacuum analyze loader.transform_queue" -c "vacuum analyze loader.raw_logins" >/dev/null
t=$(now); loader reconcile --skip-queue --since 1d >/dev/null; report "reconcile --since 1d" "$(took "$t")"
t=$(now); loader reconcile --skip-queue >/dev/null; report "reconcile, full audit" "$(took "$t")"

# A stream of new logins during the rotation: 1,000 a second, each batch transformed at once;
# the longest wait from staging to outcome is what a dashboard would see.
stream() {
    local i=0 worst=0
    while [ ! -f "$1" ]; do
        i=$((i + 1))
        sql -c "insert into loader.raw_logins (message_id, body, body_is_json, queue)
                select 'live-$i-' || g, jsonb_build_object('user_id', 'l' || g, 'device_id', 'x' || g), true, 'live'
                  from generate_series(1, 1000) g" >/dev/null
        loader transform --workers 1 >/dev/null
        worst=$(sql -c "select greatest($worst, coalesce(max(extract(epoch from u.loaded_at - r.staged_at)), 0))
                          from loader.raw_logins r join public.user_logins u using (message_id)
                         where r.message_id like 'live-$i-%'")
        sleep 1
    done
    echo "$worst" >"$1.worst"
}
stop=$(mktemp -u)
# The stream ends with the script, whatever ends it (a failed rotation included).
trap 'touch "$stop"' EXIT
stream "$stop" &
# The rotation's log (the sessions a swap waited for, by pid) is shown when it fails.
t=$(now); loader keys rotate >/dev/null 2>"$stop.rotate-log" || { cat "$stop.rotate-log" >&2; exit 1; }
report "key rotation, online (default workers)" "$(took "$t"); $(sizes)"
touch "$stop"; wait
report "  longest wait of a new login for its outcome meanwhile" "$(cat "$stop.worst") s"
report "  key ids in user_logins after it" "$(sql -c "select count(distinct mask_key_id) from public.user_logins")"

# Retention of 30 days: whole days dropped, each after its proof, then the day at the cutoff in
# batches (stopped after PURGE_SECONDS, default 1200: it resumes). WAL from pg_current_wal_lsn().
t=$(now); w=$(wal)
purged=$(timeout -s INT "${PURGE_SECONDS:-1200}" "$loader_bin" purge --older-than-days 30 \
             | tr '\n' ';') || true
report "purge --older-than-days 30" "$(took "$t"); WAL $(wal_since "$w"); $(sizes)"
echo "  ($purged)"
report "  rows in the days dropped" "$(sql -c "select sum(staged) from loader.staged_days")"

t=$(now); loader reconcile --skip-queue --since 1d >/dev/null; report "reconcile --since 1d (after the rotation rewrote loaded_at)" "$(took "$t")"
trap - EXIT
rm -f "$stop" "$stop.worst" "$stop.rotate-log"
