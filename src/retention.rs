//! Retention (`sql/40_retention.sql`): the raw body of every message staged before a cutoff
//! that has an outcome becomes JSON null, in bounded committed batches. Owner role only.

use anyhow::{Context, Result};
use sqlx::PgPool;
use time::OffsetDateTime;

use crate::progress::Progress;

/// Bodies per committed batch: one batch is the most a purge ever holds in one transaction.
pub const DEFAULT_BATCH: i32 = 10_000;

/// Purges every body staged more than `days` days ago (the cutoff is fixed when it starts),
/// `batch` rows per committed transaction, showing `progress` when given. Killed, it loses at
/// most the batch in progress; run again, it continues. Returns how many bodies it purged.
pub async fn purge(
    pool: &PgPool,
    days: i32,
    batch: i32,
    progress: Option<&Progress>,
) -> Result<i64> {
    let cutoff: OffsetDateTime = sqlx::query_scalar("select now() - make_interval(days => $1)")
        .bind(days)
        .fetch_one(pool)
        .await
        .context("reading the database's clock")?;
    let mut purged = 0;
    loop {
        let n: i64 = sqlx::query_scalar("select loader.purge_staged_batch($1, $2)")
            .bind(cutoff)
            .bind(batch)
            .fetch_one(pool)
            .await
            .context("purging staged bodies (only the owner role may)")?;
        if n == 0 {
            return Ok(purged);
        }
        purged += n;
        tracing::debug!(batch = n, purged, "purge batch committed");
        if let Some(progress) = progress {
            progress.advance(n as u64, None);
        }
    }
}
