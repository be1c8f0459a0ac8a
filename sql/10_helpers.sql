-- Private helpers of the transform: masking, IP parsing, version parsing, validation.
--
-- Each statement is idempotent (create or replace), so this file reruns cleanly:
--   psql -v ON_ERROR_STOP=1 -f sql/10_helpers.sql
-- `loader migrate` applies it too. None of these is executable by PUBLIC or granted to the
-- loader roles (sql/90_privileges.sql): a function that returns
-- the HMAC of caller-chosen text would be a dictionary-attack oracle.

-- Replaced by the helpers below when the transform became set-based per field (one extraction
-- per row): _inet by _ipv4_plain and _inet_other, _canonical_ip by an expression in
-- _outcome_rows, _reject_reason by _reason.
drop function if exists loader._inet(text);
drop function if exists loader._canonical_ip(text, inet);
drop function if exists loader._reject_reason(jsonb, boolean);

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
