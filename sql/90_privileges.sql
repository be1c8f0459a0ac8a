-- Who may do what: the README's "Roles" and "Security model" sections, in code.
--
-- Applied last by `loader migrate`, in the same transaction as every migration and every other
-- sql/ file, so no function or table is ever visible to another session before this file has
-- locked it down. Reruns cleanly in psql (as the owner):
--   psql -v ON_ERROR_STOP=1 -f sql/90_privileges.sql
--
-- It starts from nothing in schema loader and grants exactly what each role needs, so the
-- privileges converge to this file on every migrate; tests/privacy.rs asserts the result,
-- role by role, against the README's list.

-- Nothing in schema loader for PUBLIC or the loader roles but what is granted below.
revoke all on schema loader from public;
revoke all on all tables in schema loader from public, loader_ingest, loader_analyst;
revoke all on all sequences in schema loader from public, loader_ingest, loader_analyst;
revoke all on all routines in schema loader from public, loader_ingest, loader_analyst;
grant usage on schema loader to loader_ingest, loader_analyst;

-- loader_ingest: registers runs, stages raw messages into its own run and records its
-- counters, through sql/15_staging.sql only. No privilege on any table: it cannot read bodies
-- or set a column the server owns.
grant execute on function loader.register_run(text, text, text),
    loader.stage(bigint, text, text[], text[], boolean[], timestamptz[], integer[], bigint),
    loader.record_deletes(bigint, text, bigint, bigint),
    loader.record_refusals(bigint, text, text[], text[], text[]),
    loader.finish_run(bigint, text) to loader_ingest;

-- loader_analyst: reads the masked table, reject reasons and the bookkeeping (not the runs'
-- tokens), and runs the incremental transform. Never raw_logins, never the key table, never a
-- helper that hashes.
grant select on public.user_logins to loader_analyst;
grant select on loader.login_rejects, loader.transform_queue, loader.transform_state,
    loader.mask_key_info, loader.pipeline_status, loader.refusals to loader_analyst;
grant select (id, started_at, finished_at, queue, mode, received, staged, duplicates, deleted,
              delete_failures, loader_version, refused) on loader.ingest_runs to loader_analyst;
grant execute on function loader.transform_batch(integer, boolean) to loader_analyst;
grant execute on procedure loader.transform(bigint, bigint, bigint, integer, jsonb) to loader_analyst;

-- Every security-definer function runs with these settings pinned, whatever the calling
-- session set: a session could otherwise print the plans and parse trees of the statements
-- inside (debug_print_*, with client_min_messages routing LOG lines to itself) or have error
-- reports quote parameters. Pinned here, in one place, so a new definer function cannot miss
-- them; tests/privacy.rs checks each one has them.
do $$
declare
    f regprocedure;
begin
    for f in select p.oid from pg_catalog.pg_proc p
              where p.pronamespace = 'loader'::regnamespace and p.prosecdef
    loop
        execute format(
            'alter function %s set search_path = pg_catalog, pg_temp
                 set debug_print_parse = off set debug_print_rewritten = off
                 set debug_print_plan = off set client_min_messages = warning
                 set log_parameter_max_length_on_error = 0
                 set plpgsql.print_strict_params = off', f);
    end loop;
end
$$;

-- A trigger of someone else's that calls a function of schema loader runs it as the owner
-- (a security-definer trigger function ignores who fires it). Only triggers on loader's own
-- tables (in schema loader, where nobody else may create anything) may.
do $$
declare
    foreign_trigger text;
begin
    select format('%s on %s', t.tgname, t.tgrelid::regclass) into foreign_trigger
      from pg_catalog.pg_trigger t
      join pg_catalog.pg_proc p on p.oid = t.tgfoid
      join pg_catalog.pg_class c on c.oid = t.tgrelid
     where p.pronamespace = 'loader'::regnamespace
       and c.relnamespace <> 'loader'::regnamespace
     limit 1;
    if foreign_trigger is not null then
        raise exception 'trigger % calls a function of schema loader; drop it (it runs as the owner)',
            foreign_trigger;
    end if;
end
$$;
