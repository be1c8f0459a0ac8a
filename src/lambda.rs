//! The AWS Lambda form of ingest (cargo feature `lambda`, binary `loader-lambda`).
//!
//! SQS invokes the function with a batch of records. They are staged with the same code as
//! `loader ingest` ([`staging::stage`]: one statement, idempotent on `message_id`), and the
//! function answers with the records it could not stage, so that SQS redelivers only those
//! (`ReportBatchItemFailures`). The event source mapping deletes the others; the function never
//! calls SQS itself.
//!
//! - Records the database refuses because of their rows (a constraint, an error raised by a
//!   trigger) are staged apart by `loader.stage`, recorded in `loader.refusals`, and reported
//!   (as in `loader ingest`). Any other error (an outage, a missing schema, a permission, or
//!   every record refused) fails the invocation: every record returns to the queue, and
//!   reaches the DLQ after `maxReceiveCount` tries.
//! - Each execution environment registers one `loader.ingest_runs` row per queue (mode
//!   `lambda`) the first time it stages, and adds to its counters from then on. Such a run never
//!   finishes (Lambda freezes and retires environments without notice), and its `deleted`
//!   counter stays 0 because the event source mapping deletes.
//! - Any other event runs the incremental transform when it is an EventBridge schedule
//!   (`"source": "aws.events"`) or `{"action": "transform"}` (a manual invoke). Anything else is
//!   an error, rather than a guess.

use std::collections::{HashMap, HashSet};

use anyhow::{Context, Result};
use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent, SqsMessage};
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool};
use tokio::sync::Mutex;

use crate::config::DatabaseUrl;
use crate::counts::TransformReport;
use crate::db;
use crate::sqs::is_fifo_name;
use crate::sqs::{self, SystemAttributes};
use crate::staging::{self, RawMessage, StageOutcome};
use crate::transform;

/// Connections per execution environment: it handles one invocation at a time, which stages on
/// one connection and then (optionally) transforms.
pub const POOL_SIZE: u32 = 2;

/// The transform an invocation runs: one session (each execution environment has a pool of
/// two; Lambda's concurrency is the parallelism), committed batches as `loader transform`.
const TRANSFORM: transform::Plan =
    transform::Plan { batch_size: transform::DEFAULT_BATCH, workers: 1 };

/// An event the handler does not take (its [`Handler::error_type`] is `Loader.BadEvent`).
#[derive(Debug, thiserror::Error)]
#[error("an event the handler does not take")]
pub struct BadEvent;

/// What one execution environment keeps between invocations.
pub struct Handler {
    pool: PgPool,
    transform_after_stage: bool,
    /// The `loader.ingest_runs` row of each queue this environment has staged from.
    runs: Mutex<HashMap<String, staging::IngestRun>>,
}

impl Handler {
    pub fn new(pool: PgPool, transform_after_stage: bool) -> Self {
        Self { pool, transform_after_stage, runs: Mutex::new(HashMap::new()) }
    }

    /// From the environment: `DATABASE_URL` (required) and `LOADER_TRANSFORM_AFTER_STAGE`
    /// (`true` to transform after each staged batch; default `false`). The pool connects on
    /// first use, so a database outage at cold start fails invocations, not the environment.
    pub fn from_env() -> Result<Self> {
        let url = std::env::var("DATABASE_URL")
            .ok()
            .filter(|u| !u.trim().is_empty())
            .context("DATABASE_URL is not set")?;
        let transform_after_stage = match std::env::var("LOADER_TRANSFORM_AFTER_STAGE") {
            Err(_) => false,
            Ok(v) => parse_bool(&v).with_context(|| {
                format!("LOADER_TRANSFORM_AFTER_STAGE must be true or false, not {v:?}")
            })?,
        };
        let pool = db::pool(&DatabaseUrl::from(url), POOL_SIZE)?;
        Ok(Self::new(pool, transform_after_stage))
    }

    /// The `errorType` an invocation that failed with `e` reports, stable and documented
    /// (docs/deploying.md): `Loader.BadEvent` (an event the handler does not take),
    /// `Loader.Unavailable` (PostgreSQL unreachable or shutting down: the records come back
    /// after the visibility timeout), `Loader.Permission` (the login lacks a role),
    /// `Loader.NotMigrated`, else `Loader.Error`.
    pub fn error_type(e: &anyhow::Error) -> &'static str {
        use crate::db::Cause;
        if e.chain().any(|c| c.is::<BadEvent>()) {
            return "Loader.BadEvent";
        }
        if crate::retry::is_transient(e) {
            return "Loader.Unavailable";
        }
        match Cause::in_chain(e) {
            Some(Cause::Permission) => "Loader.Permission",
            Some(Cause::NotMigrated) => "Loader.NotMigrated",
            _ => "Loader.Error",
        }
    }

    /// One invocation: an SQS event is staged, a schedule runs the transform.
    pub async fn handle(&self, event: Value) -> Result<Value> {
        if event.get("Records").is_some() {
            let event: SqsEvent = serde_json::from_value(event).map_err(|e| {
                anyhow::Error::new(BadEvent).context(format!("not an SQS event: {e}"))
            })?;
            return Ok(serde_json::to_value(self.stage_event(event).await?)?);
        }
        let scheduled = event.get("source").and_then(Value::as_str) == Some("aws.events");
        let asked = event.get("action").and_then(Value::as_str) == Some("transform");
        if scheduled || asked {
            let report = self.transform().await?;
            return Ok(json!({
                "loaded": report.loaded, "rejected": report.rejected, "pending": report.pending,
            }));
        }
        Err(anyhow::Error::new(BadEvent).context(
            "unrecognised event: expected an SQS event, a schedule or {\"action\": \"transform\"}",
        ))
    }

    /// Stages the records of an SQS event; the response lists the records that failed.
    pub async fn stage_event(&self, event: SqsEvent) -> Result<SqsBatchResponse> {
        // Per queue, in the event's order, with each record's message group (FIFO queues).
        let mut by_queue: HashMap<String, (Vec<RawMessage>, Vec<Option<String>>)> = HashMap::new();
        for record in event.records {
            let queue = queue_name(&record);
            let group = record.attributes.get("MessageGroupId").cloned();
            let (messages, groups) = by_queue.entry(queue).or_default();
            messages.push(raw_message(record)?);
            groups.push(group);
        }
        let mut conn = self.pool.acquire().await.context("connecting to PostgreSQL")?;
        let mut failed = Vec::new();
        let mut totals = StageOutcome::default();
        for (queue, (messages, groups)) in &by_queue {
            let run = self.ingest_run(&mut conn, queue).await?;
            // Statements of a bounded size: up to 10,000 records of up to 1 MiB can come in
            // one event (a batching window), and one statement of their sum would be encoded
            // in memory whole.
            let mut refused = HashSet::new();
            for chunk in staging::by_bytes(messages, STATEMENT_BYTES) {
                let staged = staging::stage(&mut conn, &run, chunk).await?;
                totals += staged.outcome;
                refused.extend(staged.refused);
            }
            failed.extend(failed_records(messages, groups, &refused, is_fifo_name(queue)));
        }
        drop(conn);
        tracing::info!(
            received = totals.received,
            staged = totals.staged,
            duplicates = totals.duplicates,
            failed = failed.len(),
            "event staged"
        );
        if self.transform_after_stage && totals.staged > 0 {
            // The records are staged whatever happens here; the schedule retries the transform.
            if let Err(e) = self.transform().await {
                tracing::warn!(
                    error = crate::display::error_line(&e),
                    "transform after staging failed"
                );
            }
        }
        let mut response = SqsBatchResponse::default();
        for message_id in failed {
            let mut failure = BatchItemFailure::default();
            failure.item_identifier = message_id;
            response.batch_item_failures.push(failure);
        }
        Ok(response)
    }

    /// Runs the incremental transform over everything staged and pending.
    pub async fn transform(&self) -> Result<TransformReport> {
        let report = transform::transform(&self.pool, TRANSFORM).await?;
        tracing::info!(%report, "transform");
        Ok(report)
    }

    async fn ingest_run(&self, conn: &mut PgConnection, queue: &str) -> Result<staging::IngestRun> {
        let mut runs = self.runs.lock().await;
        if let Some(run) = runs.get(queue) {
            return Ok(run.clone());
        }
        let run = staging::IngestRun::register(&mut *conn, queue, "lambda").await?;
        tracing::info!(run_id = run.id, queue, "run started");
        runs.insert(queue.to_owned(), run.clone());
        Ok(run)
    }
}

/// The most body bytes one staging statement of the handler carries: `loader ingest`'s flush
/// size with the default memory budget.
const STATEMENT_BYTES: usize = crate::ingest::DEFAULT_MEMORY_BUDGET / 8;

/// The records to report as failed, in the event's order: those PostgreSQL refused and, from a
/// FIFO queue, every record of a message group after its first refused one, staged or not: SQS
/// requires it of a FIFO partial batch response, so that a group's messages are redelivered in
/// order (what AWS Powertools' `SqsFifoPartialProcessor` does with `skip_group_on_error`). The
/// later ones already staged come back as duplicates, which staging counts and skips.
fn failed_records(
    messages: &[RawMessage],
    groups: &[Option<String>],
    refused: &HashSet<String>,
    fifo: bool,
) -> Vec<String> {
    let mut failed_groups = HashSet::new();
    let mut failed = Vec::new();
    for (m, group) in messages.iter().zip(groups) {
        let after_failure = fifo && group.as_ref().is_some_and(|g| failed_groups.contains(g));
        if refused.contains(&m.message_id) || after_failure {
            failed.push(m.message_id.clone());
            if let (true, Some(g)) = (fifo, group) {
                failed_groups.insert(g.clone());
            }
        }
    }
    failed
}

/// A record as staging wants it: id, body, SentTimestamp and ApproximateReceiveCount.
fn raw_message(record: SqsMessage) -> Result<RawMessage> {
    let message_id = record.message_id.context("an SQS record without messageId")?;
    let system = SystemAttributes::parse(|name| record.attributes.get(name).map(String::as_str));
    Ok(RawMessage {
        sent_at: system.sent_at,
        receive_count: system.receive_count,
        body: record.body.unwrap_or_default(),
        message_id,
    })
}

/// The queue's name, the last part of the record's `eventSourceARN`.
fn queue_name(record: &SqsMessage) -> String {
    record.event_source_arn.as_deref().and_then(sqs::name_from_arn).unwrap_or("unknown").to_owned()
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Some(true),
        "false" | "0" | "no" | "" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(json: Value) -> SqsMessage {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_record_carries_its_id_timestamp_and_receive_count() {
        let m = raw_message(record(json!({
            "messageId": "m-1",
            "body": "{\"user_id\": \"u\"}",
            "attributes": {"SentTimestamp": "1583020799000", "ApproximateReceiveCount": "3"},
            "eventSourceARN": "arn:aws:sqs:eu-west-1:123456789012:login-queue",
        })))
        .unwrap();
        assert_eq!(m.message_id, "m-1");
        assert_eq!(m.receive_count, Some(3));
        assert_eq!(m.sent_at.unwrap().unix_timestamp(), 1_583_020_799);
        assert_eq!(m.body, "{\"user_id\": \"u\"}");
    }

    #[test]
    fn a_record_without_id_is_an_error() {
        assert!(raw_message(record(json!({"body": "x"}))).is_err());
    }

    #[test]
    fn the_queue_is_named_by_the_event_source_arn() {
        let with = record(json!({"eventSourceARN": "arn:aws:sqs:us-east-1:000000000000:q-1"}));
        assert_eq!(queue_name(&with), "q-1");
        assert_eq!(queue_name(&record(json!({}))), "unknown");
    }

    #[test]
    fn after_a_refused_fifo_record_every_later_record_of_its_group_fails_too() {
        let m = |id: &str| RawMessage {
            message_id: id.into(),
            body: String::new(),
            sent_at: None,
            receive_count: None,
        };
        let messages = [m("a1"), m("b1"), m("a2"), m("c1"), m("b2"), m("a3")];
        let groups: Vec<Option<String>> =
            ["a", "b", "a", "c", "b", "a"].iter().map(|g| Some((*g).to_owned())).collect();
        let refused = HashSet::from(["a2".to_owned(), "c1".to_owned()]);
        assert_eq!(failed_records(&messages, &groups, &refused, true), ["a2", "c1", "a3"]);
        assert_eq!(failed_records(&messages, &groups, &refused, false), ["a2", "c1"]);
    }

    #[test]
    fn transform_after_stage_accepts_only_booleans() {
        assert_eq!(parse_bool("TRUE"), Some(true));
        assert_eq!(parse_bool("0"), Some(false));
        assert_eq!(parse_bool("maybe"), None);
    }
}
