-- V8: nothing a role below the owner does can stall the pipeline. Never edit once merged.
--
-- 1. Rebuild, key rotation and purge serialise on an owner-only table's lock instead of a
--    public advisory lock key (any role that can connect may take any advisory key); the
--    incremental transform takes no such lock at all.
-- 2. The single transform_state row that every batch updated (so one open transaction holding
--    a batch blocked every other batch) becomes eight slots that a batch updates only when one
--    is free (SKIP LOCKED); transform_state is now a view over them, with the same columns.
-- 3. A batch leaves a ticket naming the key it masked with; a deferred check at COMMIT refuses
--    the batch when that key was retired meanwhile, so a batch that an open transaction held
--    across a key rotation cannot add rows masked with the old key.

create table loader.maintenance_lock ();
comment on table loader.maintenance_lock is
    'Locked (exclusive) by rebuild, key rotation and purge, so they never overlap; owner only';

create table loader.transform_progress (
    slot smallint not null constraint transform_progress_pkey primary key
        constraint transform_progress_slot_check check (slot between 0 and 7),
    last_drained_at timestamptz,
    batches bigint not null default 0
);
insert into loader.transform_progress (slot, last_drained_at, batches)
select 0, last_drained_at, batches from loader.transform_state;
insert into loader.transform_progress (slot) select generate_series(1, 7);
drop table loader.transform_state;
create view loader.transform_state as
select max(p.last_drained_at) as last_drained_at, sum(p.batches)::bigint as batches
  from loader.transform_progress p;

create table loader.batch_keys (
    id bigint generated always as identity constraint batch_keys_pkey primary key,
    key_id integer not null,
    -- true: the first firing of the check, which only re-queues it (see _confirm_batch_key)
    armed boolean not null default true
);
comment on table loader.batch_keys is
    'Tickets: the key each uncommitted transform batch masked with, checked at COMMIT';
