-- Private helpers of the transform: masking, IP parsing, version parsing, validation.
--
-- Each statement is idempotent (create or replace), so this file reruns cleanly:
--   psql -v ON_ERROR_STOP=1 -f sql/10_helpers.sql
-- `loader migrate` applies it too. None of these is executable by PUBLIC or granted to the
-- loader roles (sql/90_privileges.sql): a function that returns
-- the HMAC of caller-chosen text would be a dictionary-attack oracle.

-- _try_inet_slow: the text as inet, or NULL when it does not parse. A failed ::inet cast would
-- abort a whole set-based statement (PG15 has no pg_input_is_valid), so the cast runs in an
-- exception block (a subtransaction). Parallel unsafe because of the exception block.
create or replace function loader._try_inet_slow(v text) returns inet
language plpgsql immutable strict parallel unsafe as $$
begin
    return v::inet;
exception when invalid_text_representation then
    return null;
end
$$;
comment on function loader._try_inet_slow(text) is 'The text as inet, or NULL (exception block)';

-- _ipv4_plain: true when the text (already trimmed) is a plain dotted-quad IPv4 address with
-- no leading zeros and no /mask. Such a text always casts to inet, and is exactly what host()
-- gives back for it, so its canonical form is the text itself. No backslash in any pattern
-- here: how a literal's backslashes read depends on the session's
-- standard_conforming_strings ('\.' could mean "any character"), and although every definer
-- function pins it, [.] means a dot whatever reads it (tests/it/privacy.rs checks no function
-- of schema loader holds a backslash).
create or replace function loader._ipv4_plain(t text) returns boolean
language sql immutable parallel safe as $$
    select t ~ '^(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])([.](25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}$'
$$;
comment on function loader._ipv4_plain(text) is 'Private: whether the text is a plain dotted-quad IPv4 address';

-- _inet_other: the already trimmed text as inet, or NULL, for a text that is not _ipv4_plain.
-- IPv6 in the forms the inet parser always accepts (eight groups of 1-4 hex digits, or at most
-- seven around one "::") is cast directly; text that cannot be an inet (anything but hex
-- digits, colons, dots and one /mask) is NULL at once; only the rest (IPv4 with leading zeros
-- or a mask, IPv6 with a mask or an embedded IPv4, malformed text) pays for the exception
-- block of _try_inet_slow.
create or replace function loader._inet_other(t text) returns inet
language sql immutable parallel unsafe as $$
    select case
        when t ~ '^[0-9A-Fa-f]{1,4}(:[0-9A-Fa-f]{1,4}){7}$'
            then t::inet
        -- "::" stands for at least one zero group: at most 7 colons means at most 7 groups.
        when t ~ '^([0-9A-Fa-f]{1,4}(:[0-9A-Fa-f]{1,4})*)?::([0-9A-Fa-f]{1,4}(:[0-9A-Fa-f]{1,4})*)?$'
             and length(t) - length(replace(t, ':', '')) <= 7
            then t::inet
        when t ~ '^[0-9A-Fa-f:.]+(/[0-9]{1,3})?$'
            then loader._try_inet_slow(t)
    end
$$;
comment on function loader._inet_other(text) is 'Private: a text that is not a plain IPv4 address as inet, or NULL';

-- _ip_network: IPv4 /24 or IPv6 /48 network of a parsed IP; NULL when it did not parse.
-- (network(), not host(): host(set_masklen(ip, 24)) would return the full address.)
create or replace function loader._ip_network(parsed inet) returns cidr
language sql immutable parallel safe as $$
    select network(set_masklen(parsed, case family(parsed) when 4 then 24 else 48 end))
$$;
comment on function loader._ip_network(inet) is 'Private: IPv4 /24 or IPv6 /48 network';

-- _mask: lowercase hex HMAC-SHA256 of the UTF-8 bytes of v under key. NULL in, NULL out; blank
-- text counts as missing. Stable, not immutable: convert_to() is stable, and a helper is only
-- inlined when it is no more volatile than what it calls (text::bytea would be immutable but
-- parses backslash escapes, so it would mangle, or fail on, values holding a backslash).
create or replace function loader._mask(v text, key bytea) returns text
language sql stable parallel safe as $$
    select case when btrim(v) = '' then null
                else encode(public.hmac(convert_to(v, 'UTF8'), key, 'sha256'), 'hex') end
$$;
comment on function loader._mask(text, bytea) is 'Private: hex HMAC-SHA256 (an oracle if granted: never grant it)';

-- _app_version: major*10000 + minor*100 + patch for 1-3 dot-separated numeric parts, each 0-99
-- ("2.3.0" -> 20300, "0.96" -> 9600, "3.7" -> 30700, "3" -> 30000); NULL otherwise. The dots
-- are never stripped, so "2.3.0" and "23.0" cannot collide.
create or replace function loader._app_version(v text) returns integer
language sql immutable parallel safe as $$
    -- translate() turns every ASCII digit into 9, so the shapes below are exactly the texts
    -- matching ^[0-9]{1,2}([.][0-9]{1,2}){0,2}$ (a hashed lookup, cheaper than that regex).
    select case when translate(v, '012345678', '999999999') in
                     ('9', '99', '9.9', '9.99', '99.9', '99.99',
                      '9.9.9', '9.9.99', '9.99.9', '9.99.99', '99.9.9', '99.9.99', '99.99.9', '99.99.99') then
               split_part(v, '.', 1)::integer * 10000
               + coalesce(nullif(split_part(v, '.', 2), '')::integer, 0) * 100
               + coalesce(nullif(split_part(v, '.', 3), '')::integer, 0)
           end
$$;
comment on function loader._app_version(text) is 'Private: the app_version integer encoding, or NULL';

-- Envelopes. A login may arrive wrapped: SNS (raw message delivery off, SNS's default) delivers
-- a notification whose Message is the login as a JSON string; an EventBridge rule delivers an
-- event whose detail is the login. Staging keeps the envelope; the transform unwraps it. An
-- envelope is recognised by its whole shape, never by one key, so a login that happens to carry
-- a "Message" or "detail" field stays a login. Nothing of the envelope reaches user_logins (SNS
-- MessageAttributes may carry anything): only the login's fields are read. Unwrapping is always
-- on: recognised by shape, it can only turn what would be a user_id_missing reject into the
-- login it carries. create_date stays the SQS SentTimestamp's day for a wrapped login too (set
-- by SQS, not by the producer, as EventBridge's "time" can be).

-- _envelope: 'sns', 'eventbridge', or NULL (not a recognised envelope).
create or replace function loader._envelope(body jsonb) returns text
language sql immutable parallel safe as $$
    select case
        when jsonb_typeof(body) <> 'object' then null
        when body ->> 'Type' = 'Notification'
             and jsonb_typeof(body -> 'Message') = 'string'
             and jsonb_typeof(body -> 'MessageId') = 'string'
             and jsonb_typeof(body -> 'TopicArn') = 'string'
             and jsonb_typeof(body -> 'Timestamp') = 'string'
             and body ?& array['SignatureVersion', 'Signature', 'SigningCertURL', 'UnsubscribeURL']
            then 'sns'
        when jsonb_typeof(body -> 'detail-type') = 'string'
             and jsonb_typeof(body -> 'source') = 'string'
             and jsonb_typeof(body -> 'id') = 'string'
             and jsonb_typeof(body -> 'time') = 'string'
             and jsonb_typeof(body -> 'resources') = 'array'
             and body ?& array['version', 'account', 'region', 'detail']
            then 'eventbridge'
    end
$$;
comment on function loader._envelope(jsonb) is
    'Private: sns or eventbridge when the body has that envelope''s whole shape, else NULL';

-- _json_object: the text as a JSON object, or NULL when it is not one (not JSON, not an object,
-- or JSON jsonb cannot store). An exception block (a subtransaction): only an SNS Message pays
-- for it, and no error quotes the text. Parallel unsafe because of the exception block.
create or replace function loader._json_object(t text) returns jsonb
language plpgsql immutable strict parallel unsafe as $$
declare
    parsed jsonb;
begin
    parsed := t::jsonb;
    return case when jsonb_typeof(parsed) = 'object' then parsed end;
exception when data_exception then
    return null;
end
$$;
comment on function loader._json_object(text) is 'Private: the text as a JSON object, or NULL (exception block)';

-- _unwrap: the login a body carries, given its _envelope (NULL when the envelope carries none);
-- the body itself when it has no envelope. The one definition of what the transform, an
-- erasure and a reveal read as the login.
create or replace function loader._unwrap(body jsonb, envelope text) returns jsonb
language sql immutable parallel unsafe as $$
    select case envelope
        when 'sns' then loader._json_object(body ->> 'Message')
        when 'eventbridge' then case when jsonb_typeof(body -> 'detail') = 'object' then body -> 'detail' end
        else body
    end
$$;
comment on function loader._unwrap(jsonb, text) is
    'Private: the login a body carries (through its SNS or EventBridge envelope), or NULL';

-- _user_hash: the erasure ledger's keyed hash of a user id (HMAC-SHA256 of its UTF-8 bytes under
-- loader.erasure_key, which the caller joins in, so the key is a column of a scan, never a
-- value). Private: granted, it would be a dictionary oracle for user ids.
create or replace function loader._user_hash(user_id text, key bytea) returns bytea
language sql stable parallel safe as $$
    select public.hmac(convert_to(user_id, 'UTF8'), key, 'sha256')
$$;
comment on function loader._user_hash(text, bytea) is 'Private: the erasure ledger''s HMAC of a user id';

-- _body_hash: the keyed fingerprint of an erased body (loader.erased_bodies): HMAC-SHA256 of
-- its text under loader.erasure_key, joined in by the caller like _user_hash's.
create or replace function loader._body_hash(body jsonb, key bytea) returns bytea
language sql stable parallel safe as $$
    select public.hmac(convert_to(body::text, 'UTF8'), key, 'sha256')
$$;
comment on function loader._body_hash(jsonb, bytea) is 'Private: the keyed fingerprint of an erased body';

-- _user_tag: the cheap keyed tag of a user id (loader.erased_users.user_tag) under the seed the
-- caller joins in.
create or replace function loader._user_tag(user_id text, seed bigint) returns bigint
language sql immutable parallel safe as $$
    select hashtextextended(user_id, seed)
$$;
comment on function loader._user_tag(text, bigint) is 'Private: the erased users'' 64-bit keyed tag of a user id';

-- _login: _unwrap with the body's own envelope.
create or replace function loader._login(body jsonb) returns jsonb
language sql immutable parallel unsafe as $$
    select loader._unwrap(body, loader._envelope(body))
$$;
comment on function loader._login(jsonb) is 'Private: the login a staged body carries, or NULL';

-- Validation. Reason codes, the first failing check wins:
--   erased (sent before its user asked to be erased: sql/42_erasure.sql),
--   sns_message_not_object, eventbridge_detail_not_object (an envelope without a login),
--   body_not_json, body_not_object, field_not_scalar, user_id_missing, user_id_empty,
--   value_too_long.
-- Unknown extra keys are ignored, so producers may add fields. Details name fields and sizes,
-- never values (no PII). Plain CASE chains: this runs once per row and must stay cheap.

-- _nested_field: the first contract field holding a JSON object or array, or NULL.
create or replace function loader._nested_field(body jsonb) returns text
language sql immutable parallel safe as $$
    select case
        when jsonb_typeof(body -> 'user_id') in ('object', 'array') then 'user_id'
        when jsonb_typeof(body -> 'device_type') in ('object', 'array') then 'device_type'
        when jsonb_typeof(body -> 'ip') in ('object', 'array') then 'ip'
        when jsonb_typeof(body -> 'locale') in ('object', 'array') then 'locale'
        when jsonb_typeof(body -> 'device_id') in ('object', 'array') then 'device_id'
        when jsonb_typeof(body -> 'app_version') in ('object', 'array') then 'app_version'
    end
$$;
comment on function loader._nested_field(jsonb) is 'Private: the first contract field holding an object or array';

-- _too_long: the first value longer than its column, as a detail line, or NULL. Never
-- truncate silently: user_logins.user_id is varchar(128), device_type and locale varchar(32).
-- (::text, not text || integer: that operator is only stable, and an immutable SQL function
-- calling it is not inlined but run as a nested statement per row.)
create or replace function loader._too_long(body jsonb) returns text
language sql immutable parallel safe as $$
    select case
        when char_length(body ->> 'user_id') > 128
            then 'user_id is ' || char_length(body ->> 'user_id')::text || ' characters; the column allows 128'
        when char_length(body ->> 'device_type') > 32
            then 'device_type is ' || char_length(body ->> 'device_type')::text || ' characters; the column allows 32'
        when char_length(body ->> 'locale') > 32
            then 'locale is ' || char_length(body ->> 'locale')::text || ' characters; the column allows 32'
    end
$$;
comment on function loader._too_long(jsonb) is 'Private: the first value longer than its column, as a detail line';

-- _reason: why a staged body cannot load (a reason code), or NULL when it loads. The caller
-- has extracted the contract fields with ->> (ip may be trimmed), so each is extracted once per
-- row. ->>
-- gives an object's or array's JSON text, which starts with { or [: only such a value needs the
-- closer look of _nested_field (a string starting so is looked at too, and passes). In an
-- object, ->> is NULL exactly when user_id is missing or JSON null.
create or replace function loader._reason(body jsonb, body_is_json boolean, user_id text,
    device_type text, ip text, locale text, device_id text, app_version text) returns text
language sql immutable parallel safe as $$
    select case
        when not body_is_json then 'body_not_json'
        when jsonb_typeof(body) <> 'object' then 'body_not_object'
        -- ascii(): the code of the first character; 91 is [, 123 is {.
        when (ascii(user_id) in (91, 123) or ascii(device_type) in (91, 123)
              or ascii(ip) in (91, 123) or ascii(locale) in (91, 123)
              or ascii(device_id) in (91, 123) or ascii(app_version) in (91, 123))
             and loader._nested_field(body) is not null then 'field_not_scalar'
        when user_id is null then 'user_id_missing'
        when btrim(user_id) = '' then 'user_id_empty'
        -- A text has no more characters than bytes: octet_length() (no scan) rules most out.
        when (octet_length(user_id) > 128 and char_length(user_id) > 128)
             or (octet_length(device_type) > 32 and char_length(device_type) > 32)
             or (octet_length(locale) > 32 and char_length(locale) > 32) then 'value_too_long'
    end
$$;
comment on function loader._reason(jsonb, boolean, text, text, text, text, text, text) is
    'Private: reason code why a staged body cannot load, or NULL';

-- _reject_detail: the human line for a reason code (no values, only field names and sizes).
create or replace function loader._reject_detail(body jsonb, reason text) returns text
language sql immutable parallel safe as $$
    select case reason
        when 'body_not_json' then 'the message body is not valid JSON'
        when 'body_not_object' then 'the message body is a JSON ' || jsonb_typeof(body) || ', not an object'
        when 'field_not_scalar' then loader._nested_field(body) || ' is a JSON '
            || jsonb_typeof(body -> loader._nested_field(body)) || ', not a scalar'
        when 'user_id_missing' then 'user_id is missing or null'
        when 'user_id_empty' then 'user_id is empty'
        when 'value_too_long' then loader._too_long(body)
        when 'sns_message_not_object' then 'the SNS notification''s Message is not a JSON object'
        when 'erased' then 'sent before its user asked to be erased; its body was not kept'
        when 'eventbridge_detail_not_object' then 'the EventBridge event''s detail is not a JSON object'
    end
$$;
comment on function loader._reject_detail(jsonb, text) is 'Private: the human detail of a reject reason';

-- _setting_int: an integer of loader.settings (the owner changes them in SQL), or `fallback`
-- when it is unset or not a whole number.
create or replace function loader._setting_int(setting text, fallback integer) returns integer
language sql stable parallel safe as $$
    select coalesce((select case when s.value ~ '^[0-9]{1,9}$' then s.value::integer end
                       from loader.settings s where s.name = setting), fallback)
$$;
comment on function loader._setting_int(text, integer) is
    'Private: an integer setting of loader.settings, or the fallback';

-- _caller_is_owner: whether the login calling a definer function has the owner's privileges
-- (the owner of schema loader, or a superuser). The owner may read and write every table
-- anyway, so the bounds on what lesser roles pass do not apply to it.
create or replace function loader._caller_is_owner() returns boolean
language sql stable parallel safe as $$
    select pg_has_role(session_user,
                       (select n.nspowner from pg_catalog.pg_namespace n where n.nspname = 'loader'),
                       'usage')
$$;
comment on function loader._caller_is_owner() is
    'Private: whether session_user has the privileges of the owner of schema loader';

-- Whose message is this? The one answer to "does this staged message belong to this person?",
-- for every form a body can take, used by every path that asks: the erasure's search
-- (sql/42_erasure.sql), the suppression of an erased person's later messages by the transform
-- and the rebuild (_suppressed, below), and reveal (sql/44_reveal.sql).

-- _scalar_user_id: a login's user_id when it names one person: a string, number or boolean of
-- 1 to 128 characters that is not blank; NULL for any other login (no user_id, an array or an
-- object, blank, too long), which then belongs to every id it mentions (_claimant_set).
create or replace function loader._scalar_user_id(login jsonb) returns text
language sql immutable parallel safe as $$
    select case when jsonb_typeof(login -> 'user_id') in ('string', 'number', 'boolean')
                     and char_length(btrim(login ->> 'user_id')) between 1 and 128
                then login ->> 'user_id' end
$$;
comment on function loader._scalar_user_id(jsonb) is
    'Private: a login''s user_id when it names one person, else NULL';

-- _mention_set: every text a body holds that could be a user id, one row each (repeats
-- possible). From each string and number in it (nested ones too) and each object key, in
-- three readings: as written, with JSON unicode escapes decoded (a text body, or an SNS Message
-- cut off mid-JSON, keeps them as typed), and with %XX escapes of printable ASCII decoded (a
-- URL or a form body: alice%40example.com); and in each reading: the text itself, its tokens
-- (split at blanks, quotes, = , ; & and brackets: auth0|abc123 and tenant:alice stay whole),
-- its words (runs of letters, digits and _ . @ + -), each token and word without leading or
-- trailing . @ + -, and each quoted string. Only texts of 1 to 128 characters
-- (user_logins.user_id is varchar(128)). Erring towards more candidates only ever erases or
-- suppresses a reject (such a body never loads). Staged bodies are at most 1 MiB
-- (loader.stage). A set-returning SQL function with every step inline, so the transform's
-- statement inlines it whole: a function called per string would start an executor each time
-- (about 0.3 ms, so a body of 100,000 strings took seconds). No backslash in this body: chr(92)
-- stands for it.
create or replace function loader._mention_set(body jsonb) returns setof text
language sql immutable parallel safe as $$
    select distinct t.m
      from (select v #>> '{}' as s
              from jsonb_path_query(body, 'strict $.**') as v
             where jsonb_typeof(v) in ('string', 'number')
            union all
            select k
              from jsonb_path_query(body, 'strict $.** ? (@.type() == "object")') as o,
                   jsonb_object_keys(o) as k) as leaf
      cross join lateral (
          select leaf.s
          union all
          select string_agg(case when m[1] is not null
                                      and ('x' || substr(m[1], 3))::bit(16)::integer
                                          not between 55296 and 57343
                                      and ('x' || substr(m[1], 3))::bit(16)::integer > 0
                                 then chr(('x' || substr(m[1], 3))::bit(16)::integer)
                                 else coalesce(m[1], m[2]) end, '' order by n)
            from regexp_matches(leaf.s, '(' || chr(92) || chr(92) || 'u[0-9A-Fa-f]{4})|([^'
                                        || chr(92) || chr(92) || ']+|' || chr(92) || chr(92)
                                        || ')', 'g') with ordinality as r (m, n)
           where strpos(leaf.s, chr(92) || 'u') > 0
          union all
          select string_agg(case when m[1] is not null
                                 then chr(('x' || substr(m[1], 2))::bit(8)::integer)
                                 else coalesce(m[1], m[2]) end, '' order by n)
            from regexp_matches(leaf.s, '(%(?:2[0-9A-Fa-f]|[3-6][0-9A-Fa-f]|7[0-9A-Ea-e]))|([^%]+|%)', 'g')
                     with ordinality as r (m, n)
           where strpos(leaf.s, '%') > 0
      ) as x (s)
      -- Each split only where the text has what it splits at (most strings are one word).
      cross join lateral (
          select x.s
          union all
          select w from regexp_split_to_table(x.s, '[][[:space:]"''=,;&{}()<>]+') as w
           where x.s ~ '[][[:space:]"''=,;&{}()<>]'
          union all
          select w from regexp_split_to_table(x.s, '[^[:alnum:]_.@+-]+') as w
           where x.s ~ '[^[:alnum:]_.@+-]'
          union all
          select q[1] from regexp_matches(x.s, '"([^"]*)"', 'g') as q where strpos(x.s, '"') > 0
          union all
          select q[1] from regexp_matches(x.s, '''([^'']*)''', 'g') as q
           where strpos(x.s, '''') > 0
      ) as w (m)
      cross join lateral (
          select w.m
          union all
          select btrim(w.m, '.@+-') where w.m ~ '^[.@+-]|[.@+-]$'
      ) as t (m)
     where x.s is not null and char_length(t.m) between 1 and 128
$$;
comment on function loader._mention_set(jsonb) is
    'Private: every string, number, key, token, word and quoted string a body holds, decoded too (1-128 characters), one row each';

-- _claimant_set: the user ids a staged message belongs to, one row each. A login whose user_id
-- names one person (_scalar_user_id; plain, or carried by an SNS or EventBridge envelope)
-- belongs to that id alone. Any other body (not JSON, an envelope whose login does not parse,
-- a user_id that is an array, an object, blank or too long, no user_id at all) belongs to
-- every id it mentions (_mention_set). Such a message never loads, so erring towards a match
-- can only erase or suppress a reject, never a login. A set-returning SQL function, inlined
-- into the statements that ask (the erasure's search); the transform writes its two branches
-- out, the scalar one without a subquery per row.
create or replace function loader._claimant_set(body jsonb) returns setof text
language sql immutable parallel unsafe as $$
    select l.id
      from (select loader._scalar_user_id(loader._login(body)) as id) as l
     where l.id is not null
    union all
    select m
      from (select loader._scalar_user_id(loader._login(body)) as id) as l,
           loader._mention_set(body) as m
     where l.id is null
$$;
comment on function loader._claimant_set(jsonb) is
    'Private: the user ids a staged message belongs to, whatever its form, one row each (the one predicate of erasure, suppression and reveal)';

-- _claimants: _claimant_set as an array without repeats (reveal, _suppressed).
create or replace function loader._claimants(body jsonb) returns text[]
language sql immutable parallel unsafe as $$
    select coalesce(array_agg(distinct c), '{}') from loader._claimant_set(body) as c
$$;
comment on function loader._claimants(jsonb) is
    'Private: the user ids a staged message belongs to, as an array';

-- _suppressed: whether a message (its _claimants, body, SentTimestamp and staging time) is an
-- erased person's that must not load: one of its claimants was erased (loader.erased_users)
-- and either it was sent before that erasure, or it was staged within erasure_quarantine_days
-- after it (loader.settings, default 28: a message sent before the erasure and moved through a
-- dead-letter queue comes back on AWS with a new MessageId and SentTimestamp), or its body is
-- byte for byte one that was erased (loader.erased_bodies: a redrive or replay, whenever it
-- comes). The common case, a claimant no erasure named, costs one cheap keyed tag
-- (hashtextextended) looked up in a hash; only a hit pays for the HMACs that confirm it. Users
-- erased before V17 have no tag: their rule stays "sent before the erasure", checked by HMAC.
-- The keys are columns of scans, never values (see _outcome_rows).
create or replace function loader._suppressed(
    claimants text[], body jsonb, sent timestamptz, staged timestamptz) returns boolean
language sql stable parallel safe as $$
    select coalesce((exists (select from unnest(claimants) as c
                     where loader._user_tag(c, (select x.tag_seed from loader.erasure_key x))
                           in (select e.user_tag from loader.erased_users e where e.user_tag is not null))
            or coalesce(sent < (select max(e.erased_at) from loader.erased_users e
                                 where e.user_tag is null), false))
       and exists (
           select from unnest(claimants) as c
             cross join loader.erasure_key as k
             join loader.erased_users as e on e.user_hash = loader._user_hash(c, k.key)
            where e.erased_at > sent
               or (e.user_tag is not null
                   and (staged < e.erased_at
                           + make_interval(days => loader._setting_int('erasure_quarantine_days', 28))
                        or exists (select from loader.erased_bodies b
                                    where b.body_hash = loader._body_hash(body, k.key))))),
           false)
$$;
comment on function loader._suppressed(text[], jsonb, timestamptz, timestamptz) is
    'Private: whether a staged message is an erased person''s that must not load';

-- _read_committed: raises unless the caller's transaction is READ COMMITTED. For the functions
-- whose guarantee needs each statement to see what committed before it: under an older
-- snapshot (REPEATABLE READ, SERIALIZABLE) stage() would miss an id staged since and stage the
-- message twice, and a reveal would return values an erasure or purge has since ended.
create or replace function loader._read_committed(caller text) returns void
language plpgsql stable set search_path = pg_catalog, pg_temp as $$
begin
    if current_setting('transaction_isolation') <> 'read committed' then
        raise exception '%: runs in READ COMMITTED transactions, not %',
            caller, current_setting('transaction_isolation')
            using errcode = 'invalid_transaction_state',
                  hint = 'set default_transaction_isolation to read committed for this login';
    end if;
end
$$;
comment on function loader._read_committed(text) is
    'Private: refuse a caller whose transaction is not READ COMMITTED (an older snapshot would see erased or staged rows wrongly)';

-- _add_counts: two {"key": count} objects added key by key (a batch's counts to a total).
create or replace function loader._add_counts(a jsonb, b jsonb) returns jsonb
language sql immutable set search_path = pg_catalog, pg_temp as $$
    select coalesce(jsonb_object_agg(c.key, c.n), '{}')
      from (select e.key, sum(e.value::bigint) as n
              from (select * from jsonb_each_text(a) union all select * from jsonb_each_text(b)) e
             group by e.key) c
$$;
comment on function loader._add_counts(jsonb, jsonb) is
    'Private: two {"key": count} objects added key by key';
