#!/usr/bin/env bash
# An online key rotation after retention (docs/benchmarks.md "A rotation after retention"):
#
#   LOADER_BEFORE=/abs/path/to/an/older/loader scripts/bench-rotation.sh [ROWS]   (default 1000000)
#
# In a scratch database (loader_rotation, recreated): ROWS synthetic logins spread over the last
# 60 days, each UTC day in its partition, UUID message ids, transformed; then `loader purge
# --older-than-days 30` (about half the days dropped). Then `loader keys rotate` (default
# workers), timed, with what it carried and the most partitions of raw_logins one range held
# locked (sampled from pg_locks every 0.2 s while it copies): first with LOADER_BEFORE's
# binary (migrated with it), when given, then with this checkout's release build (which
# migrates the database on to its own version first); after each, `loader reconcile --since 1d`
# timed (a read by time of the tables the swap put in).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh
rows="${1:-1000000}"
export RUST_LOG=warn
report() { printf '%-52s %s\n' "$1" "$2"; }
current=$LOADER_ROOT/target/release/loader
cargo build --release --locked --quiet
LOADER_BIN="${LOADER_BEFORE:-$current}" scratch_database loader_rotation release

t=$(now)
past_days 61
sql -c "$(synthetic_logins_sql "$rows" rot "now() - (($rows - g) * interval '60 days' / $rows)" uuid)" \
    -c "vacuum analyze loader.raw_logins" -c "vacuum analyze loader.transform_queue" >/dev/null
loader transform >/dev/null
loader purge --older-than-days 30 >/dev/null
sql -c "vacuum analyze public.user_logins" -c "vacuum analyze loader.login_rejects" \
    -c "vacuum analyze loader.transform_queue" -c "vacuum analyze loader.raw_logins" -c "checkpoint"
report "$rows rows staged, transformed, 30 days dropped" \
    "$(took "$t"); $(sql -c "select count(*) from pg_inherits where inhparent = 'loader.raw_logins'::regclass") partitions, $(sql -c "select sum(staged) from loader.staged_days") rows in dropped days"

# rotate LABEL: one rotation with `loader` as it stands, timed, with the partitions of
# raw_logins its sessions held locked, sampled every 0.2 s: in how many samples one session held
# more than one, of those where one held any, and the most.
rotate() {
    local stop t
    stop=$(mktemp -u)
    (
        most=0 any=0 many=0
        while [ ! -f "$stop" ]; do
            n=$(sql -c "select coalesce(max(n), 0) from (
                          select count(distinct l.relation) as n from pg_locks l join pg_inherits i on i.inhrelid = l.relation
                           where i.inhparent = 'loader.raw_logins'::regclass group by l.pid) c")
            [ "$n" -le "$most" ] || most=$n
            [ "$n" -eq 0 ] || any=$((any + 1))
            [ "$n" -le 1 ] || many=$((many + 1))
            sleep 0.2
        done
        echo "more than one in $many of $any samples; at most $most" >"$stop.most"
    ) &
    t=$(now)
    out=$(loader keys rotate | tr '\n' ' ')
    report "$1: key rotation" "$(took "$t")"
    touch "$stop"; wait
    report "  partitions one session held locked" "$(cat "$stop.most")"
    report "  carried (counted as deleted by hand)" \
        "$(sql -c "select carried from loader.rebuilds order by id desc limit 1")"
    rm -f "$stop" "$stop.most"
    echo "  ($out)"
    # A read by time right after the swap (BRIN indexes on the new tables).
    t=$(now)
    loader reconcile --since 1d --skip-queue >/dev/null
    report "  then reconcile --since 1d --skip-queue" "$(took "$t")"
}
if [ -n "${LOADER_BEFORE:-}" ]; then
    rotate "before ($LOADER_BEFORE)"
    loader_bin=$current
    loader migrate >/dev/null
fi
rotate "this checkout"
