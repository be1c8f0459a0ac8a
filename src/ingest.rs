//! The ingest path: receive a batch, stage it (commit), then delete exactly what was staged.
//!
//! A message is never deleted before the statement that staged it has committed. A crash at any
//! point loses nothing: undeleted messages come back after their visibility timeout and the
//! `message_id` unique key turns the second staging into a counted duplicate.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::PgPool;
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinSet;

use crate::counts::Totals;
use crate::metrics;
use crate::progress::Progress;
use crate::retry::{self, Health};
use crate::sqs::{MAX_BATCH, Queue, Received};
use crate::staging::{self, RawMessage};

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
    fn as_str(self) -> &'static str {
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

/// Runs `work` (staging, which may wait out a database outage) while keeping `batch` invisible
/// on the queue: every half `visibility` timeout, its visibility is extended by a full timeout,
/// so SQS does not hand the messages to another consumer meanwhile.
async fn keep_invisible<T>(
    queue: &Queue,
    batch: &[Received],
    visibility: Duration,
    work: impl Future<Output = Result<T>>,
) -> Result<T> {
    tokio::pin!(work);
    let period = (visibility / 2).max(Duration::from_millis(500));
    loop {
        tokio::select! {
            done = &mut work => return done,
            _ = tokio::time::sleep(period) => match queue.extend_visibility(batch, visibility).await {
                Ok(0) => tracing::debug!(messages = batch.len(), "visibility extended"),
                Ok(refused) => tracing::warn!(refused, "visibility not extended for some messages; they may be redelivered"),
                Err(e) => tracing::warn!(error = format!("{e:#}"), "visibility not extended; messages may be redelivered"),
            },
        }
    }
}

/// One entry per message id, the last received copy (its receipt handle is the current one),
/// and how many copies each id had.
fn latest_copies(batch: &[Received]) -> (Vec<Received>, HashMap<String, u64>) {
    let mut copies: HashMap<String, u64> = HashMap::with_capacity(batch.len());
    let mut latest: Vec<Received> = Vec::with_capacity(batch.len());
    let mut position: HashMap<&str, usize> = HashMap::with_capacity(batch.len());
    for m in batch {
        *copies.entry(m.message_id.clone()).or_default() += 1;
        match position.get(m.message_id.as_str()) {
            Some(&i) => latest[i] = m.clone(),
            None => {
                position.insert(&m.message_id, latest.len());
                latest.push(m.clone());
            }
        }
    }
    (latest, copies)
}

/// How often a paused receiver looks again whether PostgreSQL is back.
const PAUSE_CHECK: Duration = Duration::from_millis(200);

/// One receiver: long-polls and hands non-empty batches to the writer until told to stop, or
/// (draining) until a long poll comes back empty. While the writer cannot reach PostgreSQL it
/// receives nothing: messages stay on the queue rather than wait in memory, where their
/// visibility timeout could run out.
async fn receive_loop(
    queue: Queue,
    wait_seconds: i32,
    mode: Mode,
    writer: mpsc::Sender<Vec<Received>>,
    mut stop: watch::Receiver<bool>,
    health: Arc<Mutex<Health>>,
    postgres: Arc<Mutex<Health>>,
) -> Result<()> {
    while !*stop.borrow() {
        if postgres.lock().expect("health lock").is_failing() {
            tokio::select! {
                _ = tokio::time::sleep(PAUSE_CHECK) => continue,
                _ = stop.changed() => return Ok(()),
            }
        }
        let receive = queue.receive(wait_seconds);
        tokio::pin!(receive);
        let (received, last) = tokio::select! {
            batch = &mut receive => (batch, false),
            _ = stop.changed() => match tokio::time::timeout(SHUTDOWN_GRACE, &mut receive).await {
                Ok(batch) => (batch, true),
                Err(_) => return Ok(()),
            },
        };
        let batch = match received {
            Ok(batch) => {
                health.lock().expect("health lock").ok();
                batch
            }
            // SQS unreachable or throttling: wait (or stop) and poll again.
            Err(e) if retry::is_transient(&e) && !last => {
                let wait = health.lock().expect("health lock").failed(&e);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => continue,
                    _ = stop.changed() => return Ok(()),
                }
            }
            Err(e) => return Err(e),
        };
        if batch.is_empty() {
            if mode == Mode::Drain || last {
                return Ok(());
            }
            continue;
        }
        if writer.send(batch).await.is_err() || last {
            return Ok(());
        }
    }
    Ok(())
}

/// Committed flushes whose deletes may run while the next flush stages. Two keep the writer
/// busy; memory for them is bounded by two flushes.
const FLUSHES_DELETING: usize = 2;

/// Adds batches from `inbox` to `flush` until it holds `flow.flush_messages` messages,
/// `flow.linger` has passed since this call, or every sender is gone (shutdown or the end of a
/// drain: what was gathered is flushed, never dropped).
async fn gather<T>(mut flush: Vec<T>, inbox: &mut mpsc::Receiver<Vec<T>>, flow: &Flow) -> Vec<T> {
    let deadline = tokio::time::Instant::now() + flow.linger;
    while flush.len() < flow.flush_messages {
        tokio::select! {
            batch = inbox.recv() => match batch {
                Some(batch) => flush.extend(batch),
                None => break,
            },
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    flush
}

/// How ingest overlaps receiving and staging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    /// ReceiveMessage calls in flight at once.
    pub receivers: usize,
    /// Stage once this many messages are buffered...
    pub flush_messages: usize,
    /// ...or this long after the first of them arrived, whichever comes first.
    pub linger: Duration,
}

impl Default for Flow {
    /// Four receivers keep LocalStack or SQS busy on two cores; 500 messages make one cheap
    /// statement; 50 ms bounds the added latency of a quiet queue.
    fn default() -> Self {
        Self { receivers: 4, flush_messages: 500, linger: Duration::from_millis(50) }
    }
}

/// A committed batch, not yet deleted.
struct Staged {
    outcome: staging::StageOutcome,
    /// Ids PostgreSQL refused: neither staged nor to be deleted.
    refused: HashSet<String>,
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
    run: staging::Run,
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
    /// Set once shutdown has begun: transient failures are then no longer retried.
    stopping: Arc<AtomicBool>,
    /// The queue's VisibilityTimeout, read at start.
    visibility: Duration,
}

impl Ingestor {
    /// Reads the queue's visibility timeout and registers a new run in `loader.ingest_runs`.
    pub async fn start(queue: Queue, pool: PgPool, mode: Mode, wait_seconds: i32) -> Result<Self> {
        let visibility = queue.visibility_timeout().await?;
        let run = staging::Run::register(&pool, queue.name(), mode.as_str()).await?;
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
            stopping: Arc::new(AtomicBool::new(false)),
            visibility,
        })
    }

    /// Sets the receive concurrency and flush policy.
    pub fn with_flow(self, flow: Flow) -> Self {
        Self { flow, ..self }
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
    pub fn staging_run(&self) -> &staging::Run {
        &self.run
    }

    /// Receives one batch; empty when the long poll found nothing.
    pub async fn receive(&self) -> Result<Vec<Received>> {
        self.queue.receive(self.wait_seconds).await
    }

    /// The unit of work: stages a flush and, once that has committed, deletes every message in
    /// it (new and duplicate alike: both are now safely staged), and returns its totals. Tests
    /// drive it directly; [`Ingestor::run`] does the same two steps, overlapping one flush's
    /// delete with the next one's staging.
    pub async fn process(&self, batch: &[Received]) -> Result<Totals> {
        let staged = self.stage(batch).await?;
        self.delete_staged(batch, staged).await
    }

    /// Stages a batch (retrying while PostgreSQL is unreachable, keeping the batch invisible
    /// meanwhile) and signals the commit. Its log lines carry the batch's span (message ids
    /// are not personal data).
    #[tracing::instrument(level = "debug", name = "batch", skip_all, fields(
        run_id = self.run.id,
        size = batch.len(),
        message_ids = ?batch.iter().map(|m| m.message_id.as_str()).collect::<Vec<_>>(),
    ))]
    async fn stage(&self, batch: &[Received]) -> Result<Staged> {
        let raw: Vec<RawMessage> = batch.iter().map(RawMessage::from).collect();
        let (raw, pool, run, queue) = (&raw, &self.pool, &self.run, &self.queue);
        let started = std::time::Instant::now();
        // Retried while PostgreSQL is unreachable: staging is idempotent, and its counters
        // commit with its rows, so a failed attempt leaves no trace.
        let staging = self.retrying(&self.postgres_health, || async move {
            let mut conn = pool.acquire().await.context("connecting to PostgreSQL")?;
            staging::stage_isolating(&mut conn, run, raw).await
        });
        let (outcome, refused) = keep_invisible(queue, batch, self.visibility, staging).await?;
        let took = started.elapsed();
        tracing::debug!(
            staged = outcome.staged,
            duplicates = outcome.duplicates,
            "batch committed"
        );
        if let Some(notify) = &self.on_commit {
            notify.notify_one();
        }
        Ok(Staged { outcome, refused: refused.into_iter().collect(), took })
    }

    /// Deletes every message of a committed batch (new and duplicate alike: both are now
    /// safely staged), records the deletes, and returns the batch's totals.
    #[tracing::instrument(level = "debug", name = "batch", skip_all, fields(
        run_id = self.run.id,
        size = batch.len(),
        message_ids = ?batch.iter().map(|m| m.message_id.as_str()).collect::<Vec<_>>(),
    ))]
    async fn delete_staged(&self, batch: &[Received], staged: Staged) -> Result<Totals> {
        let (pool, run, queue) = (&self.pool, &self.run, &self.queue);

        // Copies of one message (a redelivery inside one flush) are deleted once, with the most
        // recent receipt handle (SQS ignores older ones); the delete counts for every copy.
        let (mut latest, copies) = latest_copies(batch);
        latest.retain(|m| !staged.refused.contains(&m.message_id));
        let outcome = self.retrying(&self.sqs_health, || queue.delete(&latest)).await?;
        for (message_id, code) in &outcome.failed {
            tracing::warn!(%message_id, %code, "delete failed; the message will be redelivered and counted as a duplicate");
        }
        let failed_copies: u64 =
            outcome.failed.iter().map(|(id, _)| copies.get(id).copied().unwrap_or(1)).sum();
        let refused_copies: u64 = staged.refused.iter().map(|id| copies[id]).sum();
        let deleted_copies = batch.len() as u64 - failed_copies - refused_copies;
        self.retrying(&self.postgres_health, || {
            run.record_deletes(pool, deleted_copies, failed_copies)
        })
        .await?;

        let totals = Totals {
            received: staged.outcome.received + refused_copies,
            staged: staged.outcome.staged,
            duplicates: staged.outcome.duplicates,
            deleted: deleted_copies,
            delete_failures: failed_copies,
            refused: refused_copies,
        };
        metrics::batch(&totals, staged.took);
        Ok(totals)
    }

    /// Runs `op` until it succeeds, a permanent error occurs, or shutdown has begun, waiting
    /// with capped, jittered backoff between transient failures (logged once per outage).
    async fn retrying<T, F, Fut>(&self, health: &Mutex<Health>, mut op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        loop {
            match op().await {
                Ok(value) => {
                    health.lock().expect("health lock").ok();
                    return Ok(value);
                }
                Err(e) if retry::is_transient(&e) && !self.stopping.load(Ordering::Relaxed) => {
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
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> Result<Totals> {
        let result = self.pump(shutdown).await;
        if let Some(progress) = &self.progress {
            progress.finish();
        }
        // Report the error that stopped the run before any error closing its bookkeeping.
        let finished = self.finish().await;
        let totals = result?;
        finished?;
        Ok(totals)
    }

    async fn pump(&self, shutdown: impl Future<Output = ()>) -> Result<Totals> {
        let mode = self.mode;
        tokio::pin!(shutdown);
        // Room for a whole flush plus a batch per receiver: receivers keep receiving while the
        // writer stages, instead of stalling on a full channel.
        let capacity = self.flow.flush_messages.div_ceil(MAX_BATCH) + self.flow.receivers;
        let (batches, mut inbox) = mpsc::channel::<Vec<Received>>(capacity);
        let (stop, stopped) = watch::channel(false);
        let mut receivers = JoinSet::new();
        for _ in 0..self.flow.receivers {
            receivers.spawn(receive_loop(
                self.queue.clone(),
                self.wait_seconds,
                mode,
                batches.clone(),
                stopped.clone(),
                self.sqs_health.clone(),
                self.postgres_health.clone(),
            ));
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
                _ = &mut shutdown, if !self.stopping.load(Ordering::Relaxed) => {
                    self.stopping.store(true, Ordering::Relaxed);
                    let _ = stop.send(true);
                    continue;
                }
            };
            // None: every receiver has finished and the channel is empty.
            let Some(first) = first else { break };
            let flush = gather(first, &mut inbox, &self.flow).await;
            while deleting.len() >= FLUSHES_DELETING {
                let done = deleting.join_next().await.expect("a delete task is running");
                totals += done.context("a delete task panicked")??;
            }
            let staged = self.stage(&flush).await?;
            if let Some(progress) = &self.progress {
                let left = match progress.depth_due() {
                    true => self
                        .queue
                        .depth()
                        .await
                        .ok()
                        .map(|(visible, in_flight, _)| visible + in_flight),
                    false => None,
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

    /// Marks the run finished (also after an error, so the bookkeeping shows when it stopped).
    async fn finish(&self) -> Result<()> {
        self.run.finish(&self.pool).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_of_a_message_are_deleted_once_with_the_latest_handle() {
        let m = |id: &str, handle: &str| Received {
            message_id: id.into(),
            receipt_handle: handle.into(),
            body: String::new(),
            sent_at: None,
            receive_count: None,
        };
        let (latest, copies) = latest_copies(&[m("a", "h1"), m("b", "h2"), m("a", "h3")]);
        let handles: Vec<_> =
            latest.iter().map(|m| (m.message_id.as_str(), m.receipt_handle.as_str())).collect();
        assert_eq!(handles, [("a", "h3"), ("b", "h2")]);
        assert_eq!((copies["a"], copies["b"]), (2, 1));
    }

    fn flow(flush_messages: usize) -> Flow {
        Flow { receivers: 1, flush_messages, linger: Duration::from_millis(50) }
    }

    /// A sender holding `batches` of `size` messages each, already sent.
    fn inbox(batches: usize, size: usize) -> (mpsc::Sender<Vec<u32>>, mpsc::Receiver<Vec<u32>>) {
        let (tx, rx) = mpsc::channel(batches.max(1));
        for b in 0..batches {
            tx.try_send((0..size as u32).map(|i| b as u32 * 100 + i).collect()).unwrap();
        }
        (tx, rx)
    }

    #[tokio::test(start_paused = true)]
    async fn a_flush_closes_as_soon_as_it_reaches_its_size() {
        let (_tx, mut rx) = inbox(4, 10);
        let started = tokio::time::Instant::now();
        let flush = gather(vec![], &mut rx, &flow(25)).await;
        assert_eq!(flush.len(), 30, "three batches of ten reach 25");
        assert_eq!(started.elapsed(), Duration::ZERO, "no linger once full");
        assert_eq!(rx.try_recv().unwrap().len(), 10, "the fourth batch waits for the next flush");
    }

    #[tokio::test(start_paused = true)]
    async fn a_partial_flush_waits_for_the_linger_then_goes() {
        let (tx, mut rx) = inbox(1, 10);
        let started = tokio::time::Instant::now();
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            tx.send(vec![7; 5]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            tx.send(vec![8; 5]).await.unwrap();
        });
        let flush = gather(vec![], &mut rx, &flow(500)).await;
        assert_eq!(flush.len(), 15, "the batch within the linger joins; the later one does not");
        assert_eq!(started.elapsed(), Duration::from_millis(50));
        late.await.unwrap();
        assert_eq!(rx.recv().await.unwrap(), vec![8; 5]);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_flushes_what_was_gathered_at_once() {
        let (tx, mut rx) = inbox(2, 10);
        drop(tx);
        let started = tokio::time::Instant::now();
        let flush = gather(vec![1, 2], &mut rx, &flow(500)).await;
        assert_eq!(flush.len(), 22, "the first batch and both buffered ones, nothing dropped");
        assert_eq!(started.elapsed(), Duration::ZERO, "no linger once every sender is gone");
    }
}
