//! `loader transform`: the SQL transform (`sql/30_transform.sql`), `loader.transform_batch` in
//! `--workers` sessions side by side, each batch committed, their counts summed. The work
//! happens in Postgres, so psql users get the same result (`call loader.transform()` loops the
//! same batches server-side); loader loops them itself so that a stop ends at a batch boundary.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::{FromRow, PgPool};
use tokio::task::JoinSet;

use crate::counts::TransformReport;
use crate::metrics;
use crate::retry::sqlstate;
use crate::shutdown::Shutdown;

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
        std::thread::available_parallelism()
            .map_or(Self::MIN_DEFAULT_WORKERS, |n| n.get())
            .clamp(Self::MIN_DEFAULT_WORKERS, Self::MAX_DEFAULT_WORKERS)
    }

    /// The bounds of [`Plan::default_workers`].
    pub const MIN_DEFAULT_WORKERS: usize = 2;
    pub const MAX_DEFAULT_WORKERS: usize = 8;
}

impl Default for Plan {
    fn default() -> Self {
        Self { batch_size: DEFAULT_BATCH, workers: Self::default_workers() }
    }
}

/// Transforms everything pending with `plan.workers` sessions, each looping committed batches
/// of `plan.batch_size` rows, then publishes the oldest-pending age gauge. The pool needs room
/// for `plan.workers` connections.
pub async fn transform(pool: &PgPool, plan: Plan) -> Result<TransformReport> {
    transform_until(pool, plan, &Shutdown::default()).await
}

/// [`transform`], each session stopping after the batch in hand once `stop` has begun.
pub async fn transform_until(
    pool: &PgPool,
    plan: Plan,
    stop: &Shutdown,
) -> Result<TransformReport> {
    let started = std::time::Instant::now();
    let mut sessions = JoinSet::new();
    for worker in 0..plan.workers.max(1) {
        let (pool, stop) = (pool.clone(), stop.clone());
        sessions.spawn(async move {
            let session = one_session(&pool, plan.batch_size, &stop).await?;
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
/// many are left), or until `stop` has begun (after the batches in hand). Each pass ends the
/// sessions below the owner that hold rows past the bound, so a held batch delays a drain by
/// that bound at most.
pub async fn drain(
    pool: &PgPool,
    plan: Plan,
    held_wait: Duration,
    stop: &Shutdown,
) -> Result<TransformReport> {
    let mut total = TransformReport::default();
    let mut stalled_since: Option<std::time::Instant> = None;
    loop {
        let pass = transform_until(pool, plan, stop).await?;
        total += pass;
        if pass.pending == 0 || stop.has_begun() {
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

/// The row `loader.transform_batch` returns, and a session's sum of them.
#[derive(sqlx::FromRow, Default)]
struct SessionRow {
    #[sqlx(flatten)]
    report: TransformReport,
    /// Rejected rows by reason code (a fixed set: `loader._reason`).
    rejected_by_reason: sqlx::types::Json<BTreeMap<String, u64>>,
}

impl SessionRow {
    fn add(&mut self, batch: SessionRow) {
        self.report.loaded += batch.report.loaded;
        self.report.rejected += batch.report.rejected;
        for (reason, n) in batch.rejected_by_reason.0 {
            *self.rejected_by_reason.0.entry(reason).or_insert(0) += n;
        }
    }
}

/// One session's batches, each committed, until one finds nothing to claim or `stop` has
/// begun; a batch refused at COMMIT because a rotation retired its key is run again. Then the
/// work list is counted (`transform_batch(0)`), as `call loader.transform()` does.
async fn one_session(pool: &PgPool, batch_size: i32, stop: &Shutdown) -> Result<SessionRow> {
    let mut session = SessionRow::default();
    let mut refused = 0;
    while !stop.has_begun() {
        match batch(pool, batch_size).await {
            Err(e) if refused < ROTATION_RETRIES && is_key_rotated(&e) => {
                tracing::info!("a key rotation retired the batch's key; transforming again");
                refused += 1;
            }
            Err(e) => {
                return crate::db::explained(
                    Err(e),
                    "running loader.transform_batch()",
                    "loader_transformer",
                );
            }
            Ok(b) => {
                let claimed = b.report.loaded + b.report.rejected;
                session.add(b);
                if claimed == 0 {
                    break;
                }
            }
        }
    }
    let last = crate::db::explained(
        batch(pool, 0).await,
        "counting what is pending",
        "loader_transformer",
    )?;
    session.report.pending = last.report.pending;
    Ok(session)
}

/// One `loader.transform_batch`, committed on its own. The simple query protocol, the integer
/// written in: a statement outside a transaction must be one exchange to pass a pooler in
/// transaction mode (crate::db::transaction).
async fn batch(pool: &PgPool, batch_size: i32) -> Result<SessionRow, sqlx::Error> {
    let sql = format!(
        "select loaded, rejected, coalesce(pending, 0) as pending, rejected_by_reason
           from loader.transform_batch({batch_size}, {})",
        batch_size == 0
    );
    sqlx::raw_sql(&sql).fetch_one(pool).await.and_then(|row| SessionRow::from_row(&row))
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

/// Runs [`transform`] every `interval` until `stop` begins, calling `report` after each run.
/// The batches in hand are finished before returning.
pub async fn watch(
    pool: &PgPool,
    plan: Plan,
    interval: Duration,
    stop: &Shutdown,
    mut report: impl FnMut(&TransformReport),
) -> Result<()> {
    let mut stopped = stop.listen();
    loop {
        report(&transform_until(pool, plan, stop).await?);
        tokio::select! {
            _ = stopped.begun() => return Ok(()),
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
