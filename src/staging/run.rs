//! The ingest run every staging call names (`loader.register_run`, `loader.record_deletes`,
//! `loader.finish_run` of `sql/15_staging.sql`).

use anyhow::{Context, Result};
use sqlx::{Acquire, PgPool, Postgres};

use crate::counts::RunCounts;

/// The columns of [`RunCounts`] in `loader.ingest_runs`.
const RUN_COLUMNS: &str = "id, mode, started_at, finished_at, received, staged, duplicates, deleted, delete_failures, refused";

/// The `limit` most recent ingest runs, newest first (`loader status`, `loader reconcile`).
pub async fn latest_runs(pool: &PgPool, limit: i64) -> Result<Vec<RunCounts>> {
    crate::db::transaction(pool, async |tx| {
        sqlx::query_as(&format!(
            "select {RUN_COLUMNS} from loader.ingest_runs order by id desc limit $1"
        ))
        .bind(limit)
        .persistent(false)
        .fetch_all(tx)
        .await
    })
    .await
    .context("reading the latest ingest runs")
}

/// An ingest run registered in `loader.ingest_runs`: what every staging call names. The token
/// (random, from the database) binds the run to the process that registered it: no other
/// session can stage into it or change its counters. Never logged.
#[derive(Clone)]
pub struct IngestRun {
    pub id: i64,
    pub(super) token: String,
}

impl std::fmt::Debug for IngestRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngestRun").field("id", &self.id).finish_non_exhaustive()
    }
}

impl IngestRun {
    /// Registers a new open run for `queue` (`mode`: drain, follow or lambda).
    pub async fn register(
        db: impl Acquire<'_, Database = Postgres>,
        queue: &str,
        mode: &str,
    ) -> Result<Self> {
        let mut tx = db.begin().await.context("connecting to PostgreSQL")?;
        let registered =
            sqlx::query_as("select run_id, run_token from loader.register_run($1, $2, $3)")
                .bind(queue)
                .bind(mode)
                .bind(env!("CARGO_PKG_VERSION"))
                .persistent(false)
                .fetch_one(&mut *tx)
                .await;
        let (id, token): (i64, String) =
            crate::db::explained(registered, "registering the ingest run", "loader_ingest")?;
        tx.commit().await.context("registering the ingest run")?;
        Ok(Self { id, token })
    }

    /// Adds a flush's deletes and delete failures to the run's counters.
    pub async fn record_deletes(
        &self,
        db: impl Acquire<'_, Database = Postgres>,
        deleted: u64,
        failures: u64,
    ) -> Result<()> {
        let mut tx = db.begin().await.context("connecting to PostgreSQL")?;
        sqlx::query("select loader.record_deletes($1, $2, $3, $4)")
            .bind(self.id)
            .bind(&self.token)
            .bind(deleted as i64)
            .bind(failures as i64)
            .persistent(false)
            .execute(&mut *tx)
            .await
            .context("recording deletes")?;
        tx.commit().await.context("recording deletes")?;
        Ok(())
    }

    /// Tells the database the run's process is alive (`ingest_runs.last_seen_at`).
    pub async fn heartbeat(&self, pool: &PgPool) -> Result<()> {
        crate::db::transaction(pool, async |tx| {
            sqlx::query("select loader.heartbeat($1, $2)")
                .bind(self.id)
                .bind(&self.token)
                .persistent(false)
                .execute(tx)
                .await
        })
        .await
        .context("telling the database the run is alive")?;
        Ok(())
    }

    /// Marks the run finished; `stopped_on_error` when it ends on an error (then its counters
    /// may be short of what it did: a flush deleted but not yet recorded).
    pub async fn finish(
        &self,
        db: impl Acquire<'_, Database = Postgres>,
        stopped_on_error: bool,
    ) -> Result<()> {
        let mut tx = db.begin().await.context("connecting to PostgreSQL")?;
        sqlx::query("select loader.finish_run($1, $2, $3)")
            .bind(self.id)
            .bind(&self.token)
            .bind(stopped_on_error)
            .persistent(false)
            .execute(&mut *tx)
            .await
            .context("closing the ingest run")?;
        tx.commit().await.context("closing the ingest run")?;
        Ok(())
    }
}
