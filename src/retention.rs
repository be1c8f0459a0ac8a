//! Retention (`sql/40_retention.sql`), in bounded committed batches, owner role only: the raw
//! body of every message staged before a cutoff that has an outcome becomes JSON null
//! ([`purge`]), and the masked rows whose create_date is older than a period end, their
//! bodies with them ([`expire_masked`]).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sqlx::PgPool;
use time::{Date, OffsetDateTime};

use crate::evict;
use crate::progress::Progress;
use crate::shutdown::Shutdown;

/// Bodies per committed batch: one batch is the most a purge ever holds in one transaction.
pub const DEFAULT_BATCH: i32 = 10_000;

/// What a purge did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Purged {
    /// Days of `loader.raw_logins` dropped whole (their counts kept in `loader.staged_days`).
    pub days_dropped: Vec<Date>,
    /// Days due that stay, with why: `pending` (a row waits for the transform), `unaccounted`
    /// (a row has no outcome, or two, or an outcome of the day lost its staged row: `loader
    /// reconcile` names it), `copying` (an online rebuild has not copied them yet), `depended` (a permanent object outside loader depends
    /// on the partition), `busy` (a lock was held too long; the next run).
    pub days_kept: Vec<(Date, String)>,
    /// Bodies purged by this call, in the days not dropped whole (a day kept, rows staged
    /// before loader was partitioned, the default partition's).
    pub bodies: i64,
    /// False when `stop` ended it before every old body was purged (run again to continue).
    pub finished: bool,
    /// Sessions of lesser roles ended for holding a lock the days' maintenance needed.
    pub evicted: Vec<evict::Evicted>,
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
                        and r.staged_at < loader._purge_cutoff(make_interval(days => $1))) as c",
        )
        .bind(days)
        .persistent(false)
        .fetch_one(tx)
        .await
    })
    .await
    .context("counting what the purge would take (only the owner role may)")
}

/// What `purge` would do with the whole days before its cutoff, changing nothing: each day
/// partition due, oldest first, with `droppable` or why it would stay (as in
/// [`Purged::days_kept`]).
pub async fn preview_days(pool: &PgPool, days: i32) -> Result<Vec<(Date, String)>> {
    crate::db::transaction(pool, async |tx| {
        sqlx::query_as(
            "select d, loader.drop_staged_day(d, true)
               from loader._staged_days_due(loader._purge_cutoff(make_interval(days => $1))) d
              order by d",
        )
        .bind(days)
        .persistent(false)
        .fetch_all(tx)
        .await
    })
    .await
    .context("looking at the staged days due (only the owner role may)")
}

/// Purges every body staged on a UTC day that ended more than `days` days ago (every body with
/// an outcome when `days` is 0; `loader._purge_cutoff`, fixed when it starts), `batch` rows per
/// committed transaction, showing `progress` when given. First, as the daily maintenance of
/// `loader.raw_logins` (sql/16_partitions.sql): the day partitions ahead, the drop of every
/// whole day before the cutoff whose rows all have their outcome, then the staged ids' weekly
/// generation; a session of a lesser role that holds a lock one of those needs is ended after
/// `evict_after` ([`evict::retrying`]).
///
/// Once `stopping` has begun (a signal, say), the batch or day in hand commits and the purge
/// returns with `finished: false`; killed outright, it loses at most the batch in progress.
/// Either way, running it again continues.
pub async fn purge(
    pool: &PgPool,
    days: i32,
    batch: i32,
    progress: Option<&Progress>,
    stopping: &Shutdown,
    evict_after: Duration,
) -> Result<Purged> {
    let cutoff: OffsetDateTime = crate::db::transaction(pool, async |tx| {
        sqlx::query_scalar("select loader._purge_cutoff(make_interval(days => $1))")
            .bind(days)
            .persistent(false)
            .fetch_one(tx)
            .await
    })
    .await
    .context("reading the database's clock")?;
    let mut evicted = Vec::new();
    maintain(
        pool,
        evict_after,
        &mut evicted,
        "creating the staging days ahead",
        "create_staging_days",
    )
    .await?;
    maintain(
        pool,
        evict_after,
        &mut evicted,
        "creating the masked months ahead",
        "create_masked_months",
    )
    .await?;
    let due: Vec<Date> = crate::db::transaction(pool, async |tx| {
        sqlx::query_scalar("select loader._staged_days_due($1)")
            .bind(cutoff)
            .persistent(false)
            .fetch_all(tx)
            .await
    })
    .await
    .context("listing the staged days due (only the owner role may)")?;
    let (mut days_dropped, mut days_kept) = (Vec::new(), Vec::new());
    let work = "dropping a staged day";
    let watch = evict::Watch::start(pool, work, evict_after);
    let dropped = async {
        for day in due {
            if stopping.has_begun() {
                break;
            }
            let sql = "select loader.drop_staged_day($1)";
            let outcome =
                evict::retrying_under(&watch, pool, evict_after, work, sql, Some(day)).await?;
            match outcome.as_deref() {
                Some("dropped") => days_dropped.push(day),
                Some("missing") => {}
                Some(why) => days_kept.push((day, why.to_owned())),
                None => days_kept.push((day, "busy".to_owned())),
            }
        }
        anyhow::Ok(())
    }
    .await;
    evicted.extend(watch.stop().await);
    dropped?;
    if stopping.has_begun() {
        return Ok(Purged { days_dropped, days_kept, bodies: 0, finished: false, evicted });
    }
    // After the drops: a generation of ids goes once the days of its time are gone.
    maintain(
        pool,
        evict_after,
        &mut evicted,
        "switching the staged ids' generation",
        "_switch_staged_ids",
    )
    .await?;
    let (bodies, finished) = batches(
        pool,
        "select loader.purge_staged_batch($1, $2)",
        cutoff,
        batch,
        progress,
        stopping,
    )
    .await
    .context("purging staged bodies (only the owner role may)")?;
    note_oldest_body(pool).await?;
    Ok(Purged { days_dropped, days_kept, bodies, finished, evicted })
}

/// One step of the daily staging maintenance (`loader.<function>()`, owner only), retried and
/// evicting as [`evict::retrying`] does; a lock held past `evict_after` leaves it to the next
/// purge, with a warning.
async fn maintain(
    pool: &PgPool,
    evict_after: Duration,
    evicted: &mut Vec<evict::Evicted>,
    work: &'static str,
    function: &str,
) -> Result<()> {
    let sql = format!("select loader.{function}()::text");
    let (done, ended) = evict::retrying(pool, evict_after, work, &sql, None).await?;
    evicted.extend(ended);
    if done.is_none() {
        tracing::warn!(work, "a lock stayed held past --evict-after; the next purge does it");
    }
    Ok(())
}

/// Records when the oldest body still held was staged, for `loader.pipeline_status`
/// (`loader._note_oldest_body`): at the end of every purge and expiry.
async fn note_oldest_body(pool: &PgPool) -> Result<()> {
    crate::db::transaction(pool, async |tx| {
        sqlx::query("select loader._note_oldest_body()").persistent(false).execute(tx).await
    })
    .await
    .context("noting the oldest body still held")?;
    Ok(())
}

/// What an expiry of masked rows did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expired {
    /// Masked rows with a create_date before this day were ended.
    pub cutoff: Date,
    /// `user_logins` rows ended by this call (a copying rebuild's copy loses them too).
    pub rows: i64,
    /// Bodies with no masked row to end with (rejects) staged before the cutoff, purged by this
    /// call.
    pub bodies: i64,
    /// False when `stop` ended it before every old row was ended (run again to continue).
    pub finished: bool,
}

/// The first `create_date` kept when masked rows are kept `months` months (the UTC day, less
/// the months): `loader._masked_cutoff`, the one rule of every path.
pub async fn masked_cutoff(pool: &PgPool, months: i32) -> Result<Date> {
    let cutoff = crate::db::transaction(pool, async |tx| {
        sqlx::query_scalar("select loader._masked_cutoff($1)")
            .bind(months)
            .persistent(false)
            .fetch_one(tx)
            .await
    })
    .await;
    crate::db::explained(cutoff, "computing the masked data's cutoff", "the owner role")
}

/// What [`expire_masked`] would do, changing nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpiryPreview {
    pub cutoff: Date,
    /// Masked rows created before the cutoff (it ends those).
    pub rows: i64,
    /// Of those, rows from before loader (no message id).
    pub before_loader: i64,
    /// Rows with no create_date: never ended (nothing says their age).
    pub undated: i64,
}

/// What [`expire_masked`] would do for `months`, changing nothing.
pub async fn preview_masked(pool: &PgPool, months: i32) -> Result<ExpiryPreview> {
    let cutoff = masked_cutoff(pool, months).await?;
    let (rows, before_loader, undated) = crate::db::transaction(pool, async |tx| {
        sqlx::query_as(
            "select count(*) filter (where create_date < $1),
                    count(*) filter (where create_date < $1 and message_id is null),
                    count(*) filter (where create_date is null)
               from public.user_logins
              where create_date < $1 or create_date is null",
        )
        .bind(cutoff)
        .persistent(false)
        .fetch_one(tx)
        .await
    })
    .await
    .context("counting the masked rows the expiry would end")?;
    Ok(ExpiryPreview { cutoff, rows, before_loader, undated })
}

/// Ends every masked row whose create_date is more than `months` months old (the cutoff is
/// fixed when it starts), `batch` rows per committed transaction, showing `progress` when
/// given; stopped and rerun like [`purge`].
pub async fn expire_masked(
    pool: &PgPool,
    months: i32,
    batch: i32,
    progress: Option<&Progress>,
    stopping: &Shutdown,
) -> Result<Expired> {
    let cutoff = masked_cutoff(pool, months).await?;
    let before = ended_before(pool, cutoff).await?;
    let (_, finished) = batches(
        pool,
        "select loader.expire_masked_batch($1, $2)",
        cutoff,
        batch,
        progress,
        stopping,
    )
    .await
    .context("ending masked rows past their retention period")?;
    let after = ended_before(pool, cutoff).await?;
    note_oldest_body(pool).await?;
    Ok(Expired { cutoff, rows: after.0 - before.0, bodies: after.1 - before.1, finished })
}

/// The rows and bodies ended so far for `cutoff`, as its record in `loader.mask_expiries` counts
/// them (a batch's return also counts a row of a rebuild's copy it deleted after the live one).
async fn ended_before(pool: &PgPool, cutoff: Date) -> Result<(i64, i64)> {
    crate::db::transaction(pool, async |tx| {
        sqlx::query_as(
            "select coalesce(sum(expired + before_loader), 0)::bigint, coalesce(sum(bodies), 0)::bigint
               from loader.mask_expiries where cutoff = $1",
        )
        .bind(cutoff)
        .persistent(false)
        .fetch_one(tx)
        .await
    })
    .await
    .context("reading the record of the masked rows ended")
}

/// Runs `statement` (one batch, `$1` the cutoff, `$2` the batch size; returns the rows it did,
/// 0 when none is left) in a committed transaction each until it returns 0 or `stopping` has
/// begun; returns the rows done and whether it finished.
async fn batches<T>(
    pool: &PgPool,
    statement: &'static str,
    cutoff: T,
    batch: i32,
    progress: Option<&Progress>,
    stopping: &Shutdown,
) -> Result<(i64, bool), sqlx::Error>
where
    T: for<'q> sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Copy + Send,
{
    let mut done = 0;
    loop {
        if stopping.has_begun() {
            return Ok((done, false));
        }
        let started = Instant::now();
        let n: i64 = crate::db::transaction(pool, async |tx| {
            sqlx::query_scalar(statement)
                .bind(cutoff)
                .bind(batch)
                .persistent(false)
                .fetch_one(tx)
                .await
        })
        .await?;
        if n == 0 {
            return Ok((done, true));
        }
        done += n;
        let ms = started.elapsed().as_millis() as u64;
        tracing::debug!(batch = n, done, ms, statement, "retention batch committed");
        if let Some(progress) = progress {
            progress.advance(n as u64, None);
        }
    }
}
