-- The refusal ledger: every message PostgreSQL refused to stage (a constraint or trigger refused
-- its row), recorded by the run that received it. Left on the queue, such a message is
-- redelivered and, after the redrive policy's maxReceiveCount, moved to the dead-letter queue:
-- this says which message went there and why (`loader dlq list`, `loader reconcile`).
-- Ids and codes only: the SQLSTATE and the constraint (or table) the error named, never the
-- error's message or detail, which can quote the row's values.
create table loader.refusals (
    id bigint generated always as identity constraint refusals_pkey primary key,
    message_id text not null,
    sqlstate text not null,
    constraint_name text,
    refused_at timestamptz not null default now(),
    ingest_run_id bigint not null
        constraint refusals_ingest_run_fkey references loader.ingest_runs (id)
);
create index refusals_message_id on loader.refusals (message_id);
comment on table loader.refusals is
    'Messages PostgreSQL refused to stage, one row per refusal: id, SQLSTATE, constraint, run (never values)';
comment on column loader.refusals.constraint_name is
    'The constraint the error named, else its table; null when it named neither';
comment on column loader.refusals.id is 'Ledger order';
comment on column loader.refusals.message_id is 'The SQS MessageId PostgreSQL refused to stage';
comment on column loader.refusals.sqlstate is 'The SQLSTATE of the refusal (class 22, 23 or P0001)';
comment on column loader.refusals.refused_at is 'When it was refused';
comment on column loader.refusals.ingest_run_id is 'The ingest run (or Lambda invocation) that received it';
