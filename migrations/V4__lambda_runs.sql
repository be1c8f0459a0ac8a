-- Ingest runs of the Lambda handler (`loader-lambda`): one per execution environment and queue.
-- Lambda's event source mapping deletes the messages, so their `deleted` counter stays 0, and
-- they never finish (environments are retired without notice).
alter table loader.ingest_runs drop constraint ingest_runs_mode_check;
alter table loader.ingest_runs
    add constraint ingest_runs_mode_check check (mode in ('drain', 'follow', 'lambda'));
