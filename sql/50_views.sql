-- The views of schema loader, apart from the functions: `loader migrate` reapplies a sql/ file
-- only when it changed, and replacing a view takes a lock that waits for every reader of it
-- (an analyst idling in a transaction that read it), so a change to the transform never
-- touches them. Reruns cleanly: psql -v ON_ERROR_STOP=1 -f sql/50_views.sql

-- Key ids and dates, never the key bytes. Analysts may read it (to interpret mask_key_id).
create or replace view loader.mask_key_info as
select id, created_at, retired_at, source, retired_at is null as active
  from loader.mask_keys;
comment on view loader.mask_key_info is 'Masking keys without their bytes: id, dates, source, active';
comment on column loader.mask_key_info.id is 'Key id (user_logins.mask_key_id)';
comment on column loader.mask_key_info.created_at is 'When it was created or installed';
comment on column loader.mask_key_info.retired_at is 'When a rotation retired it';
comment on column loader.mask_key_info.source is 'generated or installed';
comment on column loader.mask_key_info.active is 'true for the one key new rows are masked with';

-- pipeline_status: one row, the numbers `loader status` and the pending-age gauge show, for
-- analysts in psql too (a view: it reads raw_logins as its owner, and shows no value of it).
create or replace view loader.pipeline_status as
select (select count(*) from loader.transform_queue) as pending,
       p.oldest_pending_staged_at,
       coalesce(extract(epoch from now() - p.oldest_pending_staged_at), 0)::float8
           as oldest_pending_age_seconds,
       (select s.last_drained_at from loader.transform_state s) as last_drained_at,
       (select k.id from loader.mask_keys k where k.retired_at is null) as active_key_id,
       (select max(b.finished_at) from loader.rebuilds b where b.state = 'swapped')
           as last_rebuilt_at,
       -- Retention at work: the oldest body still held, as the last purge or expiry found it
       -- (loader.retention_state: stage() writes nothing there, so no staging holds a row the
       -- purge waits on), and when that was; and the last
       -- cutoff the masked data's retention finished. (Not the oldest masked row:
       -- a view that reads user_logins would stop every rebuild's swap.)
       (select s.oldest_body_staged_at from loader.retention_state s) as oldest_body_staged_at,
       (select max(e.cutoff) from loader.mask_expiries e where e.finished_at is not null)
           as last_masked_cutoff,
       (select s.measured_at from loader.retention_state s) as oldest_body_measured_at
  -- Neither reads raw_logins whole: a reader would lock every day's partition (and an
  -- analyst's idle transaction would hold those locks).
  from (select min(q.staged_at) as oldest_pending_staged_at from loader.transform_queue q) as p;
comment on view loader.pipeline_status is
    'One row: rows pending transform, the oldest one''s staging time and age, when the transform last drained, the active key id, the last rebuild, the oldest body kept and the last cutoff of the masked data''s retention';
comment on column loader.pipeline_status.pending is 'Staged rows waiting for the transform';
comment on column loader.pipeline_status.oldest_pending_staged_at is 'When the oldest of them was staged';
comment on column loader.pipeline_status.oldest_pending_age_seconds is 'Its age in seconds (0 when none waits)';
comment on column loader.pipeline_status.last_drained_at is 'As loader.transform_state';
comment on column loader.pipeline_status.active_key_id is 'loader.mask_keys.id of the active key';
comment on column loader.pipeline_status.last_rebuilt_at is
    'When a rebuild or key rotation last swapped in rewritten outcomes (NULL: never): copy user_logins downstream in full after it changes';
comment on column loader.pipeline_status.oldest_body_staged_at is
    'When the oldest body still held in loader.raw_logins was staged, as the last purge or expiry found it (NULL: none then; loader purge ends bodies)';
comment on column loader.pipeline_status.oldest_body_measured_at is
    'When the last purge or expiry looked for the oldest body (bodies staged since are not in oldest_body_staged_at)';
comment on column loader.pipeline_status.last_masked_cutoff is
    'The latest cutoff the masked data''s retention finished (loader.mask_expiries): no row created before it is kept';

-- transform_state: when the transform last drained, and how many batches ran, from the
-- insert-only batch log (a view since V8, when the one row every batch updated went; V14
-- created it, so pipeline_status above can read it). Replaced after pipeline_status, which
-- reads it: a reader locks the outer view first, then this one, and so does a migrate that
-- replaces both; the other order deadlocks with a transform reading pipeline_status.
create or replace view loader.transform_state as
select max(l.at) filter (where l.drained) as last_drained_at,
       coalesce(sum(l.batches), 0)::bigint as batches
  from loader.transform_log l;
comment on view loader.transform_state is 'When the transform last drained its work list, and how many batches ran';
comment on column loader.transform_state.last_drained_at is
    'Start of the last batch that found less work than it could take: every row committed before it was claimed';
comment on column loader.transform_state.batches is 'Transform batches run';
