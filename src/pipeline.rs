//! `loader run`, the whole pipeline in one process: ingest and transform together. The ingest
//! loop signals each committed batch; a transformer task runs the SQL transform shortly after
//! (a short debounce gathers batches that commit together), and also on a slow timer for rows
//! staged by other processes. Shutdown: stop receiving, finish the batch in hand (stage,
//! commit, delete), stop the transformer, run a last transform, return.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::PgPool;
use tokio::sync::Notify;

use crate::counts::{Totals, TransformReport};
use crate::ingest::Ingestor;
use crate::retry::Streak;
use crate::shutdown::{Listener, Shutdown};
use crate::transform;

/// Database connections `loader run` holds besides one per transform worker: staging, and the
/// delete bookkeeping.
pub const CONNECTIONS_BESIDES_WORKERS: u32 = 2;

/// When `loader run` transforms.
#[derive(Debug, Clone, Copy)]
pub struct Cadence {
    /// Wait this long after a commit before transforming, to gather batches committing together.
    pub debounce: Duration,
    /// Transform at least this often, for rows staged by other ingest processes.
    pub interval: Duration,
    /// Rows per committed transform batch, and sessions at once.
    pub transform: transform::Plan,
}

impl Default for Cadence {
    fn default() -> Self {
        Self {
            debounce: Duration::from_millis(100),
            interval: transform::DEFAULT_INTERVAL,
            transform: transform::Plan::default(),
        }
    }
}

/// At most one INFO line about the transform per this long (the rest at DEBUG).
const TRANSFORM_LOG_EVERY: Duration = Duration::from_secs(60);

/// What a `loader run` did.
#[derive(Debug, Default, Clone, Copy)]
pub struct RunTotals {
    pub ingest: Totals,
    pub transform: TransformReport,
}

/// Drains the queue, transforms, returns (`loader run --once`). When `shutdown` resolves first,
/// the drain stops as `ingest` does (the batch in hand staged and deleted, the run finished) and
/// what was staged is still transformed.
pub async fn once(
    ingestor: Ingestor,
    pool: &PgPool,
    cadence: Cadence,
    shutdown: impl Future<Output = ()>,
) -> Result<RunTotals> {
    let ingest = ingestor.ingest(shutdown).await?;
    let transform = transform::transform(pool, cadence.transform).await?;
    Ok(RunTotals { ingest, transform })
}

/// Ingests and transforms until `shutdown` resolves.
pub async fn until_stopped(
    ingestor: Ingestor,
    pool: &PgPool,
    cadence: Cadence,
    shutdown: impl Future<Output = ()>,
) -> Result<RunTotals> {
    let committed = Arc::new(Notify::new());
    let ingestor = ingestor.notify_on_commit(committed.clone());
    let stop = Shutdown::default();
    let transformer = tokio::spawn(transform_loop(pool.clone(), cadence, committed, stop.listen()));

    let ingested = ingestor.ingest(shutdown).await;
    stop.begin();
    // A panic in the transformer is an error of the run, not a zero count.
    let mut totals = transformer.await.context("the transformer task failed")?;
    let ingest = ingested?;
    // The last transform covers the batch committed during shutdown.
    let last = transform::transform(pool, cadence.transform).await?;
    totals += last;
    Ok(RunTotals { ingest, transform: totals })
}

/// Transforms after each commit (debounced) and every `interval`, until told to stop. A failing
/// transform is logged and retried on the next signal; staged rows wait safely meanwhile.
async fn transform_loop(
    pool: PgPool,
    cadence: Cadence,
    committed: Arc<Notify>,
    mut stop: Listener,
) -> TransformReport {
    let mut totals = TransformReport::default();
    let mut streak = Streak::new("transform", "failed; will retry", "recovered");
    // One INFO line a minute at most (a busy run transforms several times a second); each pass
    // at DEBUG.
    let mut since_logged = TransformReport::default();
    let mut logged_at = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = stop.begun() => return totals,
            _ = committed.notified() => tokio::time::sleep(cadence.debounce).await,
            _ = tokio::time::sleep(cadence.interval) => {}
        }
        let started = std::time::Instant::now();
        match transform::transform(&pool, cadence.transform).await {
            Ok(r) => {
                streak.ok();
                if r.loaded + r.rejected > 0 {
                    tracing::debug!(
                        loaded = r.loaded,
                        rejected = r.rejected,
                        pending = r.pending,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "transformed"
                    );
                }
                since_logged += r;
                if since_logged.loaded + since_logged.rejected > 0
                    && logged_at.elapsed() >= TRANSFORM_LOG_EVERY
                {
                    tracing::info!(
                        loaded = since_logged.loaded,
                        rejected = since_logged.rejected,
                        pending = since_logged.pending,
                        seconds = logged_at.elapsed().as_secs(),
                        "transformed"
                    );
                    since_logged = TransformReport::default();
                    logged_at = std::time::Instant::now();
                }
                totals += r;
            }
            Err(e) => streak.failed(&e),
        }
    }
}
