//! `loader status`: the pipeline at a glance, from `loader.pipeline_status` (which analysts
//! can read in psql too) and the latest ingest run.

use anyhow::Result;
use serde::Serialize;
use sqlx::PgPool;
use time::{Date, OffsetDateTime};

use crate::counts::RunCounts;

// Dates in JSON as `2026-12-06`, as `loader status` prints them.
time::serde::format_description!(day, Date, "[year]-[month]-[day]");

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
    /// When the oldest body still held was staged, as the last purge or expiry found it
    /// (`loader purge` ends bodies; None: none was held then).
    #[serde(with = "time::serde::rfc3339::option")]
    pub oldest_body_staged_at: Option<OffsetDateTime>,
    /// When that purge or expiry looked.
    #[serde(with = "time::serde::rfc3339::option")]
    pub oldest_body_measured_at: Option<OffsetDateTime>,
    /// `create_date` of the oldest masked row (`loader purge --masked-older-than-months`).
    #[serde(with = "day::option")]
    pub oldest_masked_create_date: Option<Date>,
    /// The latest cutoff the masked data's retention finished.
    #[serde(with = "day::option")]
    pub last_masked_cutoff: Option<Date>,
    pub last_run: Option<RunCounts>,
}

/// The columns of `loader.pipeline_status` that [`Status`] shows.
#[derive(sqlx::FromRow)]
struct Row {
    pending: i64,
    oldest_pending_staged_at: Option<OffsetDateTime>,
    last_drained_at: Option<OffsetDateTime>,
    active_key_id: Option<i32>,
    oldest_body_staged_at: Option<OffsetDateTime>,
    oldest_body_measured_at: Option<OffsetDateTime>,
    oldest_masked_create_date: Option<Date>,
    last_masked_cutoff: Option<Date>,
}

/// Reads [`Status`].
pub async fn read(pool: &PgPool) -> Result<Status> {
    let status = crate::db::transaction(pool, async |tx| {
        sqlx::query_as::<_, Row>(
            "select pending, oldest_pending_staged_at, last_drained_at, active_key_id,
                    oldest_body_staged_at, oldest_body_measured_at, last_masked_cutoff,
                    (select min(create_date) from public.user_logins) as oldest_masked_create_date
               from loader.pipeline_status",
        )
        .persistent(false)
        .fetch_one(tx)
        .await
    })
    .await;
    let row = crate::db::explained(status, "reading status", "loader_analyst")?;
    let last_run = crate::staging::latest_runs(pool, 1).await?.into_iter().next();
    Ok(Status {
        pending: row.pending,
        oldest_pending: row.oldest_pending_staged_at,
        last_drained_at: row.last_drained_at,
        active_key_id: row.active_key_id,
        oldest_body_staged_at: row.oldest_body_staged_at,
        oldest_body_measured_at: row.oldest_body_measured_at,
        oldest_masked_create_date: row.oldest_masked_create_date,
        last_masked_cutoff: row.last_masked_cutoff,
        last_run,
    })
}
