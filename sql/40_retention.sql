-- Retention of raw personal data. Applied by `loader migrate` after the migrations; create or
-- replace, so it also reruns in psql.
--
-- purge_staged(older_than): replaces the body of every staged message older than `older_than`
-- (by staged_at) that already has an outcome with JSON null, and stamps purged_at. Rows still
-- waiting for the transform are kept whole. The row stays, so a redelivered copy is still a
-- duplicate and reconcile still accounts for it. Afterwards the original values cannot be read
-- back from the database (old row versions go at the next VACUUM; backups and WAL archives keep
-- them for as long as they are kept). Purged rows keep their outcome as it is: a rebuild or key
-- rotation cannot recompute them and leaves them (and their mask_key_id) untouched.
-- Owner only. Locks loader.maintenance_lock, so it never runs during a rebuild or rotation.
create or replace function loader.purge_staged(older_than interval)
returns bigint
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    purged bigint;
begin
    if older_than is null or older_than < interval '0' then
        raise exception 'purge_staged: older_than must be a non-negative interval';
    end if;
    lock table loader.maintenance_lock in exclusive mode;
    update loader.raw_logins r
       set body = 'null'::jsonb, purged_at = now()
     where r.purged_at is null
       and r.staged_at < now() - older_than
       and not exists (select from loader.transform_queue q where q.raw_id = r.id);
    get diagnostics purged = row_count;
    return purged;
end
$$;
comment on function loader.purge_staged(interval) is
    'Replace bodies staged before now() - older_than that have an outcome with JSON null';
