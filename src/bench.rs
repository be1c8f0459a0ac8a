//! `loader bench`: the parts of the ingest benchmark that `loader ingest` itself cannot show
//! (`scripts/bench-ingest.sh` runs them all and prints one report):
//! - `ceiling`: the queue's own limit: receive and delete with the same concurrency as ingest,
//!   and no database work at all;
//! - `staging`: pre-built batches into `loader.raw_logins`, no queue at all.

use std::time::{Duration, Instant};

use anyhow::Result;
use sqlx::PgPool;
use tokio::task::JoinSet;

use crate::send;
use crate::sqs::Queue;
use crate::staging::{self, RawMessage};

/// Drains `queue` with `receivers` concurrent receive-and-delete loops; returns messages and
/// elapsed time (up to the last non-empty receive).
pub async fn queue_ceiling(
    queue: &Queue,
    receivers: usize,
    wait_seconds: i32,
) -> Result<(u64, Duration)> {
    let started = Instant::now();
    let mut loops = JoinSet::new();
    for _ in 0..receivers {
        let queue = queue.clone();
        loops.spawn(async move {
            let mut done = 0u64;
            let mut last = Instant::now();
            loop {
                let batch = queue.receive(wait_seconds).await?;
                if batch.is_empty() {
                    return Ok::<_, anyhow::Error>((done, last));
                }
                queue.delete(&batch).await?;
                done += batch.len() as u64;
                last = Instant::now();
            }
        });
    }
    let (mut total, mut end) = (0, started);
    while let Some(done) = loops.join_next().await {
        let (n, last) = done??;
        total += n;
        end = end.max(last);
    }
    Ok((total, end - started))
}

/// Stages `rows` synthetic messages in flushes of `flush` rows over one connection; returns
/// rows and elapsed time of the staging statements alone.
pub async fn staging(pool: &PgPool, rows: u64, flush: usize) -> Result<(u64, Duration)> {
    let run_id: i64 = sqlx::query_scalar(
        "insert into loader.ingest_runs (queue, mode, loader_version)
         values ('bench', 'drain', 'bench') returning id",
    )
    .fetch_one(pool)
    .await?;
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
        staged += staging::stage(&mut conn, run_id, "bench", chunk).await?.staged;
    }
    Ok((staged, started.elapsed()))
}
