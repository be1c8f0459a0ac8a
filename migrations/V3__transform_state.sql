-- V3: when the transform last drained its work list, for `loader reconcile` and `loader status`.
-- Never edit once merged: add V4.

create table loader.transform_state (
    -- One row only.
    singleton boolean not null default true constraint transform_state_pkey primary key
        constraint transform_state_singleton check (singleton),
    -- Start of the last transform batch that found fewer rows than it could take: every row
    -- committed before then has been claimed.
    last_drained_at timestamptz,
    batches bigint not null default 0
);
insert into loader.transform_state default values;
comment on table loader.transform_state is
    'When the transform last drained its work list (one row)';
grant select on loader.transform_state to loader_analyst, loader_ingest;
