-- Audited recovery of raw values: when someone must see a real IP or device id (an incident, a
-- fraud case), the role loader_pii_reader, granted to the few who may, calls
--
--   call loader.reveal(array['<message id>', ...], 'INC-1234: account takeover');
--
-- and gets, for each message asked for, its status and, where its body is still kept, the raw
-- ip and device_id (the login's, inside an envelope too), as one JSON array. Nothing else of a
-- body is returned.
--
-- No read without its record: the record (loader.pii_access_log: who, when, why, which
-- messages, how many values) is committed before the values are read. One transaction cannot
-- promise that (a caller could read the values and roll back, or drop the connection before
-- the commit, and the record would be gone), so reveal is a procedure: it writes the record
-- (loader._reveal_log), commits, and only then reads (loader._reveal_read, which returns values
-- only for a record of the caller's own that a transaction before the current one committed,
-- less than five minutes ago). The log is append-only for every role, the owner included
-- (a trigger refuses UPDATE, DELETE and TRUNCATE; only the table's owner could drop it, a
-- change `loader doctor` reports).
--
-- A purpose is required (NULL or blank is refused); one call asks for at most
-- reveal_max_messages messages (loader.settings, default 100; the owner raises it with
-- `update loader.settings set value = '500' where name = 'reveal_max_messages'`), so it is no
-- bulk export. No function the reader may call hashes text of its choosing or reads a key.

-- The log's guard.
create or replace function loader._append_only() returns trigger
language plpgsql as $$
begin
    raise exception '% is append-only: % refused', tg_table_name, tg_op
        using errcode = 'insufficient_privilege';
end
$$;
comment on function loader._append_only() is 'Trigger: refuses UPDATE, DELETE and TRUNCATE';

-- (The triggers themselves are made, and enabled, by sql/90_privileges.sql, which runs on
-- every migrate: a migrate then restores them whatever removed or disabled them.)

-- _reveal_encoding: refuses a session whose client_encoding is not UTF8. Raw values go to the
-- client as text: converting one the client's encoding cannot hold fails with an error that
-- quotes its bytes (in the session and the server log), after the record said it was returned.
create or replace function loader._reveal_encoding() returns void
language plpgsql as $$
begin
    if pg_catalog.current_setting('client_encoding') <> 'UTF8' then
        raise exception 'a reveal needs client_encoding UTF8 (this session has %)',
            pg_catalog.current_setting('client_encoding')
            using errcode = 'feature_not_supported',
                  hint = 'set client_encoding = ''UTF8'', then call loader.reveal again';
    end if;
end
$$;
comment on function loader._reveal_encoding() is 'Private: refuse a reveal to a session whose client_encoding is not UTF8';

-- _ascii: a value with every character outside ASCII written as \u and its code point in hex
-- (4 digits or more), so that no client_encoding a caller switches to, even within the
-- statement that reads, can fail converting it (the error would quote the value's bytes). No
-- backslash in this body: chr(92) stands for it.
create or replace function loader._ascii(v text) returns text
language sql immutable as $$
    select case when v is null or v !~ '[^[:ascii:]]' then v
           else (select string_agg(case when ascii(c) < 128 then c
                                        else chr(92) || 'u' || lpad(to_hex(ascii(c)), 4, '0') end,
                                   '' order by n)
                   from regexp_split_to_table(v, '') with ordinality as r (c, n)) end
$$;
comment on function loader._ascii(text) is 'Private: a value with its non-ASCII characters escaped as \uXXXX';

-- _reveal_log: checks a reveal request (a purpose, within the bound), writes its record, and
-- returns the record's id. Committed by loader.reveal before anything is read.
create or replace function loader._reveal_log(message_ids text[], purpose text) returns bigint
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
#variable_conflict use_variable
declare
    bound integer;
    access bigint;
begin
    if purpose is null or btrim(purpose) = '' then
        raise exception 'a reveal needs a purpose (why these values must be seen)'
            using errcode = 'invalid_parameter_value';
    end if;
    perform loader._reveal_encoding();
    perform loader._read_committed('reveal');
    if coalesce(cardinality(message_ids), 0) = 0 then
        raise exception 'a reveal needs at least one message id'
            using errcode = 'invalid_parameter_value';
    end if;
    select s.value::integer into bound from loader.settings s where s.name = 'reveal_max_messages';
    if cardinality(message_ids) > coalesce(bound, 100) then
        raise exception 'one reveal may ask for % messages at most (asked for %)',
            coalesce(bound, 100), cardinality(message_ids)
            using errcode = 'program_limit_exceeded',
                  hint = 'the owner sets the bound: update loader.settings set value = ''...'' where name = ''reveal_max_messages''';
    end if;
    -- The record covers exactly the messages that have a body to reveal now: staged, not
    -- purged, not erased, and not an erased person's (loader._suppressed, the transform's own
    -- rule, by the one predicate loader._claimants). A read returns values of these only.
    insert into loader.pii_access_log (at, role, purpose, message_ids, revealable, values_returned)
    select clock_timestamp(), session_user, purpose, message_ids, v.ids, cardinality(v.ids)
      from (select array(select r.message_id from loader.raw_logins r
                          where r.message_id = any (message_ids)
                            and r.purged_at is null and r.erased_at is null
                            and not loader._suppressed(loader._claimants(r.body), r.body,
                                                       coalesce(r.sent_at, r.staged_at), r.staged_at)
                          order by r.message_id) as ids) v
    returning id into access;
    return access;
end
$$;
comment on function loader._reveal_log(text[], text) is
    'Private to loader.reveal: record a reveal request; returns its id';

-- _reveal_read: the values a committed record of the caller's own covers: per message, in the
-- order asked, its status (revealed, purged, erased, not staged) and the login's ip and
-- device_id when revealed.
create or replace function loader._reveal_read(access bigint) returns jsonb
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
#variable_conflict use_variable
declare
    request loader.pii_access_log;
begin
    perform loader._reveal_encoding();
    -- Under an older snapshot it would return values an erasure or purge has since ended.
    perform loader._read_committed('reveal');
    select * into request from loader.pii_access_log a where a.id = access;
    if request.id is null or request.role <> session_user
       or request.xact = pg_current_xact_id()
       or pg_xact_status(request.xact) is distinct from 'committed'
       or request.at < clock_timestamp() - interval '5 minutes' then
        raise exception 'no committed reveal request % of yours from the last five minutes', access
            using errcode = 'insufficient_privilege',
                  hint = 'call loader.reveal(message_ids, purpose), which records the request first';
    end if;
    -- Values only for the messages the record covers (revealable), and only while each is
    -- still kept and not an erased person's: never more than the record counts. A message
    -- staged after the record was written is 'not staged' for it, whenever it is read.
    return (select coalesce(jsonb_agg(jsonb_build_object(
                       'message_id', m.id,
                       'status', s.status,
                       'ip', case when s.status = 'revealed' then loader._ascii(l.login ->> 'ip') end,
                       'device_id', case when s.status = 'revealed'
                                         then loader._ascii(l.login ->> 'device_id') end)
                   order by m.n), '[]')
              from unnest(request.message_ids) with ordinality as m (id, n)
              left join loader.raw_logins r
                     on r.message_id = m.id
                    and (r.message_id = any (request.revealable) or r.staged_at <= request.at)
              cross join lateral (
                  select case when r.message_id is null then 'not staged'
                              when r.erased_at is not null then 'erased'
                              when r.purged_at is not null then 'purged'
                              when loader._suppressed(loader._claimants(r.body), r.body,
                                                      coalesce(r.sent_at, r.staged_at), r.staged_at)
                                  then 'erased'
                              -- Staged, but not visible yet when the record was written.
                              when not (r.message_id = any (coalesce(request.revealable, '{}')))
                                  then 'not staged'
                              else 'revealed' end as status) s
              left join lateral (select loader._login(r.body) as login) l on true);
end
$$;
comment on function loader._reveal_read(bigint) is
    'Private to loader.reveal: the values a committed reveal request of the caller''s asked for';

-- reveal: the audited read (see the head of this file). CALL it outside a transaction block: it
-- commits its record before it reads.
create or replace procedure loader.reveal(
    message_ids text[],
    purpose text,
    inout revealed jsonb default null)
language plpgsql as $$
declare
    access bigint;
begin
    access := loader._reveal_log(message_ids, purpose);
    commit;
    revealed := loader._reveal_read(access);
end
$$;
comment on procedure loader.reveal(text[], text, jsonb) is
    'Raw ip and device_id of these messages, for loader_pii_reader; every call recorded in loader.pii_access_log first';
