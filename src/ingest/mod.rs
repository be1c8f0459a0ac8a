//! The ingest path: receive a batch, stage it (commit), then delete exactly what was staged.
//!
//! A message is never deleted before the statement that staged it has committed. A crash at any
//! point loses nothing: undeleted messages come back after their visibility timeout and the
//! `message_id` unique key turns the second staging into a counted duplicate.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::PgPool;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;

mod budget;
pub mod concurrency;
mod flush;
mod invisible;
mod queue_counts;
mod receiver;

pub use budget::MIN_BYTES as MIN_MEMORY_BUDGET;
use concurrency::Controller;
pub use flush::{DEFAULT_MEMORY_BUDGET, Flow};
use flush::{gather, latest_copies};
use invisible::Held;
pub use queue_counts::publish_queue_counts;
use receiver::Receiver;

use crate::counts::Totals;
use crate::metrics;
use crate::progress::Progress;
use crate::retry::{self, Health};
use crate::shutdown::Shutdown;
use crate::sqs::{MAX_BATCH, Queue, Received};
use crate::staging::{self, RawMessage};

/// How often an ingest run tells the database it is alive (`loader.heartbeat`); reconcile
/// calls an unfinished run silent for [`crate::reconcile::SILENT_AFTER`] (three of them) ended.
pub const HEARTBEAT: Duration = Duration::from_secs(60);

/// How long a receive in progress at shutdown may still take to complete.
pub const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

/// How a run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Stop at the first receive that returns nothing.
    Drain,
    /// Keep polling until the shutdown future resolves.
    Follow,
}

impl Mode {
    /// The long-poll wait of a receive unless told otherwise (`--wait-seconds`): a drain's
    /// first empty receive ends it, so a short wait; a follower's polls are free while idle,
    /// so SQS's longest.
    pub const fn default_wait_seconds(self) -> i32 {
        match self {
            Mode::Drain => 2,
            Mode::Follow => 20,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Mode::Drain => "drain",
            Mode::Follow => "follow",
        }
    }
}

impl From<&Received> for RawMessage {
    fn from(m: &Received) -> Self {
        RawMessage {
            message_id: m.message_id.clone(),
            body: m.body.clone(),
            sent_at: m.sent_at,
            receive_count: m.receive_count,
        }
    }
}

/// What staging needs of a received message, its body moved out (no copy): what stays behind
/// is what the deletes need, the id and the receipt handle.
fn take_raw(m: &mut Received) -> RawMessage {
    RawMessage {
        message_id: m.message_id.clone(),
        body: std::mem::take(&mut m.body),
        sent_at: m.sent_at,
        receive_count: m.receive_count,
    }
}

/// Committed flushes whose deletes may run while the next flush stages. At 20 ms a call a
/// 500-message flush takes about two round trips to delete; with two, the writer waited on
/// deletes and the controller read that as a database falling behind. Memory for them is
/// bounded by four flushes (about 2 MB of 500-byte bodies).
const FLUSHES_DELETING: usize = 4;

/// Database connections `loader ingest` holds: the writer's, and the delete bookkeeping's.
pub const CONNECTIONS: u32 = 2;

/// A committed batch, not yet deleted.
struct Committed {
    staged: staging::Staged,
    took: Duration,
}

/// One ingest run: a queue, a database, and the `loader.ingest_runs` row that counts for it.
///
/// Cheap to clone (shared state sits behind `Arc`s): the writer hands each committed flush to
/// a task of its own for deleting, so staging the next flush overlaps it.
#[derive(Clone)]
pub struct Ingestor {
    queue: Queue,
    pool: PgPool,
    run: staging::IngestRun,
    /// Drain (stop when the queue is empty) or follow (until shutdown); set once, at start.
    mode: Mode,
    wait_seconds: i32,
    /// Signalled after every batch whose staging committed (used by `loader run`).
    on_commit: Option<Arc<Notify>>,
    /// A progress line on the terminal (draining).
    progress: Option<Arc<Progress>>,
    flow: Flow,
    /// Outage tracking (backoff, state-change logging) per dependency: health trackers, not
    /// clients.
    postgres_health: Arc<Mutex<Health>>,
    sqs_health: Arc<Mutex<Health>>,
    /// Whether shutdown has begun (its one owner): receivers then stop, and transient failures
    /// are no longer retried.
    shutdown: Shutdown,
    /// How many receives are in flight (adaptive unless `--receivers N`); deletes follow it.
    concurrency: concurrency::Shared,
    /// The queue's VisibilityTimeout, read at start.
    visibility: Duration,
    /// Messages received and not yet staged, kept invisible while the run goes on.
    held: Held,
}

impl Ingestor {
    /// Reads the queue's visibility timeout and registers a new run in `loader.ingest_runs`.
    pub async fn start(queue: Queue, pool: PgPool, mode: Mode, wait_seconds: i32) -> Result<Self> {
        let visibility = queue.visibility_timeout().await?;
        let run = staging::IngestRun::register(&pool, queue.name(), mode.as_str()).await?;
        Ok(Self {
            queue,
            pool,
            run,
            mode,
            wait_seconds,
            on_commit: None,
            progress: None,
            flow: Flow::default(),
            postgres_health: Arc::new(Mutex::new(Health::new("PostgreSQL"))),
            sqs_health: Arc::new(Mutex::new(Health::new("SQS"))),
            shutdown: Shutdown::default(),
            concurrency: concurrency::Shared::new(Controller::from_flow(&Flow::default())),
            visibility,
            held: Held::default(),
        })
    }

    /// Sets the receive concurrency and flush policy.
    pub fn with_flow(self, flow: Flow) -> Self {
        let concurrency = concurrency::Shared::new(Controller::from_flow(&flow));
        Self { flow, concurrency, ..self }
    }

    /// Shows `progress` (when `Some`) as batches complete.
    pub fn with_progress(self, progress: Option<Progress>) -> Self {
        Self { progress: progress.map(Arc::new), ..self }
    }

    /// Signals `notify` after each batch has committed (before its delete).
    pub fn notify_on_commit(self, notify: Arc<Notify>) -> Self {
        Self { on_commit: Some(notify), ..self }
    }

    pub fn run_id(&self) -> i64 {
        self.run.id
    }

    /// The run this ingestor stages into.
    pub fn staging_run(&self) -> &staging::IngestRun {
        &self.run
    }

    /// Receives one batch; empty when the long poll found nothing.
    pub async fn receive(&self) -> Result<Vec<Received>> {
        self.queue.receive(self.wait_seconds).await
    }

    /// The unit of work: stages a flush and, once that has committed, deletes every message in
    /// it (new and duplicate alike: both are now safely staged), and returns its totals. Tests
    /// drive it directly; [`Ingestor::ingest`] does the same two steps, overlapping one flush's
    /// delete with the next one's staging.
    pub async fn process(&self, batch: &[Received]) -> Result<Totals> {
        self.hold(batch);
        let mut batch = batch.to_vec();
        self.keeping_invisible(async {
            let staged = self.stage(&mut batch).await?;
            self.delete_staged(&batch, staged).await
        })
        .await
    }

    /// Holds a received batch: kept invisible until its staging commits.
    fn hold(&self, batch: &[Received]) {
        self.held.hold(batch, tokio::time::Instant::now(), self.visibility);
    }

    /// Runs `work` while every held message is kept invisible on the queue.
    async fn keeping_invisible<T>(&self, work: impl Future<Output = T>) -> T {
        let keeper = self.held.keep_invisible(&self.queue, self.visibility, self.calls_in_flight());
        tokio::select! {
            done = work => done,
            never = keeper => match never {},
        }
    }

    /// Stages a held batch (retrying while PostgreSQL is unreachable; the batch stays
    /// invisible meanwhile), releases it, and signals the commit. Its log lines carry the batch's span (message ids
    /// are not personal data).
    #[tracing::instrument(level = "debug", name = "batch", skip_all, fields(
        run_id = self.run.id,
        size = batch.len(),
        message_ids = ?batch.iter().map(|m| m.message_id.as_str()).collect::<Vec<_>>(),
    ))]
    async fn stage(&self, batch: &mut [Received]) -> Result<Committed> {
        // The bodies move into the staging call and are dropped with it: a flush being
        // deleted holds ids and receipt handles only.
        let bodies: Vec<RawMessage> = batch.iter_mut().map(take_raw).collect();
        let (raw, pool, run) = (&bodies, &self.pool, &self.run);
        let started = std::time::Instant::now();
        // Retried while PostgreSQL is unreachable: staging is idempotent, and its counters
        // commit with its rows, so a failed attempt leaves no trace.
        let staging = self.retrying(&self.postgres_health, || async move {
            let mut conn = pool.acquire().await.context("connecting to PostgreSQL")?;
            staging::stage(&mut conn, run, raw).await
        });
        let staged = staging.await?;
        drop(bodies);
        self.held.release(batch);
        let took = started.elapsed();
        tracing::debug!(
            staged = staged.outcome.staged,
            duplicates = staged.outcome.duplicates,
            "batch committed"
        );
        if let Some(notify) = &self.on_commit {
            notify.notify_one();
        }
        Ok(Committed { staged, took })
    }

    /// Deletes every message of a committed batch (new and duplicate alike: both are now
    /// safely staged), records the deletes, and returns the batch's totals.
    #[tracing::instrument(level = "debug", name = "batch", skip_all, fields(
        run_id = self.run.id,
        size = batch.len(),
        message_ids = ?batch.iter().map(|m| m.message_id.as_str()).collect::<Vec<_>>(),
    ))]
    async fn delete_staged(&self, batch: &[Received], committed: Committed) -> Result<Totals> {
        let staged = &committed.staged;
        let (pool, run, queue) = (&self.pool, &self.run, &self.queue);

        // Copies of one message (a redelivery inside one flush) are deleted once, with the most
        // recent receipt handle (SQS ignores older ones); the delete counts for every copy.
        let (mut latest, copies) = latest_copies(batch);
        latest.retain(|m| !staged.refused.contains(&m.message_id));
        let in_flight = self.calls_in_flight();
        crate::metrics::deletes_in_flight(in_flight);
        let outcome = match self
            .retrying(&self.sqs_health, || queue.delete_concurrently(&latest, in_flight))
            .await
        {
            Ok(outcome) => {
                for (message_id, code) in &outcome.failed {
                    tracing::warn!(%message_id, %code, "delete failed; the message will be redelivered and counted as a duplicate");
                }
                outcome
            }
            // SQS unreachable once shutdown has begun: the batch is staged, so leaving it on the
            // queue loses nothing (it comes back and counts as duplicates). The run records
            // these as delete failures and stops cleanly instead of failing.
            Err(e) if retry::is_transient(&e) && self.shutdown.has_begun() => {
                tracing::warn!(
                    messages = latest.len(),
                    error = %format!("{e:#}"),
                    "SQS unreachable at shutdown; staged messages left on the queue will be redelivered and counted as duplicates"
                );
                crate::sqs::DeleteOutcome::unreachable(&latest)
            }
            Err(e) => return Err(e),
        };
        let failed_copies: u64 =
            outcome.failed.iter().map(|(id, _)| copies.get(id).copied().unwrap_or(1)).sum();
        let refused_copies: u64 = staged.refused.iter().map(|id| copies[id]).sum();
        let deleted_copies = batch.len() as u64 - failed_copies - refused_copies;
        self.retrying(&self.postgres_health, || {
            run.record_deletes(pool, deleted_copies, failed_copies)
        })
        .await?;

        let totals = Totals {
            from_queue: staged.outcome.received + refused_copies,
            staged: staged.outcome.staged,
            duplicates: staged.outcome.duplicates,
            deleted: deleted_copies,
            delete_failures: failed_copies,
            refused: refused_copies,
        };
        metrics::batch(&totals, committed.took);
        Ok(totals)
    }

    /// DeleteMessageBatch (and ChangeMessageVisibilityBatch) calls a flush may have in flight:
    /// as many as receives can ever be (at least the usual eight), whatever the receive target
    /// is now. Deletes exist only for messages already received, so this costs nothing on an
    /// idle queue; tied to the current target instead, a writer falling behind would shrink the
    /// receivers, which would slow the deletes it waits on, which would shrink them further
    /// (measured at 20 ms: 4,178 messages/s, the target swinging between 1 and 32).
    fn calls_in_flight(&self) -> usize {
        self.concurrency.max().max(crate::sqs::DELETE_CONCURRENCY)
    }

    /// Runs `op` until it succeeds, a permanent error occurs, or shutdown has begun, waiting
    /// with capped, jittered backoff between transient failures (logged once per outage).
    async fn retrying<T, F, Fut>(&self, health: &Mutex<Health>, mut op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        loop {
            let started = std::time::Instant::now();
            match op().await {
                Ok(value) => {
                    health.lock().expect("health lock").ok(started);
                    return Ok(value);
                }
                Err(e) if retry::is_transient(&e) && !self.shutdown.has_begun() => {
                    let wait = health.lock().expect("health lock").failed(&e);
                    tokio::time::sleep(wait).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Runs until the queue is empty (`Drain`) or `shutdown` resolves (`Follow`).
    ///
    /// Several receivers (`flow.receivers`) long-poll at once and hand their batches through a
    /// bounded channel to one writer, which stages many SQS batches per statement (a flush: up
    /// to `flow.flush_messages` messages, or whatever arrived within `flow.linger` of the first)
    /// and then deletes them. Memory stays bounded by the channel and one flush, however large
    /// the backlog.
    ///
    /// Draining ends when every receiver has had an empty long poll. On shutdown, receivers
    /// stop; a receive in progress gets [`SHUTDOWN_GRACE`] to land (a response already on its
    /// way would otherwise leave its messages invisible until their visibility timeout), and
    /// everything received is staged, committed and deleted before returning.
    pub async fn ingest(&self, shutdown: impl Future<Output = ()>) -> Result<Totals> {
        let result = tokio::select! {
            done = self.keeping_invisible(self.pump(shutdown)) => done,
            never = self.heartbeat() => match never {},
        };
        if let Some(progress) = &self.progress {
            progress.finish();
        }
        // Report the error that stopped the run before any error closing its bookkeeping.
        let finished = self.finish(result.is_err()).await;
        let totals = result?;
        finished?;
        Ok(totals)
    }

    /// Tells the database every [`HEARTBEAT`] that this run is alive, so reconcile tells a run
    /// waiting on an empty queue from one whose process died. A failed heartbeat is only
    /// logged: staging has its own retries, and reconcile at worst calls a live run silent.
    async fn heartbeat(&self) -> std::convert::Infallible {
        loop {
            tokio::time::sleep(HEARTBEAT).await;
            if let Err(e) = self.run.heartbeat(&self.pool).await {
                tracing::debug!(error = format!("{e:#}"), "heartbeat failed");
            }
        }
    }

    async fn pump(&self, shutdown: impl Future<Output = ()>) -> Result<Totals> {
        let mode = self.mode;
        tokio::pin!(shutdown);
        // Room for a whole flush plus a batch per receiver: receivers keep receiving while the
        // writer stages, instead of stalling on a full channel.
        let capacity = self.flow.flush_messages.div_ceil(MAX_BATCH) + self.concurrency.max();
        let (batches, mut inbox) = mpsc::channel::<Vec<Received>>(capacity);
        let budget = budget::Budget::new(self.flow.memory_budget);
        let mut receivers = JoinSet::new();
        for index in 0..self.concurrency.max() {
            let receiver = Receiver {
                index,
                concurrency: self.concurrency.clone(),
                queue: self.queue.clone(),
                wait_seconds: self.wait_seconds,
                mode,
                writer: batches.clone(),
                held: self.held.clone(),
                visibility: self.visibility,
                shutdown: self.shutdown.listen(),
                sqs_health: self.sqs_health.clone(),
                postgres_health: self.postgres_health.clone(),
                budget: budget.clone(),
            };
            receivers.spawn(receiver.poll());
        }
        drop(batches);

        let mut totals = Totals::default();
        // Committed flushes being deleted, each in a task of its own.
        let mut deleting = JoinSet::new();
        loop {
            let first = tokio::select! {
                batch = inbox.recv() => batch,
                Some(done) = deleting.join_next() => {
                    totals += done.context("a delete task panicked")??;
                    continue;
                }
                Some(done) = receivers.join_next() => {
                    done.context("a receiver panicked")??;
                    continue;
                }
                _ = &mut shutdown, if !self.shutdown.has_begun() => {
                    self.shutdown.begin();
                    continue;
                }
            };
            // None: every receiver has finished and the channel is empty.
            let Some(first) = first else { break };
            let mut flush = gather(first, &mut inbox, &self.flow, |m| m.body.len()).await;
            while deleting.len() >= FLUSHES_DELETING {
                let done = deleting.join_next().await.expect("a delete task is running");
                totals += done.context("a delete task panicked")??;
            }
            let cost = budget::batch_cost(&flush);
            let staged = self.stage(&mut flush).await?;
            budget.give(cost);
            if let Some(progress) = &self.progress {
                let left = if progress.depth_due() {
                    self.queue.depth().await.ok().map(|d| d.visible + d.in_flight)
                } else {
                    None
                };
                progress.advance(flush.len() as u64, left);
            }
            let this = self.clone();
            deleting.spawn(async move { this.delete_staged(&flush, staged).await });
        }
        while let Some(done) = deleting.join_next().await {
            totals += done.context("a delete task panicked")??;
        }
        while let Some(done) = receivers.join_next().await {
            done.context("a receiver panicked")??;
        }
        Ok(totals)
    }

    /// Marks the run finished, also after an error (so the bookkeeping shows when it stopped),
    /// then marked as stopped on it: a flush may have been deleted and not yet recorded.
    async fn finish(&self, stopped_on_error: bool) -> Result<()> {
        self.run.finish(&self.pool, stopped_on_error).await
    }
}
