-- loader.raw_logins by UTC day of staged_at (docs/decisions.md "Staging by day"): the day
-- partitions loader creates ahead of time, and the one-time move of an unpartitioned table
-- into that shape. Owner only, every function here: none is granted to a lesser role
-- (sql/90_privileges.sql), and each takes locks only the owner's maintenance may take.
--
-- Shape: loader.raw_logins is partitioned by range of staged_at. Its partitions:
-- - loader.raw_logins_legacy: every row staged before the move, from (minvalue) to the
--   cutover (loader.staging_layout), with its own indexes; it stays until retention empties it
--   (on a new database it is empty and its range too: the cutover is -infinity);
-- - loader.raw_logins_pYYYYMMDD: one UTC day each, created ahead by create_staging_days;
-- - loader.raw_logins_default: the net for a day no partition was created for, so a missing
--   day never fails staging (doctor reports rows there).
-- Each partition has its own indexes, none on the parent: the legacy table keeps those it has,
-- and no index is ever built over rows already staged.
--
-- Reruns cleanly: psql -v ON_ERROR_STOP=1 -f sql/16_partitions.sql (applied by `loader migrate`).
--
--   select loader.create_staging_days();      -- as the owner; the partitions created

-- _comment_like: copies the comments of `parent`'s columns onto the same columns of `child`,
-- and gives `child` its own table comment.
create or replace function loader._comment_like(child regclass, parent regclass, about text)
returns void
language plpgsql set search_path = pg_catalog, pg_temp set timezone = 'UTC' set datestyle = 'ISO, YMD' as $$
declare
    col record;
begin
    execute format('comment on table %s is %L', child, about);
    for col in select a.attname, col_description(parent, a.attnum) as said
                 from pg_attribute a
                where a.attrelid = parent and a.attnum > 0 and not a.attisdropped
    loop
        execute format('comment on column %s.%I is %L', child, col.attname, col.said);
    end loop;
end
$$;
comment on function loader._comment_like(regclass, regclass, text) is
    'Private: a partition''s comments, its columns'' copied from its parent''s';

-- _staging_partitions: every partition of loader.raw_logins with the staging times it holds,
-- [staged_from, staged_to): a day partition its UTC day (`day`), the legacy one everything before
-- the cutover, the default one NULLs (whatever no other takes). Oldest first, the default one
-- last; nothing while raw_logins is not partitioned yet. The one reading of loader's partition
-- names: every listing of the days goes through it.
create or replace function loader._staging_partitions()
returns table (rel regclass, day date, staged_from timestamptz, staged_to timestamptz)
language sql stable set search_path = pg_catalog, pg_temp set timezone = 'UTC' set datestyle = 'ISO, YMD' as $$
    select c.oid::regclass, p.day,
           case when p.day is not null then p.day::timestamp at time zone 'UTC'
                when c.relname = 'raw_logins_legacy' then '-infinity' end,
           case when p.day is not null then (p.day + 1)::timestamp at time zone 'UTC'
                when c.relname = 'raw_logins_legacy' then (select l.cutover from loader.staging_layout l) end
      from pg_inherits i
      join pg_class c on c.oid = i.inhrelid
     cross join lateral (select case when c.relname ~ '^raw_logins_p[0-9]{8}$'
                                     then to_date(substr(c.relname, 13), 'YYYYMMDD') end as day) p
     where i.inhparent = 'loader.raw_logins'::regclass
     order by 3 nulls last, 1
$$;
comment on function loader._staging_partitions() is
    'Private: the partitions of loader.raw_logins with the staging times each holds, oldest first';

-- _add_staging_partition: one partition of loader.raw_logins, with its indexes, attached for
-- [lo, hi), or as the DEFAULT partition when both are NULL. Built empty beside the table and
-- then attached: ATTACH PARTITION takes SHARE UPDATE EXCLUSIVE on raw_logins, which no stager,
-- transform or reader waits on (CREATE TABLE ... PARTITION OF would take ACCESS EXCLUSIVE), and
-- a lock on the DEFAULT partition, which it scans for rows of the new day (none, as a rule).
create or replace function loader._add_staging_partition(
    part_name text, lo timestamptz, hi timestamptz) returns void
language plpgsql set search_path = pg_catalog, pg_temp set timezone = 'UTC' set datestyle = 'ISO, YMD' as $$
declare
    part text := format('loader.%I', part_name);
begin
    execute format('create table %s (like loader.raw_logins including defaults)', part);
    execute format('create unique index %I on %s (id)', part_name || '_id', part);
    execute format('create index %I on %s (message_id)', part_name || '_message_id', part);
    execute format('create index %I on %s (staged_at) where purged_at is null',
                   part_name || '_unpurged_staged_at', part);
    execute format('create index %I on %s (message_id) where erased_at is not null',
                   part_name || '_erased', part);
    if lo is null then
        execute format('alter table loader.raw_logins attach partition %s default', part);
        perform loader._comment_like(part::regclass, 'loader.raw_logins'::regclass,
            'Staged messages of a day no partition was created for (the net: loader doctor reports rows here)');
    else
        -- A constraint the bound is proved from, so ATTACH scans nothing (the table is empty
        -- anyway); dropped once attached.
        execute format('alter table %s add constraint %I check (staged_at >= %L and staged_at < %L)',
                       part, part_name || '_bound', lo, hi);
        execute format('alter table loader.raw_logins attach partition %s for values from (%L) to (%L)',
                       part, lo, hi);
        execute format('alter table %s drop constraint %I', part, part_name || '_bound');
        perform loader._comment_like(part::regclass, 'loader.raw_logins'::regclass,
            format('Messages staged on %s (UTC)', to_char(lo at time zone 'UTC', 'YYYY-MM-DD')));
    end if;
end
$$;
comment on function loader._add_staging_partition(text, timestamptz, timestamptz) is
    'Private: build a partition of loader.raw_logins with its indexes and attach it (a UTC day, or the DEFAULT one)';

-- create_staging_days: the day partitions from today (UTC) to `days_ahead` days from now that do
-- not exist yet (staging_days_ahead in loader.settings, default 14). Called by every `loader
-- migrate` and by loader.purge_staged (the daily pg_cron job, `loader purge`), so the days
-- exist long before a row arrives; a day the default partition already holds rows of is
-- skipped (reported by loader doctor), never failed. Waits at most lock_timeout (2 s) on a
-- lock, then raises lock_not_available: `loader migrate` and `loader purge` try again, ending a
-- lesser role's session that blocks them past --evict-after (src/evict.rs); the pg_cron job
-- warns and the next run creates what this one did not. Returns how many it created.
create or replace function loader.create_staging_days(days_ahead integer default null)
returns integer
language plpgsql set search_path = pg_catalog, pg_temp set timezone = 'UTC' set datestyle = 'ISO, YMD' set lock_timeout = '2s' as $$
declare
    ahead integer := coalesce(days_ahead, loader._setting_int('staging_days_ahead', 14));
    first date;
    d date;
    lo timestamptz;
    created integer := 0;
begin
    if ahead is null or ahead < 1 or ahead > 366 then
        raise exception 'create_staging_days: 1 to 366 days ahead' using errcode = 'invalid_parameter_value';
    end if;
    if (select c.relkind from pg_class c where c.oid = 'loader.raw_logins'::regclass) <> 'p' then
        return 0;
    end if;
    -- Nothing before the cutover: those rows are the legacy partition's.
    select greatest((now() at time zone 'UTC')::date, (l.cutover at time zone 'UTC')::date)
      into first from loader.staging_layout l;
    for d in select generate_series(first, (now() at time zone 'UTC')::date + ahead, interval '1 day')::date
    loop
        continue when to_regclass(format('loader.raw_logins_p%s', to_char(d, 'YYYYMMDD'))) is not null;
        lo := d::timestamp at time zone 'UTC';
        continue when exists (select from loader.raw_logins_default r
                               where r.staged_at >= lo
                                 and r.staged_at < (d + 1)::timestamp at time zone 'UTC');
        perform loader._add_staging_partition(format('raw_logins_p%s', to_char(d, 'YYYYMMDD')),
                                              lo, (d + 1)::timestamp at time zone 'UTC');
        created := created + 1;
    end loop;
    return created;
end
$$;
comment on function loader.create_staging_days(integer) is
    'Create loader.raw_logins'' day partitions up to days_ahead days ahead (owner; migrate and the purge call it)';

-- _move_staging_cutover: before the move, when the cutover is less than an hour away (a
-- migrate killed between V20 and the move, and not run again for a day), a later one: stagings
-- must never reach it while the table is not partitioned yet. The new constraint is NOT VALID
-- again (validated by the next step). Returns the cutover in force.
create or replace function loader._move_staging_cutover() returns timestamptz
language plpgsql set search_path = pg_catalog, pg_temp set timezone = 'UTC' set datestyle = 'ISO, YMD' as $$
declare
    cut timestamptz;
begin
    select l.cutover into cut from loader.staging_layout l for update;
    if (select c.relkind from pg_class c where c.oid = 'loader.raw_logins'::regclass) = 'p'
       or cut > now() + interval '1 hour' then
        return cut;
    end if;
    cut := date_trunc('day', now() at time zone 'UTC') at time zone 'UTC' + interval '2 days';
    alter table loader.raw_logins drop constraint if exists raw_logins_before_cutover;
    execute format('alter table loader.raw_logins add constraint raw_logins_before_cutover
                    check (staged_at < %L) not valid', cut);
    update loader.staging_layout set cutover = cut;
    return cut;
end
$$;
comment on function loader._move_staging_cutover() is
    'Private: push the cutover of a not yet partitioned raw_logins a day or more ahead';

-- _partition_staging: the move itself, in the caller's transaction, after
-- raw_logins_before_cutover was validated: raw_logins becomes raw_logins_legacy, attached for
-- (minvalue, cutover) to a new partitioned raw_logins (nothing scanned: the validated
-- constraint proves the bound), whose ids continue from the legacy ones (its default draws on
-- the legacy partition's identity sequence, which stays: dropping it would fail while any
-- session's temporary default names it), with the default partition and the days ahead.
-- Holds ACCESS EXCLUSIVE on the table for those catalog changes only. The caller then applies the sql/
-- files again (the trigger and the views follow the new table). Returns false when already done.
create or replace function loader._partition_staging() returns boolean
language plpgsql set search_path = pg_catalog, pg_temp set timezone = 'UTC' set datestyle = 'ISO, YMD' as $$
declare
    cut timestamptz;
    blockers text;
begin
    lock table loader.raw_logins in access exclusive mode;
    if (select c.relkind from pg_class c where c.oid = 'loader.raw_logins'::regclass) = 'p' then
        return false;
    end if;
    if not exists (select from pg_constraint k
                    where k.conrelid = 'loader.raw_logins'::regclass
                      and k.conname = 'raw_logins_before_cutover' and k.convalidated) then
        raise exception 'raw_logins_before_cutover is not validated yet'
            using errcode = 'object_not_in_prerequisite_state',
                  hint = 'loader migrate validates it first';
    end if;
    select l.cutover into cut from loader.staging_layout l for update;
    if not exists (select from loader.raw_logins) then
        -- Nothing to keep apart (a new database): the legacy partition holds no time at all,
        -- and every day, past ones included, may have a partition of its own.
        cut := '-infinity';
    end if;
    -- Until now the name was a view of this table, for stage()'s probe (V21): dropped with
    -- others' temporary objects on it (which would otherwise stop the move until their
    -- sessions end); a permanent one is named.
    if to_regclass('loader.raw_logins_legacy') is not null then
        blockers := loader._drop_with_temporary_dependents('loader.raw_logins_legacy');
        if blockers is not null then
            raise exception 'cannot move raw_logins to day partitions: %', blockers
                using errcode = 'dependent_objects_still_exist',
                      hint = 'drop that object, then run loader migrate again';
        end if;
    end if;
    alter table loader.raw_logins rename to raw_logins_legacy;
    drop trigger if exists raw_logins_queue_for_transform on loader.raw_logins_legacy;
    create table loader.raw_logins (like loader.raw_logins_legacy including defaults)
        partition by range (staged_at);
    -- Partitioned tables have identity columns only from PostgreSQL 17: the legacy identity's
    -- sequence (still named after the table it was made for) numbers every row.
    execute format('alter table loader.raw_logins alter column id set default nextval(%L::regclass)',
                   pg_get_serial_sequence('loader.raw_logins_legacy', 'id'));
    execute format('alter table loader.raw_logins attach partition loader.raw_logins_legacy
                    for values from (minvalue) to (%L)', cut);
    alter table loader.raw_logins_legacy drop constraint raw_logins_before_cutover;
    update loader.staging_layout set cutover = cut, partitioned_at = now();
    perform loader._comment_like('loader.raw_logins'::regclass, 'loader.raw_logins_legacy'::regclass,
        'Every SQS message ever staged (raw, holds PII): one row per message_id, partitioned by UTC day of staged_at');
    comment on table loader.raw_logins_legacy is
        'Messages staged before raw_logins was partitioned (its first partition, up to loader.staging_layout.cutover)';
    perform loader._add_staging_partition('raw_logins_default', null, null);
    perform loader.create_staging_days();
    return true;
end
$$;
comment on function loader._partition_staging() is
    'Private: move an unpartitioned raw_logins into the partitioned shape (loader migrate, once)';

-- Retention by dropping whole days (loader purge --older-than-days, the pg_cron purge job).

-- _staged_days_due: the day partitions whose whole day is before `cutoff`, and the days before it
-- the default partition holds with every body purged, oldest first.
create or replace function loader._staged_days_due(cutoff timestamptz) returns setof date
language plpgsql stable set search_path = pg_catalog, pg_temp set timezone = 'UTC' set datestyle = 'ISO, YMD' as $$
begin
    -- And the days of the default partition before it whose bodies the batch purge has taken
    -- (loader.drop_staged_day moves them to a partition of their own first).
    return query execute format(
        'select p.day from loader._staging_partitions() p
          where p.day is not null and p.staged_to <= $1 %s order by 1',
        -- (OFFSET 0: the check once a day, not pushed down to once a row.)
        case when to_regclass('loader.raw_logins_default') is not null then
            'union
             select x.day from (select distinct (r.staged_at at time zone ''UTC'')::date as day
                                  from loader.raw_logins_default r where r.staged_at < $1
                                offset 0) x
              where loader._default_day_purged(x.day)' end)
    using cutoff;
end
$$;
comment on function loader._staged_days_due(timestamptz) is
    'Private: the days of loader.raw_logins (partitions, or rows in the default one) wholly before the cutoff';

-- _drop_with_temporary_dependents: drops table (or view) `rel` with the temporary objects of other
-- sessions that depend on it or its row type (a temporary table with a column of that type, or a
-- default naming it: any role that can connect may make one, and a plain DROP would then fail
-- until that session ends), unless a permanent object does (loader._permanent_dependents,
-- sql/35_rebuild.sql): then nothing is dropped and what depends on it is returned. NULL when
-- dropped.
create or replace function loader._drop_with_temporary_dependents(rel regclass) returns text
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    blockers text := loader._permanent_dependents(rel);
begin
    if blockers is null then
        execute format('drop %s %s cascade',
                       case (select c.relkind from pg_class c where c.oid = rel)
                           when 'v' then 'view' else 'table' end, rel);
    end if;
    return blockers;
end
$$;
comment on function loader._drop_with_temporary_dependents(regclass) is
    'Private: drop a table or view with others'' temporary objects on it, unless a permanent one depends on it (returned)';

-- _summarize_staged_on: summarizes the block ranges of the BRIN indexes on staged_on (V23) that
-- rows written since their last summary filled; returns how many. A BRIN index returns every
-- block range not summarized yet as a match, so a day's outcomes read by staged_on would read
-- all of them: the day's new rows (the transform's since the last vacuum), and after a
-- rebuild's swap the whole table. Called before those reads, so each run reads those pages
-- once, not once a day. Takes SHARE UPDATE EXCLUSIVE on the tables (as vacuum does), which no
-- writer or reader waits on.
create or replace function loader._summarize_staged_on() returns integer
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    ix regclass;
    summarized integer := 0;
begin
    -- Those of user_logins' partitions (the table's own before the move) and login_rejects'.
    for ix in select i.indexrelid::regclass
                from pg_index i
                join pg_class c on c.oid = i.indexrelid
                join pg_am a on a.oid = c.relam
               where a.amname = 'brin'
                 and pg_get_indexdef(i.indexrelid) like '%USING brin (staged_on)'
                 and i.indrelid in (select t.relid from pg_partition_tree('public.user_logins') t
                                    union all
                                    -- (A plain table, before the move, has no partition tree.)
                                    select 'public.user_logins'::regclass
                                    union all
                                    select 'loader.login_rejects'::regclass)
    loop
        summarized := summarized + brin_summarize_new_values(ix);
    end loop;
    return summarized;
end
$$;
comment on function loader._summarize_staged_on() is
    'Private: summarize what the BRIN indexes on staged_on have not yet (before a day''s outcomes are read by it)';

-- _default_day_purged: whether the default partition of loader.raw_logins holds rows staged on
-- UTC day `d` (a day no partition was made for in time), every one of them without its body
-- (the batch purge, an expiry or an erasure took it; so none is pending), that retention may
-- take: not a day dropped before (rows a staging open across its drop left there stay, as a
-- rebuild's copy of that day expects: sql/35_rebuild.sql).
create or replace function loader._default_day_purged(d date) returns boolean
language plpgsql stable set search_path = pg_catalog, pg_temp set timezone = 'UTC' as $$
declare
    held boolean;
begin
    if to_regclass('loader.raw_logins_default') is null
       or exists (select from loader.staged_days s where s.day = d) then
        return false;
    end if;
    execute 'select bool_and(r.purged_at is not null) from loader.raw_logins_default r
              where r.staged_at >= $1 and r.staged_at < $2'
       into held using d::timestamp at time zone 'UTC', (d + 1)::timestamp at time zone 'UTC';
    return coalesce(held, false);
end
$$;
comment on function loader._default_day_purged(date) is
    'Private: whether the default partition of loader.raw_logins holds rows of a UTC day, all purged, that retention may take';

-- _move_default_day: moves the rows of UTC day `d` out of the default partition into a new
-- partition of their own (ids, bodies, every column as they were; the work list names rows by
-- id and staging time, so a pending row stays pending), in the caller's transaction; returns
-- how many. Attaching it takes a lock on the default partition (stagers write there only for
-- a day without a partition), bounded by the caller's lock_timeout. So retention drops such a
-- day as any other, and the ids' generations of its time can go. Owner only.
create or replace function loader._move_default_day(d date) returns bigint
language plpgsql set search_path = pg_catalog, pg_temp set timezone = 'UTC' set datestyle = 'ISO, YMD' as $$
declare
    lo timestamptz := d::timestamp at time zone 'UTC';
    hi timestamptz := (d + 1)::timestamp at time zone 'UTC';
    name text := format('raw_logins_p%s', to_char(d, 'YYYYMMDD'));
    moved bigint;
begin
    lock table loader.raw_logins_default in exclusive mode;
    create temporary table pg_temp.moving_day (like loader.raw_logins) on commit drop;
    with gone as (delete from loader.raw_logins_default r
                   where r.staged_at >= lo and r.staged_at < hi returning r.*)
    insert into pg_temp.moving_day select * from gone;
    perform loader._add_staging_partition(name, lo, hi);
    execute format('insert into loader.%I select * from pg_temp.moving_day', name);
    get diagnostics moved = row_count;
    drop table pg_temp.moving_day;
    return moved;
end
$$;
comment on function loader._move_default_day(date) is
    'Private: move a UTC day''s rows out of the default partition of loader.raw_logins into a partition of their own';

-- _lock_exclusive_briefly: takes ACCESS EXCLUSIVE on table `rel` itself (ONLY: not its
-- partitions, which DROP of one of them does not lock either) within `budget`, then raises
-- lock_not_available as one long wait would. While a lock request waits, every later request
-- on the table queues behind it: so it first tries for 100, 200 and 400 ms, 50 ms apart, and
-- only then waits out the rest of the budget. Stagers (ROW EXCLUSIVE on raw_logins) wait
-- behind it a short try at a time; and a stream of short transactions, which could beat every
-- short try, cannot beat the last wait, behind which they queue.
create or replace function loader._lock_exclusive_briefly(rel regclass, budget interval) returns void
language plpgsql set search_path = pg_catalog, pg_temp set lock_timeout = '100ms' as $$
declare
    deadline timestamptz := clock_timestamp() + budget;
    tries interval[] := array[interval '100 ms', interval '200 ms', interval '400 ms', null];
    wait interval;
begin
    for i in 1 .. cardinality(tries) loop
        -- The last try waits whatever is left (NULL); none waits past the deadline.
        wait := least(coalesce(tries[i], deadline - clock_timestamp()), deadline - clock_timestamp());
        perform set_config('lock_timeout',
                           greatest(ceil(extract(epoch from wait) * 1000), 1)::bigint || 'ms', true);
        begin
            execute format('lock table only %s in access exclusive mode', rel);
            return;
        exception when lock_not_available then
            if i = cardinality(tries) or clock_timestamp() >= deadline then
                raise;
            end if;
        end;
        perform pg_sleep(0.05);
    end loop;
end
$$;
comment on function loader._lock_exclusive_briefly(regclass, interval) is
    'Private: ACCESS EXCLUSIVE on a table itself in short tries, then one wait (no long queue behind a waiting lock)';

-- drop_staged_day: drops the partition of UTC day `d` when every row in it is accounted for (an
-- outcome, erased, or its masked row expired), after writing its counts to loader.staged_days
-- and loader.staged_day_runs, all in the caller's transaction. Returns what it did:
--   'dropped'; 'pending' (a row waits for the transform: the day stays until it has its
--   outcome); 'unaccounted' (a row with no outcome, or two, or an outcome of the day with no row
--   in it: loader reconcile names it; the day stays); 'copying' (an online rebuild has not
--   copied its rows yet, nor carried its outcomes whose message was deleted by hand);
--   'depended' (a permanent object outside loader depends on the partition or its row type:
--   loader._permanent_dependents names it; others' temporary ones go with the day); 'missing'.
--   With dry_run, changes nothing, takes no lock, and says 'droppable' instead of dropping.
-- While it counts, the day's rows cannot change (SHARE lock on the partition; stagers write
-- today's partition, not this one); the DROP then takes ACCESS EXCLUSIVE on raw_logins for a
-- catalog change only, in short tries first (loader._lock_exclusive_briefly). Waits at most
-- 2 s for either, then raises lock_not_available (retried as create_staging_days is). Owner
-- only.
drop function if exists loader.drop_staged_day(date);
create or replace function loader.drop_staged_day(d date, dry_run boolean default false)
returns text
language plpgsql set search_path = pg_catalog, pg_temp set timezone = 'UTC' set datestyle = 'ISO, YMD' set lock_timeout = '2s' as $$
declare
    part text := format('loader.%I', format('raw_logins_p%s', to_char(d, 'YYYYMMDD')));
    source text := part;
    c record;
    copying bigint;
begin
    if to_regclass(part) is null then
        -- A day the default partition holds (no partition was made for it in time), once the
        -- batch purge has taken its bodies: its rows move to a partition of their own first,
        -- and the day goes as any other (loader._move_default_day). A dry run reads them where
        -- they are.
        if not loader._default_day_purged(d) then
            return 'missing';
        end if;
        source := format('(select x.* from loader.raw_logins_default x
                            where x.staged_at >= %L and x.staged_at < %L)',
                         d::timestamp at time zone 'UTC', (d + 1)::timestamp at time zone 'UTC');
    end if;
    if not dry_run then
        -- No rebuild's transaction in between (as every retention batch).
        lock table loader.maintenance_lock in exclusive mode;
        if source <> part then
            -- Not while a rebuild has a range of the default partition to copy: it reads that
            -- partition by name, and would miss the rows moved out of it.
            if exists (select from loader.rebuild_ranges g join loader.rebuilds b on b.id = g.rebuild_id
                        where b.state = 'copying' and not g.done
                          and g.part = 'loader.raw_logins_default') then
                return 'copying';
            end if;
            perform loader._move_default_day(d);
            source := part;
        end if;
        execute format('lock table %s in share mode', part);
        perform loader._summarize_staged_on();
    end if;
    -- The day's outcomes by staged_on (BRIN, V23), joined to its rows: a read of the day, not an
    -- index descent per row into the whole of user_logins and login_rejects. What that finds
    -- is so (message_id is unique in each); a row it finds nothing for (an outcome without
    -- staged_on, from before V21; a work-list row whose staged_at is not its row's; an erased
    -- or expired row) is looked up one by one, as every row was before V23. (A second outcome
    -- without staged_on beside one with it is not seen here: only the owner can write one,
    -- and reconcile's single_outcome names it, before the drop and after.) An outcome of the
    -- day that no row of it has (`strays`: its staged row deleted by hand) keeps the day too:
    -- once the day is gone, nothing would tell it from the day's own, and reconcile would stop
    -- naming it.
    execute format(
        'with u as materialized (select u.message_id from public.user_logins u where u.staged_on = $1),
              j as materialized (select j.message_id from loader.login_rejects j where j.staged_on = $1),
              q as materialized (select q.raw_id from loader.transform_queue q
                                  where q.staged_at >= $1::timestamptz and q.staged_at < ($1 + 1)::timestamptz),
              f as (select r.id, r.message_id, r.erased_at, r.expired_at,
                           u.message_id is not null as loaded, j.message_id is not null as rejected,
                           q.raw_id is not null as pending
                      from %s r
                      left join u on u.message_id = r.message_id
                      left join j on j.message_id = r.message_id
                      left join q on q.raw_id = r.id)
         select count(*) as staged, min(r.id) as lo, max(r.id) as hi,
                (select count(*) from u) + (select count(*) from j)
                    - count(*) filter (where r.loaded) - count(*) filter (where r.rejected) as strays,
                count(*) filter (where r.erased_at is not null) as erased,
                count(*) filter (where r.erased_at is null and r.expired_at is not null) as expired,
                count(*) filter (where o.loaded) as loaded,
                count(*) filter (where o.rejected) as rejected,
                count(*) filter (where o.pending) as pending,
                count(*) filter (where (r.erased_at is not null or r.expired_at is not null)::int
                                       + o.loaded::int + o.rejected::int <> 1
                                   and not o.pending) as unaccounted
           from f r
          cross join lateral (
                select r.loaded or exists (select from public.user_logins x
                                            where not (r.loaded or r.rejected or r.pending)
                                              and x.message_id = r.message_id) as loaded,
                       r.rejected or exists (select from loader.login_rejects x
                                              where not (r.loaded or r.rejected or r.pending)
                                                and x.message_id = r.message_id) as rejected,
                       r.pending or exists (select from loader.transform_queue x
                                             where not (r.loaded or r.rejected or r.pending)
                                               and x.raw_id = r.id) as pending) o',
        source) using d into c;
    if c.pending > 0 then
        return 'pending';
    end if;
    if c.unaccounted > 0 or c.strays > 0 then
        return 'unaccounted';
    end if;
    -- A copying rebuild still to copy a range of this day's ids (the first of which also carries
    -- the day's outcomes whose message was deleted by hand).
    select b.id into copying from loader.rebuilds b where b.state = 'copying';
    if copying is not null and exists (select from loader.rebuild_ranges g
                                        where g.rebuild_id = copying and not g.done
                                          and g.lo <= c.hi and g.hi >= c.lo) then
        return 'copying';
    end if;
    if source = part and loader._permanent_dependents(part::regclass) is not null then
        return 'depended';
    end if;
    if dry_run then
        return 'droppable';
    end if;
    insert into loader.staged_days (day, dropped_by, staged, loaded, rejected, erased, expired)
    values (d, session_user, c.staged, c.loaded, c.rejected, c.erased, c.expired);
    execute format('insert into loader.staged_day_runs (day, ingest_run_id, staged)
                    select %L, r.ingest_run_id, count(*) from %s r group by r.ingest_run_id', d, part);
    -- The DROP takes ACCESS EXCLUSIVE on raw_logins: taken first in short tries, so stagers
    -- queue behind a waiting drop a short try at a time, not for the whole 2 s.
    perform loader._lock_exclusive_briefly('loader.raw_logins', interval '2 s');
    -- (Its permanent dependents were checked just above, under the day's SHARE lock.)
    perform loader._drop_with_temporary_dependents(part::regclass);
    return 'dropped';
end
$$;
comment on function loader.drop_staged_day(date, boolean) is
    'Drop one day of loader.raw_logins whose rows all have their outcome, keeping its counts (owner; purge calls it)';

-- _switch_staged_ids: once the current generation of loader.staged_ids is a week old, the next
-- one becomes current; a generation that ended more than sent_at_max_age_days + 1 days ago is
-- dropped (no copy of a message it holds can still come: SQS keeps a message at most 14 days,
-- 28 after a FIFO dead-letter queue restarted its clock, and sent_at_max_age_days bounds that),
-- once no day partition of its time is left.
-- The switch takes ACCESS EXCLUSIVE on loader.staged_id_generations, which every stager reads
-- (and so holds) until it commits: no two copies of one message are staged in two generations
-- at once. Waits at most lock_timeout (2 s), then raises lock_not_available (retried as
-- create_staging_days is). Returns the current generation.
create or replace function loader._switch_staged_ids() returns integer
language plpgsql set search_path = pg_catalog, pg_temp set timezone = 'UTC' set datestyle = 'ISO, YMD' set lock_timeout = '2s' as $$
declare
    cur integer;
    began timestamptz;
    old integer;
    first_day date;
    gen_table regclass;
    blockers text;
begin
    select g.generation, g.started_at into cur, began
      from loader.staged_id_generations g where g.ended_at is null;
    if began <= now() - interval '7 days' then
        -- In a stager's order: loader.staged_ids (its lookup), then the generations (its
        -- insert); the other order deadlocks with a stager that starts meanwhile.
        lock table loader.staged_ids in access exclusive mode;
        lock table loader.staged_id_generations in access exclusive mode;
        execute format('create table loader.%I partition of loader.staged_ids for values in (%s)',
                       'staged_ids_g' || (cur + 1), cur + 1);
        perform loader._comment_like(format('loader.%I', 'staged_ids_g' || (cur + 1))::regclass,
            'loader.staged_ids'::regclass,
            format('The message ids staged while generation %s was current', cur + 1));
        update loader.staged_id_generations set ended_at = now() where generation = cur;
        insert into loader.staged_id_generations (generation) values (cur + 1);
        cur := cur + 1;
    end if;
    -- And only once the days it was current in are dropped: while a staged row of its time is
    -- kept, its id stays (else an id staged anew, by a caller choosing it, would be staged
    -- twice). The default partition's rows count too (a day that had no partition; stage()
    -- looks an id up in the generations and the legacy partition, not there).
    select min(p.day) into first_day from loader._staging_partitions() p;
    if to_regclass('loader.raw_logins_default') is not null then
        first_day := least(first_day, (select min(r.staged_at at time zone 'UTC')::date
                                         from loader.raw_logins_default r));
    end if;
    for old in select g.generation from loader.staged_id_generations g
                where g.ended_at < now() - make_interval(
                          days => loader._setting_int('sent_at_max_age_days', 28) + 1)
                  and (g.ended_at at time zone 'UTC')::date < coalesce(first_day, 'infinity')
                order by 1
    loop
        -- Kept (with a warning) while a permanent object outside loader depends on it.
        gen_table := to_regclass(format('loader.%I', 'staged_ids_g' || old));
        blockers := case when gen_table is not null
                         then loader._drop_with_temporary_dependents(gen_table) end;
        if blockers is not null then
            raise warning 'the staged ids of generation % stay: %', old, blockers;
            continue;
        end if;
        delete from loader.staged_id_generations where generation = old;
    end loop;
    return cur;
end
$$;
comment on function loader._switch_staged_ids() is
    'Private: the weekly switch of loader.staged_ids'' generation, and the drop of those no message can outlive';

-- _oldest_body_staged_at: when the oldest body still held in loader.raw_logins was staged
-- (NULL: none). Reads the default partition, the legacy one, then the days up to today oldest
-- first, and stops at the first that holds a body (along each partition's index of the bodies
-- held), so it locks a few partitions, not every day's. Owner only: the purge records it in
-- loader.retention_state, which loader.pipeline_status shows.
create or replace function loader._oldest_body_staged_at() returns timestamptz
language plpgsql stable set search_path = pg_catalog, pg_temp set timezone = 'UTC' as $$
declare
    part record;
    found timestamptz;
    oldest timestamptz;
begin
    if (select c.relkind from pg_class c where c.oid = 'loader.raw_logins'::regclass) <> 'p' then
        return (select min(r.staged_at) from loader.raw_logins r where r.purged_at is null);
    end if;
    -- The default partition first (its rows may be of any time), then oldest first; not the
    -- days ahead: stage() stamps the server's time, so they are empty.
    for part in select p.rel, p.staged_from from loader._staging_partitions() p
                 where p.staged_from is null or p.staged_from <= now()
                 order by p.staged_from nulls first
    loop
        execute format('select min(r.staged_at) from %s r where r.purged_at is null', part.rel)
           into found;
        oldest := least(oldest, found);
        -- Every day's rows are later than the legacy partition's and an earlier day's.
        exit when found is not null and part.staged_from is not null;
    end loop;
    return oldest;
end
$$;
comment on function loader._oldest_body_staged_at() is
    'Private: when the oldest body still held in loader.raw_logins was staged (a few partitions read, not all)';

-- _note_oldest_body: records _oldest_body_staged_at in loader.retention_state (the end of
-- every purge and expiry).
create or replace function loader._note_oldest_body() returns void
language sql volatile set search_path = pg_catalog, pg_temp as $$
    update loader.retention_state
       set oldest_body_staged_at = loader._oldest_body_staged_at(), measured_at = now()
$$;
comment on function loader._note_oldest_body() is
    'Private: record when the oldest body still held was staged (loader.retention_state)';
