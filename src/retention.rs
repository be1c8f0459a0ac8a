//! Retention (`sql/40_retention.sql`): the raw body of every message staged before a cutoff
//! that has an outcome becomes JSON null, in bounded committed batches. Owner role only.

use std::time::Instant;

use anyhow::{Context, Result};
use sqlx::PgPool;
use time::OffsetDateTime;

use crate::progress::Progress;
use crate::shutdown::Shutdown;

/// Bodies per committed batch: one batch is the most a purge ever holds in one transaction.
pub const DEFAULT_BATCH: i32 = 10_000;

/// What a purge did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Purged {
    /// Bodies purged by this call.
    pub bodies: i64,
    /// False when `stop` ended it before every old body was purged (run again to continue).
    pub finished: bool,
}

/// What `purge` would do for `days`, changing nothing: the bodies staged more than `days` ago
/// that have an outcome (it purges those), and the pending rows among them (kept until
/// transformed). A rebuild's ranges not yet copied are counted as purgeable: purge passes over
/// them until they are.
pub async fn preview(pool: &PgPool, days: i32) -> Result<(i64, i64)> {
    crate::db::transaction(pool, async |tx| {
        sqlx::query_as(
            "select count(*) filter (where not c.pending), count(*) filter (where c.pending)
               from (select exists (select from loader.transform_queue q where q.raw_id = r.id)
                                as pending
                       from loader.raw_logins r
                      where r.purged_at is null
                        and r.staged_at < now() - make_interval(days => $1)) as c",
        )
        .bind(days)
        .persistent(false)
        .fetch_one(tx)
        .await
    })
    .await
    .context("counting what the purge would take (only the owner role may)")
}

/// Purges every body staged more than `days` days ago (the cutoff is fixed when it starts),
/// `batch` rows per committed transaction, showing `progress` when given.
///
/// Once `stopping` has begun (a signal, say), the batch in hand commits and the purge returns
/// with `finished: false`; killed outright, it loses at most the batch in progress. Either way,
/// running it again continues.
pub async fn purge(
    pool: &PgPool,
    days: i32,
    batch: i32,
    progress: Option<&Progress>,
    stopping: &Shutdown,
) -> Result<Purged> {
    let cutoff: OffsetDateTime = crate::db::transaction(pool, async |tx| {
        sqlx::query_scalar("select now() - make_interval(days => $1)")
            .bind(days)
            .persistent(false)
            .fetch_one(tx)
            .await
    })
    .await
    .context("reading the database's clock")?;
    let mut purged = 0;
    loop {
        if stopping.has_begun() {
            return Ok(Purged { bodies: purged, finished: false });
        }
        let started = Instant::now();
        // One committed batch: its own transaction.
        let n: i64 = crate::db::transaction(pool, async |tx| {
            sqlx::query_scalar("select loader.purge_staged_batch($1, $2)")
                .bind(cutoff)
                .bind(batch)
                .persistent(false)
                .fetch_one(tx)
                .await
        })
        .await
        .context("purging staged bodies (only the owner role may)")?;
        if n == 0 {
            return Ok(Purged { bodies: purged, finished: true });
        }
        purged += n;
        let ms = started.elapsed().as_millis() as u64;
        tracing::debug!(batch = n, purged, ms, "purge batch committed");
        if let Some(progress) = progress {
            progress.advance(n as u64, None);
        }
    }
}
