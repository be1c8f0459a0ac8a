-- The transform: staged rows without an outcome become public.user_logins rows (masked) or
-- loader.login_rejects rows (with a reason).
--
-- Reruns cleanly: psql -v ON_ERROR_STOP=1 -f sql/30_transform.sql (applied by `loader migrate`).
--
-- Analysts (role loader_analyst), in psql, outside a transaction block:
--   call loader.transform();                       -- everything pending, committing per batch
--   select * from loader.transform_batch(10000);   -- one bounded batch, in your transaction
--
-- Concurrency, and why nothing a caller does can stall anyone else:
-- - Every batch claims its rows from loader.transform_queue with FOR UPDATE SKIP LOCKED, so
--   transforms run side by side without loading a row twice or waiting on each other, and rows
--   staged by a concurrent ingest are picked up once committed. Rows claimed by a transaction
--   that stays open simply wait for it; every other row flows.
-- - A batch takes no table or advisory lock and updates no row another batch needs: its
--   progress is a row of its own in loader.transform_log.
-- - A batch leaves a ticket naming the key it masked with (loader.batch_keys). At COMMIT a
--   deferred check confirms that key is still active, holding it FOR SHARE for the instant of
--   the commit; when a rotation retired it meanwhile, the batch fails with 40001 and its rows
--   go back to the work list. So a batch never needs to lock anything a rotation waits for,
--   yet never commits old masks after one.
-- - A rebuild or rotation (sql/35_rebuild.sql) skips rows that are still in the work list
--   (claimed or not): those get their outcome from the incremental transform, with the key
--   active when it commits.
-- The functions run as their owner (security definer, settings pinned by
-- sql/90_privileges.sql), the only role that can read loader.raw_logins and the key.

-- _outcome_rows: the outcome of each staged row in `ids`, not yet written: reason and detail for
-- a reject (reason not null), else the user_logins values, masked with the active key (or, with
-- for_rebuild, the copying online rebuild's key: sql/35_rebuild.sql). Inlined into the
-- statement of _write_outcomes (a single SELECT, stable, no SET), so the key is read inside
-- that statement.
-- Private (owner only): its rows carry masks, so granted it would be a masking oracle.
drop function if exists loader._outcome_rows(bigint[], boolean);
create or replace function loader._outcome_rows(
    ids bigint[], for_rebuild boolean default false,
    staged_from timestamptz default null, staged_to timestamptz default null)
returns table (message_id text, reason text, detail text, user_id text, device_type text,
               masked_ip text, masked_device_id text, locale text, app_version integer,
               create_date date, ip_network cidr, app_version_text text, mask_key_id integer,
               staged_on date)
language sql stable as $$
    -- The key is read inside the statement (active_key), never into a variable: PL/pgSQL
    -- passes variables to a statement as parameters, and a custom plan folds a parameter into
    -- a constant that debug_print_plan shows the calling session. Read here, it is a column
    -- of a scan, so no plan, message or log line can carry its bytes.
    -- Materialised: one scan of mask_keys per statement, not one per row.
    with active_key as materialized (
        select k.id, k.key from loader.mask_keys k where k.retired_at is null and not for_rebuild
        union all
        -- A rotation's new key waits in loader.rebuilds; a plain rebuild uses the active key.
        select b.key_id, coalesce(b.new_key, k.key)
          from loader.rebuilds b
          left join loader.mask_keys k on k.id = b.key_id and k.retired_at is null
         where for_rebuild and b.state = 'copying'
    ), span as materialized (
        -- dense: the ids are every id from lo to hi (distinct ids as many as the range holds),
        -- as a batch claimed from the work list nearly always is.
        select min(i) as lo, max(i) as hi, count(distinct i) = max(i) - min(i) + 1 as dense
          from unnest(ids) as i
    ), staged as (
        -- Dense: one index range scan. Otherwise = any(ids): an index probe per id (a range
        -- scan could read any number of rows that are not in ids).
        -- Between the batch's first and last staging time, when given: constants in the
        -- caller's one-shot plan, so only those days' partitions are read, and locked.
        select r.* from span s join loader.raw_logins r on r.id between s.lo and s.hi
         where s.dense and r.staged_at >= coalesce(staged_from, '-infinity')
           and r.staged_at <= coalesce(staged_to, 'infinity')
        union all
        select r.* from span s join loader.raw_logins r on r.id = any (ids)
         where not s.dense and r.staged_at >= coalesce(staged_from, '-infinity')
           and r.staged_at <= coalesce(staged_to, 'infinity')
    )
    -- Each level below is a subquery fenced by OFFSET 0, so the planner cannot flatten it and
    -- repeat its expressions: a body field is extracted once, the reason is decided once, the
    -- IP is trimmed once and parsed once (loaded rows only).
    select j.message_id, j.reason,
           case when j.reason is not null then loader._reject_detail(j.body, j.reason) end,
           j.user_id,
           j.device_type,
           -- What is hashed for an IP (as loader._canonical_ip): host(ip::inet) when it parses,
           -- which for a plain dotted quad is the text itself; else the trimmed text; NULL when
           -- blank or missing (never blank, so _mask's blank check is moot).
           loader._mask(case when j.ip_plain then j.ip
                             else coalesce(host(j.parsed), nullif(j.ip, '')) end, k.key),
           loader._mask(j.device_id, k.key),
           j.locale,
           loader._app_version(j.app_version),
           j.create_date,
           loader._ip_network(j.parsed),
           j.app_version,
           k.id,
           j.staged_on
      from (select c.*,
                   case when c.reason is null then
                       case when c.ip_plain then c.ip::inet else loader._inet_other(c.ip) end
                   end as parsed
              from (select f.*,
                           -- A wrapped login whose wrapping holds no JSON object has a reason
                           -- of its own; every other check is the login's.
                           case when f.erased then 'erased'
                                when f.envelope is not null and f.body is null
                                then f.envelope || case f.envelope when 'sns' then '_message_not_object'
                                                                  else '_detail_not_object' end
                                else loader._reason(f.body, f.body_is_json, f.user_id, f.device_type,
                                                    f.ip, f.locale, f.device_id, f.app_version)
                           end as reason,
                           loader._ipv4_plain(f.ip) as ip_plain
                      -- From here on "body" is the login: the staged body, or the one an SNS
                      -- notification or an EventBridge event carries (NULL when it carries
                      -- none). Nothing else of an envelope is read.
                      from (select l.message_id, l.login as body, l.body_is_json, l.envelope,
                                   -- An erased person's message (loader._suppressed), asked
                                   -- only of a row a cheap test cannot clear: a user erased
                                   -- before V17 (no tag) when it was sent before their erasure;
                                   -- else a login naming one person (nearly every row) whose
                                   -- keyed tag is in a hash built once per statement; else any
                                   -- other body (its claimants are what _claimant_set gives,
                                   -- _mention_set) with a word whose tag has its bit set in the
                                   -- bitmap of erased tags (one bit per tag modulo 2^20, read
                                   -- once per statement) and is in the ledger (an index probe;
                                   -- a hash built in this correlated subquery would be built
                                   -- again for every row). Each test is true or false, never
                                   -- NULL, so the AND never asks _suppressed needlessly.
                                   (select exists (select from loader.erased_users))
                                   and (coalesce(l.sent < (select max(e.erased_at) from loader.erased_users e
                                                            where e.user_tag is null), false)
                                        or case when loader._scalar_user_id(l.login) is not null
                                                then loader._user_tag(l.login ->> 'user_id',
                                                                      (select x.tag_seed from loader.erasure_key x))
                                                     in (select e.user_tag from loader.erased_users e
                                                          where e.user_tag is not null)
                                                else exists (
                                                    select from loader._mention_set(l.staged_body) as c
                                                     cross join lateral (select loader._user_tag(c, (select x.tag_seed from loader.erasure_key x)) as tag) t
                                                     where get_bit((select x.tag_bits || ''::bytea from loader.erasure_key x),
                                                                   (t.tag & 1048575)::integer) = 1
                                                       and exists (select from loader.erased_users e where e.user_tag = t.tag))
                                           end)
                                   and loader._suppressed(
                                           case when loader._scalar_user_id(l.login) is not null
                                                then array[l.login ->> 'user_id']
                                                else loader._claimants(l.staged_body) end,
                                           l.staged_body, l.sent, l.staged_at) as erased,
                                   l.login ->> 'user_id' as user_id,
                                   l.login ->> 'device_type' as device_type,
                                   btrim(l.login ->> 'ip') as ip,
                                   l.login ->> 'locale' as locale,
                                   l.login ->> 'device_id' as device_id,
                                   l.login ->> 'app_version' as app_version,
                                   l.create_date,
                                   l.staged_on
                              from (select r.message_id, r.body_is_json, e.envelope,
                                           loader._unwrap(r.body, e.envelope) as login,
                                           r.body as staged_body, r.staged_at,
                                           coalesce(r.sent_at, r.staged_at) as sent,
                                           -- The UTC day SQS received it (wrapped or not), not
                                           -- the day of the transform: reruns must not move it.
                                           (coalesce(r.sent_at, r.staged_at) at time zone 'UTC')::date
                                               as create_date,
                                           -- The partition its staged row is in (reconcile
                                           -- counts an outcome of a dropped day by it).
                                           (r.staged_at at time zone 'UTC')::date as staged_on
                                      from staged r
                                      cross join lateral (select loader._envelope(r.body) as envelope) e
                                    offset 0) l
                            offset 0) f
                    offset 0) c
            offset 0) j
      cross join active_key k
$$;
comment on function loader._outcome_rows(bigint[], boolean, timestamptz, timestamptz) is
    'Private: the outcomes (masked values or reject reasons) of the staged rows with these ids, unwritten';

-- _write_outcomes: writes the outcome of each staged row in `ids`: a user_logins row masked
-- with the active key, or a login_rejects row with its reason; into the online rebuild's
-- copies instead (with the rebuild's key) when `into_copies`. The one INSERT of outcomes: the
-- transform and the rebuild both write through it. Rows that already have an outcome are left
-- as they are; with `fresh` (the transform's claimed rows, which have none) a plain INSERT,
-- without ON CONFLICT's index probe and speculative insertion per row (which cost about as
-- much as the insert itself): should a row have an outcome after all, it fails with
-- unique_violation and writes nothing. Into the live tables it also leaves a ticket for the
-- COMMIT-time key check (loader.batch_keys) and empties the body of a suppressed message of
-- an erased person, keeping its keyed fingerprint (the CTEs read the bodies as they were
-- before the statement), so a redrive or replay of it is suppressed whenever it comes. The
-- copies' write does neither: it must read the same bodies (a batch writes the copies first).
-- Private (owner only): called by transform_batch and rebuild_copy_range. One statement,
-- built once per call (the target tables differ) and passed only the ids: the key is read
-- inside it. jit off: the dense range scan is estimated at a fixed share of raw_logins (its
-- bounds are parameters), so on a big table the planner would JIT-compile every batch.
drop function if exists loader._write_outcomes(bigint[], boolean, boolean);
create or replace function loader._write_outcomes(
    ids bigint[], into_copies boolean default false, fresh boolean default false,
    staged_from timestamptz default null, staged_to timestamptz default null,
    out loaded bigint, out rejected bigint, out rejected_by_reason jsonb)
language plpgsql volatile set jit = off as $f$
begin
  begin
    execute format($q$
    with outcome as (
        select * from loader._outcome_rows($1, %1$L, $2, $3)
    ), loads as (
        insert into %2$s
            (user_id, device_type, masked_ip, masked_device_id, locale, app_version, create_date,
             message_id, ip_network, app_version_text, mask_key_id, staged_on)
        select o.user_id, o.device_type, o.masked_ip, o.masked_device_id, o.locale,
               o.app_version, o.create_date, o.message_id, o.ip_network, o.app_version_text,
               o.mask_key_id, o.staged_on
          from outcome o
         where o.reason is null
        %4$s
        returning mask_key_id
    ), rejects as (
        insert into %3$s (message_id, reason, detail, staged_on)
        select o.message_id, o.reason, o.detail, o.staged_on from outcome o where o.reason is not null
        %4$s
        returning reason
    )
    %5$s
    -- (ticket, erased and fingerprints, like every data-modifying CTE, run unreferenced.)
    select (select count(*) from loads), (select count(*) from rejects),
           (select coalesce(jsonb_object_agg(j.reason, j.n), '{}')
              from (select reason, count(*) as n from rejects group by reason) as j)
    $q$,
        into_copies,
        case when into_copies then 'loader_rebuild.user_logins_next' else 'public.user_logins' end,
        case when into_copies then 'loader_rebuild.login_rejects_next' else 'loader.login_rejects' end,
        -- No conflict target: user_logins' partitions each have their own unique index on
        -- message_id (sql/17_masked_partitions.sql), login_rejects one; that index decides.
        case when fresh then '' else 'on conflict do nothing' end,
        -- Into the live tables only: the key's ticket, and an erased person's bodies emptied
        -- and fingerprinted. Left out of the copies' statement, not made false in it: an
        -- UPDATE of raw_logins under a false condition still locks every partition.
        case when not into_copies then $live$, ticket as (
        insert into loader.batch_keys (key_id)
        select distinct l.mask_key_id from loads l
    ), erased as (
        update loader.raw_logins r
           set body = 'null'::jsonb, purged_at = coalesce(r.purged_at, now()), erased_at = now()
          from outcome o
         where o.reason = 'erased' and r.message_id = o.message_id
           and r.staged_at >= coalesce($2, '-infinity') and r.staged_at <= coalesce($3, 'infinity')
    ), fingerprints as (
        -- No unique index, no ON CONFLICT: a speculative insert would wait on another batch
        -- still holding the same fingerprint uncommitted. A rare duplicate costs nothing.
        insert into loader.erased_bodies (body_hash, erased_at)
        select distinct loader._body_hash(r.body, k.key), now()
          from outcome o
          join loader.raw_logins r on r.message_id = o.message_id
                                  and r.staged_at >= coalesce($2, '-infinity')
                                  and r.staged_at <= coalesce($3, 'infinity')
         cross join loader.erasure_key k
         where o.reason = 'erased' and r.purged_at is null
           and not exists (select from loader.erased_bodies b
                            where b.body_hash = loader._body_hash(r.body, k.key))
    )$live$ else '' end)
    using ids, staged_from, staged_to
    into loaded, rejected, rejected_by_reason;
  exception when check_violation then
    -- The one CHECK a masked row can fail is the legacy partition's: a row after its cutover
    -- whose month has no partition. Raised again without PostgreSQL's DETAIL, which quotes the
    -- row (its user id, masks and network) to whoever called the transform.
    raise exception 'a masked row''s month has no partition of public.user_logins (after the cutover, the legacy partition takes none)'
        using errcode = 'check_violation',
              hint = 'as the owner: select loader.create_masked_months(); loader doctor names the month';
  end;
end
$f$;
comment on function loader._write_outcomes(bigint[], boolean, boolean, timestamptz, timestamptz) is
    'Private: write the outcomes (masked rows or rejects) of these staged rows, into the live tables or the rebuild''s copies';

-- _confirm_batch_key: the COMMIT-time check behind loader.batch_keys (constraint trigger,
-- deferred). A ticket fires twice: the first firing (armed) only queues a second ticket. At
-- COMMIT that second one fires at trigger depth 1 and checks the key, holding its row FOR SHARE
-- until the commit ends, so a rotation cannot retire it in between. If a session forces the
-- check early (SET CONSTRAINTS ... IMMEDIATE) to hold that lock while it idles, the second
-- ticket fires nested inside the first and is refused: the lock is only ever held at COMMIT.
create or replace function loader._confirm_batch_key() returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    delete from loader.batch_keys b where b.id = new.id;
    if new.armed then
        insert into loader.batch_keys (key_id, armed, rebuild_check, rebuild_id)
        values (new.key_id, false, new.rebuild_check, new.rebuild_id);
        return null;
    end if;
    if pg_trigger_depth() > 1 then
        raise exception 'a transform batch is checked at COMMIT only; do not SET CONSTRAINTS loader.batch_keys_confirm IMMEDIATE'
            using errcode = 'object_not_in_prerequisite_state';
    end if;
    if new.rebuild_check then
        -- The row rebuild_start rewrites: held from here to the end of the commit, so no
        -- rebuild starts between this check and the commit.
        perform from loader.mask_keys k where k.retired_at is null for share;
        if (select b.id from loader.rebuilds b where b.state = 'copying') is distinct from new.rebuild_id then
            raise exception 'an online rebuild started or ended while this transform batch ran; nothing of it was kept, run the transform again'
                using errcode = 'serialization_failure';
        end if;
        return null;
    end if;
    perform from loader.mask_keys k where k.id = new.key_id and k.retired_at is null for share;
    if not found then
        raise exception 'the masking key was rotated while this transform batch ran; nothing of it was kept, run the transform again'
            using errcode = 'serialization_failure';
    end if;
    return null;
end
$$;
comment on function loader._confirm_batch_key() is
    'Trigger: at COMMIT, refuse a transform batch whose masking key was retired meanwhile';

do $$
begin
    if not exists (select from pg_catalog.pg_trigger
                    where tgrelid = 'loader.batch_keys'::regclass and tgname = 'batch_keys_confirm') then
        create constraint trigger batch_keys_confirm after insert on loader.batch_keys
            deferrable initially deferred
            for each row execute function loader._confirm_batch_key();
    end if;
end
$$;

-- _end_held_transactions: ends the sessions of loader's roles below the owner (members of
-- loader_ingest, loader_analyst, loader_transformer or loader_pii_reader) in this database
-- whose write transaction has been open longer than evict_after_seconds (loader.settings,
-- default 10). Every write those roles can make is short (a staging, a transform batch, a
-- run's counters, a reveal's record), so such a session is idle in its transaction, or
-- sleeping in it (a trigger of its own at COMMIT), whatever timeouts it set; meanwhile it holds
-- what it claimed or staged, and holds back every snapshot's xmin, so the downstream cursor
-- (loaded_xid) cannot pass it. Sessions of other roles (another application's, the owner's, a
-- superuser's) and sessions in other databases (another loader database's, under its own
-- bound) are never ended: docs/security.md says what remains. Recorded in loader.evictions and the
-- server log with its pid and login, never its query. Needs the owner to have
-- pg_signal_backend, and pg_read_all_stats to see how long another login's transaction is
-- open (docs/security.md "The owner role"); without them it ends nothing, and `loader doctor`
-- says so. With `holding`, the sessions of those roles whose transaction (reading or writing)
-- has been open that long and holds a lock on that table: for the daily job's maintenance,
-- which has no watch (loader purge and migrate end a session only once it blocks them).
-- Returns how many it ended.
drop function if exists loader._end_held_transactions();
create or replace function loader._end_held_transactions(holding regclass default null) returns integer
language plpgsql as $$
declare
    bound interval := make_interval(secs => loader._setting_int('evict_after_seconds', 10));
    owner oid := (select n.nspowner from pg_catalog.pg_namespace n where n.nspname = 'loader');
    holder record;
    ended integer := 0;
begin
    for holder in
        select a.pid, a.usename::text as role, clock_timestamp() - a.xact_start as held_for
          from pg_catalog.pg_stat_activity a
         where a.datid = (select d.oid from pg_catalog.pg_database d
                           where d.datname = current_database())
           and a.backend_type = 'client backend'
           and case when holding is null then a.backend_xid is not null
                    else exists (select from pg_catalog.pg_locks l
                                  where l.pid = a.pid and l.relation = holding and l.granted) end
           and a.pid <> pg_backend_pid()
           and a.xact_start < clock_timestamp() - bound
           and not pg_has_role(a.usesysid, owner, 'usage')
           and exists (select from unnest(array['loader_ingest', 'loader_analyst',
                                                'loader_transformer', 'loader_pii_reader']) r
                        where pg_has_role(a.usesysid, r, 'member'))
    loop
        if pg_terminate_backend(holder.pid) then
            insert into loader.evictions (at, pid, role, held_for)
            values (clock_timestamp(), holder.pid, holder.role, holder.held_for);
            raise log 'loader ended session % (login %): its % was open for %',
                holder.pid, holder.role,
                case when holding is null then 'write transaction' else 'transaction holding ' || holding end,
                holder.held_for;
            ended := ended + 1;
        end if;
    end loop;
    return ended;
exception when insufficient_privilege then
    -- No pg_signal_backend: nothing is ended (loader doctor reports it).
    return ended;
end
$$;
comment on function loader._end_held_transactions(regclass) is
    'Private: end the sessions of loader''s lesser roles whose write transaction (or one holding a table) is open past evict_after_seconds';

-- transform_batch: one bounded batch. Returns its counts and what is still pending (NULL when
-- count_pending is false: counting the work list costs more than a batch on a big backlog, so
-- the batch loops below count once, at the end).
create or replace function loader.transform_batch(
    max_rows integer default 10000,
    count_pending boolean default true)
returns table (loaded bigint, rejected bigint, pending bigint, rejected_by_reason jsonb)
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
#variable_conflict use_column
declare
    claimed bigint[];
    staged_from timestamptz;
    staged_to timestamptz;
    more_loaded bigint;
    more_rejected bigint;
    more_reasons jsonb;
    rebuilding bigint;
begin
    if not exists (select from loader.mask_keys k where k.retired_at is null) then
        raise exception 'no active masking key: run loader migrate';
    end if;
    -- Duties: a transaction that staged messages cannot transform (it could read what its own
    -- input became, then roll both back). Staging commits first; its rows are then on record.
    if not loader._caller_is_owner() and exists (
           select from loader.ingest_runs r
            where r.last_stage_xact = pg_current_xact_id_if_assigned()) then
        raise exception 'a transaction that staged messages cannot transform them: commit the staging first'
            using errcode = 'object_not_in_prerequisite_state';
    end if;
    -- A caller's size is capped: one batch never claims the whole work list.
    max_rows := least(greatest(coalesce(max_rows, 0), 0), 100000);
    -- Sessions below the owner holding a write transaction open past the bound are ended
    -- first: they hold the rows they claimed, and every snapshot's xmin.
    perform loader._end_held_transactions();
    -- The COMMIT-time key check stays deferred whatever the session set before.
    set constraints loader.batch_keys_confirm deferred;

    with taken as (
        -- ctid = any(array(...)): a TID scan fetches exactly the claimed rows (they are locked
        -- by this transaction, so their ctids cannot change), with no index descent per row.
        -- A join here would let the planner scan the whole work list for every batch.
        delete from loader.transform_queue q
         where q.ctid = any (array(
                   select t.ctid from loader.transform_queue t
                    order by t.raw_id limit max_rows
                      for update skip locked))
        returning q.raw_id, q.staged_at
    )
    -- The claimed rows' first and last staging time: the batch reads, and locks, only the
    -- days between (a transaction left open locks no other day, which retention may drop).
    select coalesce(array_agg(t.raw_id), '{}'), min(t.staged_at), max(t.staged_at)
      into claimed, staged_from, staged_to
      from taken t;
    -- Nothing claimed, nothing written: a write without the claimed rows' days would read, and
    -- lock, every day partition (an idle batch held open would hold up retention's drops).
    loaded := 0;
    rejected := 0;
    rejected_by_reason := '{}';
    if cardinality(claimed) > 0 then
        -- While an online rebuild copies, its copies get these outcomes too (with its key),
        -- written first, from the bodies as staged: the live write empties an erased person's.
        -- A ticket says which rebuild this batch saw: at COMMIT it must still be the one copying.
        select b.id into rebuilding from loader.rebuilds b where b.state = 'copying';
        if rebuilding is not null then
            perform loader._write_outcomes(claimed, true, false, staged_from, staged_to);
        end if;
        -- Claimed rows have no outcome yet (a row leaves the work list with its outcome, in one
        -- transaction), so the cheaper fresh write; should one have an outcome after all, its
        -- unique_violation rolls it back (this block's subtransaction) and the second write
        -- leaves that outcome as it is.
        begin
            select o.loaded, o.rejected, o.rejected_by_reason into loaded, rejected, rejected_by_reason
              from loader._write_outcomes(claimed, false, true, staged_from, staged_to) o;
        exception when unique_violation then
            select o.loaded, o.rejected, o.rejected_by_reason into loaded, rejected, rejected_by_reason
              from loader._write_outcomes(claimed, false, false, staged_from, staged_to) o;
        end;
        -- Every claimed row that is staged has its outcome now, unless its staged row's time is
        -- not the one queued with it (an owner's UPDATE of staged_at): then it was outside the
        -- days read. Those are written from every day, rather than leave the work list without one.
        if loaded + rejected < cardinality(claimed) then
            select o.loaded, o.rejected, o.rejected_by_reason into more_loaded, more_rejected, more_reasons
              from loader._write_outcomes(claimed) o;
            loaded := loaded + more_loaded;
            rejected := rejected + more_rejected;
            rejected_by_reason := loader._add_counts(rejected_by_reason, more_reasons);
        end if;
        insert into loader.batch_keys (rebuild_check, rebuild_id) values (true, rebuilding);
    end if;

    -- Progress, for reconcile and status: one insert-only row per batch (loader.transform_log),
    -- never a row that batches share, so a transaction held open holds nothing another batch
    -- needs. Drained: fewer rows than asked for, and nothing else waits, not even rows another
    -- session has claimed and not committed (still visible here), so a batch held open never
    -- makes the pipeline look drained.
    insert into loader.transform_log (at, drained)
    values (now(), cardinality(claimed) < max_rows
                   and not exists (select from loader.transform_queue));
    -- A drained batch folds rows over a minute old into one per kind (their count and latest
    -- time), passing over rows another fold holds: the log stays small and nothing waits.
    if cardinality(claimed) < max_rows then
        with folded as (
            delete from loader.transform_log l
             where l.ctid = any (array(
                       select o.ctid from loader.transform_log o
                        where o.at < now() - interval '1 minute'
                        limit 1000
                          for update skip locked))
            returning l.at, l.drained, l.batches
        )
        insert into loader.transform_log (at, drained, batches)
        select max(f.at), f.drained, sum(f.batches)::bigint from folded f group by f.drained;
    end if;
    if count_pending then
        select count(*) into pending from loader.transform_queue;
    end if;
    return next;
end
$$;
comment on function loader.transform_batch(integer, boolean) is
    'Transform up to max_rows staged rows without an outcome; returns (loaded, rejected, pending, rejected_by_reason)';

-- transform: every pending row, committing after each batch, so a large backlog never holds one
-- giant transaction. Security invoker (transaction control needs it); the work is done by
-- transform_batch. Must be CALLed outside a transaction block. No SET clause: a procedure with
-- one cannot commit; every name in it is schema-qualified instead.
create or replace procedure loader.transform(
    inout loaded bigint default null,
    inout rejected bigint default null,
    inout pending bigint default null,
    batch_size integer default 10000,
    inout rejected_by_reason jsonb default null)
language plpgsql as $$
declare
    batch record;
begin
    loaded := 0;
    rejected := 0;
    rejected_by_reason := '{}';
    loop
        select * into batch from loader.transform_batch(batch_size, false);
        loaded := loaded + batch.loaded;
        rejected := rejected + batch.rejected;
        -- The two {"reason": count} objects added key by key.
        rejected_by_reason := (
            select coalesce(pg_catalog.jsonb_object_agg(e.reason, e.n), '{}')
              from (select c.key as reason, pg_catalog.sum(c.value::bigint) as n
                      from (select * from pg_catalog.jsonb_each_text(rejected_by_reason)
                            union all
                            select * from pg_catalog.jsonb_each_text(batch.rejected_by_reason)) as c
                     group by c.key) as e);
        commit;
        -- Nothing claimed: done, or what is left is claimed by a concurrent transform.
        exit when batch.loaded + batch.rejected = 0;
    end loop;
    select b.pending into pending from loader.transform_batch(0) as b;
end
$$;
comment on procedure loader.transform(bigint, bigint, bigint, integer, jsonb) is
    'Transform everything pending, one committed batch at a time; returns (loaded, rejected, pending, rejected_by_reason)';
