-- public.user_logins by month of create_date (docs/decisions.md "Masked data by month"): the
-- month partitions loader creates ahead of time, and the one-time move of an unpartitioned
-- table into that shape. Owner only, every function here (sql/90_privileges.sql).
--
-- Shape: public.user_logins is partitioned by range of create_date, with no index of its own.
-- Its partitions, in schema loader:
-- - loader.user_logins_legacy, the DEFAULT partition: every row written before the move (its
--   CHECK constraint user_logins_before_cutover says up to when: loader.masked_layout.cutover),
--   the rows without a create_date (from before loader), and, on a database that was new at
--   the move (no cutover), any day no month partition holds;
-- - loader.user_logins_mYYYYMM: one month each, created ahead by create_masked_months, with its
--   own indexes and a CHECK constraint stating its bounds (kept, unlike raw_logins' days: a
--   rotation's copy of a month, made with the same constraint, is attached without a scan).
-- ON CONFLICT DO NOTHING names no index: the one unique index of the partition a row goes to
-- (message_id) decides. A message's create_date never changes (the UTC day SQS received it),
-- so every outcome of one message goes to the same partition.
--
-- Reruns cleanly: psql -v ON_ERROR_STOP=1 -f sql/17_masked_partitions.sql (applied by `loader
-- migrate`). In psql, as the owner:
--   select loader.create_masked_months();     -- the month partitions created

-- _masked_partitions: every partition of public.user_logins with the create_date range it
-- holds, [lo, hi): a month partition its month, the legacy one NULL to the cutover (NULL
-- bounds: no bound). Legacy first, then by month; nothing while user_logins is not partitioned.
create or replace function loader._masked_partitions()
returns table (rel regclass, month date, lo date, hi date)
language sql stable set search_path = pg_catalog, pg_temp set datestyle = 'ISO, YMD' as $$
    select c.oid::regclass, p.month, p.month,
           case when p.month is not null then (p.month + interval '1 month')::date
                else (select l.cutover from loader.masked_layout l) end
      from pg_inherits i
      join pg_class c on c.oid = i.inhrelid
     cross join lateral (select case when c.relname ~ '^user_logins_m[0-9]{6}$'
                                     then to_date(substr(c.relname, 14), 'YYYYMM') end as month) p
     where i.inhparent = 'public.user_logins'::regclass
     order by 2 nulls first, 1
$$;
comment on function loader._masked_partitions() is
    'Private: the partitions of public.user_logins with the create_date range each holds (legacy first)';

-- _add_masked_month: one month partition named `part_name` in schema `nsp`, with its indexes
-- (the names are the partition's, so a rotation's copy in loader_rebuild has the live one's)
-- and its bound as a CHECK constraint, attached to `parent` (public.user_logins, or a
-- rotation's copy of it). Built empty beside the table and then attached: ATTACH PARTITION
-- takes SHARE UPDATE EXCLUSIVE on the parent, which no writer or reader waits on, and a lock
-- on the DEFAULT partition, whose constraint proves it holds no row of the month (or, on a
-- database new at the move, which it scans: it holds none, as a rule).
create or replace function loader._add_masked_month(parent regclass, nsp text, part_name text, month date)
returns regclass
language plpgsql set search_path = pg_catalog, pg_temp set datestyle = 'ISO, YMD' as $$
declare
    part text := format('%I.%I', nsp, part_name);
    hi date := (month + interval '1 month')::date;
begin
    execute format('create table %s (like public.user_logins including defaults)', part);
    execute format('alter table %s add constraint %I check (create_date >= %L and create_date < %L)',
                   part, part_name || '_bound', month, hi);
    execute format('create unique index %I on %s (message_id)', part_name || '_message_id', part);
    execute format('create index %I on %s (loaded_xid)', part_name || '_loaded_xid', part);
    execute format('create index %I on %s (user_id)', part_name || '_user_id', part);
    execute format('create index %I on %s (create_date)', part_name || '_create_date', part);
    execute format('create index %I on %s using brin (loaded_at)', part_name || '_loaded_at_brin', part);
    execute format('create index %I on %s using brin (staged_on)', part_name || '_staged_on_brin', part);
    execute format('alter table %s attach partition %s for values from (%L) to (%L)', parent, part, month, hi);
    perform loader._comment_like(part::regclass, 'public.user_logins'::regclass,
        format('Masked logins of %s (create_date)', to_char(month, 'YYYY-MM')));
    return part::regclass;
end
$$;
comment on function loader._add_masked_month(regclass, text, text, date) is
    'Private: build a month partition of public.user_logins (or of a rotation''s copy) with its indexes and attach it';

-- create_masked_months: the month partitions from the cutover (on a database new at the move,
-- last month) to `months_ahead` months from now that do not exist yet; a month the legacy
-- partition already holds rows of is skipped (they stay there, and so do the month's). While
-- a rotation copies, each new month gets its copy too, so that a batch's row of that month
-- goes to the same place in both. Called by every `loader migrate` and by loader.purge_staged
-- (the daily pg_cron job, `loader purge`). Waits at most lock_timeout (2 s) on a lock, as
-- create_staging_days does. Returns how many it created.
create or replace function loader.create_masked_months(months_ahead integer default 2)
returns integer
language plpgsql set search_path = pg_catalog, pg_temp set datestyle = 'ISO, YMD' set lock_timeout = '2s' as $$
declare
    this_month date := date_trunc('month', now() at time zone 'UTC')::date;
    first date;
    m date;
    part_name text;
    created integer := 0;
begin
    if months_ahead is null or months_ahead < 1 or months_ahead > 24 then
        raise exception 'create_masked_months: 1 to 24 months ahead' using errcode = 'invalid_parameter_value';
    end if;
    if (select c.relkind from pg_class c where c.oid = 'public.user_logins'::regclass) <> 'p' then
        return 0;
    end if;
    select coalesce(l.cutover, (this_month - interval '1 month')::date) into first from loader.masked_layout l;
    for m in select generate_series(first, this_month + make_interval(months => months_ahead), interval '1 month')::date
    loop
        part_name := format('user_logins_m%s', to_char(m, 'YYYYMM'));
        continue when to_regclass(format('loader.%I', part_name)) is not null;
        continue when exists (select from loader.user_logins_legacy u
                               where u.create_date >= m and u.create_date < (m + interval '1 month')::date);
        perform loader._add_masked_month('public.user_logins', 'loader', part_name, m);
        if (select c.relkind from pg_class c where c.oid = to_regclass('loader_rebuild.user_logins_next')) = 'p'
           and to_regclass(format('loader_rebuild.%I', part_name)) is null then
            perform loader._add_masked_month('loader_rebuild.user_logins_next', 'loader_rebuild', part_name, m);
        end if;
        created := created + 1;
    end loop;
    return created;
end
$$;
comment on function loader.create_masked_months(integer) is
    'Create public.user_logins'' month partitions up to months_ahead months ahead (owner; migrate and the purge call it)';

-- _move_masked_cutover: before the move, when the cutover is less than a week away (a migrate
-- killed between V27 and the move, and not run again for weeks), a later one; and the
-- constraint again when the table lost it (a rotation started before V27, whose copy had none,
-- swapped in since). The new constraint is NOT VALID (validated by the next step). Returns the
-- cutover in force.
create or replace function loader._move_masked_cutover() returns date
language plpgsql set search_path = pg_catalog, pg_temp set datestyle = 'ISO, YMD' as $$
declare
    cut date;
begin
    select l.cutover into cut from loader.masked_layout l for update;
    if (select c.relkind from pg_class c where c.oid = 'public.user_logins'::regclass) = 'p'
       or cut > (now() at time zone 'UTC')::date + 7
          and exists (select from pg_constraint k where k.conrelid = 'public.user_logins'::regclass
                                                    and k.conname = 'user_logins_before_cutover') then
        return cut;
    end if;
    cut := (date_trunc('month', now() at time zone 'UTC') + interval '2 months')::date;
    alter table public.user_logins drop constraint if exists user_logins_before_cutover;
    execute format('alter table public.user_logins add constraint user_logins_before_cutover
                    check (create_date < %L) not valid', cut);
    update loader.masked_layout set cutover = cut;
    return cut;
end
$$;
comment on function loader._move_masked_cutover() is
    'Private: push the cutover of a not yet partitioned user_logins weeks ahead';

-- _partition_masked: the move itself, in the caller's transaction, after
-- user_logins_before_cutover was validated: public.user_logins becomes
-- loader.user_logins_legacy (rows, indexes and that constraint untouched), the DEFAULT
-- partition of a new partitioned public.user_logins with the same columns, defaults, comments
-- and grants, and the months from the cutover on. Nothing is scanned: a DEFAULT partition
-- attached first has no other partition to be checked against, and the constraint proves each
-- month holds nothing of it. Holds ACCESS EXCLUSIVE on the table for those catalog changes only.
-- Not while an online rebuild copies (it copies the table whole; the next migrate moves it),
-- nor while a permanent object of someone else's depends on it (it would follow the legacy
-- partition): named, as a rebuild names it. Returns false when not moved.
create or replace function loader._partition_masked() returns boolean
language plpgsql set search_path = pg_catalog, pg_temp set datestyle = 'ISO, YMD' as $$
declare
    cut date;
    blockers text;
begin
    -- The maintenance lock first, as rebuild_start takes it: a rotation starting meanwhile
    -- either has started (and copies the table as it is: no move) or sees the new shape.
    lock table loader.maintenance_lock in exclusive mode;
    lock table public.user_logins in access exclusive mode;
    if (select c.relkind from pg_class c where c.oid = 'public.user_logins'::regclass) = 'p'
       or exists (select from loader.rebuilds b where b.state = 'copying') then
        return false;
    end if;
    if not exists (select from pg_constraint k
                    where k.conrelid = 'public.user_logins'::regclass
                      and k.conname = 'user_logins_before_cutover' and k.convalidated) then
        raise exception 'user_logins_before_cutover is not validated yet'
            using errcode = 'object_not_in_prerequisite_state',
                  hint = 'loader migrate validates it first';
    end if;
    blockers := loader._permanent_dependents('public.user_logins');
    if blockers is not null then
        raise exception 'cannot move public.user_logins to month partitions: % (it would follow the old table: drop it, run loader migrate again, then create it again)', blockers
            using errcode = 'dependent_objects_still_exist';
    end if;
    select l.cutover into cut from loader.masked_layout l for update;
    if not exists (select from public.user_logins) then
        -- Nothing to keep apart (a new database): the legacy partition is only the net.
        cut := null;
        alter table public.user_logins drop constraint user_logins_before_cutover;
    end if;
    alter table public.user_logins rename to user_logins_legacy;
    alter table public.user_logins_legacy set schema loader;
    create table public.user_logins (like loader.user_logins_legacy including defaults)
        partition by range (create_date);
    alter table public.user_logins attach partition loader.user_logins_legacy default;
    -- Grants follow the name: a deployment's own (a BI role's SELECT) too
    -- (loader._move_grants, sql/35_rebuild.sql).
    perform loader._move_grants('loader.user_logins_legacy', 'public.user_logins');
    update loader.masked_layout set cutover = cut, partitioned_at = now();
    perform loader._comment_like('public.user_logins'::regclass, 'loader.user_logins_legacy'::regclass,
        obj_description('loader.user_logins_legacy'::regclass, 'pg_class'));
    comment on table loader.user_logins_legacy is
        'Masked logins written before user_logins was partitioned, without a create_date, or of a day no month partition holds (its DEFAULT partition)';
    perform loader.create_masked_months();
    return true;
end
$$;
comment on function loader._partition_masked() is
    'Private: move an unpartitioned public.user_logins into the partitioned shape (loader migrate, once)';
