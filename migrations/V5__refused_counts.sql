-- Messages PostgreSQL refused to stage (a constraint or trigger refused their rows): left on the
-- queue for SQS to redeliver and, in the end, move to the DLQ. Not part of `received`, which
-- counts what reached staging (received = staged + duplicates).
alter table loader.ingest_runs add column refused bigint not null default 0;
comment on column loader.ingest_runs.refused is
    'Messages PostgreSQL refused, left on the queue (not counted in received)';
