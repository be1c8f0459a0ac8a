-- The ingest role's only write path: register a run, stage messages into it, record its
-- deletes and end. Security definer, so loader_ingest needs no privilege on the tables: it
-- cannot set a server-owned column (id, staged_at, purged_at, ingest_run_id, registered_by) or
-- touch another run. Every call names its run by id and the token register_run returned, which
-- only the registering process knows (analysts cannot read ingest_runs.token).
--
-- What the server checks and what it takes on trust: the queue name a run is registered for
-- is the ingest process's claim (the server cannot see SQS), recorded beside the login that
-- made it (registered_by = session_user); counts can only grow, never past what the run
-- received; a refusal is recorded only by stage() itself, for a message handed to it in that
-- run, so the ingest role cannot write one for a message it did not stage.
--
-- Reruns cleanly: psql -v ON_ERROR_STOP=1 -f sql/15_staging.sql (applied by `loader migrate`).
--
--   select * from loader.register_run('login-queue', 'drain', '0.1.0');   -- run_id, run_token
--   select * from loader.stage(run_id, run_token, ids, bodies, is_json, sent_at, receive_counts,
--                              copies);                                   -- staged, refused_ids

-- The transform's work list is fed by a statement trigger: the ids of newly staged rows are
-- queued in the same transaction, so they appear exactly when the rows do (why a list and not
-- a high-water mark: migrations/V2__transform_queue.sql, which created both). Runs as its
-- owner, so the ingest role needs no rights on the work list.
create or replace function loader._queue_staged_rows() returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    insert into loader.transform_queue (raw_id, staged_at) select s.id, s.staged_at from staged s;
    return null;
end
$$;
comment on function loader._queue_staged_rows() is
    'Trigger: queue newly staged raw_logins rows for the transform (same transaction)';

create or replace trigger raw_logins_queue_for_transform
    after insert on loader.raw_logins
    referencing new table as staged
    for each statement execute function loader._queue_staged_rows();

-- A row queued by hand (`insert into loader.transform_queue (raw_id) ...`, as the owner) gets its
-- staged row's time: a transform batch reads only the days between its rows' first and last
-- (sql/30_transform.sql). The staging trigger above sets it itself, so this one never fires
-- for staging.
create or replace function loader._queue_row_staged_at() returns trigger
language plpgsql set search_path = pg_catalog, pg_temp as $$
begin
    new.staged_at := (select r.staged_at from loader.raw_logins r where r.id = new.raw_id);
    return new;
end
$$;
comment on function loader._queue_row_staged_at() is
    'Trigger: a row queued by hand gets the staging time of its staged row';

create or replace trigger transform_queue_staged_at
    before insert on loader.transform_queue
    for each row when (new.staged_at is null) execute function loader._queue_row_staged_at();

-- register_run: a new open run for `queue`; returns its id and its token.
-- Each argument is checked first, so a bad one is a clear error, never a failing row quoted
-- back in a constraint's DETAIL.
create or replace function loader.register_run(
    queue text, mode text, loader_version text, out run_id bigint, out run_token text)
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
#variable_conflict use_variable
begin
    if queue is null or btrim(queue) = '' or char_length(queue) > 256 then
        raise exception 'register_run: a queue name of 1 to 256 characters'
            using errcode = 'invalid_parameter_value';
    end if;
    if mode is null or mode not in ('drain', 'follow', 'lambda') then
        raise exception 'register_run: mode is drain, follow or lambda'
            using errcode = 'invalid_parameter_value';
    end if;
    if loader_version is null or char_length(loader_version) > 64 then
        raise exception 'register_run: a loader version of at most 64 characters'
            using errcode = 'invalid_parameter_value';
    end if;
    insert into loader.ingest_runs
        (queue, mode, loader_version, started_at, registered_by, last_seen_at)
    values (queue, mode, loader_version, clock_timestamp(), session_user, clock_timestamp())
    returning id, token into run_id, run_token;
end
$$;
comment on function loader.register_run(text, text, text) is
    'Register an ingest run; returns (run_id, run_token) for the calls that stage into it';

-- _insert_staged: the set-based insert of stage(), one entry per distinct message_id; returns
-- the rows newly staged. A body is stored as jsonb when `is_json`, else as a JSON string of its
-- exact text. Private (owner only): stage() calls it after checking the run.
--
-- Idempotency (docs/decisions.md "Staging by day"): a message id is new when no generation of
-- loader.staged_ids holds it and the legacy partition (rows staged before the cutover, whose
-- own unique index keeps their ids; a view of the whole table until it is partitioned) has
-- no row of it: named directly, so a staging locks those two and the partition it writes to,
-- never every day's; the insert into the current generation, ON CONFLICT
-- on its unique index, decides between two copies staged at once (the second waits for the
-- first to commit, and stages nothing). Reading the current generation takes the lock on
-- loader.staged_id_generations that a switch to the next one waits for, so every id of an
-- older generation is committed when a stager reads it.
create or replace function loader._insert_staged(
    run_id bigint, stamp timestamptz, message_ids text[], bodies text[], is_json boolean[],
    sent_at timestamptz[], receive_counts integer[]) returns bigint
language plpgsql volatile set search_path = pg_catalog, pg_temp as $$
declare
    new_ids text[];
    inserted bigint;
begin
    -- No current generation (an owner's slip) is a NULL generation: the insert fails, and
    -- stage() refuses the messages (left on the queue), never counts them as duplicates.
    with ids as (
        insert into loader.staged_ids (message_id, generation)
        select u.m, (select g.generation from loader.staged_id_generations g where g.ended_at is null)
          from unnest(message_ids) as u(m)
         where not exists (select from loader.staged_ids i where i.message_id = u.m)
           and not exists (select from loader.raw_logins_legacy l where l.message_id = u.m)
        on conflict (message_id, generation) do nothing
        returning message_id
    )
    select coalesce(array_agg(ids.message_id), '{}') into new_ids from ids;
    if cardinality(new_ids) = 0 then
        return 0;
    end if;
    -- The new ones only: the list is a constant of this one-shot plan, looked up in a hash
    -- table (a join with the ids just inserted went row by row through both lists).
    execute $q$
        insert into loader.raw_logins
            (message_id, body, body_is_json, sent_at, receive_count, queue, ingest_run_id,
             staged_at)
        select m.message_id,
               case when m.is_json then m.body::jsonb else to_jsonb(m.body) end,
               m.is_json, m.sent_at, m.receive_count,
               (select r.queue from loader.ingest_runs r where r.id = $6), $6, $7
          from unnest($1, $2, $3, $4, $5) as m(message_id, body, is_json, sent_at, receive_count)
         where m.message_id = any ($8)
    $q$ using message_ids, bodies, is_json, sent_at, receive_counts, run_id, stamp, new_ids;
    get diagnostics inserted = row_count;
    return inserted;
end
$$;
comment on function loader._insert_staged(bigint, timestamptz, text[], text[], boolean[], timestamptz[], integer[]) is
    'Private: the set-based insert of loader.stage';
-- stage: one batch of messages (column arrays, one entry per distinct message_id; `copies`
-- says how many copies of each the caller received) into loader.raw_logins, idempotent on
-- message_id, with the run's counters in the same transaction. Returns how many rows were new
-- and the ids PostgreSQL refused (leave those on the queue).
--
-- Nothing a producer sends makes it raise, and no error it catches reaches the caller or the
-- server log (a caught error is never reported): when the one statement fails on its rows
-- (class 22 or 23, or a trigger's raise), each message is staged on its own. A body jsonb
-- refuses though the client judged it JSON (say a number beyond numeric's range) is then
-- kept as text; a message whose row is still refused (a constraint, a trigger) is recorded in
-- loader.refusals (SQLSTATE and constraint or table, never the message or detail, which can
-- quote the row) and counted apart from received. When every one of several messages is
-- refused and some are on their first delivery, the fault is the table's (a broken trigger, a
-- rule that fits nothing), not the messages': it raises instead, naming the code, and nothing
-- is recorded. Redelivered messages refused together are the usual poison messages on their way
-- to the DLQ, and are recorded. Refuses (42501) a run that is unknown, finished, or not the
-- caller's (_check_run). staged_at is the time of this call, not of the caller's transaction
-- start, so a transaction held open cannot back-date it; sent_at is bounded (below). The run
-- remembers the transaction, which then cannot transform (transform_batch).
create or replace function loader.stage(
    run_id bigint, run_token text, message_ids text[], bodies text[], is_json boolean[],
    sent_at timestamptz[], receive_counts integer[], copies integer[],
    out staged bigint, out refused_ids text[])
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
#variable_conflict use_variable
declare
    stamp timestamptz := clock_timestamp();
    n integer := cardinality(message_ids);
    all_copies bigint;
    newest timestamptz;
    oldest timestamptz;
    oversized text[] := '{}';
    received bigint;
    replaced bigint := 0;
    refused_copies bigint := 0;
    one bigint;
    code text;
    named text;
    first_code text;
    first_named text;
begin
    if cardinality(bodies) is distinct from n or cardinality(is_json) is distinct from n
       or cardinality(sent_at) is distinct from n or cardinality(receive_counts) is distinct from n
       or cardinality(copies) is distinct from n then
        raise exception 'stage: the column arrays must have one entry per message'
            using errcode = 'invalid_parameter_value';
    end if;
    if exists (select from unnest(copies) c where c is null or c < 1) then
        raise exception 'stage: every message has at least one copy'
            using errcode = 'invalid_parameter_value';
    end if;
    if n <> (select count(distinct m) from unnest(message_ids) m) then
        raise exception 'stage: message ids must be distinct (count copies in `copies`)'
            using errcode = 'invalid_parameter_value';
    end if;
    -- Idempotency needs each lookup to see every id committed before it (the switch of
    -- loader.staged_ids' generation makes it wait for one in flight). A snapshot taken earlier
    -- (REPEATABLE READ, SERIALIZABLE) would miss an id staged in the new generation meanwhile
    -- and stage the message again.
    perform loader._read_committed('stage');
    perform loader._check_run(run_id, run_token);
    -- The server owns sent_at: below the owner, a SentTimestamp in the future (beyond a minute of
    -- clock skew) or older than a message can live on SQS (sent_at_max_age_days, default 28:
    -- 14 days on a queue, and as long again after a FIFO dead-letter queue restarted the clock)
    -- is replaced by the staging time, and counted in the run (sent_at_replaced).
    if not loader._caller_is_owner() then
        -- The bounds once, as values: read per element, the setting cost a query per row.
        newest := stamp + interval '1 minute';
        oldest := stamp - make_interval(days => loader._setting_int('sent_at_max_age_days', 28));
        replaced := (select count(*) from unnest(sent_at) t where t > newest or t < oldest);
        if replaced > 0 then
            sent_at := array(select case when t > newest or t < oldest then stamp else t end
                               from unnest(sent_at) with ordinality as u (t, n) order by u.n);
        end if;
    end if;
    all_copies := coalesce((select sum(c) from unnest(copies) c), 0);
    -- No SQS message is larger than 1 MiB: a bigger body is refused (recorded, left on the
    -- queue), so no caller makes the transform or an erasure's search work through more than
    -- SQS could ever deliver.
    select coalesce(array_agg(u.m order by u.o), '{}'), coalesce(sum(u.c), 0)
      into oversized, refused_copies
      from unnest(message_ids, bodies, copies) with ordinality as u (m, b, c, o)
     where octet_length(u.b) > 1048576;
    if cardinality(oversized) > 0 then
        insert into loader.refusals (message_id, sqlstate, constraint_name, ingest_run_id)
        select m, '54000', 'body_size', run_id from unnest(oversized) m;
        select coalesce(array_agg(u.m order by u.o), '{}'), coalesce(array_agg(u.b order by u.o), '{}'),
               coalesce(array_agg(u.j order by u.o), '{}'), coalesce(array_agg(u.s order by u.o), '{}'),
               coalesce(array_agg(u.r order by u.o), '{}'), coalesce(array_agg(u.c order by u.o), '{}')
          into message_ids, bodies, is_json, sent_at, receive_counts, copies
          from unnest(message_ids, bodies, is_json, sent_at, receive_counts, copies)
                   with ordinality as u (m, b, j, s, r, c, o)
         where octet_length(u.b) <= 1048576 or u.b is null;
        n := cardinality(message_ids);
    end if;
    refused_ids := '{}';
    begin
        staged := loader._insert_staged(run_id, stamp, message_ids, bodies, is_json, sent_at,
                                        receive_counts);
    exception when data_exception or integrity_constraint_violation or raise_exception then
        staged := 0;
        for i in 1 .. n loop
            code := null;
            begin
                one := loader._insert_staged(run_id, stamp, message_ids[i:i], bodies[i:i],
                                             is_json[i:i], sent_at[i:i], receive_counts[i:i]);
            exception
                when data_exception then
                    if is_json[i] then
                        -- jsonb refused the body: keep it as the text it is.
                        begin
                            one := loader._insert_staged(run_id, stamp, message_ids[i:i],
                                       bodies[i:i], array[false], sent_at[i:i],
                                       receive_counts[i:i]);
                        exception when data_exception or integrity_constraint_violation
                                       or raise_exception then
                            get stacked diagnostics code = returned_sqlstate,
                                named = constraint_name;
                            if named = '' then
                                get stacked diagnostics named = table_name;
                            end if;
                        end;
                    else
                        get stacked diagnostics code = returned_sqlstate, named = constraint_name;
                        if named = '' then
                            get stacked diagnostics named = table_name;
                        end if;
                    end if;
                when integrity_constraint_violation or raise_exception then
                    get stacked diagnostics code = returned_sqlstate, named = constraint_name;
                    if named = '' then
                        get stacked diagnostics named = table_name;
                    end if;
            end;
            if code is null then
                staged := staged + one;
            else
                first_code := coalesce(first_code, code);
                first_named := coalesce(first_named, nullif(named, ''));
                refused_ids := refused_ids || message_ids[i];
                refused_copies := refused_copies + copies[i];
                insert into loader.refusals (message_id, sqlstate, constraint_name, ingest_run_id)
                values (message_ids[i], left(code, 5), left(nullif(named, ''), 63), run_id);
            end if;
        end loop;
        if n > 1 and cardinality(refused_ids) = n
           and exists (select from unnest(receive_counts) c where c is null or c <= 1) then
            raise exception 'PostgreSQL refuses every message of this batch, one by one too (SQLSTATE %, %): a fault of the table or a trigger, not of the messages',
                first_code, coalesce(first_named, 'no constraint named')
                using errcode = first_code;
        end if;
    end;
    refused_ids := oversized || refused_ids;
    received := all_copies - refused_copies;
    update loader.ingest_runs r
       set received = r.received + received,
           staged = r.staged + staged,
           duplicates = r.duplicates + received - staged,
           refused = r.refused + refused_copies,
           sent_at_replaced = r.sent_at_replaced + replaced,
           last_stage_xact = pg_current_xact_id(),
           last_seen_at = clock_timestamp()
     where r.id = run_id;
end
$$;
comment on function loader.stage(bigint, text, text[], text[], boolean[], timestamptz[], integer[], integer[]) is
    'Stage a batch of SQS messages into the caller''s run; returns (staged, refused_ids)';

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
comment on function loader._check_run(bigint, text) is 'Private: refuse a run that is not open or not the caller''s';

-- record_deletes: add a flush's deletes and delete failures to the caller's run. Neither may be
-- negative, and a run cannot delete more copies than it received.
create or replace function loader.record_deletes(
    run_id bigint, run_token text, deleted bigint, delete_failures bigint) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
#variable_conflict use_variable
begin
    perform loader._check_run(run_id, run_token);
    if deleted is null or delete_failures is null or deleted < 0 or delete_failures < 0 then
        raise exception 'record_deletes: counts are never negative (got %, %)', deleted, delete_failures
            using errcode = 'invalid_parameter_value';
    end if;
    update loader.ingest_runs r
       set deleted = r.deleted + deleted, delete_failures = r.delete_failures + delete_failures,
           last_seen_at = clock_timestamp()
     where r.id = run_id
       and r.deleted + deleted + r.delete_failures + delete_failures <= r.received;
    if not found then
        raise exception 'record_deletes: run % would have deleted more messages than it received', run_id
            using errcode = 'invalid_parameter_value';
    end if;
end
$$;
comment on function loader.record_deletes(bigint, text, bigint, bigint) is
    'Add deleted messages and delete failures to the caller''s ingest run';

-- finish_run: mark the caller's run finished, and whether it stopped on an error (its deleted
-- counter may then be short: V15); later calls with its token are refused.
create or replace function loader.finish_run(
    run_id bigint, run_token text, stopped_on_error boolean default false) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
#variable_conflict use_variable
begin
    perform loader._check_run(run_id, run_token);
    update loader.ingest_runs r
       set finished_at = clock_timestamp(), stopped_on_error = coalesce(stopped_on_error, false),
           last_seen_at = clock_timestamp()
     where r.id = run_id;
end
$$;
comment on function loader.finish_run(bigint, text, boolean) is
    'Mark the caller''s ingest run finished (and whether it stopped on an error)';

-- heartbeat: the caller's run is alive (called every minute while it idles, so a run whose
-- process died is told apart from one waiting on an empty queue: ingest_runs.last_seen_at).
create or replace function loader.heartbeat(run_id bigint, run_token text) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
#variable_conflict use_variable
begin
    perform loader._check_run(run_id, run_token);
    update loader.ingest_runs r set last_seen_at = clock_timestamp() where r.id = run_id;
end
$$;
comment on function loader.heartbeat(bigint, text) is
    'The caller''s ingest run is alive (ingest_runs.last_seen_at)';
