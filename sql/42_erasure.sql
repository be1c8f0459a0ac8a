-- Erasure on request (GDPR article 17): every trace of some user ids that loader holds, in
-- committed batches, resumable, recorded in loader.erasures without the ids. `loader forget`
-- drives it (ids sent by COPY, never as statement parameters); in psql, as the owner:
--
--   call loader.forget(array['user-1', 'user-2'], 'DSR-2026-0042');   -- in committed batches
--
-- What it erases, for each message of those users (found by user_logins.user_id, and by
-- loader._claimants in the staged bodies still kept: pending rows and rejects, whatever their
-- form): its outcome (a
-- user_logins or login_rejects row, and its copy while an online rebuild copies), its refusals,
-- and its body (purged; erased_at stamped). The staged row itself stays, with no personal data
-- left in it, so a redelivery of the same MessageId (SQS keeps messages up to 14 days; a DLQ
-- redrive; a replay) is a duplicate that stages nothing and gets no outcome. user_logins rows
-- from before loader (no message id) are deleted. Each erased body's keyed fingerprint is kept
-- (loader.erased_bodies).
--
-- A later message of an erased user is suppressed by the transform (loader._suppressed: no
-- body kept, a reject with reason `erased`) when it was sent before the erasure, staged within
-- erasure_quarantine_days after it, or is an erased body come back. The ledger recognises the
-- person without the id: loader.erased_users holds HMAC-SHA256 of each id under
-- loader.erasure_key (and a cheap keyed tag), keys that never leave the owner (only the owner,
-- who can read the raw bodies anyway, could test a guess against them; no function a lesser
-- role may call computes them).
--
-- Owner only. A batch waits for a transform batch that claimed one of its rows (that batch's
-- outcome is then erased with the rest); `loader forget` ends a session that holds it up past
-- --evict-after.

-- _forget_messages: the messages of `user_ids`, by the one predicate (loader._claimant_set),
-- whatever form each body has: loaded ones by user_logins.user_id (what _claimants gave when
-- they loaded), and every staged body still kept that has no loaded outcome: pending (claimed
-- or not) and rejected. What an erasure erases, and what `loader forget --dry-run` counts.
create or replace function loader._forget_messages(user_ids text[]) returns table (message_id text)
language sql stable as $$
    select u.message_id from public.user_logins u
     where u.user_id = any (user_ids) and u.message_id is not null
    union
    select r.message_id from loader.transform_queue q
      join loader.raw_logins r on r.id = q.raw_id
     where r.purged_at is null
       and exists (select from loader._claimant_set(r.body) c where c = any (user_ids))
    union
    select r.message_id from loader.login_rejects j
      join loader.raw_logins r on r.message_id = j.message_id
     where r.purged_at is null
       and exists (select from loader._claimant_set(r.body) c where c = any (user_ids))
$$;
comment on function loader._forget_messages(text[]) is
    'Private: the messages of these user ids, whatever form their bodies have';

-- _forget_preview: what an erasure of `user_ids` would erase, per table, changing nothing
-- (`loader forget --dry-run`).
create or replace function loader._forget_preview(user_ids text[])
returns table (what text, rows bigint)
language sql stable as $$
    with m as materialized (select f.message_id from loader._forget_messages(user_ids) f)
    select 'user_logins', count(*) from public.user_logins u where u.message_id in (select * from m)
    union all
    select 'user_logins_before_loader', count(*) from public.user_logins u
     where u.user_id = any (user_ids) and u.message_id is null
    union all
    select 'login_rejects', count(*) from loader.login_rejects j where j.message_id in (select * from m)
    union all
    select 'pending', count(*) from loader.transform_queue q join loader.raw_logins r on r.id = q.raw_id
     where r.message_id in (select * from m)
    union all
    select 'refusals', count(*) from loader.refusals f where f.message_id in (select * from m)
    union all
    select 'raw_logins', count(*) from loader.raw_logins r where r.message_id in (select * from m)
$$;
comment on function loader._forget_preview(text[]) is
    'Private: what an erasure of these user ids would erase, per table (loader forget --dry-run)';

-- _forget_start: starts an erasure of `user_ids` (or resumes the unfinished one with the same
-- reference and the same users) and returns its id. Records the users' hashes (so suppression
-- starts now), deletes their rows from before loader, and lists the messages to erase.
create or replace function loader._forget_start(user_ids text[], reference text) returns bigint
language plpgsql as $$
declare
    erasure bigint;
    hashes bytea[];
    adopted bigint;
    tag bigint;
    bits bytea;
begin
    if reference is null or btrim(reference) = '' then
        raise exception 'an erasure needs a reference (the request''s ticket)'
            using errcode = 'invalid_parameter_value';
    end if;
    if coalesce(cardinality(user_ids), 0) = 0
       or exists (select from unnest(user_ids) u where u is null or u = '') then
        raise exception 'an erasure needs at least one user id, none of them empty'
            using errcode = 'invalid_parameter_value';
    end if;
    hashes := array(select distinct loader._user_hash(u, k.key)
                      from unnest(user_ids) u, loader.erasure_key k order by 1);
    select e.id into erasure from loader.erasures e
     where e.finished_at is null and e.reference = _forget_start.reference
       and array(select u.user_hash from loader.erased_users u where u.erasure_id = e.id order by 1)
           = hashes;
    if erasure is not null then
        return erasure;
    end if;
    insert into loader.erasures (reference, requested_by, started_at, users)
    values (reference, session_user, clock_timestamp(), cardinality(hashes))
    returning id into erasure;
    insert into loader.erased_users (user_hash, user_tag, erasure_id, erased_at)
    select distinct loader._user_hash(u, k.key), loader._user_tag(u, k.tag_seed), erasure,
           clock_timestamp()
      from unnest(user_ids) u, loader.erasure_key k;
    -- Their bits in the tag bitmap (the transform's first test of a body that is no login),
    -- set in one write of the 128 KiB row however many users the request names (the row
    -- locked first, so two erasures at once each add to what the other wrote; the lock also
    -- waits for the rebuild ranges being copied, which hold it FOR SHARE).
    select k.tag_bits into bits from loader.erasure_key k for update;
    for tag in select e.user_tag from loader.erased_users e where e.erasure_id = erasure loop
        bits := set_bit(bits, (tag & 1048575)::integer, 1);
    end loop;
    update loader.erasure_key k set tag_bits = bits;
    -- Rows from before loader (no message_id, nothing staged to find them by) go by user id,
    -- from the live table and from a copying rebuild's copy, which carried them at its start:
    -- the maintenance lock keeps a rebuild from starting (and carrying them) meanwhile.
    lock table loader.maintenance_lock in exclusive mode;
    delete from public.user_logins u where u.user_id = any (user_ids) and u.message_id is null;
    get diagnostics adopted = row_count;
    if to_regclass('loader_rebuild.user_logins_next') is not null then
        execute 'delete from loader_rebuild.user_logins_next u
                  where u.user_id = any ($1) and u.message_id is null'
          using user_ids;
    end if;
    update loader.erasures e set counts = jsonb_build_object('user_logins_before_loader', adopted)
     where e.id = erasure;
    insert into loader.erasure_work (erasure_id, message_id)
    select erasure, m.message_id from loader._forget_messages(user_ids) m;
    return erasure;
end
$$;
comment on function loader._forget_start(text[], text) is
    'Private: start (or resume) the erasure of these user ids; returns its id';

-- _forget_batch: erases up to max_rows messages of the erasure's list in the caller's
-- transaction; returns how many, 0 when none is left (the erasure is then finished).
create or replace function loader._forget_batch(erasure bigint, max_rows integer default 1000)
returns bigint
language plpgsql as $$
declare
    ids text[];
    n bigint;
    erased jsonb := '{}';
begin
    ids := array(select w.message_id from loader.erasure_work w
                  where w.erasure_id = erasure order by w.message_id limit max_rows
                    for update skip locked);
    if cardinality(ids) = 0 then
        update loader.erasures e set finished_at = clock_timestamp()
         where e.id = erasure and e.finished_at is null
           and not exists (select from loader.erasure_work w where w.erasure_id = erasure);
        return 0;
    end if;
    -- A pending row a transform batch has claimed: wait for that batch (its outcome is erased
    -- below); an unclaimed one leaves the work list.
    perform from loader.transform_queue q join loader.raw_logins r on r.id = q.raw_id
     where r.message_id = any (ids) for update of q;
    delete from loader.transform_queue q using loader.raw_logins r
     where r.id = q.raw_id and r.message_id = any (ids);
    delete from public.user_logins u where u.message_id = any (ids);
    get diagnostics n = row_count;
    erased := erased || jsonb_build_object('user_logins', n);
    delete from loader.login_rejects j where j.message_id = any (ids);
    get diagnostics n = row_count;
    erased := erased || jsonb_build_object('login_rejects', n);
    if to_regclass('loader_rebuild.user_logins_next') is not null then
        execute 'with u as (delete from loader_rebuild.user_logins_next u where u.message_id = any ($1)
                            returning 1),
                      j as (delete from loader_rebuild.login_rejects_next j where j.message_id = any ($1)
                            returning 1)
                 select (select count(*) from u) + (select count(*) from j)' into n using ids;
        erased := erased || jsonb_build_object('rebuild_copies', n);
    end if;
    delete from loader.refusals f where f.message_id = any (ids);
    get diagnostics n = row_count;
    erased := erased || jsonb_build_object('refusals', n);
    -- Each erased body's keyed fingerprint: the same body coming back (a redrive on AWS, with
    -- a new MessageId and SentTimestamp; a replay) is suppressed whenever it comes.
    insert into loader.erased_bodies (body_hash, erased_at)
    select distinct loader._body_hash(r.body, k.key), clock_timestamp()
      from loader.raw_logins r, loader.erasure_key k
     where r.message_id = any (ids) and r.purged_at is null
       and not exists (select from loader.erased_bodies b
                        where b.body_hash = loader._body_hash(r.body, k.key));
    update loader.raw_logins r
       set body = 'null'::jsonb, purged_at = coalesce(r.purged_at, clock_timestamp()),
           erased_at = clock_timestamp()
     where r.message_id = any (ids);
    get diagnostics n = row_count;
    erased := erased || jsonb_build_object('raw_logins', n);
    delete from loader.erasure_work w where w.erasure_id = erasure and w.message_id = any (ids);
    -- The counts so far, key by key.
    update loader.erasures e
       set counts = loader._add_counts(e.counts, erased)
     where e.id = erasure;
    return cardinality(ids);
end
$$;
comment on function loader._forget_batch(bigint, integer) is
    'Private: erase up to max_rows messages of an erasure; 0 when none is left';

-- forget: erases every trace of `user_ids` (see the head of this file), one committed batch at
-- a time; resumed by running it again with the same ids and reference. For psql: CALL, outside
-- a transaction block (the ids are then part of the statement text, which statement logging
-- may write to the server log: `loader forget` sends them by COPY instead).
create or replace procedure loader.forget(
    user_ids text[],
    reference text,
    inout erasure_id bigint default null,
    batch_size integer default 1000)
language plpgsql as $$
begin
    erasure_id := loader._forget_start(user_ids, reference);
    commit;
    loop
        exit when loader._forget_batch(erasure_id, batch_size) = 0;
        commit;
    end loop;
end
$$;
comment on procedure loader.forget(text[], text, bigint, integer) is
    'Erase every trace of these user ids (loader forget), in committed batches; returns the erasure id';
