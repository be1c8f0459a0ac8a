-- Retention for the staging table, which holds the only raw copy of personal data:
-- `loader.purge_staged()` (sql/40_retention.sql) replaces old bodies with JSON null and stamps
-- `purged_at`, keeping the row itself (message_id for idempotency, counts for reconcile).
alter table loader.raw_logins add column purged_at timestamptz;
comment on column loader.raw_logins.purged_at is
    'When the body was purged (replaced by JSON null); the outcome rows remain';
