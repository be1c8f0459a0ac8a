-- V7: close the window in which PUBLIC could execute a new function. Never edit once merged.
--
-- PUBLIC's EXECUTE on new functions is a global default: V1's
-- `alter default privileges in schema loader revoke ...` cannot remove it (a schema-level
-- default can only add to the global one). Revoking it for the role that runs `loader migrate`
-- (the owner; no FOR ROLE means the current role) makes every function it creates from now on
-- private until granted. `loader migrate` also runs everything in one transaction now, with
-- sql/90_privileges.sql last, so a new function is never visible before it is locked down.
alter default privileges revoke execute on functions from public;
revoke all on all routines in schema loader from public;

-- Tombstones of functions replaced by later signatures (they used to sit in sql/).
drop function if exists loader._reject(jsonb, boolean);
drop function if exists loader.transform_batch(integer);
