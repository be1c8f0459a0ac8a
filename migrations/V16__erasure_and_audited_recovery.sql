-- V16: erasing a person on request (`loader forget`, sql/42_erasure.sql) and recovering a raw
-- value only through an audited path (`loader.reveal`, sql/44_reveal.sql). Never edit once
-- merged: add V17.

-- The role that may recover raw values (granted to the few who may; NOLOGIN, like the others).
do $$
begin
    if not exists (select from pg_roles where rolname = 'loader_pii_reader') then
        create role loader_pii_reader nologin;
    end if;
end
$$;

-- An erased message keeps its row (so a redelivery of its MessageId stays a duplicate), with
-- its body purged and the time of its erasure.
alter table loader.raw_logins add column erased_at timestamptz;
create index raw_logins_erased on loader.raw_logins (message_id) where erased_at is not null;
-- Finding a person's loaded rows (and an analyst's duplicates by user).
create index if not exists user_logins_user_id on public.user_logins (user_id);

-- The key of the erasure ledger's hashes: 32 random bytes, owner only, never rotated (a hash
-- must keep matching later messages of the same person) and never sent anywhere.
create table loader.erasure_key (
    singleton boolean not null default true constraint erasure_key_pkey primary key
        constraint erasure_key_singleton check (singleton),
    key bytea not null constraint erasure_key_length check (length(key) = 32)
);
insert into loader.erasure_key (key) values (public.gen_random_bytes(32));

-- The erasure ledger: one row per request, never a user id in clear.
create table loader.erasures (
    id bigint generated always as identity constraint erasures_pkey primary key,
    reference text not null constraint erasures_reference_check check (btrim(reference) <> ''),
    requested_by text not null,
    started_at timestamptz not null,
    finished_at timestamptz,
    users integer not null,
    counts jsonb not null default '{}'
);
-- The persons a request named, as keyed hashes (HMAC-SHA256 under loader.erasure_key), so that
-- a message of theirs sent before the request and staged after it is suppressed too.
create table loader.erased_users (
    user_hash bytea not null,
    erasure_id bigint not null constraint erased_users_erasure_fkey references loader.erasures (id),
    erased_at timestamptz not null,
    constraint erased_users_pkey primary key (user_hash, erasure_id)
);
-- What an unfinished request still has to erase: message ids, removed batch by batch.
create table loader.erasure_work (
    erasure_id bigint not null constraint erasure_work_erasure_fkey references loader.erasures (id),
    message_id text not null,
    constraint erasure_work_pkey primary key (erasure_id, message_id)
);

-- Every recovery of a raw value: who, when, why, which messages, how many values. Written
-- before the values can be read (sql/44_reveal.sql), append-only for every role.
create table loader.pii_access_log (
    id bigint generated always as identity constraint pii_access_log_pkey primary key,
    at timestamptz not null,
    role text not null,
    purpose text not null constraint pii_access_log_purpose_check check (btrim(purpose) <> ''),
    message_ids text[] not null,
    values_returned integer not null,
    -- The transaction that wrote it: the values are read only once it has committed.
    xact xid8 not null default pg_current_xact_id()
);

-- Settings the owner changes in SQL (`update loader.settings set value = ...`).
create table loader.settings (
    name text constraint settings_pkey primary key,
    value text not null
);
insert into loader.settings (name, value) values ('reveal_max_messages', '100');

comment on column loader.raw_logins.erased_at is
    'When the message was erased (loader forget, or suppressed as sent before its user''s erasure): body purged, no outcome kept';
comment on table loader.erasure_key is 'The key of the erasure ledger''s hashes (owner only; never rotated, never sent)';
comment on column loader.erasure_key.singleton is 'Always true: one row';
comment on column loader.erasure_key.key is '32 random bytes';
comment on table loader.erasures is 'Erasure requests (loader forget): when, by whom, the reference, rows per table; never a user id';
comment on column loader.erasures.id is 'Erasure id';
comment on column loader.erasures.reference is 'The request''s reference (a ticket), as given';
comment on column loader.erasures.requested_by is 'The login (session_user) that ran it';
comment on column loader.erasures.started_at is 'When it started';
comment on column loader.erasures.finished_at is 'When it finished; NULL while it runs or after a kill (rerun to finish)';
comment on column loader.erasures.users is 'How many user ids it named';
comment on column loader.erasures.counts is 'Rows erased per table';
comment on table loader.erased_users is 'The persons erasures named, as HMAC-SHA256 under loader.erasure_key (no id in clear)';
comment on column loader.erased_users.user_hash is 'HMAC-SHA256 of the user id under loader.erasure_key';
comment on column loader.erased_users.erasure_id is 'The erasure that named them';
comment on column loader.erased_users.erased_at is 'When: their messages sent before it are suppressed when they arrive';
comment on table loader.erasure_work is 'Message ids an unfinished erasure has still to erase';
comment on column loader.erasure_work.erasure_id is 'The erasure';
comment on column loader.erasure_work.message_id is 'A message of its users';
comment on table loader.pii_access_log is 'Every recovery of raw values (loader.reveal): append-only, written before the values are read';
comment on column loader.pii_access_log.id is 'Access id';
comment on column loader.pii_access_log.at is 'When';
comment on column loader.pii_access_log.role is 'The login (session_user) that asked';
comment on column loader.pii_access_log.purpose is 'Why, as given (never empty)';
comment on column loader.pii_access_log.message_ids is 'The messages asked for';
comment on column loader.pii_access_log.values_returned is 'How many of them still had a body to reveal';
comment on column loader.pii_access_log.xact is 'The transaction that wrote the row (the values are read only after it committed)';
comment on table loader.settings is 'Settings the owner changes in SQL: reveal_max_messages (messages one reveal may ask for)';
comment on column loader.settings.name is 'Setting';
comment on column loader.settings.value is 'Its value, as text';
