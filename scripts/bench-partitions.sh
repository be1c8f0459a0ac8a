#!/usr/bin/env bash
# The partitioned staging of issue 29, measured on a prototype before it is built
# (docs/benchmarks.md "Partitioned staging, measured on a prototype"):
#
#   LOADER_BIN=/abs/path/to/loader scripts/bench-partitions.sh [ROWS]      (default 1000000)
#
# Its "today" is loader.raw_logins as it was before V20: run it with LOADER_BIN naming a build
# from before that migration (commit 7303769, say); against this tree's, whose raw_logins is
# partitioned since, it fails. What was built is measured by bench-staging.sh and
# bench-retention.sh.
#
# In a scratch database (loader_parts, recreated): ROWS synthetic logins staged over the last 60
# days, twice: in today's loader.raw_logins (one table, message_id unique), and in a prototype
# (schema proto): the same columns partitioned by day of staged_at, each partition indexed on
# id, message_id and the bodies not yet purged, with the work-list trigger, beside a narrow ids
# table (message_id primary key, staged_at) that carries message-id idempotency instead of a
# global unique index. Then, each against the other in the same run:
#   staging: 200 committed batches of 1,000 new messages (one INSERT each, as loader.stage
#     does), then the same 200 again (every message a duplicate);
#   the transform's lookup of 10,000 staged rows by id (its claimed work list), by id alone and
#     with the day of staged_at the work list could carry;
#   retention: 30 days of bodies as `loader purge` does it (10,000-row batches) against dropping
#     the 30 oldest day partitions (after counting each day's rows, as reconcile would need);
#     one day's partition alone;
#   the ids table's own retention: the ids of the oldest day deleted in 10,000-row batches.
# WAL from pg_current_wal_lsn().
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh
rows="${1:-1000000}"
export RUST_LOG=warn took_digits=2
scratch_database loader_parts release

report() { printf '%-64s %s\n' "$1" "$2"; }

echo "cores: $(nproc); rows: $rows; $(psql --version | head -n1)"
sql >/dev/null <<'SQL'
create schema proto;
create sequence proto.raw_id_seq;
create table proto.raw (like loader.raw_logins including defaults) partition by range (staged_at);
alter table proto.raw alter column id drop identity if exists;
alter table proto.raw alter column id set default nextval('proto.raw_id_seq');
select format('create table proto.raw_%s partition of proto.raw for values from (%L) to (%L)',
              to_char(d, 'YYYYMMDD'), d, d + interval '1 day')
  from generate_series(date_trunc('day', now() - interval '61 days'), now() + interval '2 days',
                       interval '1 day') d
\gexec
create index on proto.raw (id);
create index on proto.raw (message_id);
create index on proto.raw (staged_at) where purged_at is null;
create table proto.ids (message_id text primary key, staged_at timestamptz not null);
create index on proto.ids using brin (staged_at);
create table proto.queue (raw_id bigint primary key);
create function proto.queue_staged() returns trigger language plpgsql as $$
begin
    insert into proto.queue (raw_id) select s.id from staged s;
    return null;
end $$;
create trigger raw_queue after insert on proto.raw referencing new table as staged
    for each statement execute function proto.queue_staged();
SQL
t=$(now)
sql -c "$(synthetic_logins_sql "$rows" parts "now() - interval '60 days' * (($rows - g)::float8 / $rows)")" \
    -c "truncate loader.transform_queue"
report "setup: $rows rows over 60 days into loader.raw_logins" "$(took "$t")"
t=$(now)
sql -c "insert into proto.raw select * from loader.raw_logins" \
    -c "select setval('proto.raw_id_seq', (select max(id) from proto.raw))" \
    -c "insert into proto.ids select message_id, staged_at from loader.raw_logins" \
    -c "truncate proto.queue" \
    -c "vacuum analyze loader.raw_logins" -c "vacuum analyze proto.raw" -c "vacuum analyze proto.ids" \
    -c "checkpoint" >/dev/null
report "  the same rows into the prototype (and its ids table)" "$(took "$t")"

# 200 committed batches of 1,000 messages, one INSERT each; run twice: new, then duplicates.
batch_rows="select 'new-' || b || '-' || g as message_id,
                   jsonb_build_object('user_id', md5(g::text), 'device_id', g::text, 'ip', '10.0.0.1') as body
              from generate_series(1, 1000) g"
today="insert into loader.raw_logins (message_id, body, body_is_json, sent_at, receive_count, queue, staged_at)
       select n.message_id, n.body, true, now(), 1, 'q', clock_timestamp() from ($batch_rows) n
       on conflict (message_id) do nothing"
proto="with n as materialized ($batch_rows),
            fresh as (insert into proto.ids (message_id, staged_at)
                      select n.message_id, clock_timestamp() from n
                      on conflict (message_id) do nothing
                      returning message_id, staged_at)
       insert into proto.raw (message_id, body, body_is_json, sent_at, receive_count, queue, staged_at)
       select n.message_id, n.body, true, now(), 1, 'q', f.staged_at from n join fresh f using (message_id)"
stage() { sql -c "do \$\$ begin for b in 1 .. 200 loop $1; commit; end loop; end \$\$"; }
for round in "new messages" "duplicates"; do
    t=$(now); w=$(wal); stage "$today"
    report "staging, 200 x 1,000 $round: today's table" "$(took "$t"); WAL $(wal_since "$w")"
    t=$(now); w=$(wal); stage "$proto"
    report "  the prototype (ids table, then the day's partition)" "$(took "$t"); WAL $(wal_since "$w")"
done
sql -c "truncate loader.transform_queue, proto.queue" -c "vacuum analyze loader.raw_logins" \
    -c "vacuum analyze proto.raw" -c "vacuum analyze proto.ids" >/dev/null

# The transform reads its claimed rows by id (10,000 of yesterday's here).
ids="array(select id from loader.raw_logins where staged_at > now() - interval '1 day' order by id limit 10000)"
lookup() { sql -c "\\timing on" -c "$1" | awk '/^Time:/ { t = $2 } END { printf "%.1f ms", t }'; }
report "lookup of 10,000 staged rows by id: today's table" \
    "$(lookup "select count(*) from loader.raw_logins where id = any ($ids)")"
report "  the prototype, by id alone" \
    "$(lookup "select count(*) from proto.raw where id = any ($ids)")"
report "  the prototype, by id and the day of staged_at" \
    "$(lookup "select count(*) from proto.raw where id = any ($ids)
                 and staged_at >= date_trunc('day', now() - interval '1 day')")"

# Retention: 30 days of bodies.
t=$(now); w=$(wal)
purged=$(loader purge --older-than-days 30)
report "purge (today): $purged" "$(took "$t"); WAL $(wal_since "$w")"
old_days="select c.relname from pg_inherits i join pg_class c on c.oid = i.inhrelid
           where i.inhparent = 'proto.raw'::regclass
             and c.relname < 'raw_' || to_char(now() - interval '30 days', 'YYYYMMDD')
           order by c.relname"
t=$(now); w=$(wal)
days=$(sql -c "select count(*) from ($old_days) d")
gexec() { printf '%s\n\\gexec\n' "$1" | sql >/dev/null; }
gexec "select format('select count(*), count(*) filter (where purged_at is not null),
                             count(*) filter (where erased_at is not null) from proto.%I', relname)
         from ($old_days) d"
gexec "select format('drop table proto.%I', relname) from ($old_days) d"
report "  the prototype: count each of the $days oldest days, drop them" "$(took "$t"); WAL $(wal_since "$w")"
one=$(sql -c "select c.relname from pg_inherits i join pg_class c on c.oid = i.inhrelid
               where i.inhparent = 'proto.raw'::regclass order by c.relname limit 1")
day_rows=$(sql -c "select count(*) from proto.$one")
t=$(now); w=$(wal)
sql -c "select count(*), count(*) filter (where purged_at is not null) from proto.$one" \
    -c "drop table proto.$one" >/dev/null
report "  one more day ($day_rows rows): count it, drop it" "$(took "$t"); WAL $(wal_since "$w")"

# The ids table's retention: the oldest day's ids, in 10,000-row batches.
t=$(now); w=$(wal)
first=$(sql -c "select date_trunc('day', min(staged_at)) + interval '1 day' from proto.ids")
deleted=0
while :; do
    n=$(sql -c "with d as (delete from proto.ids where message_id = any (array(
                    select message_id from proto.ids where staged_at < '$first' limit 10000)) returning 1)
                select count(*) from d")
    [ "$n" -eq 0 ] && break
    deleted=$((deleted + n))
done
report "ids table: the oldest day's $deleted ids deleted, 10,000 a batch" "$(took "$t"); WAL $(wal_since "$w")"
