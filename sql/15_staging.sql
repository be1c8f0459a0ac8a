-- The ingest role's only write path: register a run, stage messages into it, record its
-- deletes, refusals and end. Security definer, so loader_ingest needs no privilege on the
-- tables: it cannot set a server-owned column (id, staged_at, purged_at, queue, ingest_run_id)
-- or touch another run. Every call names its run by id and the token register_run returned,
-- which only the registering process knows (analysts cannot read ingest_runs.token).
--
-- Reruns cleanly: psql -v ON_ERROR_STOP=1 -f sql/15_staging.sql (applied by `loader migrate`).
--
--   select * from loader.register_run('login-queue', 'drain', '0.1.0');   -- run_id, run_token
--   select loader.stage(run_id, run_token, ids, bodies, is_json, sent_at, receive_counts, received);

-- register_run: a new open run for `queue`; returns its id and its token.
create or replace function loader.register_run(
    queue text, mode text, loader_version text, out run_id bigint, out run_token text)
language sql security definer set search_path = pg_catalog, pg_temp as $$
    insert into loader.ingest_runs (queue, mode, loader_version)
    values (queue, mode, loader_version)
    returning id, token
$$;
comment on function loader.register_run(text, text, text) is
    'Register an ingest run; returns (run_id, run_token) for the calls that stage into it';

-- stage: one batch of messages (column arrays, one entry per distinct message_id) into
-- loader.raw_logins, idempotent on message_id, with the run's counters in the same statement
-- (received counts every copy handed in, so received - staged = duplicates). A body is stored
-- as jsonb when `is_json`, else as a JSON string of its exact text. Returns the rows newly
-- staged. Refuses (42501) a run that is unknown, finished, or not the caller's (_check_run).
create or replace function loader.stage(
    run_id bigint, run_token text, message_ids text[], bodies text[], is_json boolean[],
    sent_at timestamptz[], receive_counts integer[], received bigint)
returns bigint
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
#variable_conflict use_variable
declare
    staged bigint;
begin
    if received < cardinality(message_ids) then
        raise exception 'received (%) is less than the % distinct messages handed in',
            received, cardinality(message_ids) using errcode = 'invalid_parameter_value';
    end if;
    perform loader._check_run(run_id, run_token);
    with inserted as (
        insert into loader.raw_logins
            (message_id, body, body_is_json, sent_at, receive_count, queue, ingest_run_id)
        select m.message_id,
               case when m.is_json then m.body::jsonb else to_jsonb(m.body) end,
               m.is_json, m.sent_at, m.receive_count,
               (select r.queue from loader.ingest_runs r where r.id = run_id), run_id
          from unnest(message_ids, bodies, is_json, sent_at, receive_counts)
                   as m(message_id, body, is_json, sent_at, receive_count)
        on conflict (message_id) do nothing
        returning 1
    ), counted as (
        update loader.ingest_runs r
           set received = r.received + received,
               staged = r.staged + (select count(*) from inserted),
               duplicates = r.duplicates + received - (select count(*) from inserted)
         where r.id = run_id
    )
    select count(*) into staged from inserted;
    return staged;
end
$$;
comment on function loader.stage(bigint, text, text[], text[], boolean[], timestamptz[], integer[], bigint) is
    'Stage a batch of SQS messages into the caller''s run; returns how many were new';

-- _check_run: private check that run_id is open and run_token is its token (locks the run row,
-- which the caller updates next anyway).
create or replace function loader._check_run(run_id bigint, run_token text) returns void
language plpgsql as $$
begin
    perform from loader.ingest_runs r
     where r.id = run_id and r.token = run_token and r.finished_at is null for update;
    if not found then
        raise exception 'ingest run % is not open, or its token does not match', run_id
            using errcode = 'insufficient_privilege';
    end if;
end
$$;

-- record_deletes: add a flush's deletes and delete failures to the caller's run.
create or replace function loader.record_deletes(
    run_id bigint, run_token text, deleted bigint, delete_failures bigint) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
#variable_conflict use_variable
begin
    perform loader._check_run(run_id, run_token);
    update loader.ingest_runs r
       set deleted = r.deleted + deleted, delete_failures = r.delete_failures + delete_failures
     where r.id = run_id;
end
$$;
comment on function loader.record_deletes(bigint, text, bigint, bigint) is
    'Add deleted messages and delete failures to the caller''s ingest run';

-- record_refusals: the messages PostgreSQL refused to stage (left on the queue), into the ledger
-- loader.refusals and the run's refused counter, in one statement. Codes only, never values.
drop function if exists loader.record_refused(bigint, text, bigint);
create or replace function loader.record_refusals(
    run_id bigint, run_token text, message_ids text[], sqlstates text[], constraint_names text[])
returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
#variable_conflict use_variable
begin
    perform loader._check_run(run_id, run_token);
    if cardinality(message_ids) is distinct from cardinality(sqlstates)
       or cardinality(message_ids) is distinct from cardinality(constraint_names) then
        raise exception 'record_refusals: the three arrays must have one entry per message'
            using errcode = 'invalid_parameter_value';
    end if;
    insert into loader.refusals (message_id, sqlstate, constraint_name, ingest_run_id)
    select m, left(s, 5), left(c, 63), run_id
      from unnest(message_ids, sqlstates, constraint_names) as u (m, s, c);
    update loader.ingest_runs r set refused = r.refused + cardinality(message_ids)
     where r.id = run_id;
end
$$;
comment on function loader.record_refusals(bigint, text, text[], text[], text[]) is
    'Record messages PostgreSQL refused (left on the queue) in loader.refusals and the caller''s run';

-- finish_run: mark the caller's run finished; later calls with its token are refused.
create or replace function loader.finish_run(run_id bigint, run_token text) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
#variable_conflict use_variable
begin
    perform loader._check_run(run_id, run_token);
    update loader.ingest_runs r set finished_at = now() where r.id = run_id;
end
$$;
comment on function loader.finish_run(bigint, text) is 'Mark the caller''s ingest run finished';
