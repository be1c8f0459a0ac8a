//! `loader transform`: the SQL transform (`sql/30_transform.sql`), `call loader.transform()` in
//! `--workers` sessions side by side, their counts summed. The work happens in Postgres, so
//! psql users get the same result.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::{FromRow, PgPool};
use tokio::task::JoinSet;

use crate::counts::TransformReport;
use crate::metrics;
use crate::retry::sqlstate;

/// How often a transform whose batch was refused at COMMIT because a key rotation retired its
/// key (SQLSTATE 40001) is run again. The rerun masks with the new key; batches committed
/// before the refusal stay committed.
const ROTATION_RETRIES: usize = 3;

/// Rows per committed transform batch, unless told otherwise (`--batch-size`, the Lambda
/// handler, `loader.transform()`'s own default in SQL).
pub const DEFAULT_BATCH: i32 = 10_000;

/// Seconds between transforms of `loader transform --watch` and of `loader run`'s timer.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);

/// How the transform runs: rows per committed batch, and database sessions at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Rows per committed batch.
    pub batch_size: i32,
    /// Sessions running `call loader.transform()` side by side. Their batches claim rows with
    /// `FOR UPDATE SKIP LOCKED`, so they split the work without loading a row twice.
    pub workers: usize,
}

impl Plan {
    /// Default workers: this machine's cores, at least 2 and at most 8. Where PostgreSQL runs
    /// on the same host that is the number of cores it has; elsewhere set `--workers` to the
    /// database's vCPUs (measured: docs/benchmarks.md "Transform at scale").
    pub fn default_workers() -> usize {
        std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 8)
    }
}

impl Default for Plan {
    fn default() -> Self {
        Self { batch_size: DEFAULT_BATCH, workers: Self::default_workers() }
    }
}

/// Transforms everything pending with `plan.workers` sessions, each calling
/// `call loader.transform()` (committed batches of `plan.batch_size` rows), then publishes the
/// oldest-pending age gauge. The pool needs room for `plan.workers` connections.
pub async fn transform(pool: &PgPool, plan: Plan) -> Result<TransformReport> {
    let started = std::time::Instant::now();
    let mut sessions = JoinSet::new();
    for worker in 0..plan.workers.max(1) {
        let pool = pool.clone();
        sessions.spawn(async move {
            let session = one_session(&pool, plan.batch_size).await?;
            tracing::debug!(
                worker,
                loaded = session.report.loaded,
                rejected = session.report.rejected,
                "transform session finished"
            );
            Ok::<_, anyhow::Error>(session)
        });
    }
    let mut report = TransformReport { pending: i64::MAX, ..TransformReport::default() };
    let mut rejected_by_reason = BTreeMap::new();
    while let Some(done) = sessions.join_next().await {
        let session = done.context("a transform session panicked")??;
        report.loaded += session.report.loaded;
        report.rejected += session.report.rejected;
        // Each session counts the work list as it ends: the smallest count is the latest.
        report.pending = report.pending.min(session.report.pending);
        for (reason, n) in session.rejected_by_reason.0 {
            *rejected_by_reason.entry(reason).or_insert(0) += n;
        }
    }
    metrics::transform(&report, &rejected_by_reason, started.elapsed());
    oldest_pending_age(pool).await?;
    Ok(report)
}

/// How long [`drain`] keeps trying rows that another session has claimed and not committed:
/// longer than the server's default bound (`evict_after_seconds`, 10 s), after which the
/// transform ends such a session of a role below the owner.
pub const HELD_WAIT: Duration = Duration::from_secs(15);

/// [`transform`] until nothing is pending, or until rows claimed by another session's open
/// transaction have waited `held_wait` with no progress (the report's `pending` then says how
/// many are left). Each pass ends the sessions below the owner that hold rows past the bound,
/// so a held batch delays a drain by that bound at most.
pub async fn drain(pool: &PgPool, plan: Plan, held_wait: Duration) -> Result<TransformReport> {
    let mut total = TransformReport::default();
    let mut stalled_since: Option<std::time::Instant> = None;
    loop {
        let pass = transform(pool, plan).await?;
        total += pass;
        if pass.pending == 0 {
            return Ok(total);
        }
        if pass.loaded + pass.rejected > 0 {
            stalled_since = None;
            continue;
        }
        let since = *stalled_since.get_or_insert_with(std::time::Instant::now);
        if since.elapsed() >= held_wait {
            return Ok(total);
        }
        tracing::info!(pending = pass.pending, "rows are claimed by another session; waiting");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The row `call loader.transform()` returns.
#[derive(sqlx::FromRow)]
struct SessionRow {
    #[sqlx(flatten)]
    report: TransformReport,
    /// Rejected rows by reason code (a fixed set: `loader._reason`).
    rejected_by_reason: sqlx::types::Json<BTreeMap<String, u64>>,
}

/// One session's `call loader.transform()`, run again when a rotation refused a batch.
async fn one_session(pool: &PgPool, batch_size: i32) -> Result<SessionRow> {
    let mut attempt = 0;
    loop {
        // The simple query protocol, the integer written in: a procedure that commits cannot
        // run inside a transaction, and a statement outside one must be one exchange to pass a
        // pooler in transaction mode (crate::db::transaction).
        let result = sqlx::raw_sql(&format!("call loader.transform(batch_size => {batch_size})"))
            .fetch_one(pool)
            .await
            .and_then(|row| SessionRow::from_row(&row));
        match result {
            Err(e) if attempt < ROTATION_RETRIES && is_key_rotated(&e) => {
                tracing::info!("a key rotation retired the batch's key; transforming again");
                attempt += 1;
            }
            other => {
                return crate::db::explained(
                    other,
                    "running loader.transform()",
                    "loader_transformer",
                );
            }
        }
    }
}

/// SQLSTATE 40001 from `loader._confirm_batch_key`: the batch's key was retired before COMMIT.
fn is_key_rotated(e: &sqlx::Error) -> bool {
    sqlstate(e).is_some_and(|c| c == "40001")
}

/// Age of the oldest staged row still waiting for the transform (zero when none waits);
/// also published as the `loader_oldest_pending_age_seconds` gauge.
async fn oldest_pending_age(pool: &PgPool) -> Result<Duration> {
    let seconds: f64 = crate::db::transaction(pool, async |tx| {
        sqlx::query_scalar("select oldest_pending_age_seconds from loader.pipeline_status")
            .persistent(false)
            .fetch_one(tx)
            .await
    })
    .await
    .context("reading the oldest pending row")?;
    let age = Duration::from_secs_f64(seconds.max(0.0));
    metrics::oldest_pending(age);
    Ok(age)
}

/// Runs [`transform`] every `interval` until `shutdown` resolves, calling `report` after each
/// run. A run in progress is finished before returning.
pub async fn watch(
    pool: &PgPool,
    plan: Plan,
    interval: Duration,
    shutdown: impl Future<Output = ()>,
    mut report: impl FnMut(&TransformReport),
) -> Result<()> {
    tokio::pin!(shutdown);
    loop {
        report(&transform(pool, plan).await?);
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
