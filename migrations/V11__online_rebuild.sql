-- V11: online rebuild and key rotation (sql/35_rebuild.sql). Never edit once merged.
--
-- A rebuild re-masks into new copies of public.user_logins and loader.login_rejects in
-- committed batches (ranges of raw_logins ids, claimed with SKIP LOCKED by parallel workers),
-- while the incremental transform writes every batch to both; a short transaction then swaps
-- the copies in. A rotation's new key waits here (owner-only) until that swap makes it active.

create table loader.rebuilds (
    id bigint generated always as identity constraint rebuilds_pkey primary key,
    -- The key the new copies are masked with: the active one, or the rotation's new key's id
    -- (taken from mask_keys' identity, so it is that key's id once active).
    key_id integer not null,
    new_key bytea constraint rebuilds_new_key_length check (length(new_key) = 32),
    new_key_source text constraint rebuilds_new_key_source_check
        check (new_key_source in ('generated', 'installed')),
    -- Ranges of raw_logins ids up to this one are copied by the workers; later rows (and rows
    -- still pending) get their new outcome from the incremental transform.
    upto bigint not null,
    started_at timestamptz not null default now(),
    finished_at timestamptz,
    state text not null default 'copying'
        constraint rebuilds_state_check check (state in ('copying', 'swapped', 'abandoned'))
);
create unique index rebuilds_one_copying on loader.rebuilds ((true)) where state = 'copying';
comment on table loader.rebuilds is
    'Online rebuilds and key rotations: one copying at a time; a rotation''s new key until its swap (owner only)';

create table loader.rebuild_ranges (
    rebuild_id bigint not null constraint rebuild_ranges_rebuild_fkey references loader.rebuilds (id),
    lo bigint not null,
    hi bigint not null,
    done boolean not null default false,
    constraint rebuild_ranges_pkey primary key (rebuild_id, lo)
);
comment on table loader.rebuild_ranges is
    'The raw_logins id ranges of an online rebuild, each copied in one committed transaction';

-- A transform batch's ticket may also name the rebuild it saw (rebuild tickets carry no key):
-- at COMMIT it must still be the one copying, else the batch missed the new copies.
alter table loader.batch_keys alter column key_id drop not null,
    add column rebuild_check boolean not null default false,
    add column rebuild_id bigint;
