-- What `\dn+`, `\d+` and `\df+` say in psql: a comment on every object of schema loader and on
-- every column of public.user_logins. Two rules: a function or view defined in sql/ has its
-- comment beside its definition; a table the migrations create has its comments here, applied
-- on every migrate (merged migrations never change, and an online rebuild's swap brings new
-- tables). V12 commented its own table (refusals); those comments stay with it. Reruns:
--   psql -v ON_ERROR_STOP=1 -f sql/80_comments.sql
-- tests/it/transform.rs checks that nothing is left without a comment.

comment on schema loader is
'loader: SQS login events staged raw, then masked into public.user_logins.
Guides: docs/analysts.md (queries), docs/operating.md (commands), docs/security.md (roles).
As loader_analyst:
  call loader.transform();                      -- transform everything pending, batch by batch
  select * from loader.transform_batch(1000);   -- one bounded batch, in your transaction
  select * from loader.pipeline_status;         -- pending rows, oldest age, last drain, active key
  select * from loader.login_rejects;           -- why messages did not load
  select id, queue, mode, started_at, finished_at, received, staged, duplicates, deleted
    from loader.ingest_runs;                    -- what each ingest run did
  select * from loader.mask_key_info;           -- the keys, and which one is active
As loader_pii_reader (a raw value, every call recorded; outside a transaction block):
  call loader.reveal(array[''fixture-0''], ''ticket SEC-1'');
As loader_ingest: loader ingest and loader run call loader.register_run and loader.stage.
As the owner, through the loader command: loader keys, loader purge, loader forget.';

-- The analysts' table.
comment on table public.user_logins is
    'Logins with personal data masked: one row per loaded SQS message (message_id), plus any rows adopted from before loader';
comment on column public.user_logins.user_id is 'user_id as sent (numbers and booleans as their text)';
comment on column public.user_logins.device_type is 'device_type as sent';
comment on column public.user_logins.masked_ip is
    'hex HMAC-SHA256 under key mask_key_id of host(ip::inet), or of the trimmed text when it is not an IP; NULL when missing or blank';
comment on column public.user_logins.masked_device_id is
    'hex HMAC-SHA256 under key mask_key_id of device_id; NULL when missing or blank';
comment on column public.user_logins.locale is 'locale as sent; NULL stays NULL';
comment on column public.user_logins.app_version is
    'major*10000 + minor*100 + patch for 1-3 dot-separated numbers of 0-99 ("2.3.0" = 20300); NULL otherwise (see app_version_text)';
comment on column public.user_logins.create_date is
    'UTC date of the SQS SentTimestamp (of staging when missing), never of the transform';
comment on column public.user_logins.loaded_at is
    'Start of the transaction that wrote the row (not commit order: copy downstream by loaded_xid)';
comment on column public.user_logins.staged_on is
    'UTC day its message was staged on (reconcile finds a dropped day''s counts by it); NULL before V21 and for rows from before loader';
comment on column public.user_logins.loaded_xid is
    'Id of the transaction that wrote the row: with the snapshot''s xmin, a commit-ordered cursor for downstream copies (NULL for rows from before V14)';

-- Staging and runs.
comment on table loader.raw_logins is
    'Every SQS message ever staged (raw, holds PII): one row per message_id, partitioned by UTC day of staged_at';
comment on table loader.staged_id_generations is
    'Generations of loader.staged_ids: stage() writes the current one (ended_at NULL) and reads them all';
comment on column loader.staged_id_generations.generation is 'Generation number (its partition is loader.staged_ids_g<n>)';
comment on column loader.staged_id_generations.started_at is 'When stage() began writing to it';
comment on column loader.staged_id_generations.ended_at is 'When the next generation took over (NULL: the current one)';
comment on table loader.staged_ids is
    'The message ids staged, for idempotency across raw_logins'' partitions (by generation; no body, no PII)';
comment on column loader.staged_ids.message_id is 'SQS MessageId';
comment on column loader.staged_ids.generation is 'The generation that was current when it was first staged';
comment on table loader.staged_ids_g1 is 'The message ids staged while generation 1 was current';
comment on column loader.staged_ids_g1.message_id is 'SQS MessageId';
comment on column loader.staged_ids_g1.generation is 'Always 1';
comment on table loader.staging_layout is 'How loader.raw_logins is partitioned (one row)';
comment on column loader.staging_layout.singleton is 'Always true: one row';
comment on column loader.staging_layout.cutover is
    'Rows staged before it are in loader.raw_logins_legacy (from before V20); day partitions start here';
comment on column loader.staging_layout.partitioned_at is 'When loader migrate made raw_logins partitioned (NULL: not yet)';
comment on table loader.masked_layout is 'How public.user_logins is partitioned (one row)';
comment on column loader.masked_layout.singleton is 'Always true: one row';
comment on column loader.masked_layout.cutover is
    'Rows written before it stay in loader.user_logins_legacy (from before V27; NULL: a database new at the move); month partitions start here';
comment on column loader.masked_layout.partitioned_at is 'When loader migrate made user_logins partitioned (NULL: not yet)';
comment on column loader.raw_logins.id is 'In staging order (the work list refers to it); unique across partitions (one sequence)';
comment on column loader.raw_logins.message_id is 'SQS MessageId: one row per message ever staged (loader.staged_ids keeps it unique)';
comment on column loader.raw_logins.body is
    'The body as jsonb, or a JSON string of its exact text (body_is_json false); JSON null once purged';
comment on column loader.raw_logins.sent_at is 'SQS SentTimestamp';
comment on column loader.raw_logins.receive_count is 'SQS ApproximateReceiveCount when staged';
comment on column loader.raw_logins.queue is 'Queue the message came from (the run''s queue)';
comment on column loader.raw_logins.ingest_run_id is 'loader.ingest_runs.id of the run that staged it';
comment on column loader.raw_logins.staged_at is 'When it was staged (set by the server)';
comment on column loader.raw_logins.expired_at is
    'When retention of the masked data ended its user_logins row (loader purge --masked-older-than-months); its body went with it';
comment on table loader.mask_expiries is
    'Retention of the masked data: per cutoff, the user_logins rows ended (create_date before it); no user id';
comment on column loader.mask_expiries.cutoff is 'Rows whose create_date is before this day were ended';
comment on column loader.mask_expiries.started_at is 'When the first batch for this cutoff ran';
comment on column loader.mask_expiries.finished_at is 'When a batch found nothing left before the cutoff (or before a later one); NULL while it runs or after a kill (rerun to finish); moves when a rerun ends more';
comment on column loader.mask_expiries.requested_by is 'The login (session_user) of the first batch (a rerun for the same cutoff adds to the row)';
comment on column loader.mask_expiries.expired is 'Rows of loader (with a message_id) ended';
comment on column loader.mask_expiries.before_loader is 'Rows from before loader (no message_id) ended';
comment on column loader.mask_expiries.bodies is 'Staged bodies with no masked row (rejects) staged before the cutoff, purged with it';
comment on column loader.ingest_runs.id is 'Run id, as `loader ingest` prints it';
comment on column loader.ingest_runs.started_at is 'When the run was registered';
comment on column loader.ingest_runs.finished_at is 'When it ended; NULL while running, after a crash, and for Lambda runs';
comment on column loader.ingest_runs.queue is 'Queue it drained, as the ingest process claimed (see registered_by)';
comment on column loader.ingest_runs.registered_by is 'The login (session_user) that registered the run';
comment on column loader.ingest_runs.mode is 'drain, follow or lambda';
comment on column loader.ingest_runs.received is 'Messages that reached staging, every copy counted (= staged + duplicates)';
comment on column loader.ingest_runs.staged is 'Messages newly staged by this run';
comment on column loader.ingest_runs.duplicates is 'Messages already staged (redeliveries, copies within a flush)';
comment on column loader.ingest_runs.deleted is 'Messages deleted from the queue after their staging committed';
comment on column loader.ingest_runs.delete_failures is 'Deletes SQS refused (the message comes back and counts as a duplicate)';
comment on column loader.ingest_runs.loader_version is 'Version of the loader that ran it';

-- Outcomes, work list, progress.
comment on column loader.login_rejects.message_id is 'SQS MessageId of the staged message';
comment on column loader.login_rejects.reason is
    'erased, sns_message_not_object, eventbridge_detail_not_object, body_not_json, body_not_object, field_not_scalar, user_id_missing, user_id_empty or value_too_long';
comment on column loader.login_rejects.detail is 'Human detail naming fields and sizes, never values';
comment on column loader.login_rejects.rejected_at is 'When the transform rejected it';
comment on column loader.login_rejects.staged_on is
    'UTC day its message was staged on (its raw_logins partition); NULL before V21';
comment on column loader.transform_queue.staged_at is
    'When the row was staged (a transform batch reads only the days between its rows'' first and last)';
comment on table loader.retention_state is 'When the oldest body still held was staged (one row; for loader.pipeline_status)';
comment on column loader.retention_state.singleton is 'Always true: one row';
comment on column loader.retention_state.oldest_body_staged_at is
    'As the last purge or expiry found it (NULL: none was held then)';
comment on column loader.retention_state.measured_at is 'When it was last written';
comment on table loader.staged_days is
    'Days of loader.raw_logins dropped by retention, with their counts (proved when dropped: every row had its outcome)';
comment on column loader.staged_days.day is 'The UTC day of staged_at';
comment on column loader.staged_days.dropped_at is 'When its partition was dropped';
comment on column loader.staged_days.dropped_by is 'The login (session_user) that dropped it';
comment on column loader.staged_days.staged is 'Rows it held';
comment on column loader.staged_days.loaded is 'Of which loaded into public.user_logins';
comment on column loader.staged_days.rejected is 'Of which rejected (loader.login_rejects)';
comment on column loader.staged_days.erased is 'Of which erased (no outcome kept)';
comment on column loader.staged_days.expired is 'Of which their masked row had reached the end of its retention period';
comment on table loader.staged_day_runs is 'Per dropped day, the rows each ingest run had staged in it';
comment on column loader.staged_day_runs.day is 'The dropped day (loader.staged_days)';
comment on column loader.staged_day_runs.ingest_run_id is 'The run (NULL: rows staged without one)';
comment on column loader.staged_day_runs.staged is 'Its rows in that day';
comment on column loader.transform_queue.raw_id is 'loader.raw_logins.id of a staged row without an outcome';
comment on table loader.transform_log is
    'Transform progress: a row per batch (insert-only, old rows folded together); read loader.transform_state';
comment on column loader.transform_log.at is 'Start of the batch''s transaction (the latest one, for folded rows)';
comment on column loader.transform_log.drained is 'The batch took fewer rows than it asked for: the work list was drained';
comment on column loader.transform_log.batches is 'Batches this row stands for';
comment on column loader.batch_keys.id is 'Ticket id';
comment on column loader.batch_keys.key_id is 'loader.mask_keys.id the batch masked with';
comment on column loader.batch_keys.armed is 'true on the first firing of the check, which re-queues it';

-- Keys.
comment on column loader.mask_keys.id is 'Key id (user_logins.mask_key_id)';
comment on column loader.mask_keys.key is '32 random or installed bytes; owner only, never printed';
comment on column loader.mask_keys.created_at is 'When it was created or installed';
comment on column loader.mask_keys.retired_at is 'When a rotation retired it; NULL for the active key';
comment on column loader.mask_keys.source is 'generated (random, in PostgreSQL) or installed (loader keys install)';

-- Migrations' bookkeeping (refinery's table).
comment on table loader.refinery_schema_history is 'Migrations applied by loader migrate (refinery)';
comment on column loader.refinery_schema_history.version is 'Migration number (V1, V2, ...)';
comment on column loader.refinery_schema_history.name is 'Migration name';
comment on column loader.refinery_schema_history.applied_on is 'When it was applied';
comment on column loader.refinery_schema_history.checksum is 'Checksum of the file as applied (never edit one)';

-- Online rebuild (sql/35_rebuild.sql, migrations/V11__online_rebuild.sql).
comment on column loader.rebuilds.id is 'Rebuild id';
comment on column loader.rebuilds.key_id is 'Key the new copies are masked with (a rotation''s new key id)';
comment on column loader.rebuilds.new_key is 'A rotation''s new key until its swap, then NULL (owner only)';
comment on column loader.rebuilds.carried is
    'Outcomes carried into the new copies as they were because their staged message is gone (nothing to recompute from)';
comment on column loader.rebuilds.kept_as_is is
    'Masked rows copied as they were, their bodies past retention (purged, or their day dropped): after a rotation they keep the key that masked them';
comment on column loader.rebuilds.copy_from is
    'The first day of the first month of user_logins it copies (the older months stay as they are, not recomputed); NULL: the whole table';
comment on column loader.rebuilds.new_key_source is 'generated or installed (a rotation''s new key)';
comment on column loader.rebuilds.upto is 'raw_logins ids up to this one are copied by ranges; later ones by the transform';
comment on column loader.rebuilds.started_at is 'When the rebuild started';
comment on column loader.rebuilds.finished_at is 'When it was swapped in or abandoned';
comment on column loader.rebuilds.state is 'copying, swapped or abandoned';
comment on column loader.rebuild_ranges.rebuild_id is 'The rebuild';
comment on column loader.rebuild_ranges.lo is 'First raw_logins id of the range';
comment on column loader.rebuild_ranges.hi is 'Last raw_logins id of the range';
comment on column loader.rebuild_ranges.done is 'Copied (committed)';
comment on column loader.rebuild_ranges.id is 'The range';
comment on column loader.rebuild_ranges.part is 'The partition of raw_logins the range reads (NULL: every partition, for a range cut before V24)';
comment on column loader.rebuild_ranges.staged_from is 'The first staging time the partition holds (NULL: any)';
comment on column loader.rebuild_ranges.staged_to is 'The end (exclusive) of the staging times the partition holds (NULL: any)';
comment on column loader.rebuild_ranges.dropped_day is 'A day retention dropped: the range keeps its outcomes as they are (ids 0 to -1: none)';
comment on column loader.rebuild_ranges.carries is 'The range (its partition''s first) also carries the outcomes of the partition''s staging days whose staged message was deleted by hand (counted in rebuilds.carried)';
comment on column loader.rebuild_ranges.carries_rest is 'The range also carries the outcomes whose staged message was deleted by hand of the days no carrying range or dropped day holds, and those without staged_on';
comment on column loader.batch_keys.rebuild_check is 'A rebuild ticket: checks at COMMIT that the same rebuild (or none) is copying';
comment on column loader.batch_keys.rebuild_id is 'The rebuild the batch saw copying (NULL: none)';
