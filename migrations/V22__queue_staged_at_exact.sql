-- V22: loader.transform_queue.staged_at is the staged row's own time, always. Never edit once
-- merged: add V23.
--
-- A transform batch reads only the days between its rows' first and last staging time
-- (sql/30_transform.sql), so a row queued by hand must carry its real one: V21's default (the
-- time it was queued) would leave its staged row out of the batch. A trigger
-- (sql/15_staging.sql) now fills it from the staged row.
alter table loader.transform_queue alter column staged_at drop default;
