-- V1: the staging (outbox) table, run bookkeeping, the analysts' table, rejects, the key table,
-- and the NOLOGIN roles with their grants. Applied by `loader migrate` inside one transaction,
-- under an advisory lock. Never edit this file once merged: add V2.

-- pgcrypto provides hmac() and gen_random_bytes(). The SQL functions in sql/ call it as
-- public.hmac(...), so it must live in schema public (where `create extension` puts it by default).
create extension if not exists pgcrypto with schema public;
do $$
begin
    if (select extnamespace::regnamespace::text from pg_extension where extname = 'pgcrypto')
       <> 'public' then
        raise exception 'pgcrypto is installed in another schema than public; loader expects public';
    end if;
end
$$;

create schema if not exists loader;
comment on schema loader is 'loader: raw staging, run bookkeeping, rejects and keys (see README)';
revoke all on schema loader from public;

-- Roles are cluster-wide: create them only when missing, so several databases can share them.
do $$
begin
    if not exists (select from pg_roles where rolname = 'loader_ingest') then
        create role loader_ingest nologin;
    end if;
    if not exists (select from pg_roles where rolname = 'loader_analyst') then
        create role loader_analyst nologin;
    end if;
end
$$;

-- One row per `loader ingest` run. Counters are updated in the same transaction that stages a
-- batch (received, staged, duplicates) and right after the delete (deleted, delete_failures).
create table loader.ingest_runs (
    id bigint generated always as identity constraint ingest_runs_pkey primary key,
    started_at timestamptz not null default now(),
    finished_at timestamptz,
    queue text not null,
    mode text not null constraint ingest_runs_mode_check check (mode in ('drain', 'follow')),
    received bigint not null default 0,
    staged bigint not null default 0,
    duplicates bigint not null default 0,
    deleted bigint not null default 0,
    delete_failures bigint not null default 0,
    loader_version text not null
);
comment on table loader.ingest_runs is 'One row per loader ingest run, with its message counters';

-- The outbox: every SQS message ever staged, exactly as received. Holds PII.
create table loader.raw_logins (
    id bigint generated always as identity constraint raw_logins_pkey primary key,
    message_id text not null constraint raw_logins_message_id_key unique,
    -- The parsed body; a body that is not storable JSON is kept as a JSON string of the raw text.
    body jsonb not null,
    body_is_json boolean not null,
    sent_at timestamptz,
    receive_count integer,
    queue text not null,
    ingest_run_id bigint constraint raw_logins_ingest_run_fkey references loader.ingest_runs (id),
    staged_at timestamptz not null default now()
);
comment on table loader.raw_logins is
    'Every SQS message ever staged (raw, holds PII): one row per message_id';
comment on column loader.raw_logins.body_is_json is
    'false: the body was not JSON that jsonb can store; body is then a JSON string of the raw text';

create table loader.login_rejects (
    message_id text not null constraint login_rejects_message_id_key unique,
    reason text not null,
    detail text not null,
    rejected_at timestamptz not null default now()
);
comment on table loader.login_rejects is
    'Staged messages the transform refused: machine-readable reason code, human detail without PII';

-- Masking keys: owner-only. Exactly one active (not retired) key at a time.
create table loader.mask_keys (
    id integer generated always as identity constraint mask_keys_pkey primary key,
    key bytea not null constraint mask_keys_key_length check (length(key) = 32),
    created_at timestamptz not null default now(),
    retired_at timestamptz,
    source text not null default 'generated'
        constraint mask_keys_source_check check (source in ('generated', 'installed'))
);
create unique index mask_keys_one_active on loader.mask_keys ((true)) where retired_at is null;
comment on table loader.mask_keys is 'HMAC keys for masking PII; owner-only, one active key';

-- The analysts' table: adopt it when it already exists with the original seven columns.
create table if not exists public.user_logins (
    user_id varchar(128),
    device_type varchar(32),
    masked_ip varchar(256),
    masked_device_id varchar(256),
    locale varchar(32),
    app_version integer,
    create_date date
);
do $$
declare
    expected constant text[] := array[
        'user_id character varying(128)', 'device_type character varying(32)',
        'masked_ip character varying(256)', 'masked_device_id character varying(256)',
        'locale character varying(32)', 'app_version integer', 'create_date date'];
    found text[];
begin
    select array_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod))
      into found
      from pg_attribute a
     where a.attrelid = 'public.user_logins'::regclass
       and a.attname = any (array['user_id', 'device_type', 'masked_ip', 'masked_device_id',
                                  'locale', 'app_version', 'create_date'])
       and not a.attisdropped;
    if not (found @> expected) then
        raise exception 'public.user_logins exists but its columns differ from the contract: %',
            array(select unnest(expected) except select unnest(found));
    end if;
end
$$;
alter table public.user_logins
    add column if not exists message_id text,
    add column if not exists ip_network cidr,
    add column if not exists app_version_text text,
    add column if not exists mask_key_id integer,
    add column if not exists loaded_at timestamptz default now();
create unique index if not exists user_logins_message_id_key on public.user_logins (message_id);
comment on column public.user_logins.message_id is 'SQS MessageId of the staged message (loader rows)';
comment on column public.user_logins.ip_network is 'IPv4 /24 or IPv6 /48 network of the IP';
comment on column public.user_logins.app_version_text is 'app_version exactly as sent';
comment on column public.user_logins.mask_key_id is 'loader.mask_keys.id of the key that masked the row';

-- Grants. Functions in schema loader are not executable by PUBLIC unless granted one by one.
alter default privileges in schema loader revoke execute on functions from public;

grant usage on schema loader to loader_ingest, loader_analyst;
-- Ingest stages rows and learns which were new (RETURNING message_id); it never reads bodies.
grant insert on loader.raw_logins to loader_ingest;
grant select (id, message_id) on loader.raw_logins to loader_ingest;
grant select, insert, update on loader.ingest_runs to loader_ingest;
-- Analysts read the masked table, reject reasons and run bookkeeping; never raw_logins or keys.
grant select on public.user_logins to loader_analyst;
grant select on loader.login_rejects to loader_analyst;
grant select on loader.ingest_runs to loader_analyst;
