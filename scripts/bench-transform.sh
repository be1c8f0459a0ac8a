#!/usr/bin/env bash
# Transform throughput next to its floor, in one run:
#
#   scripts/bench-transform.sh [ROWS]      (default 1000000)
#
# Stages ROWS synthetic logins straight into loader.raw_logins of a scratch database
# (loader_bench, recreated), then times
#   floor:     a plain copy of the same fields into a table shaped like user_logins (same unique
#              index), with no masking and no validation;
#   transform: `call loader.transform()` (one session), i.e. validation, HMAC masking of IP and
#              device id, network generalisation, version parsing, and the work-queue
#              bookkeeping;
#   then `loader transform` with its defaults (workers = cores) and with --workers N for each N
#   in $WORKERS (default "2 4"), each from the same "nothing transformed" state;
#   then one session with and without the index on user_logins.create_date (V19).
# About 5% of rows carry an IPv6 address and 1% are rejects, like the generator of `loader send`.
# The erasure ledger holds $ERASED persons (default 1000, none of them in the rows), so every
# row pays for the lookup that suppresses an erased person's messages.
erased="${ERASED:-1000}"
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh
rows="${1:-1000000}"
scratch_database loader_bench

rate() { awk -v n="$rows" -v a="$1" -v b="$2" 'BEGIN { printf "%6.2f s  %9.0f rows/s", b - a, n / (b - a) }'; }

if [ "$erased" -gt 0 ]; then
    log "erasing $erased persons"
    sql -c "do \$\$ declare ids text[] := array(select 'gone-' || g from generate_series(1, $erased) g);
                          erasure bigint;
            begin call loader.forget(ids, 'bench', erasure); end \$\$" >/dev/null
fi
log "staging $rows synthetic rows"
sql -c "$(synthetic_logins_sql "$rows" bench "now() - interval '1 day'")" \
    -c "vacuum analyze loader.raw_logins" -c "vacuum analyze loader.transform_queue" \
    -c "create table public.bench_floor (like public.user_logins including defaults including indexes)"

log "floor: plain copy"
t0=$(now)
sql -c "
insert into public.bench_floor
    (user_id, device_type, masked_ip, masked_device_id, locale, app_version_text, create_date,
     message_id)
select body ->> 'user_id', body ->> 'device_type', body ->> 'ip', body ->> 'device_id',
       body ->> 'locale', body ->> 'app_version', (sent_at at time zone 'UTC')::date, message_id
  from loader.raw_logins"
t1=$(now)

# Back to "nothing transformed": every staged row pending again, no outcome.
reset() {
    sql -c "truncate public.user_logins, loader.login_rejects" \
        -c "insert into loader.transform_queue (raw_id, staged_at) select id, staged_at from loader.raw_logins" \
        -c "vacuum analyze public.user_logins" -c "vacuum analyze loader.transform_queue"
}
ratio() { awk -v f="$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')" -v a="$1" -v b="$2" \
    'BEGIN { printf "%.2fx the floor", (b - a) / f }'; }

log "transform, one session"
t2=$(now)
result=$(sql -c "call loader.transform()")
t3=$(now)

echo "cores: $(nproc); rows staged: $rows; erased persons: $erased; $(psql --version | head -n1)"
echo "floor (plain copy, no masking):       $(rate "$t0" "$t1")"
echo "call loader.transform() (1 session):  $(rate "$t2" "$t3")  $(ratio "$t2" "$t3")   loaded|rejected|pending = $result"
for workers in "" ${WORKERS:-2 4}; do
    reset >/dev/null
    log "loader transform ${workers:+--workers $workers}"
    t4=$(now)
    out=$(loader transform ${workers:+--workers "$workers"})
    t5=$(now)
    label="loader transform ${workers:+--workers $workers}"
    [ -z "$workers" ] && label="loader transform (defaults)"
    printf '%-37s %s  %s   %s\n' "$label:" \
        "$(rate "$t4" "$t5")" "$(ratio "$t4" "$t5")" "$out"
done
# The index the masked data's retention walks (V19), against the transform without it (before
# V19), one session each, in this run.
for index in with without; do
    reset >/dev/null
    [ "$index" = without ] && sql -c "drop index public.user_logins_create_date"
    t6=$(now)
    sql -c "call loader.transform()" >/dev/null
    t7=$(now)
    printf '%-37s %s  %s\n' "1 session, $index user_logins_create_date:" "$(rate "$t6" "$t7")" "$(ratio "$t6" "$t7")"
done
