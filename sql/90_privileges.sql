-- Who may do what: docs/security.md ("Roles" and the security model), in code.
--
-- Applied last by `loader migrate`, in the same transaction as every migration and every other
-- sql/ file, so no function or table is ever visible to another session before this file has
-- locked it down. Reruns cleanly in psql (as the owner):
--   psql -v ON_ERROR_STOP=1 -f sql/90_privileges.sql
--
-- It starts from nothing in schema loader and grants exactly what each role needs, so the
-- privileges converge to this file on every migrate; tests/privacy.rs asserts the result,
-- role by role, against docs/security.md's list.

-- Nothing in schema loader for PUBLIC or the loader roles but what is granted below.
revoke all on schema loader from public;
revoke all on all tables in schema loader from public, loader_ingest, loader_analyst, loader_pii_reader,
    loader_transformer;
revoke all on all sequences in schema loader from public, loader_ingest, loader_analyst, loader_pii_reader,
    loader_transformer;
revoke all on all routines in schema loader from public, loader_ingest, loader_analyst, loader_pii_reader,
    loader_transformer;
grant usage on schema loader to loader_ingest, loader_analyst, loader_pii_reader, loader_transformer;

-- loader_ingest: registers runs, stages raw messages into its own run and records its
-- counters, through sql/15_staging.sql only. No privilege on any table: it cannot read bodies
-- or set a column the server owns.
grant execute on function loader.register_run(text, text, text),
    loader.stage(bigint, text, text[], text[], boolean[], timestamptz[], integer[], integer[]),
    loader.record_deletes(bigint, text, bigint, bigint),
    loader.finish_run(bigint, text, boolean), loader.heartbeat(bigint, text) to loader_ingest;

-- loader_analyst: reads the masked table, reject reasons and the bookkeeping (not the runs'
-- tokens), and runs the incremental transform. Never raw_logins, never the key table, never a
-- helper that hashes.
grant select on public.user_logins to loader_analyst;
grant select on loader.login_rejects, loader.transform_queue, loader.transform_state,
    loader.mask_key_info, loader.pipeline_status, loader.refusals, loader.mask_expiries to loader_analyst;
grant select (id, started_at, finished_at, queue, mode, received, staged, duplicates, deleted,
              delete_failures, loader_version, refused, registered_by, stopped_on_error,
              sent_at_replaced)
    on loader.ingest_runs to loader_analyst;
grant execute on function loader.transform_batch(integer, boolean) to loader_analyst;
grant execute on procedure loader.transform(bigint, bigint, bigint, integer, jsonb) to loader_analyst;

-- loader_transformer: runs the incremental transform and reads nothing it produces (no mask,
-- no outcome, no reject reason; only the pipeline's counts): the role beside loader_ingest for
-- a login that stages and transforms (loader run, the Lambda handler), so that no documented
-- login both chooses an input and sees what became of it (docs/security.md).
grant execute on function loader.transform_batch(integer, boolean) to loader_transformer;
grant execute on procedure loader.transform(bigint, bigint, bigint, integer, jsonb) to loader_transformer;
grant select on loader.pipeline_status to loader_transformer;

-- loader_pii_reader: the audited read of raw ip and device id (sql/44_reveal.sql), and nothing
-- else: no table, no key, no function that hashes.
grant execute on procedure loader.reveal(text[], text, jsonb) to loader_pii_reader;
grant execute on function loader._reveal_log(text[], text), loader._reveal_read(bigint)
    to loader_pii_reader;

-- _settings_policy: what every security-definer function does with each setting a session may
-- change (pg_settings context 'user', and the plpgsql.* ones): the value it pins (`pin`), or why
-- it needs none. A definer function's body is parsed, planned and evaluated under the calling
-- session's settings, so a caller could otherwise change what it means (with
-- standard_conforming_strings off, '\.' in a pattern is any character), what its casts accept
-- (DateStyle, IntervalStyle, TimeZone, array_nulls), what it prints (debug_print_*,
-- client_min_messages routing LOG lines to the caller) or how its errors quote parameters.
-- `name` is a LIKE pattern. tests/it/privacy.rs and `loader doctor` fail when the server has a
-- user-settable setting this does not classify (a new PostgreSQL or extension), and when a
-- definer function lacks a pin; the pins are applied below, in one place, so a new function
-- cannot miss them. Values are the server defaults where a default is harmless.
create or replace function loader._settings_policy()
returns table (name text, pin text, why text)
language sql immutable as $$
    select * from (values
        -- What a body means when parsed, and what its casts and comparisons accept.
        ('search_path', 'pg_catalog, pg_temp', 'names resolve to loader''s objects only'),
        ('standard_conforming_strings', 'on', 'string literals: backslashes are literal'),
        ('backslash_quote', 'safe_encoding', 'string literals'),
        ('escape_string_warning', 'on', 'string literals'),
        ('array_nulls', 'on', 'array literals'),
        ('transform_null_equals', 'off', 'comparisons with NULL'),
        ('DateStyle', 'ISO, MDY', 'date and time input and output'),
        ('IntervalStyle', 'postgres', 'interval input and output'),
        ('TimeZone', 'UTC', 'time zone of timestamptz arithmetic and text'),
        ('timezone_abbreviations', 'Default', 'time zone abbreviations in input'),
        ('extra_float_digits', '1', 'float output'),
        ('bytea_output', 'hex', 'bytea output'),
        ('xmlbinary', 'base64', 'xml output'),
        ('xmloption', 'content', 'xml input'),
        ('lc_monetary', 'C', 'money and to_char'),
        ('lc_numeric', 'C', 'to_char'),
        ('lc_time', 'C', 'to_char'),
        ('default_text_search_config', 'pg_catalog.simple', 'text search'),
        ('quote_all_identifiers', 'off', 'quote_ident and format(%I) output'),
        ('gin_fuzzy_search_limit', '0', 'GIN results would be cut short'),
        ('synchronize_seqscans', 'on', 'the order of unordered scans'),
        ('row_security', 'on', 'row security applies to the owner''s queries as written'),
        ('restrict_nonsystem_relation_kind', '', 'views and foreign tables stay usable'),
        ('default_table_access_method', 'heap', 'tables the rebuild creates'),
        ('default_tablespace', '', 'tables the rebuild creates'),
        ('temp_tablespaces', '', 'where sorts spill'),
        ('exit_on_error', 'off', 'errors caught inside the functions stay caught'),
        ('force_parallel_mode', 'off', 'error CONTEXT lines and parallel safety'),
        ('plan_cache_mode', 'auto', 'plans of the statements inside'),
        ('jit', 'off', 'no JIT compilation of per-batch statements'),
        ('plpgsql.extra_warnings', 'none', 'PL/pgSQL compilation'),
        ('plpgsql.extra_errors', 'none', 'PL/pgSQL compilation'),
        ('plpgsql.check_asserts', 'on', 'PL/pgSQL compilation'),
        -- What a caller could see of the statements inside.
        ('debug_print_parse', 'off', 'parse trees printed to the caller'),
        ('debug_print_rewritten', 'off', 'rewritten trees printed to the caller'),
        ('debug_print_plan', 'off', 'plans (with their constants) printed to the caller'),
        ('debug_pretty_print', 'on', 'format of the above'),
        ('client_min_messages', 'warning', 'LOG and DEBUG lines routed to the caller'),
        ('log_parameter_max_length_on_error', '0', 'error reports quoting parameters'),
        ('plpgsql.print_strict_params', 'off', 'error reports quoting parameters'),
        ('trace_notify', 'off', 'LOG lines the caller could cause'),
        ('trace_sort', 'off', 'LOG lines the caller could cause'),
        -- Not pinned, each for its reason.
        ('transaction_isolation', null, 'the caller''s transaction; cannot be set inside it, and the functions hold under each level (locking reads, 40001 under REPEATABLE READ; stage() refuses all but READ COMMITTED)'),
        ('transaction_read_only', null, 'the caller''s transaction: a read-only one only fails its own call'),
        ('transaction_deferrable', null, 'the caller''s transaction'),
        ('default_transaction_%', null, 'defaults of the caller''s later transactions'),
        ('statement_timeout', null, 'a caller can only cut its own calls short; owner work never relies on a caller''s timeout'),
        ('lock_timeout', null, 'as statement_timeout; rebuild_swap waits as long as its caller allows'),
        ('idle_in_transaction_session_timeout', null, 'the caller''s own session'),
        ('idle_session_timeout', null, 'the caller''s own session'),
        ('synchronous_commit', null, 'durability of the caller''s commit: a lost commit loses the outcome and its work-list delete together'),
        ('application_name', null, 'a label'),
        ('client_encoding', null, 'conversion of output: the functions return counts, codes and ids, never body text, except reveal, which refuses any encoding but UTF8 (loader._reveal_encoding)'),
        ('check_function_bodies', null, 'CREATE FUNCTION only'),
        ('password_encryption', null, 'CREATE and ALTER ROLE only'),
        ('local_preload_libraries', null, 'read at connection start only'),
        ('tcp_%', null, 'the connection'),
        ('client_connection_check_interval', null, 'the connection'),
        ('wal_sender_timeout', null, 'replication connections'),
        ('default_toast_compression', null, 'how values are stored, not what they are'),
        ('default_statistics_target', null, 'plans: how fast, never what a statement returns or says'),
        ('enable_partition_pruning', 'on', 'which day partitions a statement reads and locks: off, one batch held open would lock every day and hold up retention'),
        ('enable_%', null, 'plans: how fast, never what a statement returns or says'),
        ('%_cost', null, 'plans: how fast, never what a statement returns or says'),
        ('jit_%', null, 'plans (jit itself is pinned off)'),
        ('geqo%', null, 'plans: how fast, never what a statement returns or says'),
        ('%_collapse_limit', null, 'plans: how fast, never what a statement returns or says'),
        ('constraint_exclusion', null, 'plans: how fast, never what a statement returns or says'),
        ('cursor_tuple_fraction', null, 'plans: how fast, never what a statement returns or says'),
        ('effective_cache_size', null, 'plans: how fast, never what a statement returns or says'),
        ('recursive_worktable_factor', null, 'plans: how fast, never what a statement returns or says'),
        ('min_parallel_%', null, 'plans: how fast, never what a statement returns or says'),
        ('parallel_%', null, 'plans: how fast, never what a statement returns or says'),
        ('max_parallel_%', null, 'plans: how fast, never what a statement returns or says'),
        ('work_mem', null, 'memory of the caller''s own statements'),
        ('hash_mem_multiplier', null, 'memory of the caller''s own statements'),
        ('maintenance_work_mem', null, 'memory of the caller''s own statements'),
        ('temp_buffers', null, 'memory of the caller''s own statements'),
        ('logical_decoding_work_mem', null, 'memory of the caller''s own statements'),
        ('gin_pending_list_limit', null, 'index maintenance'),
        ('effective_io_concurrency', null, 'I/O of the caller''s own statements'),
        ('maintenance_io_concurrency', null, 'I/O of the caller''s own statements'),
        ('backend_flush_after', null, 'I/O of the caller''s own statements'),
        ('commit_siblings', null, 'commit timing'),
        ('wal_skip_threshold', null, 'WAL of the caller''s own statements'),
        ('vacuum_%', null, 'the caller''s own VACUUM'),
        ('stats_fetch_consistency', null, 'the caller''s reads of statistics views')
    ) as p (name, pin, why)
$$;
comment on function loader._settings_policy() is
    'Private: the value every security-definer function pins for each user-settable setting, or why none';

-- Every security-definer function runs with the pinned settings of _settings_policy, whatever
-- the calling session set (those this server knows: a pin for a setting it lacks is skipped).
do $$
declare
    f regprocedure;
    pins text;
begin
    -- Each pin is set here (local to this transaction, parsed as postgresql.conf would parse
    -- it: 'pg_catalog, pg_temp' is a list), then captured with SET ... FROM CURRENT.
    perform pg_catalog.set_config(p.name, p.pin, true)
       from loader._settings_policy() p
      where p.pin is not null
        and exists (select from pg_catalog.pg_settings s where lower(s.name) = lower(p.name));
    select string_agg(format('set %s from current', p.name), ' ' order by p.name) into pins
      from loader._settings_policy() p
     where p.pin is not null
       and exists (select from pg_catalog.pg_settings s where lower(s.name) = lower(p.name));
    for f in select p.oid from pg_catalog.pg_proc p
              where p.pronamespace = 'loader'::regnamespace and p.prosecdef
    loop
        execute format('alter function %s reset all %s', f, pins);
    end loop;
end
$$;

-- The access log's guard (sql/44_reveal.sql): created when missing and enabled when disabled,
-- on every migrate, so `loader migrate` is the fix `loader doctor` names for a log that lost it.
do $$
begin
    if not exists (select from pg_catalog.pg_trigger
                    where tgrelid = 'loader.pii_access_log'::regclass and tgname = 'pii_access_log_append_only') then
        create trigger pii_access_log_append_only before update or delete on loader.pii_access_log
            for each row execute function loader._append_only();
    end if;
    if not exists (select from pg_catalog.pg_trigger
                    where tgrelid = 'loader.pii_access_log'::regclass and tgname = 'pii_access_log_no_truncate') then
        create trigger pii_access_log_no_truncate before truncate on loader.pii_access_log
            for each statement execute function loader._append_only();
    end if;
    -- Only when disabled: ALTER TABLE locks the log, and a routine migrate takes no lock it
    -- does not need.
    if exists (select from pg_catalog.pg_trigger
                where tgrelid = 'loader.pii_access_log'::regclass and tgenabled = 'D'
                  and tgname in ('pii_access_log_append_only', 'pii_access_log_no_truncate')) then
        alter table loader.pii_access_log enable trigger pii_access_log_append_only;
        alter table loader.pii_access_log enable trigger pii_access_log_no_truncate;
    end if;
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
