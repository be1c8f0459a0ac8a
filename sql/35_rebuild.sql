-- The rebuild and key rotation (one algorithm, online): every outcome recomputed into new
-- copies of public.user_logins (of the months that may hold a body still kept, since V27:
-- _masked_copy_create) and loader.login_rejects, in committed batches, while the
-- incremental transform goes on; then one short transaction swaps the copies in. Readers see the old
-- tables or the new ones, never a mix of masks. `loader transform --rebuild` and `loader keys
-- rotate|install` drive it (with parallel workers and a progress line); in psql, as the owner:
--
--   select * from loader.rebuild_start();                 -- or rebuild_start(rotate => true)
--   select loader.rebuild_copy_range();                   -- repeat (in any number of sessions)
--                                                         -- until it returns NULL
--   select * from loader.rebuild_swap();                  -- needs a moment with no reader
--   select loader.rebuild_drop_retired();                 -- drop the tables the swap retired
--   select loader.rebuild_abandon();                      -- or give up, dropping the copies
--
-- How it stays consistent without stopping anything:
-- - rebuild_start creates the copies, records the rebuild (with a rotation's new key, which
--   stays here, owner-only, until the swap) and cuts each partition's ids of raw_logins, up to
--   its current maximum, into ranges: a range reads and locks one day (V24). Each day retention
--   dropped is a range too. It rewrites the active key's row, the row every committing
--   transform batch holds FOR SHARE: batches that committed before it are in the live tables
--   when the ranges are copied; a batch that commits after it must have written the copies too.
-- - Workers claim ranges with SKIP LOCKED and copy each in one transaction: rows that have an
--   outcome are recomputed from raw_logins with the rebuild's key; purged rows, and the
--   outcomes of a dropped day (nothing to recompute from), keep theirs. Rows still in the work
--   list are left to the transform. An outcome whose staged message is gone otherwise (deleted
--   by hand: loader never deletes one) has nothing to recompute from either: the first range of
--   its day (found by staged_on; the very first range for what no day range holds) carries it
--   into the copies as it was, with its key id, and counts it
--   (loader.rebuilds.carried), rather than refusing a rotation (which may be urgent) or
--   dropping a row without a word.
-- - Every transform batch, while a rebuild is copying, writes its outcomes to the live tables
--   (active key) and to the copies (the rebuild's key), and leaves a ticket naming the rebuild
--   it saw; at COMMIT _confirm_batch_key refuses (40001) a batch whose rebuild is no longer the
--   one copying, and its rows return to the work list.
-- - The swap takes ACCESS EXCLUSIVE on the four tables (waiting for open batches and readers,
--   bounded by the caller's lock_timeout), makes a rotation's key active, moves the months of
--   user_logins it did not copy into the copy (catalog changes: nothing is scanned), carries
--   grants, comments and index names over, and renames: the live tables move to schema loader_rebuild
--   as <name>_retired_<rebuild id>, stripped of every privilege, and the copies take their
--   place. rebuild_drop_retired drops them afterwards, with the temporary objects of other
--   sessions that depend on them: so such an object (a temporary view, a temporary table with
--   a column of the table's row type, which any role that can connect may create) delays only
--   that drop, never the swap, and needs no privilege of its owner's to go.
-- - The copies live in schema loader_rebuild, which no other role may use: nobody can name
--   them, so nobody can make anything depend on them.
-- While a rebuild is copying, another request (a rotation during a rebuild, a rotation to
-- another key) is refused; purge goes on, passing over the ranges not yet copied.

comment on schema loader_rebuild is
    'loader: the online rebuild''s copies and the tables swaps retired (owner only; see sql/35_rebuild.sql)';

-- _is_temporary: whether the object (classid, objid) is in a temporary schema or depends on
-- one through up to five links (normal, automatic or internal dependencies: a cast on a
-- temporary type, a policy, rule, trigger or default of a temporary table, an operator taking
-- a temporary type, ...). Such an object ends with its session.
create or replace function loader._is_temporary(cls oid, obj oid) returns boolean
language sql stable set search_path = pg_catalog, pg_temp as $$
    with recursive up (classid, objid, depth) as (
        select cls, obj, 0
        union
        select d.refclassid, d.refobjid, u.depth + 1
          from up u join pg_catalog.pg_depend d on d.classid = u.classid and d.objid = u.objid
         where u.depth < 5 and d.deptype in ('n', 'a', 'i')
    )
    select exists (select from up u
                    where u.classid = 'pg_catalog.pg_namespace'::regclass
                      and (u.objid = pg_catalog.pg_my_temp_schema()
                           or pg_catalog.pg_is_other_temp_schema(u.objid)))
$$;
comment on function loader._is_temporary(oid, oid) is
    'Private: whether an object is temporary (in a temporary schema, or depending on something that is)';

-- _permanent_dependents: what depends on `rel` (a table, or a view) or its row type and is
-- neither part of the table nor temporary (a temporary object lives only as long as its session, and a drop
-- with CASCADE may take it): views, rules, triggers, policies, publications, foreign keys,
-- inheritance, columns, functions and types of the row type or of its array type. NULL when
-- there is none.
create or replace function loader._permanent_dependents(rel regclass) returns text
language sql stable as $$
    select string_agg(what, '; ' order by what)
      from (select format('%s depends on %s', pg_describe_object(d.classid, d.objid, d.objsubid),
                          rel) as what
              from pg_catalog.pg_depend d
             -- The table, its row type, and that type's array type (a column of `rel[]`).
             where d.refobjid in (rel::oid,
                                  (select c.reltype from pg_catalog.pg_class c where c.oid = rel),
                                  (select t.typarray from pg_catalog.pg_class c
                                     join pg_catalog.pg_type t on t.oid = c.reltype
                                    where c.oid = rel))
               and d.refclassid in ('pg_catalog.pg_class'::regclass, 'pg_catalog.pg_type'::regclass)
               and d.deptype = 'n'
               -- The table's own parts: its constraints and defaults.
               and not (d.classid = 'pg_catalog.pg_constraint'::regclass
                        and exists (select from pg_catalog.pg_constraint c
                                     where c.oid = d.objid and c.conrelid = rel))
               and not (d.classid = 'pg_catalog.pg_attrdef'::regclass
                        and exists (select from pg_catalog.pg_attrdef a
                                     where a.oid = d.objid and a.adrelid = rel))
               -- A view's own query (tables have none).
               and not (d.classid = 'pg_catalog.pg_rewrite'::regclass
                        and exists (select from pg_catalog.pg_rewrite w
                                     where w.oid = d.objid and w.ev_class = rel
                                       and w.rulename = '_RETURN'))
               -- Temporary: in a temporary schema, or depending (a cast on a temporary type,
               -- a policy or rule of a temporary table, ...) on something that is: it goes
               -- when its session ends, and a drop with CASCADE may take it.
               and not loader._is_temporary(d.classid, d.objid)
            union all
            -- (Not a partition: only the table's owner may attach one, loader's own months.)
            select format('%s inherits from %s', i.inhrelid::regclass, i.inhparent::regclass)
              from pg_catalog.pg_inherits i join pg_catalog.pg_class c on c.oid = i.inhrelid
             where i.inhparent = rel and not c.relispartition
            union all
            select format('%s is in publication %s', rel, p.pubname)
              from pg_catalog.pg_publication_rel r join pg_catalog.pg_publication p on p.oid = r.prpubid
             where r.prrelid = rel) b
$$;
comment on function loader._permanent_dependents(regclass) is
    'Private: the permanent objects of others that depend on a table or its row type, or NULL';

-- _rebuild_blockers: what a swap could not carry over: permanent objects that name the live
-- tables (or user_logins' partitions, which a swap may retire) by identity (see
-- _permanent_dependents). Temporary ones do not block: they follow the retired tables and go
-- with them. NULL when there is none.
create or replace function loader._rebuild_blockers() returns text
language sql stable as $$
    select nullif(concat_ws('; ', loader._permanent_dependents('public.user_logins'),
                            (select string_agg(loader._permanent_dependents(p.rel), '; ')
                               from loader._masked_partitions() p),
                            loader._permanent_dependents('loader.login_rejects')), '')
$$;
comment on function loader._rebuild_blockers() is
    'Private: permanent objects a swap could not carry over (views, foreign keys, ...), or NULL';

-- _id_bounds: the first and last id of a partition of raw_logins (two index descents), or NULLs
-- when it is empty.
create or replace function loader._id_bounds(rel regclass, out lo bigint, out hi bigint)
language plpgsql stable set search_path = pg_catalog, pg_temp as $$
begin
    execute format('select min(r.id), max(r.id) from %s r', rel) into lo, hi;
end
$$;
comment on function loader._id_bounds(regclass) is
    'Private: the first and last id of a partition of loader.raw_logins (NULLs when empty)';

-- _carry_outcomes: copies into the copying rebuild's copies, as they are, the outcomes staged on a
-- day in [from_day, to_day) (staged_on; NULL when from_day is NULL) whose message has no row in
-- `staged` (a partition of raw_logins, or the whole table; NULL: none left) and that no erasure
-- has still to erase (it takes them out of the copies); returns how many of each. A read of
-- those days along the BRIN indexes on staged_on (summarized first), looking in `staged`
-- alone, so it locks that partition and no other. With probe, copies nothing: `loaded` is 1
-- when there is such an outcome, else 0.
drop function if exists loader._carry_outcomes(regclass, date, date, boolean);
create or replace function loader._carry_outcomes(
    staged regclass, from_day date, to_day date, probe boolean,
    out loaded bigint, out rejected bigint)
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    condition text := format(
        '%s and u.message_id is not null %s
         and not exists (select from loader.erasure_work w where w.message_id = u.message_id)',
        case when from_day is null then 'u.staged_on is null'
             else 'u.staged_on >= $1 and u.staged_on < $2' end,
        case when staged is not null
             then format('and not exists (select from %s r where r.message_id = u.message_id)', staged) end);
    found boolean;
begin
    rejected := 0;
    if probe then
        execute format('select exists (select from public.user_logins u where %1$s and %2$s)
                            or exists (select from loader.login_rejects u where %1$s)',
                       condition, loader._masked_copied('u'))
           into found using from_day, to_day;
        loaded := found::integer;
        return;
    end if;
    -- Of user_logins, the months the copy holds: the others stay where they are.
    execute format('insert into loader_rebuild.user_logins_next
                    select u.* from public.user_logins u where %s and %s
                    on conflict do nothing', condition, loader._masked_copied('u'))
       using from_day, to_day;
    get diagnostics loaded = row_count;
    execute format('insert into loader_rebuild.login_rejects_next
                    select u.* from loader.login_rejects u where %s
                    on conflict do nothing', condition)
       using from_day, to_day;
    get diagnostics rejected = row_count;
end
$$;
comment on function loader._carry_outcomes(regclass, date, date, boolean) is
    'Private: copy as they are the outcomes of some staging days whose staged message is gone (a rebuild''s carrying and dropped days'' ranges)';

-- _masked_copy_create: creates the copy of public.user_logins a rebuild writes, empty, and
-- returns the first day it holds (NULL: the whole table). Unpartitioned (before the move), a
-- whole copy. Partitioned, only the partitions that may hold a row it re-masks: the months
-- from the one of the oldest body kept (pending ones included), less sent_at_max_age_days
-- (staging replaces an older SentTimestamp, and create_date is its day), and the legacy
-- partition when it holds a row of those months, or is only the net of a database new at the
-- move. Else the copy's DEFAULT partition is loader_rebuild.user_logins_strays. A row
-- recomputed of a month not copied (staged before that bound existed) goes to the copy's
-- DEFAULT partition, and the swap puts it in place of the live one.
create or replace function loader._masked_copy_create() returns date
language plpgsql set search_path = pg_catalog, pg_temp set datestyle = 'ISO, YMD' as $$
declare
    oldest timestamptz;
    cut date;
    part record;
begin
    drop table if exists loader_rebuild.user_logins_next;
    if (select c.relkind from pg_class c where c.oid = 'public.user_logins'::regclass) <> 'p' then
        create table loader_rebuild.user_logins_next (like public.user_logins including all);
        return null;
    end if;
    select min(r.staged_at) into oldest from loader.raw_logins r where r.purged_at is null;
    cut := date_trunc('month', (coalesce(oldest, now()) at time zone 'UTC')
                               - make_interval(days => loader._setting_int('sent_at_max_age_days', 28)))::date;
    create table loader_rebuild.user_logins_next (like public.user_logins including defaults including comments)
        partition by range (create_date);
    for part in select c.relname, p.month from loader._masked_partitions() p
                  join pg_class c on c.oid = p.rel
                 where p.month is not null and p.hi > cut
    loop
        perform loader._add_masked_month('loader_rebuild.user_logins_next', 'loader_rebuild', part.relname, part.month);
    end loop;
    -- The legacy partition is copied when it may hold such rows, and when it is only the net
    -- of a database new at the move (no cutover: empty, as a rule, or holding days no month
    -- was made for, copied as they are).
    if (select l.cutover from loader.masked_layout l) is null
       or exists (select from loader.user_logins_legacy u where u.create_date >= cut) then
        create table loader_rebuild.user_logins_legacy (like loader.user_logins_legacy including all);
        alter table loader_rebuild.user_logins_next attach partition loader_rebuild.user_logins_legacy default;
    else
        create table loader_rebuild.user_logins_strays (like public.user_logins including defaults);
        create unique index user_logins_strays_message_id on loader_rebuild.user_logins_strays (message_id);
        alter table loader_rebuild.user_logins_next attach partition loader_rebuild.user_logins_strays default;
    end if;
    return cut;
end
$$;
comment on function loader._masked_copy_create() is
    'Private: create a rebuild''s copy of user_logins (the partitions it may re-mask rows of); returns its first day, NULL when whole';

-- _masked_copied: the condition (SQL text) on public.user_logins rows, named `alias`, that the
-- copying rebuild's copy holds: rows of the months it copies (create_date, so the planner
-- reads only those partitions), and of the legacy partition when it copies that one. Every
-- copy of an outcome as it is goes through it: the rest stays where it is, untouched by the swap.
create or replace function loader._masked_copied(alias text) returns text
language sql stable set search_path = pg_catalog, pg_temp set datestyle = 'ISO, YMD' as $$
    select case when b.copy_from is null then 'true'
                when to_regclass('loader_rebuild.user_logins_legacy') is not null
                    then format('(%1$I.create_date >= %2$L or %1$I.tableoid = %3$s)', alias, b.copy_from,
                                to_regclass('loader.user_logins_legacy')::oid)
                else format('%I.create_date >= %L', alias, b.copy_from) end
      from loader.rebuilds b where b.state = 'copying'
$$;
comment on function loader._masked_copied(text) is
    'Private: the condition on user_logins rows that the copying rebuild copies';

-- _masked_copy_bytes: the size of what the copying rebuild copies of user_logins: the live
-- partitions it has a copy of (the whole table before the move).
create or replace function loader._masked_copy_bytes() returns bigint
language sql stable set search_path = pg_catalog, pg_temp as $$
    select case when (select c.relkind from pg_class c where c.oid = 'public.user_logins'::regclass) <> 'p'
                then pg_total_relation_size('public.user_logins')
                else (select coalesce(sum(pg_total_relation_size(p.rel)), 0)::bigint
                        from loader._masked_partitions() p
                        join pg_class c on c.oid = p.rel
                       where to_regclass(format('loader_rebuild.%I', c.relname)) is not null) end
$$;
comment on function loader._masked_copy_bytes() is
    'Private: the bytes of user_logins the copying rebuild copies';

-- _move_grants: every privilege on table `source` granted to a role (PUBLIC is grantee 0) but
-- its owner is granted on `target` and revoked on `source`.
create or replace function loader._move_grants(source regclass, target regclass) returns void
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    grant_item record;
    grantee text;
begin
    for grant_item in select a.privilege_type, a.grantee
                        from pg_catalog.pg_class c, aclexplode(c.relacl) a
                       where c.oid = source and a.grantee <> c.relowner
    loop
        grantee := case when grant_item.grantee = 0 then 'public'
                        else quote_ident(grant_item.grantee::regrole::text) end;
        execute format('grant %s on %s to %s', grant_item.privilege_type, target, grantee);
        execute format('revoke %s on %s from %s', grant_item.privilege_type, source, grantee);
    end loop;
end
$$;
comment on function loader._move_grants(regclass, regclass) is
    'Private: move the privileges granted on a table to another (a swap, the move to month partitions)';

-- _swap_in: puts table `copy` (schema loader_rebuild) in the place of `live`, in the caller's
-- transaction (which holds both): carries grants, the table's comment and index names over
-- (each index of the copy takes the name of the live index with the same definition; the live
-- one takes `suffix`), then moves `live` to loader_rebuild as
-- <name><retired_suffix><suffix> (user_logins_retired_r<id>; a partition of user_logins, which
-- stays in the table retired with it, <name>_r<id>), every privilege on it revoked, and the
-- copy to live's schema and name.
drop function if exists loader._swap_in(regclass, regclass, text);
create or replace function loader._swap_in(live regclass, copy regclass, suffix text,
                                           retired_suffix text default '_retired')
returns void
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    ix record;
    live_schema text;
    live_name text;
begin
    select n.nspname, c.relname into live_schema, live_name
      from pg_class c join pg_namespace n on n.oid = c.relnamespace where c.oid = live;
    perform loader._move_grants(live, copy);
    execute format('comment on table %s is %L', copy, obj_description(live, 'pg_class'));
    for ix in select n.indexrelid::regclass as copy_index, l.indexrelid::regclass::text as live_index,
                     (select c.relname from pg_class c where c.oid = l.indexrelid) as index_name
                from pg_catalog.pg_index n join pg_catalog.pg_index l
                  on l.indrelid = live and n.indrelid = copy
                 and l.indisunique = n.indisunique
                 and regexp_replace(pg_get_indexdef(l.indexrelid), '^.* USING ', '')
                   = regexp_replace(pg_get_indexdef(n.indexrelid), '^.* USING ', '')
    loop
        execute format('alter index %s rename to %I', ix.live_index, ix.index_name || suffix);
        -- (A month's copy has the live one's names already, in its own schema.)
        if (select c.relname from pg_class c where c.oid = ix.copy_index) <> ix.index_name then
            execute format('alter index %s rename to %I', ix.copy_index, ix.index_name);
        end if;
    end loop;
    execute format('alter table %s rename to %I', live, live_name || retired_suffix || suffix);
    execute format('alter table %I.%I set schema loader_rebuild', live_schema, live_name || retired_suffix || suffix);
    execute format('alter table %s set schema %I', copy, live_schema);
    if (select c.relname from pg_class c where c.oid = copy) <> live_name then
        execute format('alter table %s rename to %I', copy, live_name);
    end if;
end
$$;
comment on function loader._swap_in(regclass, regclass, text, text) is
    'Private: put a rebuild''s copy of a table in its place, retiring the live one (rebuild_swap)';

-- rebuild_start: starts an online rebuild (a rotation when `rotate`: to `new_key`, or a random
-- key), or returns the one already copying when it is the same request (resumed = true);
-- refuses when another is copying. `range_rows` raw_logins ids per range. key_id is NULL when
-- `new_key` is already the active key.
create or replace function loader.rebuild_start(
    new_key bytea default null,
    rotate boolean default false,
    range_rows integer default 50000)
returns table (rebuild_id bigint, key_id integer, rotation boolean, ranges bigint,
               ranges_done bigint, resumed boolean, copy_bytes bigint)
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
#variable_conflict use_column
declare
    running loader.rebuilds;
    blockers text;
    active_id integer;
begin
    lock table loader.maintenance_lock in exclusive mode;
    select * into running from loader.rebuilds b where b.state = 'copying';
    -- Resuming is for the same request: a rebuild, a rotation to a random key, or to this key.
    if running.id is not null
       and not (rotate = (running.new_key is not null)
                and (new_key is null or new_key = running.new_key)) then
        raise exception 'online % % is copying, and this asks for something else',
            case when running.new_key is null then 'rebuild' else 'rotation' end, running.id
            using errcode = 'object_not_in_prerequisite_state',
                  hint = 'finish it with the command that started it (loader transform --rebuild, loader keys rotate, the same loader keys install), or abandon it (select loader.rebuild_abandon()), then run this again';
    end if;
    if running.id is null then
        blockers := loader._rebuild_blockers();
        if blockers is not null then
            raise exception 'an online rebuild cannot swap the tables: %', blockers
                using hint = 'drop or move those objects (create them again after the swap), then run this again';
        end if;
        if new_key is not null and (length(new_key) <> 32) then
            raise exception 'a masking key must be exactly 32 bytes (got %)', length(new_key)
                using errcode = 'invalid_parameter_value';
        end if;
        -- A real new version of the row every committing batch holds FOR SHARE: batches
        -- committing from here on see this rebuild (or, in REPEATABLE READ, fail with 40001),
        -- so no batch writes only the live tables for rows above the ranges cut below. First,
        -- then, and nothing slow after it: committing batches wait for this transaction.
        update loader.mask_keys k set key = k.key where k.retired_at is null
        returning k.id into active_id;
        if active_id is null then
            raise exception 'no active masking key: run loader migrate';
        end if;
        if rotate and new_key is not null
           and exists (select from loader.mask_keys k where k.id = active_id and k.key = new_key) then
            return query select null::bigint, null::integer, true, 0::bigint, 0::bigint, false, 0::bigint;
            return;
        end if;
        drop table if exists loader_rebuild.login_rejects_next;
        create table loader_rebuild.login_rejects_next (like loader.login_rejects including all);
        insert into loader.rebuilds (key_id, new_key, new_key_source, upto, copy_from)
        values (case when rotate then nextval(pg_get_serial_sequence('loader.mask_keys', 'id'))::integer
                     else active_id end,
                case when rotate then coalesce(new_key, public.gen_random_bytes(32)) end,
                case when rotate then case when new_key is null then 'generated' else 'installed' end end,
                0, loader._masked_copy_create())
        returning * into running;
        -- Each partition's ids up to its current maximum, in ranges of its own, so a range
        -- reads and locks one day (rebuild_copy_range). The first range of a day (or of the
        -- legacy partition) also carries the outcomes of that day whose staged message was
        -- deleted by hand; the first of all, those of the days no such range holds.
        insert into loader.rebuild_ranges (rebuild_id, lo, hi, part, staged_from, staged_to,
                                           carries, carries_rest)
        select running.id, g, least(g + range_rows - 1, s.hi), p.rel::text, p.staged_from, p.staged_to,
               p.staged_from is not null and g = s.lo,
               row_number() over (order by p.staged_from nulls last, g) = 1
          from (select p.rel, p.staged_from, p.staged_to from loader._staging_partitions() p
                union all
                -- Not partitioned yet (before loader migrate's move): the table itself.
                select 'loader.raw_logins'::regclass, null, null
                 where not exists (select from pg_inherits i
                                    where i.inhparent = 'loader.raw_logins'::regclass)) p
         cross join lateral loader._id_bounds(p.rel) s
         cross join generate_series(s.lo, s.hi, range_rows) g;
        -- At least one range (1..0 when nothing is staged), the one carrying the rest.
        if not found then
            insert into loader.rebuild_ranges (rebuild_id, lo, hi, carries_rest) values (running.id, 1, 0, true);
        end if;
        -- The ids of every row committed so far, in any partition, are at most this.
        update loader.rebuilds b
           set upto = coalesce((select max(g.hi) from loader.rebuild_ranges g
                                 where g.rebuild_id = running.id), 0),
               carried = 0, kept_as_is = 0
         where b.id = running.id;
        -- Each day retention dropped: its outcomes, kept as they are (an empty id range).
        insert into loader.rebuild_ranges (rebuild_id, lo, hi, dropped_day)
        select running.id, 0, -1, d.day from loader.staged_days d;
        -- Rows from before loader (no message_id) the copy holds: nothing to recompute, carried
        -- as they are (the unique index on message_id finds them).
        execute format('insert into loader_rebuild.user_logins_next
                        select * from public.user_logins u where u.message_id is null and %s',
                       loader._masked_copied('u'));
    end if;
    return query
    select running.id, running.key_id, running.new_key is not null,
           (select count(*) from loader.rebuild_ranges g where g.rebuild_id = running.id),
           (select count(*) from loader.rebuild_ranges g where g.rebuild_id = running.id and g.done),
           running.started_at < now(),
           loader._masked_copy_bytes() + pg_total_relation_size('loader.login_rejects');
end
$$;
comment on function loader.rebuild_start(bytea, boolean, integer) is
    'Start an online rebuild (or rotation), or return the one copying; see sql/35_rebuild.sql';

-- rebuild_copy_range: copies one unclaimed range of the copying rebuild, committed with the
-- caller's transaction; returns the rows it wrote, or NULL when no range is left to claim (the
-- call that finds every range copied summarizes the copies' BRIN indexes). Safe to run in many
-- sessions at once (SKIP LOCKED), and to kill: an uncommitted range is claimed again.
create or replace function loader.rebuild_copy_range() returns bigint
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    running bigint;
    range record;
    rel regclass;
    ids bigint[];
    outcome record;
    kept bigint;
    carried_rejects bigint;
    gone bigint;
    uncovered datemultirange;
    piece record;
begin
    -- An erasure starting meanwhile (loader._forget_start locks this row FOR UPDATE) waits for
    -- the ranges being copied, whose bodies it would not see to take out of the copies.
    perform from loader.erasure_key for share;
    select b.id into running from loader.rebuilds b where b.state = 'copying';
    if running is null then
        raise exception 'no online rebuild is copying' using errcode = 'object_not_in_prerequisite_state';
    end if;
    select g.id, g.lo, g.hi, g.part, g.staged_from, g.staged_to, g.dropped_day, g.carries,
           g.carries_rest into range
      from loader.rebuild_ranges g
     where g.rebuild_id = running and not g.done
     order by g.lo, g.id limit 1
       for update skip locked;
    if not found then
        -- Every range copied: the copies' BRIN indexes (the times reconcile --since reads by,
        -- staged_on) answer a block range they have not summarized as a match, so until a
        -- vacuum every read by time after the swap would read the whole table. Summarized by
        -- the call that finds nothing left to copy (SHARE UPDATE EXCLUSIVE on the copies, as a
        -- vacuum takes: batches write on; the few pages they fill after it wait for a vacuum).
        if not exists (select from loader.rebuild_ranges g where g.rebuild_id = running and not g.done) then
            perform brin_summarize_new_values(i.indexrelid)
               from pg_catalog.pg_index i
               join pg_catalog.pg_class c on c.oid = i.indexrelid
               join pg_catalog.pg_am a on a.oid = c.relam
              where a.amname = 'brin'
                and i.indrelid in (select t.relid from pg_partition_tree('loader_rebuild.user_logins_next') t
                                   union all
                                   -- (A plain table, before the move, has no partition tree.)
                                   select 'loader_rebuild.user_logins_next'::regclass
                                   union all
                                   select 'loader_rebuild.login_rejects_next'::regclass);
        end if;
        return null;
    end if;
    -- A day retention dropped: its outcomes as they are (nothing to recompute them from),
    -- found by staged_on along the BRIN indexes (V23). staged_on is the day of the outcome's
    -- staged row, which the dropped day held: no other range recomputes them.
    -- Not an outcome an erasure has still to erase (its work list commits before any range
    -- that can miss its batch starts), nor one whose message has a row in the default
    -- partition after all (staged on that day by a transaction still open once the day was
    -- gone): the default partition's range recomputes that one.
    if range.dropped_day is not null then
        perform loader._summarize_staged_on();
        select c.loaded, c.rejected into kept, carried_rejects
          from loader._carry_outcomes(to_regclass('loader.raw_logins_default'),
                                      range.dropped_day, range.dropped_day + 1, false) c;
        if kept > 0 then
            update loader.rebuilds b set kept_as_is = coalesce(b.kept_as_is, 0) + kept where b.id = running;
        end if;
        update loader.rebuild_ranges g set done = true where g.id = range.id;
        return kept + carried_rejects;
    end if;
    -- The range's partition (no retention drop takes a day with ranges left to copy), or
    -- every partition for a range cut before V24.
    rel := case when range.part is null then 'loader.raw_logins'::regclass else to_regclass(range.part) end;
    if rel is null then
        raise exception 'rebuild %: the partition % of a range not yet copied is gone', running, range.part
            using errcode = 'object_not_in_prerequisite_state',
                  hint = 'abandon the rebuild (select loader.rebuild_abandon()) and start it again';
    end if;
    -- Rows with an outcome to recompute; pending ones are the transform's.
    execute format('select array(select r.id from %s r
                                  where r.id between $1 and $2 and r.purged_at is null
                                    and not exists (select from loader.transform_queue q where q.raw_id = r.id)
                                  order by r.id)', rel)
       into ids using range.lo, range.hi;
    -- Between the partition's staging times (the last microsecond of its range: the bound is
    -- exclusive, _outcome_rows' inclusive), so only that partition is read, and locked. The
    -- default partition holds any time no day partition does: its rows' own first and last.
    if range.part is not null and range.staged_from is null then
        execute format('select min(r.staged_at), max(r.staged_at) + interval ''1 microsecond''
                          from %s r where r.id = any ($1)', rel)
           into range.staged_from, range.staged_to using ids;
    end if;
    if cardinality(ids) > 0 then
        select * into outcome from loader._write_outcomes(ids, true, false, range.staged_from,
                                                           range.staged_to - interval '1 microsecond');
    else
        select 0::bigint as loaded, 0::bigint as rejected into outcome;
    end if;
    -- Purged rows keep their outcome as it is (but not one an erasure has still to erase), in
    -- the months the copy holds (the others stay where they are).
    execute format('insert into loader_rebuild.user_logins_next
                    select u.* from %s r join public.user_logins u on u.message_id = r.message_id
                     where r.id between $1 and $2 and r.purged_at is not null and %s
                       and not exists (select from loader.erasure_work w where w.message_id = u.message_id)
                    on conflict do nothing', rel, loader._masked_copied('u'))
       using range.lo, range.hi;
    get diagnostics kept = row_count;
    execute format('insert into loader_rebuild.login_rejects_next
                    select j.* from %s r join loader.login_rejects j on j.message_id = r.message_id
                     where r.id between $1 and $2 and r.purged_at is not null
                       and not exists (select from loader.erasure_work w where w.message_id = j.message_id)
                    on conflict do nothing', rel)
       using range.lo, range.hi;
    -- Outcomes whose staged message is gone, but not by retention (deleted by hand: loader never
    -- deletes one), carried as they were, and counted; read by staged_on (BRIN, summarized
    -- first). No batch can make such an outcome (it has a staged message).
    gone := 0;
    if range.carries or range.carries_rest then
        perform loader._summarize_staged_on();
    end if;
    if range.carries then
        -- The partition's staging days: it is the one place their messages can be (a day
        -- partition cannot be attached while the default one holds rows of its day).
        select c.loaded + c.rejected into gone
          from loader._carry_outcomes(rel, (range.staged_from at time zone 'UTC')::date,
                                      (range.staged_to at time zone 'UTC')::date, false) c;
    end if;
    if range.carries_rest then
        -- The days no carrying range (when the rebuild started) nor a dropped day holds.
        select '{(,)}'::datemultirange
               - coalesce(range_agg(daterange(d.lo, d.hi)), '{}') into uncovered
          from (select (g.staged_from at time zone 'UTC')::date as lo,
                       (g.staged_to at time zone 'UTC')::date as hi
                  from loader.rebuild_ranges g
                 where g.rebuild_id = running and g.carries
                union all
                select g.dropped_day, g.dropped_day + 1
                  from loader.rebuild_ranges g
                 where g.rebuild_id = running and g.dropped_day is not null) d;
        -- Those with a partition now (empty at the start, or made since): a day that has an
        -- outcome at all is looked up in its partition alone.
        for piece in select p.rel, p.day from loader._staging_partitions() p
                      where p.day is not null and p.day <@ uncovered
        loop
            if (loader._carry_outcomes(null, piece.day, piece.day + 1, true)).loaded > 0 then
                gone := gone + (select c.loaded + c.rejected
                                  from loader._carry_outcomes(piece.rel, piece.day, piece.day + 1, false) c);
            end if;
        end loop;
        -- The others are the default partition's (the table's, before the move).
        for piece in
            select coalesce(lower(s), '-infinity') as lo, coalesce(upper(s), 'infinity') as hi
              from unnest(uncovered - (select coalesce(range_agg(daterange(p.day, p.day + 1)), '{}')
                                         from loader._staging_partitions() p where p.day is not null)) s
        loop
            gone := gone + (select c.loaded + c.rejected
                              from loader._carry_outcomes(
                                  coalesce(to_regclass('loader.raw_logins_default'), 'loader.raw_logins'::regclass),
                                  piece.lo, piece.hi, false) c);
        end loop;
        -- And the outcomes without staged_on (from before V21): their messages are in the legacy
        -- partition, as a rule, looked in alone; should one of them have an outcome to carry, it
        -- is looked for in every partition (a row of such an outcome in a day).
        if (loader._carry_outcomes(coalesce(to_regclass('loader.raw_logins_legacy'), 'loader.raw_logins'::regclass),
                                   null, null, true)).loaded > 0 then
            gone := gone + (select c.loaded + c.rejected
                              from loader._carry_outcomes('loader.raw_logins', null, null, false) c);
        end if;
    end if;
    -- Counted for the command (a rotation leaves those kept on their older key).
    if gone > 0 or kept > 0 then
        update loader.rebuilds b
           set carried = coalesce(b.carried, 0) + gone, kept_as_is = coalesce(b.kept_as_is, 0) + kept
         where b.id = running;
    end if;
    update loader.rebuild_ranges g set done = true where g.id = range.id;
    return outcome.loaded + outcome.rejected + kept + gone;
end
$$;
comment on function loader.rebuild_copy_range() is
    'Copy one range of the online rebuild (committed by the caller); NULL when none is left';

-- rebuild_swap: once every range is copied, swaps the copies in, in one transaction: waits for
-- ACCESS EXCLUSIVE on the four tables (bounded by the caller's lock_timeout: a reader or an
-- open transform batch delays it, and a failed attempt changes nothing), activates a
-- rotation's key, carries grants, the table comments and index names over, and moves the live
-- tables to loader_rebuild as <name>_retired_<rebuild id>, every privilege on them revoked.
-- Refuses when a permanent object of someone else's has come to depend on a live table since
-- the start (it would follow the retired table): drop it, and swap again.
create or replace function loader.rebuild_swap() returns table (rebuild_id bigint, key_id integer)
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
#variable_conflict use_column
declare
    running loader.rebuilds;
    left_to_copy bigint;
    blockers text;
    suffix text;
    part record;
begin
    select * into running from loader.rebuilds b where b.state = 'copying' for update;
    if running.id is null then
        raise exception 'no online rebuild is copying' using errcode = 'object_not_in_prerequisite_state';
    end if;
    select count(*) into left_to_copy from loader.rebuild_ranges g
     where g.rebuild_id = running.id and not g.done;
    if left_to_copy > 0 then
        raise exception 'rebuild %: % ranges are not copied yet', running.id, left_to_copy
            using errcode = 'object_not_in_prerequisite_state';
    end if;
    -- In the order a transform batch takes them (it writes the copies first, then the live
    -- tables): taking the live tables first deadlocked with a batch between its two writes.
    lock table loader_rebuild.user_logins_next, loader_rebuild.login_rejects_next,
               public.user_logins, loader.login_rejects in access exclusive mode;
    blockers := loader._rebuild_blockers();
    if blockers is not null then
        raise exception 'rebuild %: the tables cannot be swapped: %', running.id, blockers
            using errcode = 'dependent_objects_still_exist',
                  hint = 'drop or move those objects, then swap again (the copies are kept)';
    end if;
    if running.new_key is not null then
        update loader.mask_keys k set retired_at = clock_timestamp() where k.retired_at is null;
        insert into loader.mask_keys (id, key, source) overriding system value
        values (running.key_id, running.new_key, running.new_key_source);
    end if;
    suffix := '_r' || running.id;
    perform loader._swap_in('loader.login_rejects', 'loader_rebuild.login_rejects_next', suffix);
    if (select c.relkind from pg_class c where c.oid = 'loader_rebuild.user_logins_next'::regclass) = 'p' then
        -- The months not copied move to the copy, as they are (each has its bound as a
        -- constraint: attaching scans nothing), the legacy partition last. First, the rows
        -- recomputed of each, which the copy's DEFAULT partition holds, are taken out (strays:
        -- read by create_date), and put in place of the live ones once their months have moved.
        if to_regclass('loader_rebuild.user_logins_strays') is not null then
            alter table loader_rebuild.user_logins_next detach partition loader_rebuild.user_logins_strays;
        else
            create table loader_rebuild.user_logins_strays (like public.user_logins including defaults);
        end if;
        for part in select c.relname, p.month, p.lo, p.hi, pg_get_expr(c.relpartbound, c.oid) as bound
                      from loader._masked_partitions() p join pg_class c on c.oid = p.rel
                     where to_regclass(format('loader_rebuild.%I', c.relname)) is null
                     order by p.month nulls last
        loop
            if part.month is not null and to_regclass('loader_rebuild.user_logins_legacy') is not null then
                with taken as (
                    delete from loader_rebuild.user_logins_legacy u
                     where u.create_date >= part.lo and u.create_date < part.hi
                    returning u.*)
                insert into loader_rebuild.user_logins_strays select * from taken;
            end if;
            execute format('alter table public.user_logins detach partition loader.%I', part.relname);
            execute format('alter table loader_rebuild.user_logins_next attach partition loader.%I %s',
                           part.relname, part.bound);
        end loop;
        delete from loader_rebuild.user_logins_next u using loader_rebuild.user_logins_strays s
         where u.message_id = s.message_id and u.create_date = s.create_date;
        insert into loader_rebuild.user_logins_next select * from loader_rebuild.user_logins_strays;
        drop table loader_rebuild.user_logins_strays;
        -- The months copied: each copy takes its live partition's place and names; the live
        -- one stays a partition of the table retired below.
        for part in select c.relname from pg_inherits i join pg_class c on c.oid = i.inhrelid
                     where i.inhparent = 'loader_rebuild.user_logins_next'::regclass
                       and c.relnamespace = 'loader_rebuild'::regnamespace
        loop
            if to_regclass(format('loader.%I', part.relname)) is not null then
                perform loader._swap_in(format('loader.%I', part.relname)::regclass,
                                        format('loader_rebuild.%I', part.relname)::regclass, suffix, '');
            else
                execute format('alter table loader_rebuild.%I set schema loader', part.relname);
            end if;
        end loop;
    end if;
    perform loader._swap_in('public.user_logins', 'loader_rebuild.user_logins_next', suffix);
    update loader.rebuilds b set state = 'swapped', finished_at = clock_timestamp(), new_key = null
     where b.id = running.id;
    delete from loader.rebuild_ranges g where g.rebuild_id = running.id;
    return query select running.id, running.key_id;
end
$$;
comment on function loader.rebuild_swap() is
    'Swap a fully copied online rebuild in, in one short transaction (activates a rotation''s key)';

-- rebuild_drop_retired: drops the tables swaps retired (schema loader_rebuild, *_retired_r*),
-- with the temporary objects of other sessions that depend on them (CASCADE: their views, the
-- columns of their temporary tables of the row type). Each drop waits for the locks it needs,
-- as long as the caller's lock_timeout allows (`loader` ends sessions that hold it up, see
-- docs/security.md). Returns how many it dropped.
create or replace function loader.rebuild_drop_retired() returns integer
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    retired regclass;
    part regclass;
    blockers text;
    dropped integer := 0;
begin
    for retired in select c.oid::regclass from pg_catalog.pg_class c
                    where c.relnamespace = 'loader_rebuild'::regnamespace and c.relkind in ('r', 'p')
                      and c.relname ~ '_retired_r[0-9]+$'
                    order by c.relname
    loop
        -- Nobody but the owner can reach loader_rebuild, and the swap refused permanent
        -- dependents; should one have come anyway, it is named, not dropped. A retired
        -- user_logins' partitions (the months it replaced) first, each with the temporary
        -- objects on it.
        for part in select i.inhrelid::regclass from pg_catalog.pg_inherits i where i.inhparent = retired loop
            blockers := loader._drop_with_temporary_dependents(part);
            if blockers is not null then
                raise exception 'cannot drop %: %', part, blockers
                    using errcode = 'dependent_objects_still_exist';
            end if;
        end loop;
        blockers := loader._drop_with_temporary_dependents(retired);
        if blockers is not null then
            raise exception 'cannot drop %: %', retired, blockers
                using errcode = 'dependent_objects_still_exist';
        end if;
        dropped := dropped + 1;
    end loop;
    return dropped;
end
$$;
comment on function loader.rebuild_drop_retired() is
    'Drop the tables online rebuilds retired, with others'' temporary objects on them; returns how many';

-- rebuild_abandon: gives up the copying rebuild: drops the copies and forgets a new key.
create or replace function loader.rebuild_abandon() returns bigint
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    running bigint;
begin
    update loader.rebuilds b set state = 'abandoned', finished_at = clock_timestamp(), new_key = null
     where b.state = 'copying' returning b.id into running;
    drop table if exists loader_rebuild.user_logins_next, loader_rebuild.login_rejects_next;
    delete from loader.rebuild_ranges g where g.rebuild_id = running;
    return running;
end
$$;
comment on function loader.rebuild_abandon() is
    'Abandon the copying online rebuild: drop its copies, forget its key; returns its id';
