//! The ingest path: receive a batch, stage it (commit), then delete exactly what was staged.
//!
//! A message is never deleted before the statement that staged it has committed. A crash at any
//! point loses nothing: undeleted messages come back after their visibility timeout and the
//! `message_id` unique key turns the second staging into a counted duplicate.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::PgPool;
use tokio::sync::Notify;

use crate::metrics;
use crate::progress::Progress;
use crate::sqs::{Queue, Received};
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

/// Counters for one batch, and summed over a run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub received: u64,
    pub staged: u64,
    pub duplicates: u64,
    pub deleted: u64,
    pub delete_failures: u64,
}

impl Totals {
    fn add(&mut self, o: &Totals) {
        self.received += o.received;
        self.staged += o.staged;
        self.duplicates += o.duplicates;
        self.deleted += o.deleted;
        self.delete_failures += o.delete_failures;
    }
}

impl std::fmt::Display for Totals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "received {}, staged {} new, {} duplicates, deleted {} ({} delete failures)",
            self.received, self.staged, self.duplicates, self.deleted, self.delete_failures
        )
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

/// One ingest run: a queue, a database, and the `loader.ingest_runs` row that counts for it.
pub struct Ingestor {
    queue: Queue,
    pool: PgPool,
    run_id: i64,
    wait_seconds: i32,
    /// Signalled after every batch whose staging committed (used by `loader run`).
    on_commit: Option<Arc<Notify>>,
    /// A progress line on the terminal (draining).
    progress: Option<Progress>,
}

impl Ingestor {
    /// Registers a new run in `loader.ingest_runs`.
    pub async fn start(queue: Queue, pool: PgPool, mode: Mode, wait_seconds: i32) -> Result<Self> {
        let (run_id,): (i64,) = sqlx::query_as(
            "insert into loader.ingest_runs (queue, mode, loader_version)
             values ($1, $2, $3) returning id",
        )
        .bind(queue.name())
        .bind(mode.as_str())
        .bind(env!("CARGO_PKG_VERSION"))
        .fetch_one(&pool)
        .await
        .context("registering the ingest run (has `loader migrate` run?)")?;
        Ok(Self { queue, pool, run_id, wait_seconds, on_commit: None, progress: None })
    }

    /// Shows `progress` (when `Some`) as batches complete.
    pub fn with_progress(self, progress: Option<Progress>) -> Self {
        Self { progress, ..self }
    }

    /// Signals `notify` after each batch has committed (before its delete).
    pub fn notify_on_commit(self, notify: Arc<Notify>) -> Self {
        Self { on_commit: Some(notify), ..self }
    }

    pub fn run_id(&self) -> i64 {
        self.run_id
    }

    /// Receives one batch; empty when the long poll found nothing.
    pub async fn receive(&self) -> Result<Vec<Received>> {
        self.queue.receive(self.wait_seconds).await
    }

    /// Stages a received batch and, once that has committed, deletes every message in it (new
    /// and duplicate alike: both are now safely staged).
    #[tracing::instrument(name = "batch", level = "debug", skip_all, fields(
        run_id = self.run_id,
        size = batch.len(),
        message_ids = ?batch.iter().map(|m| m.message_id.as_str()).collect::<Vec<_>>(),
    ))]
    pub async fn process(&self, batch: &[Received]) -> Result<Totals> {
        let raw: Vec<RawMessage> = batch.iter().map(RawMessage::from).collect();
        let mut conn = self.pool.acquire().await.context("connecting to PostgreSQL")?;
        let started = std::time::Instant::now();
        let staged = staging::stage(&mut conn, self.run_id, self.queue.name(), &raw).await?;
        let staging_took = started.elapsed();
        tracing::debug!(staged = staged.staged, duplicates = staged.duplicates, "batch committed");
        if let Some(notify) = &self.on_commit {
            notify.notify_one();
        }

        let deleted = self.queue.delete(batch).await?;
        for (message_id, code) in &deleted.failed {
            tracing::warn!(%message_id, %code, "delete failed; the message will be redelivered and counted as a duplicate");
        }
        sqlx::query(
            "update loader.ingest_runs
                set deleted = deleted + $2, delete_failures = delete_failures + $3
              where id = $1",
        )
        .bind(self.run_id)
        .bind(deleted.deleted as i64)
        .bind(deleted.failed.len() as i64)
        .execute(&mut *conn)
        .await
        .context("recording deletes")?;

        let totals = Totals {
            received: staged.received,
            staged: staged.staged,
            duplicates: staged.duplicates,
            deleted: deleted.deleted as u64,
            delete_failures: deleted.failed.len() as u64,
        };
        metrics::batch(&totals, staging_took);
        Ok(totals)
    }

    /// Receive, then process. The unit of work that tests drive directly.
    pub async fn ingest_batch(&self) -> Result<Totals> {
        let batch = self.receive().await?;
        if batch.is_empty() {
            return Ok(Totals::default());
        }
        self.process(&batch).await
    }

    /// Runs until the queue is empty (`Drain`) or `shutdown` resolves (`Follow`). A batch in hand
    /// is always staged, committed and deleted before returning. A receive still in progress at
    /// shutdown gets [`SHUTDOWN_GRACE`] to complete (a response already on its way would
    /// otherwise leave its messages invisible until their visibility timeout); after that it is
    /// dropped, and whatever SQS had handed it comes back after the timeout.
    pub async fn run(&self, mode: Mode, shutdown: impl Future<Output = ()>) -> Result<Totals> {
        tokio::pin!(shutdown);
        let mut totals = Totals::default();
        let mut stopping = false;
        let result = loop {
            let receive = self.receive();
            tokio::pin!(receive);
            let batch = tokio::select! {
                batch = &mut receive => batch,
                _ = &mut shutdown => {
                    stopping = true;
                    match tokio::time::timeout(SHUTDOWN_GRACE, &mut receive).await {
                        Ok(batch) => batch,
                        Err(_) => break Ok(()),
                    }
                }
            };
            let batch = match batch {
                Ok(b) => b,
                Err(e) => break Err(e),
            };
            if !batch.is_empty() {
                match self.process(&batch).await {
                    Ok(t) => totals.add(&t),
                    Err(e) => break Err(e),
                }
                if let Some(progress) = &self.progress {
                    progress.advance(batch.len() as u64, &self.queue).await;
                }
            }
            if stopping || (batch.is_empty() && mode == Mode::Drain) {
                break Ok(());
            }
        };
        if let Some(progress) = &self.progress {
            progress.finish();
        }
        // Report the error that stopped the run before any error closing its bookkeeping.
        let finished = self.finish().await;
        result?;
        finished?;
        Ok(totals)
    }

    /// Marks the run finished (also after an error, so the bookkeeping shows when it stopped).
    async fn finish(&self) -> Result<()> {
        sqlx::query("update loader.ingest_runs set finished_at = now() where id = $1")
            .bind(self.run_id)
            .execute(&self.pool)
            .await
            .context("closing the ingest run")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_line_names_every_counter() {
        let t = Totals { received: 12, staged: 10, duplicates: 2, deleted: 11, delete_failures: 1 };
        assert_eq!(
            t.to_string(),
            "received 12, staged 10 new, 2 duplicates, deleted 11 (1 delete failures)"
        );
    }
}
