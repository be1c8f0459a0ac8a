-- Private helpers of the transform: masking, IP parsing, version parsing, validation.
--
-- Each statement is idempotent (create or replace), so this file reruns cleanly:
--   psql -v ON_ERROR_STOP=1 -f sql/10_helpers.sql
-- `loader migrate` applies it too. None of these is executable by PUBLIC (V1 revokes that by
-- default in schema loader) and none is granted to the loader roles: a function that returns
-- the HMAC of caller-chosen text would be a dictionary-attack oracle.

-- _try_inet: the text as inet, or NULL when it does not parse. A failed ::inet cast would abort
-- a whole set-based statement (PG15 has no pg_input_is_valid), so the cast runs in an exception
-- block; plain dotted-quad IPv4, the common case, skips that block's subtransaction. Parallel
-- unsafe because of the exception block.
create or replace function loader._try_inet(v text) returns inet
language plpgsql immutable strict parallel unsafe as $$
begin
    if v ~ '^(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}$' then
        return v::inet;
    end if;
    -- Only hex digits, colons, dots and one /mask can form an inet: skip the exception block
    -- for everything else.
    if v !~ '^[0-9A-Fa-f:.]+(/[0-9]{1,3})?$' then
        return null;
    end if;
    begin
        return v::inet;
    exception when invalid_text_representation then
        return null;
    end;
end
$$;
comment on function loader._try_inet(text) is 'The text as inet, or NULL when it does not parse';

-- _canonical_ip: what is hashed for an IP: host(ip::inet) when it parses (so two spellings of
-- one address mask alike), else the trimmed raw text. Blank or missing: NULL (no mask).
create or replace function loader._canonical_ip(v text) returns text
language sql immutable parallel unsafe as $$
    select case when btrim(v) = '' then null
                else coalesce(host(loader._try_inet(btrim(v))), btrim(v)) end
$$;

-- _ip_network: IPv4 /24 or IPv6 /48 network of the IP; NULL when it does not parse.
-- (network(), not host(): host(set_masklen(ip, 24)) would return the full address.)
create or replace function loader._ip_network(v text) returns cidr
language sql immutable parallel unsafe as $$
    select network(set_masklen(i, case family(i) when 4 then 24 else 48 end))
      from (select loader._try_inet(btrim(v)) as i) as parsed
$$;

-- _mask: lowercase hex HMAC-SHA256 of the UTF-8 bytes of v under key. NULL in, NULL out; blank
-- text counts as missing. Stable, not immutable: convert_to() is stable, and a helper is only
-- inlined when it is no more volatile than what it calls (text::bytea would be immutable but
-- parses backslash escapes, so it would mangle, or fail on, values holding a backslash).
create or replace function loader._mask(v text, key bytea) returns text
language sql stable parallel safe as $$
    select case when btrim(v) = '' then null
                else encode(public.hmac(convert_to(v, 'UTF8'), key, 'sha256'), 'hex') end
$$;

-- _app_version: major*10000 + minor*100 + patch for 1-3 dot-separated numeric parts, each 0-99
-- ("2.3.0" -> 20300, "0.96" -> 9600, "3.7" -> 30700, "3" -> 30000); NULL otherwise. The dots
-- are never stripped, so "2.3.0" and "23.0" cannot collide.
create or replace function loader._app_version(v text) returns integer
language sql immutable parallel safe as $$
    select case when v ~ '^[0-9]{1,2}(\.[0-9]{1,2}){0,2}$' then
               split_part(v, '.', 1)::integer * 10000
               + coalesce(nullif(split_part(v, '.', 2), '')::integer, 0) * 100
               + coalesce(nullif(split_part(v, '.', 3), '')::integer, 0)
           end
$$;

-- _reject: why a staged body cannot load, as (reason code, detail), or no row when it loads.
-- The first failing check wins. Details name fields and sizes, never values (no PII).
-- Reason codes: body_not_json, body_not_object, field_not_scalar, user_id_missing,
-- user_id_empty, value_too_long. Unknown extra keys are ignored, so producers may add fields.
create or replace function loader._reject(body jsonb, body_is_json boolean)
returns table (reason text, detail text)
language sql immutable parallel safe as $$
    select c.reason, c.detail
      from (select
                -- the first contract field holding an object or array
                (select f.field
                   from unnest(array['user_id', 'device_type', 'ip', 'locale', 'device_id',
                                     'app_version']) with ordinality as f(field, n)
                  where jsonb_typeof(body -> f.field) in ('object', 'array')
                  order by f.n limit 1) as nested_field,
                -- the first value longer than its column
                (select l.field || ' is ' || char_length(body ->> l.field)
                        || ' characters; the column allows ' || l.max_length
                   from (values (1, 'user_id', 128), (2, 'device_type', 32), (3, 'locale', 32))
                        as l(n, field, max_length)
                  where char_length(body ->> l.field) > l.max_length
                  order by l.n limit 1) as too_long) as s,
           lateral (values
            (1, not body_is_json, 'body_not_json', 'the message body is not valid JSON'),
            (2, jsonb_typeof(body) <> 'object', 'body_not_object',
                'the message body is a JSON ' || jsonb_typeof(body) || ', not an object'),
            (3, s.nested_field is not null, 'field_not_scalar',
                s.nested_field || ' is a JSON ' || jsonb_typeof(body -> s.nested_field)
                || ', not a scalar'),
            (4, coalesce(jsonb_typeof(body -> 'user_id'), 'null') = 'null',
                'user_id_missing', 'user_id is missing or null'),
            (5, btrim(body ->> 'user_id') = '', 'user_id_empty', 'user_id is empty'),
            (6, s.too_long is not null, 'value_too_long', s.too_long))
           as c(priority, failed, reason, detail)
     where c.failed
     order by c.priority
     limit 1
$$;
comment on function loader._reject(jsonb, boolean) is
    'Why a staged body cannot load: (reason code, detail without PII), or no row';
