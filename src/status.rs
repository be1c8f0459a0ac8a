//! `loader status`: the pipeline at a glance, from `loader.pipeline_status` (which analysts
//! can read in psql too) and the latest ingest run.

use anyhow::Result;
use serde::Serialize;
use sqlx::PgPool;
use time::OffsetDateTime;

use crate::counts::RunCounts;

/// What `loader status` shows (and `--json` prints, with the queue).
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Staged rows waiting for the transform.
    pub pending: i64,
    /// When the oldest of them was staged.
    #[serde(rename = "oldest_pending_staged_at", with = "time::serde::rfc3339::option")]
    pub oldest_pending: Option<OffsetDateTime>,
    /// When a transform batch last found the work list drained.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_drained_at: Option<OffsetDateTime>,
    pub active_key_id: Option<i32>,
    pub last_run: Option<RunCounts>,
}

/// Reads [`Status`].
pub async fn read(pool: &PgPool) -> Result<Status> {
    let status = crate::db::transaction(pool, async |tx| {
        sqlx::query_as(
            "select pending, oldest_pending_staged_at, last_drained_at, active_key_id
           from loader.pipeline_status",
        )
        .persistent(false)
        .fetch_one(tx)
        .await
    })
    .await;
    let (pending, oldest_pending, last_drained_at, active_key_id) =
        crate::db::explained(status, "reading status", "loader_analyst")?;
    let last_run = crate::staging::latest_runs(pool, 1).await?.into_iter().next();
    Ok(Status { pending, oldest_pending, last_drained_at, active_key_id, last_run })
}
