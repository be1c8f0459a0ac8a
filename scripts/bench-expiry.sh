#!/usr/bin/env bash
# The masked data's retention at scale (docs/benchmarks.md "The masked data's retention"):
#
#   scripts/bench-expiry.sh [ROWS]      (default 1000000)
#
# In a scratch database (loader_expiry, recreated): ROWS synthetic logins staged evenly over the
# last 400 days, their outcomes written straight by SQL (md5 stand-ins for the masks: the expiry
# reads none, and HMAC would only make the setup slower), the bodies older than 30 days purged
# (a year's steady state: bodies kept 30 days, masks 12 months). Then, against the same rows:
#   floor:  one DELETE of the user_logins rows created before the cutoff, from a copy of the
#           table with the same indexes (no batches, no staged row stamped);
#   expiry: `loader purge --masked-older-than-months 12` (10,000-row committed batches, each
#           staged row stamped expired_at), with its WAL and seconds per batch.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh
rows="${1:-1000000}"
export RUST_LOG=warn
scratch_database loader_expiry release

size() { sql -c "select pg_size_pretty(pg_total_relation_size('$1'))"; }
report() { printf '%-58s %s\n' "$1" "$2"; }

echo "cores: $(nproc); rows: $rows; $(psql --version | head -n1)"
t=$(now)
sql -c "$(synthetic_logins_sql "$rows" expiry "now() - interval '400 days' * (($rows - g)::float8 / $rows)")" \
    -c "insert into public.user_logins (user_id, device_type, masked_ip, masked_device_id, locale,
                                        app_version, create_date, message_id, mask_key_id)
        select r.body ->> 'user_id', r.body ->> 'device_type', md5(r.body ->> 'ip'),
               md5(r.body ->> 'device_id'), r.body ->> 'locale', 1,
               (r.sent_at at time zone 'UTC')::date, r.message_id, 1
          from loader.raw_logins r" \
    -c "truncate loader.transform_queue" \
    -c "update loader.raw_logins set body = 'null', purged_at = now()
         where staged_at < now() - interval '30 days'" \
    -c "vacuum analyze loader.raw_logins" -c "vacuum analyze public.user_logins" -c "checkpoint"
report "setup: $rows logins over 400 days, bodies kept 30 days" \
    "$(took "$t"); user_logins $(size public.user_logins), raw_logins $(size loader.raw_logins)"
cutoff=$(sql -c "select loader._masked_cutoff(12)")
due=$(sql -c "select count(*) from public.user_logins where create_date < '$cutoff'")

sql -c "create table public.user_logins_floor (like public.user_logins including all)" \
    -c "insert into public.user_logins_floor select * from public.user_logins" \
    -c "vacuum analyze public.user_logins_floor" -c "checkpoint"
t=$(now); w=$(wal)
sql -c "delete from public.user_logins_floor where create_date < '$cutoff'"
report "floor: one DELETE of the $due rows before $cutoff" "$(took "$t"); WAL $(wal_since "$w")"
sql -c "drop table public.user_logins_floor" -c "checkpoint"

log=$(mktemp)
t=$(now); w=$(wal)
out=$(RUST_LOG=loader::retention=debug loader purge --masked-older-than-months 12 2>"$log")
report "expiry, 10,000-row batches: $out" "$(took "$t"); WAL $(wal_since "$w")"
batch_seconds "$log"
rm -f "$log"
t=$(now); loader reconcile --skip-queue >/dev/null; report "reconcile, full audit, after it" "$(took "$t")"
