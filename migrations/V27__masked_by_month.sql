-- V27: public.user_logins partitioned by month of create_date (docs/decisions.md "Masked data
-- by month"). Never edit once merged: add V28.
--
-- Quick on any table, like V20: it records where the unpartitioned rows end (the first day of
-- the month after next: the transform writes create_date up to today, so no row can reach it
-- before the move) and marks it with a CHECK constraint NOT VALID (nothing scanned here).
-- `loader migrate` then, each in a command of its own (sql/17_masked_partitions.sql,
-- src/db/migrate.rs): validates the constraint (a scan under a lock no writer or reader waits
-- on), and in one short transaction moves the table, rows and indexes untouched, to
-- loader.user_logins_legacy, the DEFAULT partition of a new partitioned public.user_logins,
-- with a partition per month from the cutover on. Killed anywhere, the next migrate goes on.
-- The constraint stays on the legacy partition: it proves, without a scan, that a new month
-- (or a rotation's copy of one) holds nothing the legacy partition does.
create table loader.masked_layout (
    singleton boolean not null default true constraint masked_layout_pkey primary key
        constraint masked_layout_singleton check (singleton),
    cutover date,
    partitioned_at timestamptz
);

do $$
declare
    cut date := (date_trunc('month', now() at time zone 'UTC') + interval '2 months')::date;
begin
    insert into loader.masked_layout (cutover) values (cut);
    execute format('alter table public.user_logins add constraint user_logins_before_cutover
                    check (create_date < %L) not valid', cut);
end
$$;

-- A rotation copies only the months that may hold rows it re-masks (docs/operating.md
-- "Rebuild"): the first day of the first month it copies (NULL: the whole table, as before).
alter table loader.rebuilds add column copy_from date;
