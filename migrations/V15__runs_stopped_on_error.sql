-- V15: an ingest run that stopped on an error says so. Never edit once merged: add V16.
--
-- A run is finished also when it stops on an error (so its row shows when it stopped), and the
-- error can come after SQS deleted a flush's messages but before the run recorded it (the
-- database went away): its deleted counter is then short of what it staged although nothing was
-- lost. Such a run is marked, and reconcile does not hold it to deleted = staged + duplicates
-- (it lists it, as it lists unfinished runs: what it did not delete comes back as duplicates).
alter table loader.ingest_runs add column stopped_on_error boolean not null default false;
comment on column loader.ingest_runs.stopped_on_error is
    'The run stopped on an error: its deleted counter may be short of what it deleted';
