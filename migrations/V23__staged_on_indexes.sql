-- V23: the day's outcomes found by the day. Never edit once merged: add V24.
--
-- Before dropping a day of loader.raw_logins, loader.drop_staged_day (sql/16_partitions.sql)
-- proves every row in it has its outcome. It reads the day's outcomes by staged_on and joins
-- them to the day's rows, instead of looking each message up in the whole of user_logins and
-- login_rejects (an index descent per row, 5-13 us each at 10^6-10^7 rows: docs/benchmarks.md).
-- BRIN indexes: outcomes are written in about the order they were staged, so each block range
-- covers a few days, and the index is a few pages per million rows and costs the transform
-- next to nothing. A block range that mixes days (space freed by an expiry, then reused) only
-- makes the drop read more; what the join misses, the drop looks up one by one as before.
-- On a large existing table, create them beforehand with CREATE INDEX CONCURRENTLY under the
-- same names: migrate then finds them.
create index if not exists user_logins_staged_on_brin on public.user_logins using brin (staged_on);
create index if not exists login_rejects_staged_on_brin on loader.login_rejects using brin (staged_on);

-- An online rebuild copying now: its copies get the same indexes (the swap gives each the live
-- one's name).
do $$
declare
    copy regclass;
begin
    foreach copy in array array[to_regclass('loader_rebuild.user_logins_next'),
                                to_regclass('loader_rebuild.login_rejects_next')]
    loop
        if copy is not null and not exists (
               select from pg_index i where i.indrelid = copy
                  and pg_get_indexdef(i.indexrelid) like '%USING brin (staged_on)') then
            execute format('create index on %s using brin (staged_on)', copy);
        end if;
    end loop;
end
$$;
