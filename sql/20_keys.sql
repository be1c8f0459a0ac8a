-- Masking keys: a fresh database gets its first key here. Every later key is activated by the
-- swap of a rotation (sql/35_rebuild.sql, `loader keys rotate|install`), the one place a key
-- becomes active; loader.mask_key_info (sql/50_views.sql) lists them without their bytes.
--
-- Reruns cleanly: psql -v ON_ERROR_STOP=1 -f sql/20_keys.sql (applied by `loader migrate`).
-- Only the owner role can read loader.mask_keys.

-- A random 32-byte key (gen_random_bytes uses the OS's secure RNG) when none is active.
insert into loader.mask_keys (key, source)
select public.gen_random_bytes(32), 'generated'
 where not exists (select from loader.mask_keys where retired_at is null);
