//! `loader run`: ingest and transform together. The ingest loop signals each committed batch;
//! a transformer task runs the SQL transform shortly after (a short debounce gathers batches
//! that commit together), and also on a slow timer for rows staged by other processes.
//! Shutdown: stop receiving, finish the batch in hand (stage, commit, delete), run a last
//! transform, return.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use sqlx::PgPool;
use tokio::sync::{Notify, watch};

use crate::counts::{Totals, TransformReport};
use crate::ingest::Ingestor;
use crate::sqs::Queue;
use crate::{metrics, transform};

/// How `loader run` schedules the transform.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// Wait this long after a commit before transforming, to gather batches committing together.
    pub debounce: Duration,
    /// Transform at least this often, for rows staged by other ingest processes.
    pub interval: Duration,
    /// Rows per committed transform batch, and sessions at once.
    pub transform: transform::Plan,
}

impl Default for Schedule {
    fn default() -> Self {
        Self {
            debounce: Duration::from_millis(100),
            interval: transform::DEFAULT_INTERVAL,
            transform: transform::Plan::default(),
        }
    }
}

/// What a `loader run` did.
#[derive(Debug, Default, Clone, Copy)]
pub struct RunTotals {
    pub ingest: Totals,
    pub transform: TransformReport,
}

/// Drains the queue, transforms, returns (`loader run --once`).
pub async fn once(ingestor: Ingestor, pool: &PgPool, schedule: Schedule) -> Result<RunTotals> {
    let ingest = ingestor.run(std::future::pending()).await?;
    let transform = transform::transform(pool, schedule.transform).await?;
    Ok(RunTotals { ingest, transform })
}

/// Ingests and transforms until `shutdown` resolves.
pub async fn until_stopped(
    ingestor: Ingestor,
    pool: &PgPool,
    schedule: Schedule,
    shutdown: impl Future<Output = ()>,
) -> Result<RunTotals> {
    let committed = Arc::new(Notify::new());
    let ingestor = ingestor.notify_on_commit(committed.clone());
    let (stop, stopped) = watch::channel(false);
    let transformer = tokio::spawn(transform_loop(pool.clone(), schedule, committed, stopped));

    let ingested = ingestor.run(shutdown).await;
    let _ = stop.send(true);
    let mut totals = transformer.await.unwrap_or_default();
    let ingest = ingested?;
    // The last transform covers the batch committed during shutdown.
    let last = transform::transform(pool, schedule.transform).await?;
    totals += last;
    Ok(RunTotals { ingest, transform: totals })
}

/// Transforms after each commit (debounced) and every `interval`, until told to stop. A failing
/// transform is logged and retried on the next signal; staged rows wait safely meanwhile.
async fn transform_loop(
    pool: PgPool,
    schedule: Schedule,
    committed: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) -> TransformReport {
    let mut totals = TransformReport::default();
    let mut failing = false;
    loop {
        tokio::select! {
            _ = stop.changed() => return totals,
            _ = committed.notified() => tokio::time::sleep(schedule.debounce).await,
            _ = tokio::time::sleep(schedule.interval) => {}
        }
        let started = std::time::Instant::now();
        match transform::transform(&pool, schedule.transform).await {
            Ok(r) => {
                if failing {
                    tracing::info!("transform recovered");
                    failing = false;
                }
                if r.loaded + r.rejected > 0 {
                    tracing::info!(
                        loaded = r.loaded,
                        rejected = r.rejected,
                        pending = r.pending,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "transformed"
                    );
                }
                totals += r;
            }
            Err(e) => {
                if !failing {
                    tracing::error!(error = format!("{e:#}"), "transform failed; will retry");
                    failing = true;
                }
            }
        }
    }
}

/// Publishes the queue's approximate counts, and its dead-letter queue's visible count, as
/// metrics every `period`, until the task is dropped (`ingest` and `run` with
/// `--metrics-addr`). A failed read is logged and the gauges keep their last values (a scrape
/// shows the last known state; `loader_receive_errors_total` shows the outage).
pub async fn watch_queue(queue: Queue, period: Duration) {
    let name = queue.name();
    loop {
        match queue.depth().await {
            Ok(d) => metrics::queue_messages(name, d.visible, d.in_flight, d.delayed),
            Err(e) => {
                tracing::warn!(queue = %name, error = format!("{e:#}"), "reading the queue's counts")
            }
        }
        // Looked up each time: a redrive policy added or changed while loader runs shows up.
        match queue.dead_letter_queue().await {
            Ok(Some(dlq)) => match dlq.depth().await {
                Ok(d) => metrics::dead_letter_messages(name, dlq.name(), d.visible),
                Err(e) => {
                    tracing::warn!(queue = %dlq.name(), error = format!("{e:#}"), "reading the DLQ's counts")
                }
            },
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(queue = %name, error = format!("{e:#}"), "reading the redrive policy")
            }
        }
        tokio::time::sleep(period).await;
    }
}
