//! Raw messages into `loader.raw_logins`: one statement (one transaction, one round trip) per
//! batch, idempotent on `message_id`, through the ingest role's only write path: the
//! security-definer functions of `sql/15_staging.sql`, for an [`IngestRun`] registered first.
//! The run and its counters are [`run`]; batching and the JSON check are here.
//!
//! Nothing a producer can send fails a batch: a body that is not JSON that `jsonb` can store
//! (invalid JSON, `\u0000` escapes, lone surrogates) is kept as a JSON string holding the exact
//! raw text, with `body_is_json = false`; what the JSON check here misses, `loader.stage` catches
//! itself. A message whose row PostgreSQL still refuses (a constraint, a trigger) is recorded in
//! `loader.refusals` by `loader.stage` and left on the queue, so SQS moves it to the DLQ.

use std::collections::HashSet;

use anyhow::{Context, Result};
use serde_json::Value;
use sqlx::{Acquire, PgConnection};
use time::OffsetDateTime;

mod run;

pub use run::{IngestRun, latest_runs};

/// What staging needs to know about one message.
#[derive(Debug, Clone)]
pub struct RawMessage {
    pub message_id: String,
    pub body: String,
    pub sent_at: Option<OffsetDateTime>,
    pub receive_count: Option<i32>,
}

/// Counts for one staged batch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StageOutcome {
    /// Messages handed in (including copies of one MessageId).
    pub received: u64,
    /// Rows newly inserted.
    pub staged: u64,
    /// Messages whose MessageId was already staged, or repeated within the batch.
    pub duplicates: u64,
}

impl std::ops::AddAssign for StageOutcome {
    fn add_assign(&mut self, o: Self) {
        self.received += o.received;
        self.staged += o.staged;
        self.duplicates += o.duplicates;
    }
}

/// What [`stage`] did with one batch.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Staged {
    pub outcome: StageOutcome,
    /// MessageIds PostgreSQL refused (recorded in `loader.refusals`): not staged, and not to be
    /// deleted, so SQS redelivers them and, past the redrive policy's maxReceiveCount, moves
    /// them to the DLQ. Every copy of such an id is refused.
    pub refused: HashSet<String>,
}

/// Stages a batch with one call of `loader.stage`, which also adds its counts to the run's row,
/// so the counters commit exactly when the rows do. The rows get the run's queue.
///
/// When PostgreSQL refuses some rows, `loader.stage` stages the others one by one and records
/// the refused ones; when it refuses every one of several messages and some are on their first
/// delivery (a broken trigger, not poison messages), the call fails and records nothing.
pub async fn stage(
    conn: &mut PgConnection,
    run: &IngestRun,
    messages: &[RawMessage],
) -> Result<Staged> {
    let batch = Batch::new(messages);
    // In a transaction of its own, like every statement behind a pooler (crate::db::options).
    let mut tx = Acquire::begin(conn).await.context("staging batch")?;
    let (staged, refused): (i64, Vec<String>) = sqlx::query_as(
        "select staged, refused_ids from loader.stage($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(run.id)
    .bind(&run.token)
    .bind(&batch.ids)
    .bind(&batch.bodies)
    .bind(&batch.is_json)
    .bind(&batch.sent_at)
    .bind(&batch.receive_count)
    .bind(&batch.copies)
    .persistent(false)
    .fetch_one(&mut *tx)
    .await
    .context("staging batch")?;
    tx.commit().await.context("committing the staged batch")?;
    let refused: HashSet<String> = refused.into_iter().collect();
    for message_id in &refused {
        tracing::warn!(%message_id, "message refused by PostgreSQL (loader.refusals says why); left on the queue");
    }
    let refused_copies = messages.iter().filter(|m| refused.contains(&m.message_id)).count();
    let received = (messages.len() - refused_copies) as u64;
    let staged = staged as u64;
    Ok(Staged {
        outcome: StageOutcome { received, staged, duplicates: received - staged },
        refused,
    })
}

/// `messages` cut into runs whose bodies add up to at most `max_bytes` (a larger message goes
/// alone), in order: one staging statement each, so a batch of large messages is never one
/// statement of their sum.
pub fn by_bytes(messages: &[RawMessage], max_bytes: usize) -> Vec<&[RawMessage]> {
    let mut chunks = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, m) in messages.iter().enumerate() {
        if i > start && bytes + m.body.len() > max_bytes {
            chunks.push(&messages[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += m.body.len();
    }
    if start < messages.len() {
        chunks.push(&messages[start..]);
    }
    chunks
}

/// Column arrays for `loader.stage`, one entry per distinct MessageId; ids and bodies borrowed
/// (a flush of large messages is not copied before it is encoded).
struct Batch<'a> {
    ids: Vec<&'a str>,
    bodies: Vec<&'a str>,
    is_json: Vec<bool>,
    sent_at: Vec<Option<OffsetDateTime>>,
    receive_count: Vec<Option<i32>>,
    /// How many copies of each id the batch holds (a redelivery inside one flush).
    copies: Vec<i32>,
}

impl<'a> Batch<'a> {
    fn new(messages: &'a [RawMessage]) -> Self {
        // Postgres cannot insert one key twice in a statement; the first copy wins.
        let mut index = std::collections::HashMap::with_capacity(messages.len());
        let mut distinct: Vec<&RawMessage> = Vec::with_capacity(messages.len());
        let mut copies: Vec<i32> = Vec::with_capacity(messages.len());
        for m in messages {
            match index.get(m.message_id.as_str()) {
                Some(&i) => copies[i] += 1,
                None => {
                    index.insert(m.message_id.as_str(), distinct.len());
                    distinct.push(m);
                    copies.push(1);
                }
            }
        }
        Self {
            ids: distinct.iter().map(|m| m.message_id.as_str()).collect(),
            bodies: distinct.iter().map(|m| m.body.as_str()).collect(),
            is_json: distinct.iter().map(|m| is_storable_json(&m.body)).collect(),
            sent_at: distinct.iter().map(|m| m.sent_at).collect(),
            receive_count: distinct.iter().map(|m| m.receive_count).collect(),
            copies,
        }
    }
}

/// True when `jsonb` can store the body as JSON: it parses, and no string or key holds U+0000
/// (which `jsonb` refuses). serde_json already refuses lone surrogate escapes.
pub fn is_storable_json(body: &str) -> bool {
    fn has_nul(v: &Value) -> bool {
        match v {
            Value::String(s) => s.contains('\0'),
            Value::Array(a) => a.iter().any(has_nul),
            Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
            _ => false,
        }
    }
    serde_json::from_str::<Value>(body).is_ok_and(|v| !has_nul(&v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storable_json_is_recognised() {
        assert!(is_storable_json(r#"{"user_id": "u1", "ip": "10.0.0.1"}"#));
        assert!(is_storable_json("null"));
        assert!(is_storable_json("[1, 2]"));
        assert!(is_storable_json(r#""\ud83d\ude00""#), "a surrogate pair is fine");
    }

    #[test]
    fn bodies_jsonb_refuses_are_not_json() {
        assert!(!is_storable_json("not json"));
        assert!(!is_storable_json(r#"{"a": "x\u0000y"}"#));
        assert!(!is_storable_json(r#"{"a\u0000": 1}"#));
        assert!(!is_storable_json(r#"{"a": "\ud800"}"#), "lone surrogate");
        assert!(!is_storable_json(""));
    }

    #[test]
    fn a_batch_keeps_the_first_copy_of_each_message_id() {
        let m = |id: &str, body: &str| RawMessage {
            message_id: id.into(),
            body: body.into(),
            sent_at: None,
            receive_count: None,
        };
        let messages = [m("a", "1"), m("b", "x"), m("a", "2")];
        let b = Batch::new(&messages);
        assert_eq!(b.ids, ["a", "b"]);
        assert_eq!(b.bodies, ["1", "x"]);
        assert_eq!(b.is_json, [true, false]);
        assert_eq!(b.copies, [2, 1]);
    }

    #[test]
    fn large_batches_are_staged_in_statements_of_a_bounded_size() {
        let m = |bytes: usize| RawMessage {
            message_id: bytes.to_string(),
            body: "x".repeat(bytes),
            sent_at: None,
            receive_count: None,
        };
        let messages = [m(400), m(400), m(400), m(1000), m(10)];
        let sizes: Vec<usize> = by_bytes(&messages, 900).iter().map(|c| c.len()).collect();
        assert_eq!(sizes, [2, 1, 1, 1], "800, 400, 1000 alone, 10");
        assert!(by_bytes(&[], 900).is_empty());
    }
}
