-- V2: the transform's work list. Never edit once merged: add V3.
--
-- Why a work list rather than a high-water mark over raw_logins.id: identity values are assigned
-- at INSERT but become visible at COMMIT, so a mark can pass a row that a slower ingest
-- transaction commits later, and that row would never be transformed. And an anti-join over all
-- of raw_logins costs more with every row ever staged. Instead, a statement trigger queues the
-- ids of newly staged rows in the same transaction (so they appear exactly when the rows do);
-- the transform claims them with FOR UPDATE SKIP LOCKED and deletes them as it writes outcomes.

create table loader.transform_queue (
    raw_id bigint not null constraint transform_queue_pkey primary key
);
comment on table loader.transform_queue is
    'Ids of staged rows that have no outcome yet (the transform''s work list)';

-- Runs as its owner, so the ingest role needs no rights on the work list.
create function loader._queue_staged_rows() returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    insert into loader.transform_queue (raw_id) select s.id from staged s;
    return null;
end
$$;
comment on function loader._queue_staged_rows() is
    'Trigger: queue newly staged raw_logins rows for the transform (same transaction)';

create trigger raw_logins_queue_for_transform
    after insert on loader.raw_logins
    referencing new table as staged
    for each statement execute function loader._queue_staged_rows();

-- Rows staged before this migration that have no outcome yet.
insert into loader.transform_queue (raw_id)
select r.id
  from loader.raw_logins r
 where not exists (select from public.user_logins u where u.message_id = r.message_id)
   and not exists (select from loader.login_rejects j where j.message_id = r.message_id);

grant select on loader.transform_queue to loader_analyst;
