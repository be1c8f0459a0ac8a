-- Finding rows by time at 10^8-10^9 rows, without reading the whole table:
-- - batched retention (sql/40_retention.sql) walks the bodies not yet purged in staged_at
--   order: a partial index, as small as the retention window (purged rows leave it);
-- - scoped reconcile (`loader reconcile --since`) reads one time window of each table: BRIN
--   indexes (a few pages per million rows; rows arrive in time order, so each block range
--   covers a narrow span of time).
-- On a large existing table, create them beforehand with CREATE INDEX CONCURRENTLY under the
-- same names: migrate then finds them and only checks (README "Transform at scale").
create index if not exists raw_logins_unpurged_staged_at
    on loader.raw_logins (staged_at) where purged_at is null;
create index if not exists raw_logins_staged_at_brin on loader.raw_logins using brin (staged_at);
create index if not exists login_rejects_rejected_at_brin
    on loader.login_rejects using brin (rejected_at);
create index if not exists user_logins_loaded_at_brin on public.user_logins using brin (loaded_at);
