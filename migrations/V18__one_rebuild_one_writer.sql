-- V18: one rebuild, one outcome writer, and the history the sql/ files carried.
--
-- 1. Signatures the sql/ files replaced over the releases, each dropped by a line of its file
--    on every migrate until now: dropped here, once. (IF EXISTS: a database may never have had
--    them.) The files define only what is current.
drop function if exists loader._inet(text);
drop function if exists loader._canonical_ip(text, inet);
drop function if exists loader._reject_reason(jsonb, boolean);
drop function if exists loader.stage(bigint, text, text[], text[], boolean[], timestamptz[], integer[], bigint);
drop function if exists loader.record_refusals(bigint, text, text[], text[], text[]);
drop function if exists loader.record_refused(bigint, text, bigint);
drop function if exists loader.finish_run(bigint, text);
drop procedure if exists loader.transform(bigint, bigint, bigint, integer);
drop function if exists loader._outcome_rows(bigint[]);
drop function if exists loader.purge_staged(interval);
-- transform_batch from before its result had rejected_by_reason (a result type CREATE OR
-- REPLACE cannot change); sql/30_transform.sql creates the current one.
do $$
declare
    f regprocedure := to_regprocedure('loader.transform_batch(integer, boolean)');
begin
    if f is not null and pg_get_function_result(f) not like '%rejected_by_reason%' then
        drop function loader.transform_batch(integer, boolean);
    end if;
end
$$;

-- 2. One rebuild: the online one (sql/35_rebuild.sql), which `loader transform --rebuild` and
--    `loader keys rotate|install` drive. The in-place rebuild() and rotate_key(), with their
--    own key activation, are gone; an outcome whose staged message is gone is carried as it
--    was, and counted here.
drop function if exists loader.rebuild();
drop function if exists loader.rotate_key(bytea);
drop function if exists loader._activate_key(bytea, text);
drop function if exists loader._no_rebuild_copying(text);
drop function if exists loader._rebuild_blockers();
alter table loader.rebuilds add column carried bigint;

-- 3. One outcome writer (loader._write_outcomes) for the transform and the rebuild.
drop function if exists loader._outcomes(bigint[]);
drop function if exists loader._outcomes_new(bigint[]);
drop function if exists loader._outcomes_next(bigint[]);

-- 4. loader.sql_applied was written by every migrate and read by nothing: doctor compares the
--    files one by one (loader.sql_files, V14).
drop table if exists loader.sql_applied;
