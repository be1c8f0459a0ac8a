-- V9: one write path for the ingest role. Never edit once merged.
--
-- loader_ingest used to insert into loader.raw_logins and update loader.ingest_runs itself, so
-- it could set columns the server owns (purged_at, staged_at, explicit ids), take future
-- identity values, and rewrite other runs' counters. It now only executes the
-- security-definer functions of sql/15_staging.sql. A run is bound to the process that
-- registered it by a random token that only that process learns.
alter table loader.ingest_runs add column token text default gen_random_uuid()::text;
comment on column loader.ingest_runs.token is
    'Secret returned to the process that registered the run; required to stage into or update it';
