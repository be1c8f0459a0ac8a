-- V24: an online rebuild's ranges by day of staging. Never edit once merged: add V25.
--
-- loader.rebuild_start (sql/35_rebuild.sql) cut raw_logins' ids 1..max into ranges, each of which
-- read (and locked) every partition of raw_logins, and one range carried, in one transaction,
-- every outcome whose staged message was gone: after retention, the outcomes of every dropped
-- day, most of user_logins. Now each partition's ids are cut into ranges of their own (`part`,
-- with the staging times that partition holds, so a range reads one day), and each day retention
-- dropped is a range of its own (`dropped_day`: its outcomes, found by staged_on, kept as they
-- are). Two partitions' ids may interleave (a staging that began before midnight commits after
-- it), so two ranges may start at the same id: the key is a range id of its own. The range that
-- carries the outcomes whose staged message is gone otherwise was the one starting at id 1; it
-- is marked (`carries`).
alter table loader.rebuild_ranges
    drop constraint rebuild_ranges_pkey,
    add column id bigint generated always as identity constraint rebuild_ranges_pkey primary key,
    add column part text,
    add column staged_from timestamptz,
    add column staged_to timestamptz,
    add column dropped_day date,
    add column carries boolean not null default false;
update loader.rebuild_ranges set carries = (lo = 1);
create index rebuild_ranges_rebuild_lo on loader.rebuild_ranges (rebuild_id, lo);

-- A rebuild copying across this migration goes on with its ranges as they were cut (no part:
-- every partition read, as before); its carrying range now leaves the dropped days' outcomes to
-- ranges of their own, added here (an empty id range: 0 to -1).
insert into loader.rebuild_ranges (rebuild_id, lo, hi, dropped_day)
select b.id, 0, -1, d.day
  from loader.rebuilds b cross join loader.staged_days d
 where b.state = 'copying';
