-- V14: a commit-ordered cursor on user_logins, a progress log no open transaction can freeze,
-- the role that registered each ingest run, and an owner-only schema for the online rebuild's
-- copies. Never edit once merged: add V15.
--
-- 1. public.user_logins.loaded_xid: the id of the transaction that wrote the row. Read with the
--    snapshot's xmin (docs: "Copying user_logins downstream"), it gives downstream copies an
--    incremental read that never misses or repeats a row, whatever order batches commit in
--    (loaded_at is the transaction's start, not its commit). Added without a default first, so
--    adopting a big table is instant; rows from before this migration keep NULL.
-- 2. loader.transform_log replaces the eight progress slots (loader.transform_progress): one
--    insert-only row per batch, folded later with SKIP LOCKED, so sessions that hold batches
--    open hold nothing another batch needs. loader.transform_state keeps its columns.
-- 3. loader.ingest_runs.registered_by: the login (session_user) that registered the run. The
--    queue name is the ingest process's claim; this records whose claim it is.
-- 4. Schema loader_rebuild (owner only): the rebuild's copies and the tables a swap retires.
--    No other role can name anything in it, so none can make a temp object depend on them.

alter table public.user_logins add column if not exists loaded_xid xid8;
alter table public.user_logins alter column loaded_xid set default pg_current_xact_id();
create index if not exists user_logins_loaded_xid on public.user_logins (loaded_xid);

create table loader.transform_log (
    -- The batch's transaction start (now()): when it drained, every row committed before then
    -- had been claimed.
    at timestamptz not null,
    drained boolean not null,
    -- Batches this row stands for (more than 1 once old rows are folded together).
    batches bigint not null default 1
);
insert into loader.transform_log (at, drained, batches)
select coalesce(p.last_drained_at, '-infinity'), p.last_drained_at is not null, p.batches
  from loader.transform_progress p
 where p.batches > 0 or p.last_drained_at is not null;
create or replace view loader.transform_state as
select max(l.at) filter (where l.drained) as last_drained_at,
       coalesce(sum(l.batches), 0)::bigint as batches
  from loader.transform_log l;
-- CASCADE: any role with USAGE on schema loader can make a temporary view of its own depend on
-- a table (creating a view checks no privilege on it); such a view lives as long as its session
-- and may not keep an internal table alive.
drop table loader.transform_progress cascade;

alter table loader.ingest_runs add column registered_by text;

create schema if not exists loader_rebuild;
revoke all on schema loader_rebuild from public;

-- 5. loader.sql_files: the md5 of each sql/ file as `loader migrate` last applied it, so a
--    migrate reapplies only the files that changed (then the comments and privileges): a
--    routine migrate replaces no view or function, and takes no lock a reader holds.
create table loader.sql_files (
    name text constraint sql_files_pkey primary key,
    md5 text not null,
    applied_at timestamptz not null default now()
);
comment on table loader.sql_files is 'The sql/ files loader migrate last applied, one md5 each (owner only)';
comment on column loader.sql_files.name is 'File name in sql/';
comment on column loader.sql_files.md5 is 'md5 of its text as applied';
comment on column loader.sql_files.applied_at is 'When it was last applied';
