//! Online rebuild and key rotation (`sql/35_rebuild.sql`): every outcome recomputed into new
//! copies of the output tables by parallel workers, in committed ranges, while the incremental
//! transform keeps loading (into both); then one short swap. Killed at any point, running it
//! again resumes: ranges already committed are not copied twice.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sqlx::PgPool;
use tokio::task::JoinSet;

use crate::counts::TransformReport;
use crate::evict;
use crate::keys;
use crate::progress::Progress;
use crate::retry::sqlstate;
use crate::shutdown::Shutdown;
use crate::transform::{self, Plan};

/// What to rebuild with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Recompute every outcome with the active key (after a change to the transform).
    Rebuild,
    /// Re-mask every outcome with a new key (random when `None`), active from the swap on.
    Rotate(Option<Vec<u8>>),
}

/// A rebuild as `loader.rebuild_start` reports it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Started {
    pub rebuild_id: i64,
    /// The key the new copies are masked with (a rotation's new key's id).
    pub key_id: i32,
    pub rotation: bool,
    pub ranges: i64,
    pub ranges_done: i64,
    /// It was already copying (killed or stopped earlier): this run continues it.
    pub resumed: bool,
    /// Bytes of the live tables now: about the free disk the copies need.
    pub copy_bytes: i64,
}

/// What a finished rebuild did.
#[derive(Debug, Clone)]
pub struct Finished {
    pub started: Started,
    /// Rows the workers wrote into the copies (this run's share).
    pub copied: i64,
    /// How long the swap waited for readers and open batches to let go of the tables.
    pub swap_waited: Duration,
    /// Sessions of other roles ended because they held up the start, the swap or the drop of
    /// the retired tables ([`evict`]).
    pub evicted: Vec<evict::Evicted>,
    /// The transform of what was pending at the end.
    pub transform: TransformReport,
    /// Outcomes carried into the new tables as they were, because their staged message is
    /// gone (nothing to recompute from; `loader.rebuilds.carried`).
    pub carried: i64,
    /// Masked rows copied as they were, their bodies past retention: a rotation leaves them on
    /// their older key (`loader.rebuilds.kept_as_is`).
    pub kept_as_is: i64,
    /// The months of `user_logins` it left as they were: the first day it copied
    /// (`loader.rebuilds.copy_from`) and how many partitions before it stayed untouched. None
    /// when it copied the whole table.
    pub left_before: Option<(time::Date, i64)>,
}

/// How long one swap attempt waits for its locks before letting readers go on and trying
/// again: while it waits, new readers of the tables queue behind it.
const SWAP_LOCK_TIMEOUT: &str = "2s";
/// Swap attempts before giving up (the copies stay; running again swaps).
const SWAP_ATTEMPTS: u32 = 90;

/// Starts a rebuild (or resumes the one copying), calls `on_start` (to say what it will do
/// and the disk it needs, before the long part), copies with `plan.workers` sessions, swaps,
/// drops the retired tables, and transforms what is pending. `None` when a rotation's key is
/// already the active one, or when `stop` began before every range was copied (the copied
/// ranges stay: running it again continues). A session of another role that holds up the
/// start, the swap or the drop for longer than `evict_after` is ended ([`evict`]).
pub async fn rebuild(
    pool: &PgPool,
    kind: &Kind,
    plan: Plan,
    evict_after: Duration,
    stop: &Shutdown,
    on_start: impl FnOnce(&Started),
) -> Result<Option<Finished>> {
    let mut evicted = Vec::new();
    // Stopped between its swap and the drop of the tables it retired, the last run did the
    // work: a rebuild, or a rotation to a random key, finishes it rather than start another.
    let same_kind = match kind {
        Kind::Rebuild => Some(None),
        Kind::Rotate(None) => Some(Some("generated")),
        Kind::Rotate(Some(_)) => None,
    };
    if let Some(source) = same_kind
        && let Some(swapped) = swapped_unfinished(pool, source).await?
    {
        on_start(&swapped);
        let after = Swapped { copied: 0, swap_waited: Duration::ZERO, evicted };
        return Ok(Some(finish(pool, plan, evict_after, swapped, after).await?));
    }
    let Some(started) = start(pool, kind, evict_after, &mut evicted).await? else {
        return Ok(None);
    };
    on_start(&started);
    let progress = Progress::on_terminal("ranges copied");
    if let Some(p) = &progress {
        p.advance(started.ranges_done as u64, Some((started.ranges - started.ranges_done) as u64));
    }
    let copied = copy(pool, plan.workers, progress.as_ref(), stop).await?;
    if let Some(p) = &progress {
        p.finish();
    }
    if stop.has_begun() {
        return Ok(None);
    }
    let swap_waited = swap(pool, evict_after, &mut evicted).await?;
    Ok(Some(
        finish(pool, plan, evict_after, started, Swapped { copied, swap_waited, evicted }).await?,
    ))
}

/// What a rebuild did up to its swap.
struct Swapped {
    copied: i64,
    swap_waited: Duration,
    evicted: Vec<evict::Evicted>,
}

/// After the swap: the retired tables dropped, the new ones analysed, what is pending
/// transformed, and what the rebuild carried and kept as it was read back.
async fn finish(
    pool: &PgPool,
    plan: Plan,
    evict_after: Duration,
    started: Started,
    swapped: Swapped,
) -> Result<Finished> {
    let Swapped { copied, swap_waited, mut evicted } = swapped;
    drop_retired(pool, evict_after, &mut evicted).await?;
    sqlx::raw_sql("analyze public.user_logins; analyze loader.login_rejects")
        .execute(pool)
        .await
        .context("analysing the swapped tables")?;
    let transform = transform::transform(pool, plan).await?;
    let (carried, kept_as_is, copy_from, left) = crate::db::transaction(pool, async |tx| {
        sqlx::query_as::<_, (i64, i64, Option<time::Date>, i64)>(
            "select coalesce(b.carried, 0), coalesce(b.kept_as_is, 0), b.copy_from,
                    (select count(*) from loader._masked_partitions() p where p.hi <= b.copy_from)
               from loader.rebuilds b where b.id = $1",
        )
        .bind(started.rebuild_id)
        .persistent(false)
        .fetch_one(tx)
        .await
    })
    .await
    .context("reading what the rebuild carried")?;
    let left_before = copy_from.map(|day| (day, left));
    Ok(Finished {
        started,
        copied,
        swap_waited,
        evicted,
        transform,
        carried,
        kept_as_is,
        left_before,
    })
}

/// The last rebuild, when it swapped, was of this kind (`source`: NULL for a rebuild,
/// `generated` for a rotation to a random key) and the tables it retired are still there: its
/// command stopped (killed, say) before dropping them.
async fn swapped_unfinished(pool: &PgPool, source: Option<&str>) -> Result<Option<Started>> {
    crate::db::transaction(pool, async |tx| {
        sqlx::query_as(
            "select b.id as rebuild_id, b.key_id, b.new_key_source is not null as rotation,
                    0::int8 as ranges, 0::int8 as ranges_done, true as resumed,
                    0::int8 as copy_bytes
               from loader.rebuilds b
              where b.id = (select max(l.id) from loader.rebuilds l)
                and b.state = 'swapped'
                and b.new_key_source is not distinct from $1
                and exists (select from pg_catalog.pg_class c
                             where c.relnamespace = 'loader_rebuild'::regnamespace
                               and c.relname in ('user_logins_retired_r' || b.id,
                                                 'login_rejects_retired_r' || b.id))",
        )
        .bind(source)
        .persistent(false)
        .fetch_optional(tx)
        .await
    })
    .await
    .context("looking for a rebuild swapped and not finished")
}

/// `loader.rebuild_start`, the new key (if given) sent as COPY data, never as a parameter. It
/// waits for the batches committing at that moment (the key row they hold): a session that
/// holds one for longer than `evict_after` is ended.
pub async fn start(
    pool: &PgPool,
    kind: &Kind,
    evict_after: Duration,
    evicted: &mut Vec<evict::Evicted>,
) -> Result<Option<Started>> {
    let mut tx = pool.begin().await.context("connecting to PostgreSQL")?;
    let watch = evict::Watch::start(pool, "rebuild start", evict_after);
    watch.follow(evict::backend_pid(&mut tx).await?);
    let started = async {
        let (key, rotate) = match kind {
            Kind::Rebuild => ("null", false),
            Kind::Rotate(key) => (keys::key_expression(&mut tx, key.as_deref()).await?, true),
        };
        let started: Option<Started> = sqlx::query_as(&format!(
            "select rebuild_id, key_id, rotation, ranges, ranges_done, resumed, copy_bytes
               from loader.rebuild_start({key}, {rotate}) where rebuild_id is not null"
        ))
        .persistent(false)
        .fetch_optional(&mut *tx)
        .await
        .context("starting the online rebuild (only the owner role may)")?;
        tx.commit().await.context("committing the rebuild's start")?;
        anyhow::Ok(started)
    }
    .await;
    evicted.extend(watch.stop().await);
    started
}

/// `loader.rebuild_drop_retired`: the tables swaps retired, with the temporary objects other
/// sessions made on them; a session whose lock holds a drop up past `evict_after` is ended.
pub async fn drop_retired(
    pool: &PgPool,
    evict_after: Duration,
    evicted: &mut Vec<evict::Evicted>,
) -> Result<i32> {
    let mut tx = pool.begin().await.context("connecting to PostgreSQL")?;
    let watch = evict::Watch::start(pool, "dropping retired tables", evict_after);
    watch.follow(evict::backend_pid(&mut tx).await?);
    let dropped = async {
        let dropped: i32 = sqlx::query_scalar("select loader.rebuild_drop_retired()")
            .persistent(false)
            .fetch_one(&mut *tx)
            .await
            .context("dropping the tables the swap retired")?;
        tx.commit().await.context("committing the drop of the retired tables")?;
        anyhow::Ok(dropped)
    }
    .await;
    evicted.extend(watch.stop().await);
    dropped
}

/// How long [`copy`] waits for ranges another session is copying: a `loader` killed moments
/// ago leaves its server session copying its range, which commits it (or, once the server
/// notices the client is gone, rolls it back for the next pass to copy).
const HELD_RANGE_WAIT: Duration = Duration::from_secs(120);

/// Copies every range left, `workers` sessions at once, then waits for the ranges other
/// sessions hold (copying them itself if they are given back); returns the rows it wrote.
/// Once `stop` has begun, each session stops after the range in hand.
pub async fn copy(
    pool: &PgPool,
    workers: usize,
    progress: Option<&Progress>,
    stop: &Shutdown,
) -> Result<i64> {
    let mut copied = copy_unclaimed(pool, workers, progress, stop).await?;
    let deadline = tokio::time::Instant::now() + HELD_RANGE_WAIT;
    loop {
        let left: i64 = crate::db::transaction(pool, async |tx| {
            sqlx::query_scalar(
                "select count(*) from loader.rebuild_ranges g
                   join loader.rebuilds b on b.id = g.rebuild_id
                  where b.state = 'copying' and not g.done",
            )
            .persistent(false)
            .fetch_one(tx)
            .await
        })
        .await
        .context("counting the ranges left to copy")?;
        if left == 0 || stop.has_begun() {
            return Ok(copied);
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "{left} ranges of the online rebuild are still held by another session after \
                 {} s (another `loader` copying?); run the same command again to continue",
                HELD_RANGE_WAIT.as_secs()
            );
        }
        tracing::info!(left, "ranges are being copied by another session; waiting for them");
        tokio::time::sleep(Duration::from_millis(200)).await;
        copied += copy_unclaimed(pool, workers, progress, stop).await?;
    }
}

/// Copies every range no other session holds, `workers` sessions at once.
async fn copy_unclaimed(
    pool: &PgPool,
    workers: usize,
    progress: Option<&Progress>,
    stop: &Shutdown,
) -> Result<i64> {
    let (done, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<i64>();
    let mut sessions = JoinSet::new();
    for _ in 0..workers.max(1) {
        let (pool, done, stop) = (pool.clone(), done.clone(), stop.clone());
        sessions.spawn(async move {
            // Each range in a transaction of its own, committed.
            while !stop.has_begun()
                && let Some(rows) = crate::db::transaction(&pool, async |tx| {
                    sqlx::query_scalar::<_, Option<i64>>("select loader.rebuild_copy_range()")
                        .persistent(false)
                        .fetch_one(tx)
                        .await
                })
                .await
                .context("copying a range of the online rebuild")?
            {
                let _ = done.send(rows);
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    drop(done);
    let mut copied = 0;
    while let Some(rows) = done_rx.recv().await {
        copied += rows;
        if let Some(p) = progress {
            p.advance(1, None);
        }
    }
    while let Some(session) = sessions.join_next().await {
        session.context("a copy session panicked")??;
    }
    Ok(copied)
}

/// `loader.rebuild_swap`, each attempt bounded by [`SWAP_LOCK_TIMEOUT`] (while an attempt
/// waits, new readers of the tables queue behind it); between attempts the sessions holding the
/// tables are logged (pids, never queries), and one that has held the swap up for
/// `evict_after` across attempts is ended. Returns how long it waited.
pub async fn swap(
    pool: &PgPool,
    evict_after: Duration,
    evicted: &mut Vec<evict::Evicted>,
) -> Result<Duration> {
    let started = Instant::now();
    let watch = evict::Watch::start(pool, "rebuild swap", evict_after);
    let swapped = async {
        for attempt in 1..=SWAP_ATTEMPTS {
            let mut tx = pool.begin().await.context("connecting to PostgreSQL")?;
            watch.follow(evict::backend_pid(&mut tx).await?);
            sqlx::raw_sql(&format!("set local lock_timeout = '{SWAP_LOCK_TIMEOUT}'"))
                .execute(&mut *tx)
                .await?;
            match sqlx::query("select * from loader.rebuild_swap()").persistent(false).execute(&mut *tx).await {
                Ok(_) => {
                    tx.commit().await.context("committing the swap")?;
                    return Ok(started.elapsed());
                }
                Err(e) if is_lock_timeout(&e) => {
                    drop(tx);
                    let holders: Vec<i32> = crate::db::transaction(pool, async |tx| {
                        sqlx::query_scalar(
                            "select distinct l.pid from pg_locks l
                              where l.granted and l.pid <> pg_backend_pid()
                                and l.relation in ('public.user_logins'::regclass, 'loader.login_rejects'::regclass)",
                        )
                        .persistent(false).fetch_all(tx)
                        .await
                    })
                    .await
                    .unwrap_or_default();
                    tracing::warn!(
                        attempt,
                        ?holders,
                        "the swap waits for sessions using user_logins or login_rejects"
                    );
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e).context("swapping the rebuilt tables in"),
            }
        }
        anyhow::bail!(
            "the swap found the tables in use {SWAP_ATTEMPTS} times in a row; the copies are kept: run the same command again to swap"
        )
    }
    .await;
    evicted.extend(watch.stop().await);
    swapped
}

fn is_lock_timeout(e: &sqlx::Error) -> bool {
    sqlstate(e).is_some_and(|c| c == "55P03")
}
