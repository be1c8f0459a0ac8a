-- V25: an online rebuild carries the outcomes whose staged message was deleted by hand a day at
-- a time. Never edit once merged: add V26.
--
-- One range (`carries`, the first cut) looked every outcome of user_logins and login_rejects up
-- in every partition of raw_logins, in one transaction holding a lock on each (at 10^9 rows,
-- about 45 minutes). Now (sql/35_rebuild.sql) `carries` marks the first range of each day
-- partition (and of the legacy one): it also carries its days' outcomes, read by staged_on and
-- looked up in that partition alone; `carries_rest` marks the first range of all, which
-- carries those of the days no such range holds (each looked up in its own partition, or the
-- default one) and those without staged_on (the legacy partition).
--
-- A rebuild copying across this migration: its carrying range carries the rest instead, and as
-- no range of that rebuild carries a day, the rest is every outcome but the dropped days' (as
-- before, in one transaction).
alter table loader.rebuild_ranges add column if not exists carries_rest boolean not null default false;
update loader.rebuild_ranges set carries_rest = carries, carries = false where carries;
