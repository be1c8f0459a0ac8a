-- Retention of raw personal data. Applied by `loader migrate` after the migrations; create or
-- replace, so it also reruns in psql.
--
-- Purging replaces the body of every staged message staged before a cutoff that already has an
-- outcome with JSON null, and stamps purged_at. Rows still waiting for the transform are kept
-- whole. The row stays, so a redelivered copy is still a duplicate and reconcile still accounts
-- for it. Afterwards the original values cannot be read back from the database (old row
-- versions go at the next VACUUM; backups and WAL archives keep them for as long as they are
-- kept). Purged rows keep their outcome as it is: a rebuild or key rotation cannot recompute
-- them and leaves them (and their mask_key_id) untouched.
--
-- In bounded, committed batches: a first purge of 10^9 rows is never one transaction (its
-- locks, its WAL burst, its bloat), a kill loses at most the batch in progress, and rerunning
-- continues where it stopped (the purged rows no longer match the partial index's predicate).
-- Owner only. Each batch locks loader.maintenance_lock, so none runs during a rebuild or
-- rotation's transaction. While an online rebuild copies, a batch passes over the rows of the
-- ranges it has not copied yet (it recomputes them from their bodies) and purges the rest, so a
-- rebuild never holds retention up.

-- _purge_cutoff: the cutoff of a purge of bodies older than `older_than`: the UTC midnight at
-- or before now() - older_than, so retention goes by whole staged days (a body staged on day D
-- goes with D's partition once D ended more than older_than ago: kept N to N+1 days, never a
-- part of a day purged row by row, which would write a new version of each row); 0 is every
-- body with an outcome, now. In UTC whatever the session's time zone (days of an interval
-- move with the zone's clock changes). The one rule of every path (loader purge, its dry run,
-- purge_staged).
create or replace function loader._purge_cutoff(older_than interval) returns timestamptz
language sql stable set search_path = pg_catalog, pg_temp set timezone = 'UTC' as $$
    select case when older_than <= interval '0' then now()
                else date_trunc('day', (now() - older_than) at time zone 'UTC') at time zone 'UTC' end
$$;
comment on function loader._purge_cutoff(interval) is
    'Private: the cutoff of a purge of bodies older than this: a UTC midnight (whole staged days), or now for 0';

-- purge_staged_batch: purges up to max_rows bodies staged before `cutoff` (oldest first) and
-- returns how many; 0 when none is left. Rows another purge holds are skipped, not waited for.
create or replace function loader.purge_staged_batch(cutoff timestamptz, max_rows integer default 10000)
returns bigint
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    purged bigint;
    copying bigint;
begin
    if cutoff is null or cutoff > now() then
        raise exception 'purge_staged_batch: the cutoff must be a time in the past, not %', cutoff
            using errcode = 'invalid_parameter_value';
    end if;
    lock table loader.maintenance_lock in exclusive mode;
    -- A copying online rebuild recomputes the rows of its ranges not yet copied from their
    -- bodies: those stay until their range is done (a range commits with its done flag, so
    -- this sees it copied only once it is).
    select b.id into copying from loader.rebuilds b where b.state = 'copying';
    -- raw_logins_unpurged_staged_at (V10): an index range over the bodies still held that are
    -- old enough; pending rows in it are passed over, and stay. The pending check is a probe
    -- per candidate row (a subplan), never a join: written as a plain NOT EXISTS, the planner
    -- hashed the whole work list for every batch whenever its statistics still counted a
    -- drained backlog (10^7 rows, before autovacuum's next analyze): 9 s per batch instead of
    -- 0.13 s at 10^7 rows (docs/benchmarks.md "Transform at scale").
    update loader.raw_logins r
       set body = 'null'::jsonb, purged_at = now()
     where r.id = any (array(
               select c.id from loader.raw_logins c
                where c.purged_at is null and c.staged_at < cutoff
                  and not (select exists (select from loader.transform_queue q
                                           where q.raw_id = c.id))
                  and (copying is null
                       or not (select exists (select from loader.rebuild_ranges g
                                               where g.rebuild_id = copying and not g.done
                                                 and c.id between g.lo and g.hi)))
                order by c.staged_at
                limit max_rows
                  for update skip locked));
    get diagnostics purged = row_count;
    return purged;
end
$$;
comment on function loader.purge_staged_batch(timestamptz, integer) is
    'Purge up to max_rows bodies staged before cutoff that have an outcome; returns how many';

-- _maintain_ahead: runs `step` (the creation of partitions ahead); when it waited past its
-- lock_timeout for `net` (the DEFAULT partition beside which it attaches), ends the sessions of
-- loader's lesser roles holding `net` past evict_after_seconds and runs it once more; a warning
-- when it still cannot (the next run creates what this one did not).
create or replace function loader._maintain_ahead(step text, net text, what text) returns void
language plpgsql set search_path = pg_catalog, pg_temp as $$
begin
    for attempt in 1 .. 2 loop
        begin
            execute step;
            return;
        exception when lock_not_available or deadlock_detected then
            exit when attempt = 2 or to_regclass(net) is null
                   or loader._end_held_transactions(to_regclass(net)) = 0;
        end;
    end loop;
    raise warning 'purge_staged: % waited too long for a lock; the next run creates them', what;
end
$$;
comment on function loader._maintain_ahead(text, text, text) is
    'Private: the daily job''s creation of partitions ahead, ending a lesser role''s session that holds it up past evict_after_seconds';

-- purge_staged: every body staged more than `older_than` ago, one committed batch at a time
-- (for psql: CALL, outside a transaction block). The cutoff (loader._purge_cutoff, a UTC
-- midnight) is fixed when it starts. Whole days before it are dropped first
-- (loader.drop_staged_day: a day with a pending row stays, with a WARNING); the batches then
-- purge the rest (the bodies with an outcome of a day kept, rows staged before raw_logins was
-- partitioned, the default partition's). `purged` counts the bodies of batches.
create or replace procedure loader.purge_staged(
    older_than interval,
    inout purged bigint default null,
    batch_size integer default 10000)
language plpgsql as $$
declare
    cutoff timestamptz := loader._purge_cutoff(older_than);
    batch bigint;
    day date;
    outcome text;
begin
    if older_than is null or older_than < interval '0' then
        raise exception 'purge_staged: older_than must be a non-negative interval'
            using errcode = 'invalid_parameter_value';
    end if;
    purged := 0;
    -- The daily job is also what keeps raw_logins' day partitions and user_logins' months
    -- ahead, drops whole days, and switches the staged ids' generation (sql/16_partitions.sql,
    -- sql/17_masked_partitions.sql), each committed apart.
    -- Each attaches a partition beside a DEFAULT one, which any reader of the table holds: when
    -- one of loader's lesser roles has held it past evict_after_seconds, its session is ended
    -- and the step tried once more (no watch here, as loader purge and migrate have).
    perform loader._maintain_ahead('select loader.create_staging_days()', 'loader.raw_logins_default',
                                   'the staging days ahead');
    commit;
    perform loader._maintain_ahead('select loader.create_masked_months()', 'loader.user_logins_legacy',
                                   'the masked months ahead');
    commit;
    for day in select * from loader._staged_days_due(cutoff) loop
        -- No watch here (loader purge has one): a lesser role's write transaction held past
        -- evict_after_seconds, which would hold the day's lock, is ended first.
        perform loader._end_held_transactions();
        begin
            outcome := loader.drop_staged_day(day);
        exception when lock_not_available or deadlock_detected then
            outcome := 'busy';
        end;
        if outcome = 'dropped' then
            raise notice 'purge_staged: dropped the staged day % (its counts: loader.staged_days)', day;
        elsif outcome <> 'missing' then
            raise warning 'purge_staged: day % stays (%)', day, outcome;
        end if;
        commit;
    end loop;
    -- After the drops: a generation of ids goes once the days of its time are gone.
    begin
        perform loader._switch_staged_ids();
    exception when lock_not_available or deadlock_detected then
        raise warning 'purge_staged: the staged ids'' generation waited too long for a lock; the next run switches';
    end;
    commit;
    loop
        batch := loader.purge_staged_batch(cutoff, batch_size);
        purged := purged + batch;
        commit;
        exit when batch = 0;
    end loop;
    perform loader._note_oldest_body();
    commit;
end
$$;
comment on procedure loader.purge_staged(interval, bigint, integer) is
    'Purge bodies staged before now() - older_than that have an outcome, in committed batches';

-- Retention of the masked data. Masked rows are personal data too (pseudonymised data is
-- personal data under the GDPR: EDPB guidelines 01/2025), so each public.user_logins row ends
-- once its create_date (the UTC day SQS received the message) is older than the period the
-- deployment chooses: `loader purge --masked-older-than-months N`, `call
-- loader.expire_masked(N)` in psql, or the pg_cron job. Rows from before loader (no message_id)
-- go by the same rule; a row with no create_date is never expired (nothing says its age).
--
-- With the masked row, its staged body goes too (a raw body never outlives its mask), and so do
-- the bodies of rejected messages staged before the cutoff (no raw body outlives the period);
-- the staged row is stamped expired_at: it stays, so a redelivery is still a duplicate that gets no
-- outcome, and reconcile counts the message as accounted for. Each batch adds to the cutoff's
-- row in loader.mask_expiries, the record of what ended when (no user id in it), which
-- downstream copies can follow. login_rejects rows stay: they hold no personal data.
--
-- In bounded committed batches, oldest first, resumable like the purge. Owner only. Each batch
-- takes loader.maintenance_lock (never beside a rebuild's start, a purge batch or a rotation's
-- swap) and the erasure key's row FOR UPDATE, which every rebuild range holds FOR SHARE while
-- it copies: a range in flight finishes first, and a range copied later recomputes nothing of
-- an expired message (its body is gone). While an online rebuild copies, its copy loses the same
-- rows, so the swap brings none back.

-- _masked_cutoff: the first create_date kept when masked rows are kept `months` months: the
-- UTC day, less the months (the session's TimeZone changes nothing).
create or replace function loader._masked_cutoff(months integer) returns date
language plpgsql stable as $$
begin
    if months is null or months < 1 or months > 1200 then
        raise exception 'masked rows are kept 1 to 1200 months, not %', months
            using errcode = 'invalid_parameter_value';
    end if;
    return ((now() at time zone 'UTC')::date - make_interval(months => months))::date;
end
$$;
comment on function loader._masked_cutoff(integer) is
    'Private: the first create_date kept when masked rows are kept this many months';

-- expire_masked_batch: ends up to max_rows user_logins rows whose create_date is before
-- `cutoff` (oldest first), in the live table and in a copying rebuild's copy; returns how many
-- rows it deleted (a copy's row before loader counts again: the record in loader.mask_expiries
-- counts each once), 0 only when none is left before the cutoff (the record is then finished).
create or replace function loader.expire_masked_batch(cutoff date, max_rows integer default 10000)
returns bigint
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
#variable_conflict use_variable
declare
    ids text[];
    adopted bigint;
    copied bigint := 0;
    copy regclass;
    purged_bodies bigint;
    left_in_copy boolean := false;
    rounds integer := 0;
begin
    if cutoff is null or cutoff > loader._masked_cutoff(1) then
        raise exception 'expire_masked_batch: masked rows are kept at least a month: the cutoff % is too late', cutoff
            using errcode = 'invalid_parameter_value';
    end if;
    if max_rows is null or max_rows < 1 or max_rows > 1000000 then
        raise exception 'expire_masked_batch: 1 to 1000000 rows per batch, not %', max_rows
            using errcode = 'invalid_parameter_value';
    end if;
    insert into loader.mask_expiries (cutoff, started_at, requested_by)
    values (cutoff, clock_timestamp(), session_user)
    on conflict on constraint mask_expiries_pkey do nothing;
    -- In _forget_start's order: the erasure key's row, then the maintenance lock.
    perform from loader.erasure_key for update;
    lock table loader.maintenance_lock in exclusive mode;
    copy := to_regclass('loader_rebuild.user_logins_next');
    loop
        with gone as (
            delete from public.user_logins u
             where (u.tableoid, u.ctid) in (select c.tableoid, c.ctid from public.user_logins c
                                             where c.create_date < cutoff
                                             order by c.create_date limit max_rows)
            returning u.message_id)
        select coalesce(array_agg(g.message_id) filter (where g.message_id is not null), '{}'),
               count(*) filter (where g.message_id is null)
          into ids, adopted from gone g;
        -- A copying rebuild's copy: the same rows (each of its rows with a message_id has its
        -- live one), and the rows before loader it carried at its start, which nothing else
        -- finds there (counted in the live table: a swap first leaves them uncounted).
        if copy is not null then
            execute format('delete from %s u where u.message_id = any ($1)', copy) using ids;
            execute format('delete from %1$s u
                             where (u.tableoid, u.ctid) in (select c.tableoid, c.ctid from %1$s c
                                                             where c.message_id is null and c.create_date < $1
                                                             order by c.create_date limit $2)', copy)
              using cutoff, max_rows;
            get diagnostics copied = row_count;
        end if;
        update loader.raw_logins r
           set body = 'null'::jsonb, purged_at = coalesce(r.purged_at, clock_timestamp()),
               expired_at = clock_timestamp()
         where r.message_id = any (ids) and r.expired_at is null;
        update loader.mask_expiries e
           set expired = e.expired + cardinality(ids), before_loader = e.before_loader + adopted,
               finished_at = null
         where e.cutoff = expire_masked_batch.cutoff and cardinality(ids) + adopted > 0;
        exit when cardinality(ids) + adopted + copied > 0;
        -- No masked row left to end: then the bodies staged before the cutoff that have an
        -- outcome but no masked row to end with (a reject's), so that no raw body outlives the
        -- period whatever --older-than-days says.
        purged_bodies := loader.purge_staged_batch(cutoff::timestamp at time zone 'UTC', max_rows);
        if purged_bodies > 0 then
            update loader.mask_expiries e set bodies = e.bodies + purged_bodies, finished_at = null
             where e.cutoff = expire_masked_batch.cutoff;
            return purged_bodies;
        end if;
        -- Nothing deleted: done, unless the rows picked were deleted under this batch by
        -- another transaction (an erasure) that then committed, or that rolled back: pick again.
        if copy is not null then
            execute format('select exists (select from %s c where c.message_id is null and c.create_date < $1)',
                           copy)
              into left_in_copy using cutoff;
        end if;
        if not exists (select from public.user_logins c where c.create_date < cutoff)
           and not left_in_copy then
            -- An earlier cutoff left unfinished (a run stopped, and rerun on a later day) is
            -- covered too: nothing before this one is left.
            update loader.mask_expiries e set finished_at = coalesce(e.finished_at, clock_timestamp())
             where e.cutoff <= expire_masked_batch.cutoff;
            return 0;
        end if;
        rounds := rounds + 1;
        if rounds > 100 then
            raise exception 'expire_masked_batch: the rows before % keep changing under it; run it again', cutoff
                using errcode = 'serialization_failure';
        end if;
    end loop;
    return cardinality(ids) + adopted + copied;
end
$$;
comment on function loader.expire_masked_batch(date, integer) is
    'End up to max_rows masked rows whose create_date is before cutoff; returns how many, 0 when none is left';

-- expire_masked: every masked row older than `older_than_months` months, one committed batch at
-- a time (for psql and pg_cron: CALL, outside a transaction block). The cutoff is fixed when it
-- starts.
create or replace procedure loader.expire_masked(
    older_than_months integer,
    inout expired bigint default null,
    batch_size integer default 10000)
language plpgsql as $$
declare
    upto date := loader._masked_cutoff(older_than_months);
    before bigint;
begin
    before := coalesce((select e.expired + e.before_loader from loader.mask_expiries e
                         where e.cutoff = upto), 0);
    loop
        commit;
        exit when loader.expire_masked_batch(upto, batch_size) = 0;
    end loop;
    -- The rows the record counts (a batch's return also counts a copy's row it deleted).
    expired := (select e.expired + e.before_loader from loader.mask_expiries e
                 where e.cutoff = upto) - before;
    perform loader._note_oldest_body();
end
$$;
comment on procedure loader.expire_masked(integer, bigint, integer) is
    'End the masked rows whose create_date is more than older_than_months months old, in committed batches';
