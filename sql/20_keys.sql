-- Masking keys: make sure one is active, list them without their bytes, rotate or install one
-- (rotate_key, which rebuilds with loader.rebuild() of sql/35_rebuild.sql).
--
-- Reruns cleanly: psql -v ON_ERROR_STOP=1 -f sql/20_keys.sql (applied by `loader migrate`).
-- Keys never leave the database through these functions; only the owner role can read
-- loader.mask_keys.

-- A fresh database gets a random 32-byte key (gen_random_bytes uses the OS's secure RNG).
insert into loader.mask_keys (key, source)
select public.gen_random_bytes(32), 'generated'
 where not exists (select from loader.mask_keys where retired_at is null);

-- _activate_key: retire the active key and make `new_key` active. Returns the new key's id, or
-- the current id when `new_key` already is the active key (installing twice is a no-op).
create or replace function loader._activate_key(new_key bytea, new_source text) returns integer
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    current_id integer;
    current_key bytea;
    new_id integer;
begin
    if new_key is null or length(new_key) <> 32 then
        raise exception 'a masking key must be exactly 32 bytes (got %)', coalesce(length(new_key), 0)
            using errcode = 'invalid_parameter_value';
    end if;
    select id, key into current_id, current_key
      from loader.mask_keys where retired_at is null for update;
    if current_key = new_key then
        return current_id;
    end if;
    update loader.mask_keys set retired_at = clock_timestamp() where id = current_id;
    insert into loader.mask_keys (key, source) values (new_key, new_source) returning id into new_id;
    return new_id;
end
$$;
comment on function loader._activate_key(bytea, text) is
    'Private: retire the active key and activate this one (no-op when it is already active)';

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
    lock table loader.maintenance_lock in exclusive mode;
    perform loader._no_rebuild_copying('rotate_key()');
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
