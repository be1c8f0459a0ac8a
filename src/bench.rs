//! `loader bench`: the parts of the ingest benchmark that `loader ingest` itself cannot show
//! (`scripts/bench-ingest.sh` runs them all and prints one report):
//! - `ceiling`: the queue's own limit: receive and delete with the same concurrency as ingest,
//!   and no database work at all;
//! - `staging`: pre-built batches into `loader.raw_logins`, no queue at all; `--method copy`
//!   measures COPY into a temporary table plus one INSERT ... SELECT against the UNNEST
//!   statement ingest uses.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use sqlx::{Connection, PgConnection, PgPool};
use time::format_description::well_known::Rfc3339;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::send;
use crate::sqs::Queue;
use crate::staging::{self, RawMessage};

/// Drains `queue` with `receivers` concurrent receive loops, each handing its batches to
/// delete tasks that run beside the receives (at most `receivers` delete calls in flight, as
/// ingest allows), so a delete's round trip never delays the next receive. Returns messages
/// and elapsed time (until the last delete).
pub async fn queue_ceiling(
    queue: &Queue,
    receivers: usize,
    wait_seconds: i32,
) -> Result<(u64, Duration)> {
    let started = Instant::now();
    let deletes = Arc::new(Semaphore::new(receivers.max(1)));
    let mut loops = JoinSet::new();
    for _ in 0..receivers {
        let (queue, deletes) = (queue.clone(), deletes.clone());
        loops.spawn(async move {
            let (mut done, mut deleting) = (0u64, JoinSet::new());
            loop {
                while let Some(deleted) = deleting.try_join_next() {
                    deleted??;
                }
                let batch = queue.receive(wait_seconds).await?;
                if batch.is_empty() {
                    break;
                }
                done += batch.len() as u64;
                let (queue, permit) = (queue.clone(), deletes.clone().acquire_owned().await?);
                deleting.spawn(async move {
                    let _permit = permit;
                    queue.delete(&batch).await
                });
            }
            while let Some(deleted) = deleting.join_next().await {
                deleted??;
            }
            Ok::<_, anyhow::Error>(done)
        });
    }
    let mut total = 0;
    while let Some(done) = loops.join_next().await {
        total += done??;
    }
    Ok((total, started.elapsed()))
}

/// How `loader bench staging` sends a flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StagingMethod {
    /// One `select loader.stage(...)` call (UNNEST inside): one round trip.
    Unnest,
    /// COPY into a temporary table, then one INSERT ... SELECT, in one transaction.
    Copy,
}

impl StagingMethod {
    /// The names the command line accepts.
    pub const NAMES: [&str; 2] = ["unnest", "copy"];
}

impl std::str::FromStr for StagingMethod {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "unnest" => Ok(Self::Unnest),
            "copy" => Ok(Self::Copy),
            _ => Err(format!("unknown staging method {s:?}: unnest or copy")),
        }
    }
}

/// Stages `rows` synthetic messages in flushes of `flush` rows over one connection; returns
/// rows and elapsed time of the staging statements alone.
pub async fn staging(
    pool: &PgPool,
    rows: u64,
    flush: usize,
    method: StagingMethod,
) -> Result<(u64, Duration)> {
    let run = staging::IngestRun::register(pool, "bench", "drain").await?;
    let bench_run = fastrand::u64(..);
    let messages: Vec<RawMessage> = send::generate(rows, 99)
        .into_iter()
        .enumerate()
        .map(|(i, body)| RawMessage {
            message_id: format!("bench-{bench_run:x}-{i}"),
            body,
            sent_at: Some(time::OffsetDateTime::now_utc()),
            receive_count: Some(1),
        })
        .collect();
    let mut conn = pool.acquire().await?;
    let started = Instant::now();
    let mut staged = 0;
    for chunk in messages.chunks(flush.max(1)) {
        staged += match method {
            StagingMethod::Unnest => staging::stage(&mut conn, &run, chunk).await?.outcome.staged,
            StagingMethod::Copy => stage_by_copy(&mut conn, run.id, chunk).await?,
        };
    }
    Ok((staged, started.elapsed()))
}

/// The COPY alternative to [`staging::stage`]: rows go into a temporary table by COPY (CSV),
/// then into `loader.raw_logins` by the same set-based insert as `loader.stage`, and the counters. Four
/// round trips (begin, copy, insert, commit) where UNNEST needs one. It writes the tables
/// directly, so it needs the owner role: a comparison, not a write path (`loader_ingest` has
/// only `loader.stage`).
async fn stage_by_copy(
    conn: &mut PgConnection,
    run_id: i64,
    messages: &[RawMessage],
) -> Result<u64> {
    let mut tx = conn.begin().await?;
    sqlx::query(
        "create temp table if not exists bench_copy (message_id text, body text, is_json bool,
             sent_at timestamptz, receive_count int) on commit delete rows",
    )
    .persistent(false)
    .execute(&mut *tx)
    .await?;
    let mut csv = String::with_capacity(messages.len() * 320);
    for m in messages {
        let sent_at = m.sent_at.map(|t| t.format(&Rfc3339)).transpose()?.unwrap_or_default();
        let receive_count = m.receive_count.map(|c| c.to_string()).unwrap_or_default();
        let is_json = staging::is_storable_json(&m.body);
        csv.push_str(&format!(
            "{},{},{is_json},{sent_at},{receive_count}\n",
            csv_field(&m.message_id),
            csv_field(&m.body)
        ));
    }
    let mut copy = tx.copy_in_raw("copy bench_copy from stdin (format csv)").await?;
    copy.send(csv.into_bytes()).await?;
    copy.finish().await?;
    let staged: i64 = sqlx::query_scalar(
        "with inserted as (
             select loader._insert_staged($1, clock_timestamp(),
                        array_agg(b.message_id), array_agg(b.body), array_agg(b.is_json),
                        array_agg(b.sent_at), array_agg(b.receive_count)) as n
               from (select distinct on (message_id) * from bench_copy) b
         ), counted as (
             update loader.ingest_runs
                set received = received + (select count(*) from bench_copy),
                    staged = staged + (select n from inserted),
                    duplicates = duplicates + (select count(*) from bench_copy)
                                            - (select n from inserted)
              where id = $1
         )
         select n from inserted",
    )
    .bind(run_id)
    .persistent(false)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(staged as u64)
}

/// A CSV field, always quoted (bodies hold commas, quotes and newlines).
fn csv_field(value: &str) -> String {
    format!("\"{}\"", value.replace('"', "\"\""))
}
