-- V20: loader.raw_logins partitioned by UTC day of staged_at, and idempotency in a table of its
-- own (docs/decisions.md "Staging by day"). Never edit once merged: add V21.
--
-- This migration is quick on any table: it creates the ids tables and marks where the staged
-- rows end (a CHECK constraint NOT VALID, so nothing is scanned here). `loader migrate` then,
-- each in a command of its own (sql/16_partitions.sql, src/db/partitions.rs): validates the
-- constraint (a scan that takes no lock a writer or reader waits on), and in one short
-- transaction renames the table to loader.raw_logins_legacy and attaches it, rows and indexes
-- untouched, as the first partition of a new loader.raw_logins. Killed anywhere, the next
-- migrate goes on from where it stopped.

-- Which message ids were staged, for idempotency (raw_logins' partitions cannot hold a unique
-- index across them). In generations, so old ids end by dropping a table once no message that
-- could still be delivered can carry them. stage() reads the current generation under a lock
-- the switch to a new one waits for (sql/16_partitions.sql), so two copies of one message never
-- go to two generations.
create table loader.staged_id_generations (
    generation integer constraint staged_id_generations_pkey primary key,
    started_at timestamptz not null default now(),
    ended_at timestamptz
);
create unique index staged_id_generations_one_current
    on loader.staged_id_generations ((true)) where ended_at is null;
insert into loader.staged_id_generations (generation) values (1);

create table loader.staged_ids (
    message_id text not null,
    generation integer not null,
    constraint staged_ids_pkey primary key (message_id, generation)
) partition by list (generation);
create table loader.staged_ids_g1 partition of loader.staged_ids for values in (1);

-- Where the unpartitioned rows end: raw_logins_legacy's upper bound. Rows staged before it stay
-- in the legacy partition (their own unique message_id index is their idempotency); rows from
-- it on go to day partitions.
create table loader.staging_layout (
    singleton boolean not null default true constraint staging_layout_pkey primary key
        constraint staging_layout_singleton check (singleton),
    cutover timestamptz not null,
    partitioned_at timestamptz
);

-- The cutover is the UTC midnight at least a day away, so stagings go on into the old table
-- until `loader migrate` has attached it (seconds later; a migrate killed and not run again for
-- that long moves it: sql/16_partitions.sql).
do $$
declare
    cut timestamptz := date_trunc('day', now() at time zone 'UTC') at time zone 'UTC' + interval '2 days';
begin
    insert into loader.staging_layout (cutover) values (cut);
    execute format('alter table loader.raw_logins add constraint raw_logins_before_cutover
                    check (staged_at < %L) not valid', cut);
end
$$;

-- How many days ahead loader.create_staging_days makes partitions.
alter table loader.settings drop constraint settings_known;
alter table loader.settings add constraint settings_known check (
    name in ('reveal_max_messages', 'erasure_quarantine_days', 'sent_at_max_age_days',
             'evict_after_seconds', 'staging_days_ahead')
    and case when value !~ '^[0-9]{1,6}$' then false
             when name = 'reveal_max_messages' then value::integer between 1 and 100000
             when name = 'erasure_quarantine_days' then value::integer between 0 and 3650
             when name = 'sent_at_max_age_days' then value::integer between 14 and 3650
             when name = 'evict_after_seconds' then value::integer between 1 and 86400
             when name = 'staging_days_ahead' then value::integer between 1 and 366
        end);
insert into loader.settings (name, value) values ('staging_days_ahead', '14');
