//! `loader transform`: one call into the SQL transform (`sql/30_transform.sql`), whose counts
//! are printed as they are. The work happens in Postgres, so psql users get the same result.

use std::future::Future;
use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::PgPool;

/// What a transform call reports: the SQL function's own row.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct TransformReport {
    pub loaded: i64,
    pub rejected: i64,
    pub pending: i64,
}

impl std::fmt::Display for TransformReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "loaded {}, rejected {}, pending {}", self.loaded, self.rejected, self.pending)
    }
}

/// Transforms everything pending, one committed batch of `batch_size` rows at a time
/// (`call loader.transform()`).
pub async fn transform(pool: &PgPool, batch_size: i32) -> Result<TransformReport> {
    sqlx::query_as("call loader.transform(null, null, null, $1)")
        .bind(batch_size)
        .fetch_one(pool)
        .await
        .context("running loader.transform() (has `loader migrate` run?)")
}

/// Recomputes every outcome with the active key, atomically (`loader.rebuild()`).
pub async fn rebuild(pool: &PgPool) -> Result<TransformReport> {
    sqlx::query_as("select loaded, rejected, pending from loader.rebuild()")
        .fetch_one(pool)
        .await
        .context("running loader.rebuild()")
}

/// Runs [`transform`] every `interval` until `shutdown` resolves, calling `report` after each
/// run. A run in progress is finished before returning.
pub async fn watch(
    pool: &PgPool,
    batch_size: i32,
    interval: Duration,
    shutdown: impl Future<Output = ()>,
    mut report: impl FnMut(&TransformReport),
) -> Result<()> {
    tokio::pin!(shutdown);
    loop {
        report(&transform(pool, batch_size).await?);
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
