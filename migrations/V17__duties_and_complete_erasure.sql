-- V17: duties separated (a role that runs the transform and reads nothing it produces),
-- server-owned sent_at, erasure that covers every form of a message and holds on AWS (redrive,
-- replay), reveals that honour erasure with an exact log. Never edit once merged: add V18.

-- The role that runs the transform and reads nothing it produces (docs/security.md): granted,
-- beside loader_ingest, to a login that stages and transforms (loader run, the Lambda handler
-- with LOADER_TRANSFORM_AFTER_STAGE).
do $$
begin
    if not exists (select from pg_roles where rolname = 'loader_transformer') then
        create role loader_transformer nologin;
    end if;
end
$$;

-- A keyed 64-bit tag of each erased user id: the transform looks every message's user id up
-- in a hash of the tags (cheap), and only a hit pays for the HMAC that confirms it. The seed is
-- random, owner only, never rotated, like the erasure key.
alter table loader.erasure_key add column tag_seed bigint;
update loader.erasure_key
   set tag_seed = ('x' || encode(public.gen_random_bytes(8), 'hex'))::bit(64)::bigint;
alter table loader.erasure_key alter column tag_seed set not null;
-- A bitmap of the tags, one bit per tag modulo 2^20 (128 KiB): a body that is no login is
-- tested word by word against it before any index probe.
alter table loader.erasure_key add column tag_bits bytea;
update loader.erasure_key set tag_bits = decode(repeat('00', 131072), 'hex');
alter table loader.erasure_key alter column tag_bits set not null;
alter table loader.erasure_key add constraint erasure_key_tag_bits check (length(tag_bits) = 131072);
-- NULL for users erased before V17 (their ids are not kept, so no tag can be computed): those
-- keep the earlier rule, checked by HMAC for messages sent before their erasure.
alter table loader.erased_users add column user_tag bigint;
create index erased_users_tag on loader.erased_users (user_tag);

-- Keyed fingerprints of the erased bodies: a body byte for byte equal to one erased (a DLQ
-- redrive on AWS, with a new MessageId and SentTimestamp; a producer's replay) is suppressed
-- whenever it comes back.
-- Not unique: a transform inserting a fingerprint must never wait on another batch that holds
-- the same one uncommitted (a rare duplicate row costs nothing).
create table loader.erased_bodies (
    body_hash bytea not null,
    erased_at timestamptz not null
);
create index erased_bodies_hash on loader.erased_bodies (body_hash);

-- Sessions below the owner that the transform ended for holding a write transaction past the bound
-- (loader.settings evict_after_seconds): when, which session, which login. Never a query.
create table loader.evictions (
    at timestamptz not null,
    pid integer not null,
    role text not null,
    held_for interval not null
);

-- The messages a reveal record covers: those staged with a body to reveal when it was written.
-- A read returns values for these only (NULL on records written before V17: nothing).
alter table loader.pii_access_log add column revealable text[];

-- sent_at values the server replaced (outside what SQS can hold: in the future, or older than
-- a message can live), per run.
alter table loader.ingest_runs add column sent_at_replaced bigint not null default 0;
-- The transaction that last staged into the run: a transaction that staged cannot transform.
alter table loader.ingest_runs add column last_stage_xact xid8;
-- When the run's process was last heard of (every call, and a heartbeat while it idles): an
-- unfinished run not heard of for long ended without finishing (killed, out of memory, a lost
-- host), and reconcile says so instead of "running" for good.
alter table loader.ingest_runs add column last_seen_at timestamptz;
update loader.ingest_runs set last_seen_at = coalesce(finished_at, started_at);
create index ingest_runs_last_stage_xact on loader.ingest_runs (last_stage_xact);

insert into loader.settings (name, value) values
    ('erasure_quarantine_days', '28'),
    ('sent_at_max_age_days', '28'),
    ('evict_after_seconds', '10');
-- A setting the code does not read, or a value it would not understand, is refused, not
-- silently replaced by the default.
alter table loader.settings add constraint settings_known check (
    name in ('reveal_max_messages', 'erasure_quarantine_days', 'sent_at_max_age_days',
             'evict_after_seconds')
    and case when value !~ '^[0-9]{1,6}$' then false
             when name = 'reveal_max_messages' then value::integer between 1 and 100000
             when name = 'erasure_quarantine_days' then value::integer between 0 and 3650
             when name = 'sent_at_max_age_days' then value::integer between 14 and 3650
             when name = 'evict_after_seconds' then value::integer between 1 and 86400
        end);

comment on column loader.erasure_key.tag_seed is 'Seed of the erased users'' 64-bit tags (owner only)';
comment on column loader.erasure_key.tag_bits is 'Bit (tag modulo 2^20) set for every erased user''s tag: the cheap first test of a body that is no login';
comment on column loader.erased_users.user_tag is 'hashtextextended(user id, tag_seed): the cheap lookup before the HMAC; NULL before V17';
comment on table loader.erased_bodies is 'Keyed fingerprints (HMAC-SHA256 under loader.erasure_key) of erased bodies: suppressed whenever they come back';
comment on column loader.erased_bodies.body_hash is 'HMAC-SHA256 of the body''s text under loader.erasure_key';
comment on column loader.erased_bodies.erased_at is 'When the body was erased or suppressed';
comment on table loader.evictions is 'Sessions below the owner the transform ended for holding a write transaction open past evict_after_seconds (a row per termination sent: two transforms may both end one session)';
comment on column loader.evictions.at is 'When';
comment on column loader.evictions.pid is 'The ended session''s backend pid';
comment on column loader.evictions.role is 'Its login';
comment on column loader.evictions.held_for is 'How long its transaction had been open';
comment on column loader.pii_access_log.revealable is 'The messages whose values the record covers (staged, kept, not erased when it was written)';
comment on column loader.ingest_runs.sent_at_replaced is 'Messages whose SentTimestamp the server replaced by the staging time (future, or older than SQS keeps a message)';
comment on table loader.settings is 'Bounds the server enforces whatever a caller passes (docs/security.md "Settings the owner changes"); only known names and whole numbers in range';
comment on column loader.ingest_runs.last_seen_at is 'When its process last called in (staging, deletes, a heartbeat each minute while idle)';
comment on column loader.ingest_runs.last_stage_xact is 'The transaction that last staged into the run (a transaction that staged cannot transform)';
