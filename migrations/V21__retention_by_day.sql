-- V21: retention drops whole days of loader.raw_logins (sql/16_partitions.sql), and keeps what
-- reconcile needs of each first. Never edit once merged: add V22.

-- The UTC day the outcome's message was staged on, i.e. its partition: once that day is
-- dropped, reconcile finds the outcome's staged message in loader.staged_days instead. NULL for
-- outcomes written before V21 (their rows are in the legacy partition, never dropped whole) and
-- for rows from before loader.
alter table public.user_logins add column if not exists staged_on date;
alter table loader.login_rejects add column staged_on date;

-- A row per dropped day: its counts, proved when it was dropped (every row had exactly one
-- outcome, or was erased, or its masked row had expired; a day with a row still pending is
-- kept).
create table loader.staged_days (
    day date constraint staged_days_pkey primary key,
    dropped_at timestamptz not null default now(),
    dropped_by text not null,
    staged bigint not null,
    loaded bigint not null,
    rejected bigint not null,
    erased bigint not null,
    expired bigint not null
);

-- Per dropped day, the rows each ingest run had staged in it (reconcile holds each run's
-- counter to its rows, kept and dropped).
create table loader.staged_day_runs (
    day date not null constraint staged_day_runs_day_fkey references loader.staged_days (day),
    ingest_run_id bigint,
    staged bigint not null
);
create index staged_day_runs_run on loader.staged_day_runs (ingest_run_id);

-- Its result gained staged_on: dropped here, created again by sql/30_transform.sql in the same
-- transaction.
drop function if exists loader._outcome_rows(bigint[], boolean);

-- A rebuild copying now writes its copies through the same function: they gain the column too.
do $$
begin
    if to_regclass('loader_rebuild.user_logins_next') is not null then
        alter table loader_rebuild.user_logins_next add column if not exists staged_on date;
    end if;
    if to_regclass('loader_rebuild.login_rejects_next') is not null then
        alter table loader_rebuild.login_rejects_next add column if not exists staged_on date;
    end if;
end
$$;

-- stage() looks a message id up in the legacy partition by its name (sql/15_staging.sql), so it
-- locks that partition alone, not every day's. Until `loader migrate` has partitioned the
-- table, the name is a view of the whole table (dropped by the move).
do $$
begin
    if (select c.relkind from pg_class c where c.oid = 'loader.raw_logins'::regclass) = 'r' then
        create view loader.raw_logins_legacy as select r.message_id from loader.raw_logins r;
        comment on view loader.raw_logins_legacy is
            'Until raw_logins is partitioned: its message ids, for stage()''s lookup (then the legacy partition)';
        comment on column loader.raw_logins_legacy.message_id is 'SQS MessageId';
    end if;
end
$$;

-- The work list carries each row's staging time (filled by the staging trigger), so reading
-- the oldest pending row (loader.pipeline_status, which analysts read) reads no partition of
-- raw_logins. A row put back by hand gets the time it was put back.
alter table loader.transform_queue add column staged_at timestamptz not null default now();
update loader.transform_queue q set staged_at = r.staged_at from loader.raw_logins r where r.id = q.raw_id;

-- When the oldest body still held was staged, for loader.pipeline_status without reading every
-- partition: written by each purge and expiry (sql/16_partitions.sql) and by the first staging
-- while none is held (sql/15_staging.sql).
create table loader.retention_state (
    singleton boolean not null default true constraint retention_state_pkey primary key
        constraint retention_state_singleton check (singleton),
    oldest_body_staged_at timestamptz,
    measured_at timestamptz not null default now()
);
insert into loader.retention_state (oldest_body_staged_at)
select min(r.staged_at) from loader.raw_logins r where r.purged_at is null;
