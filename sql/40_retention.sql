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

-- purge_staged: every body staged more than `older_than` ago, one committed batch at a time
-- (for psql: CALL, outside a transaction block). The cutoff is fixed when it starts.
create or replace procedure loader.purge_staged(
    older_than interval,
    inout purged bigint default null,
    batch_size integer default 10000)
language plpgsql as $$
declare
    cutoff timestamptz := now() - older_than;
    batch bigint;
begin
    if older_than is null or older_than < interval '0' then
        raise exception 'purge_staged: older_than must be a non-negative interval'
            using errcode = 'invalid_parameter_value';
    end if;
    purged := 0;
    loop
        batch := loader.purge_staged_batch(cutoff, batch_size);
        purged := purged + batch;
        commit;
        exit when batch = 0;
    end loop;
end
$$;
comment on procedure loader.purge_staged(interval, bigint, integer) is
    'Purge bodies staged before now() - older_than that have an outcome, in committed batches';
