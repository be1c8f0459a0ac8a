-- The transform: staged rows without an outcome become public.user_logins rows (masked) or
-- loader.login_rejects rows (with a reason). Also the rebuild and key rotation.
--
-- Reruns cleanly: psql -v ON_ERROR_STOP=1 -f sql/30_transform.sql (applied by `loader migrate`).
--
-- Analysts (role loader_analyst), in psql, outside a transaction block:
--   call loader.transform();                       -- everything pending, committing per batch
--   select * from loader.transform_batch(10000);   -- one bounded batch, in your transaction
--
-- Concurrency: every batch claims its rows from loader.transform_queue with FOR UPDATE SKIP
-- LOCKED, so transforms run side by side without loading a row twice or waiting on each other,
-- and rows staged by a concurrent ingest are picked up once committed. A rebuild takes advisory
-- lock 7813570962337693698 exclusively; batches take it shared, so they wait for a rebuild and
-- a rebuild waits for them. The functions run as their owner (security definer, pinned
-- search_path), the only role that can read loader.raw_logins and the key.

-- transform_batch: one bounded batch. Returns its counts and what is still pending (NULL when
-- count_pending is false: counting the work list costs more than a batch on a big backlog, so
-- the batch loops below count once, at the end).
create or replace function loader.transform_batch(
    max_rows integer default 10000,
    count_pending boolean default true)
returns table (loaded bigint, rejected bigint, pending bigint)
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
#variable_conflict use_column
declare
    claimed_rows bigint;
begin
    perform pg_advisory_xact_lock_shared(7813570962337693698);
    if not exists (select from loader.mask_keys k where k.retired_at is null) then
        raise exception 'no active masking key: run loader migrate';
    end if;

    -- The key is read inside this statement (active_key), never into a variable: PL/pgSQL
    -- passes variables to a statement as parameters, and a custom plan folds a parameter into
    -- a constant that debug_print_plan shows the calling session. Read here, it is a column
    -- of a scan, so no plan, message or log line can carry its bytes.
    with active_key as (
        select k.id, k.key from loader.mask_keys k where k.retired_at is null
    ), claimed as (
        -- = any(array(...)): an index probe per claimed id. A join here would let the planner
        -- scan the whole work list for every batch.
        delete from loader.transform_queue q
         where q.raw_id = any (array(
                   select t.raw_id from loader.transform_queue t
                    order by t.raw_id limit max_rows
                      for update skip locked))
        returning q.raw_id
    ), judged as (
        -- A CTE used twice is materialised: the IP is parsed once per row here.
        select r.message_id, r.body, r.sent_at, r.staged_at,
               loader._reject_reason(r.body, r.body_is_json) as reason,
               loader._inet(r.body ->> 'ip') as ip
          from claimed c
          join loader.raw_logins r on r.id = c.raw_id
    ), loads as (
        insert into public.user_logins
            (user_id, device_type, masked_ip, masked_device_id, locale, app_version, create_date,
             message_id, ip_network, app_version_text, mask_key_id)
        select j.body ->> 'user_id',
               j.body ->> 'device_type',
               loader._mask(loader._canonical_ip(j.body ->> 'ip', j.ip), k.key),
               loader._mask(j.body ->> 'device_id', k.key),
               j.body ->> 'locale',
               loader._app_version(j.body ->> 'app_version'),
               -- The UTC day it was sent, not the day of the transform: reruns must not move it.
               (coalesce(j.sent_at, j.staged_at) at time zone 'UTC')::date,
               j.message_id,
               loader._ip_network(j.ip),
               j.body ->> 'app_version',
               k.id
          from judged j cross join active_key k
         where j.reason is null
        on conflict (message_id) do nothing
        returning 1
    ), rejects as (
        insert into loader.login_rejects (message_id, reason, detail)
        select message_id, reason, loader._reject_detail(body, reason)
          from judged where reason is not null
        on conflict (message_id) do nothing
        returning 1
    )
    select (select count(*) from loads), (select count(*) from rejects), (select count(*) from claimed)
      into loaded, rejected, claimed_rows;
    -- Fewer rows than asked for: the work list was drained as of this batch's start.
    update loader.transform_state
       set batches = batches + 1,
           last_drained_at = case when claimed_rows < max_rows
                                  then greatest(last_drained_at, now()) else last_drained_at end;
    if count_pending then
        select count(*) into pending from loader.transform_queue;
    end if;
    return next;
end
$$;
comment on function loader.transform_batch(integer, boolean) is
    'Transform up to max_rows staged rows without an outcome; returns (loaded, rejected, pending)';

-- transform: every pending row, committing after each batch, so a large backlog never holds one
-- giant transaction. Security invoker (transaction control needs it); the work is done by
-- transform_batch. Must be CALLed outside a transaction block. No SET clause: a procedure with
-- one cannot commit; every name in it is schema-qualified instead.
create or replace procedure loader.transform(
    inout loaded bigint default null,
    inout rejected bigint default null,
    inout pending bigint default null,
    batch_size integer default 10000)
language plpgsql as $$
declare
    batch record;
begin
    loaded := 0;
    rejected := 0;
    loop
        select * into batch from loader.transform_batch(batch_size, false);
        loaded := loaded + batch.loaded;
        rejected := rejected + batch.rejected;
        commit;
        -- Nothing claimed: done, or what is left is claimed by a concurrent transform.
        exit when batch.loaded + batch.rejected = 0;
    end loop;
    select b.pending into pending from loader.transform_batch(0) as b;
end
$$;
comment on procedure loader.transform(bigint, bigint, bigint, integer) is
    'Transform everything pending, one committed batch at a time; returns (loaded, rejected, pending)';

-- rebuild: recompute every outcome from raw_logins with the active key, in one transaction, so
-- readers see the old table state or the new one, never a mix of old and new masks. Rows of
-- user_logins without a message_id (adopted from before loader) are left alone. Refuses when an
-- outcome's staged message is gone: it could not be recomputed.
create or replace function loader.rebuild()
returns table (loaded bigint, rejected bigint, pending bigint)
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
#variable_conflict use_column
declare
    orphans bigint;
    batch record;
begin
    perform pg_advisory_xact_lock(7813570962337693698);
    select count(*) into orphans
      from (select u.message_id from public.user_logins u where u.message_id is not null
            union all
            select j.message_id from loader.login_rejects j) as o
     where not exists (select from loader.raw_logins r where r.message_id = o.message_id);
    if orphans > 0 then
        raise exception 'rebuild refused: % outcome rows have no staged message to recompute from',
            orphans;
    end if;

    -- Purged rows (sql/40_retention.sql) have nothing left to recompute from: their outcomes
    -- stay as they are.
    delete from public.user_logins u
     where u.message_id is not null
       and not exists (select from loader.raw_logins r
                        where r.message_id = u.message_id and r.purged_at is not null);
    delete from loader.login_rejects j
     where not exists (select from loader.raw_logins r
                        where r.message_id = j.message_id and r.purged_at is not null);
    insert into loader.transform_queue (raw_id)
    select r.id from loader.raw_logins r where r.purged_at is null
    on conflict (raw_id) do nothing;

    loaded := 0;
    rejected := 0;
    loop
        select * into batch from loader.transform_batch(100000, false);
        loaded := loaded + batch.loaded;
        rejected := rejected + batch.rejected;
        exit when batch.loaded + batch.rejected = 0;
    end loop;
    select b.pending into pending from loader.transform_batch(0) as b;
    return next;
end
$$;
comment on function loader.rebuild() is
    'Recompute every outcome from raw_logins with the active key, atomically (purged rows keep theirs)';

-- rotate_key: make a new active key (random, or new_key when given: 32 bytes) and rebuild, in
-- one transaction. Installing the key that is already active changes nothing.
create or replace function loader.rotate_key(new_key bytea default null)
returns table (key_id integer, loaded bigint, rejected bigint, pending bigint)
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
#variable_conflict use_column
declare
    previous_id integer;
    outcome record;
begin
    perform pg_advisory_xact_lock(7813570962337693698);
    select k.id into previous_id from loader.mask_keys k where k.retired_at is null;
    key_id := loader._activate_key(
        coalesce(new_key, public.gen_random_bytes(32)),
        case when new_key is null then 'generated' else 'installed' end);
    if key_id is distinct from previous_id then
        select * into outcome from loader.rebuild();
        loaded := outcome.loaded;
        rejected := outcome.rejected;
        pending := outcome.pending;
    end if;
    return next;
end
$$;
comment on function loader.rotate_key(bytea) is
    'Activate a new masking key (random or given) and rebuild every outcome, atomically';
