//! The dead-letter queue: which messages are in it and why PostgreSQL refused each
//! (`loader.refusals`), and moving them back once the cause is fixed (`loader dlq`).
//!
//! SQS cannot peek. Listing receives every message of the DLQ (holding each invisible for the
//! DLQ's own visibility timeout while the listing runs, so none is seen twice), then makes them
//! all visible again at once. Nothing is deleted or moved, and bodies are never read out; the
//! one trace a listing leaves is that every listed message's ApproximateReceiveCount in the DLQ
//! goes up by one, which matters only if the DLQ itself had a redrive policy (it should not).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use sqlx::PgPool;
use time::OffsetDateTime;

use crate::sqs::{MoveTask, Queue};

/// One message in the dead-letter queue.
#[derive(Debug, Clone, Serialize)]
pub struct Listed {
    pub message_id: String,
    /// When the producer sent it (SQS SentTimestamp).
    #[serde(with = "time::serde::rfc3339::option")]
    pub sent_at: Option<OffsetDateTime>,
    /// SQS ApproximateReceiveCount, this listing's receive included.
    pub receive_count: Option<i32>,
    /// Why PostgreSQL refused it, when loader recorded that (the latest refusal).
    pub refusal: Option<Refusal>,
}

/// A refusal as `loader.refusals` holds it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Refusal {
    pub sqlstate: String,
    pub constraint_name: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub refused_at: OffsetDateTime,
    pub ingest_run_id: i64,
    /// How many times it was refused in all.
    pub times: i64,
}

/// The dead-letter queue of `queue`: `name` when given, else the one its redrive policy names.
pub async fn resolve(queue: &Queue, name: Option<&str>) -> Result<Queue> {
    match name {
        Some(name) => Queue::open(queue.client().clone(), name).await,
        None => queue.dead_letter_queue().await?.with_context(|| {
            format!(
                "'{}' has no redrive policy naming a dead-letter queue (or pass --dlq)",
                queue.name()
            )
        }),
    }
}

/// Every message in `dlq`, by message id, with the recorded reason for each (see the module
/// comment for what listing does to the messages).
pub async fn list(dlq: &Queue, pool: &PgPool) -> Result<Vec<Listed>> {
    let mut seen = HashSet::new();
    let mut listed = Vec::new();
    let mut receipts = Vec::new();
    let received = loop {
        let batch = match dlq.receive(1).await {
            Ok(batch) => batch,
            Err(e) => break Err(e),
        };
        let mut new = 0;
        for m in batch {
            receipts.push(m.receipt_handle);
            if seen.insert(m.message_id.clone()) {
                new += 1;
                listed.push(Listed {
                    message_id: m.message_id,
                    sent_at: m.sent_at,
                    receive_count: m.receive_count,
                    refusal: None,
                });
            }
        }
        // Empty, or only messages already listed (a visibility timeout shorter than the
        // listing): everything has been seen.
        if new == 0 {
            break Ok(());
        }
    };
    // Visible again at once, whatever happened above.
    let released = dlq.extend_visibility(&receipts, Duration::ZERO, 8).await;
    received?;
    released.context("making the listed messages visible again")?;

    let ids: Vec<&str> = listed.iter().map(|l| l.message_id.as_str()).collect();
    let refusals = crate::db::transaction(pool, async |tx| {
        sqlx::query_as::<_, (String, String, Option<String>, OffsetDateTime, i64, i64)>(
            "select distinct on (message_id) message_id, sqlstate, constraint_name, refused_at,
                ingest_run_id, count(*) over (partition by message_id)
           from loader.refusals where message_id = any($1)
          order by message_id, refused_at desc, id desc",
        )
        .bind(&ids)
        .persistent(false)
        .fetch_all(tx)
        .await
    })
    .await;
    let mut refusals: HashMap<String, Refusal> =
        crate::db::explained(refusals, "reading loader.refusals", "the owner role")?
            .into_iter()
            .map(|(id, sqlstate, constraint_name, refused_at, ingest_run_id, times)| {
                (id, Refusal { sqlstate, constraint_name, refused_at, ingest_run_id, times })
            })
            .collect();
    for l in &mut listed {
        l.refusal = refusals.remove(&l.message_id);
    }
    listed.sort_by(|a, b| a.sent_at.cmp(&b.sent_at).then_with(|| a.message_id.cmp(&b.message_id)));
    Ok(listed)
}

/// Moves every message of `dlq` back to `queue` with SQS's own message move task
/// (StartMessageMoveTask): SQS moves them, none is lost or doubled by loader. With `wait`, polls
/// the task every `poll` until it ends, calling `progress` with the task on each poll, and
/// fails unless it COMPLETED.
pub async fn redrive(
    queue: &Queue,
    dlq: &Queue,
    wait: bool,
    poll: Duration,
    mut progress: impl FnMut(&MoveTask),
) -> Result<MoveTask> {
    let source = dlq.arn().await?;
    dlq.start_move(&source, &queue.arn().await?).await?;
    loop {
        let task =
            dlq.latest_move(&source).await?.context("the move task started but is not listed")?;
        progress(&task);
        match task.status.as_str() {
            "RUNNING" | "CANCELLING" if wait => tokio::time::sleep(poll).await,
            "COMPLETED" => return Ok(task),
            "FAILED" | "CANCELLED" => bail!(
                "moving '{}' back to '{}' {}: {}",
                dlq.name(),
                queue.name(),
                task.status.to_lowercase(),
                task.failure.as_deref().unwrap_or("no reason given")
            ),
            _ => return Ok(task),
        }
    }
}
