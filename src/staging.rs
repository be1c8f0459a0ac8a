//! Raw messages into `loader.raw_logins`: one statement (one transaction, one round trip) per
//! batch, idempotent on `message_id`, through the ingest role's only write path: the
//! security-definer functions of `sql/15_staging.sql`, for a [`Run`] registered first.
//!
//! Nothing a producer can send fails a batch: a body that is not JSON that `jsonb` can store
//! (invalid JSON, `\u0000` escapes, lone surrogates) is kept as a JSON string holding the exact
//! raw text, with `body_is_json = false`.

use std::collections::HashSet;

use anyhow::{Context, Result};
use serde_json::Value;
use sqlx::PgConnection;
use time::OffsetDateTime;

use crate::retry::sqlstate;

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

/// An ingest run registered in `loader.ingest_runs`: what every staging call names. The token
/// (random, from the database) binds the run to the process that registered it: no other
/// session can stage into it or change its counters. Never logged.
#[derive(Clone)]
pub struct Run {
    pub id: i64,
    token: String,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run").field("id", &self.id).finish_non_exhaustive()
    }
}

impl Run {
    /// Registers a new open run for `queue` (`mode`: drain, follow or lambda).
    pub async fn register(db: impl sqlx::PgExecutor<'_>, queue: &str, mode: &str) -> Result<Self> {
        let (id, token): (i64, String) =
            sqlx::query_as("select run_id, run_token from loader.register_run($1, $2, $3)")
                .bind(queue)
                .bind(mode)
                .bind(env!("CARGO_PKG_VERSION"))
                .fetch_one(db)
                .await
                .context("registering the ingest run (has `loader migrate` run?)")?;
        Ok(Self { id, token })
    }

    /// Adds a flush's deletes and delete failures to the run's counters.
    pub async fn record_deletes(
        &self,
        db: impl sqlx::PgExecutor<'_>,
        deleted: u64,
        failures: u64,
    ) -> Result<()> {
        sqlx::query("select loader.record_deletes($1, $2, $3, $4)")
            .bind(self.id)
            .bind(&self.token)
            .bind(deleted as i64)
            .bind(failures as i64)
            .execute(db)
            .await
            .context("recording deletes")?;
        Ok(())
    }

    /// Records messages PostgreSQL refused to stage in the ledger (`loader.refusals`) and the
    /// run's counters.
    async fn record_refusals(
        &self,
        db: impl sqlx::PgExecutor<'_>,
        refusals: &[Refusal],
    ) -> Result<()> {
        sqlx::query("select loader.record_refusals($1, $2, $3, $4, $5)")
            .bind(self.id)
            .bind(&self.token)
            .bind(refusals.iter().map(|r| r.message_id.as_str()).collect::<Vec<_>>())
            .bind(refusals.iter().map(|r| r.sqlstate.as_str()).collect::<Vec<_>>())
            .bind(refusals.iter().map(|r| r.constraint.as_deref()).collect::<Vec<_>>())
            .execute(db)
            .await
            .context("recording refused messages")?;
        Ok(())
    }

    /// Marks the run finished.
    pub async fn finish(&self, db: impl sqlx::PgExecutor<'_>) -> Result<()> {
        sqlx::query("select loader.finish_run($1, $2)")
            .bind(self.id)
            .bind(&self.token)
            .execute(db)
            .await
            .context("closing the ingest run")?;
        Ok(())
    }
}

/// Stages a batch in one statement (`loader.stage`) that also adds its counts to the run's
/// row, so the counters commit exactly when the rows do. The rows get the run's queue.
pub async fn stage(
    conn: &mut PgConnection,
    run: &Run,
    messages: &[RawMessage],
) -> Result<StageOutcome> {
    let mut batch = Batch::new(messages);
    let received = messages.len() as u64;
    let staged = match insert(conn, run, received, &batch).await {
        Ok(n) => n,
        // A data exception means Postgres refused a body the JSON check accepted (say a number
        // beyond numeric's range). Ask Postgres about each body, then stage again.
        Err(e) if is_data_exception(&e) => {
            batch.recheck_with_postgres(conn).await?;
            insert(conn, run, received, &batch).await.context("staging batch")?
        }
        Err(e) => return Err(e).context("staging batch"),
    };
    Ok(StageOutcome { received, staged, duplicates: received - staged })
}

/// Column arrays for the UNNEST insert, one entry per distinct MessageId.
struct Batch {
    ids: Vec<String>,
    bodies: Vec<String>,
    is_json: Vec<bool>,
    sent_at: Vec<Option<OffsetDateTime>>,
    receive_count: Vec<Option<i32>>,
}

impl Batch {
    fn new(messages: &[RawMessage]) -> Self {
        // Postgres cannot insert one key twice in a statement; the first copy wins.
        let mut seen = HashSet::with_capacity(messages.len());
        let distinct: Vec<&RawMessage> =
            messages.iter().filter(|m| seen.insert(m.message_id.as_str())).collect();
        Self {
            ids: distinct.iter().map(|m| m.message_id.clone()).collect(),
            bodies: distinct.iter().map(|m| m.body.clone()).collect(),
            is_json: distinct.iter().map(|m| is_storable_json(&m.body)).collect(),
            sent_at: distinct.iter().map(|m| m.sent_at).collect(),
            receive_count: distinct.iter().map(|m| m.receive_count).collect(),
        }
    }

    async fn recheck_with_postgres(&mut self, conn: &mut PgConnection) -> Result<()> {
        for (body, is_json) in self.bodies.iter().zip(self.is_json.iter_mut()) {
            if *is_json {
                *is_json = sqlx::query("select $1::text::jsonb")
                    .bind(body)
                    .execute(&mut *conn)
                    .await
                    .is_ok();
            }
        }
        Ok(())
    }
}

async fn insert(
    conn: &mut PgConnection,
    run: &Run,
    received: u64,
    b: &Batch,
) -> Result<u64, sqlx::Error> {
    let staged: i64 = sqlx::query_scalar("select loader.stage($1, $2, $3, $4, $5, $6, $7, $8)")
        .bind(run.id)
        .bind(&run.token)
        .bind(&b.ids)
        .bind(&b.bodies)
        .bind(&b.is_json)
        .bind(&b.sent_at)
        .bind(&b.receive_count)
        .bind(received as i64)
        .fetch_one(conn)
        .await?;
    Ok(staged as u64)
}

/// A message PostgreSQL refused to stage, and why, without values: the SQLSTATE and the
/// constraint (or table) the error named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub message_id: String,
    pub sqlstate: String,
    pub constraint: Option<String>,
}

impl Refusal {
    fn new(message_id: &str, e: &anyhow::Error) -> Self {
        let db = database_error(e);
        Self {
            message_id: message_id.to_owned(),
            sqlstate: db.and_then(|d| d.code()).map_or_else(|| "?".to_owned(), |c| c.into_owned()),
            constraint: db.and_then(|d| d.constraint().or(d.table())).map(str::to_owned),
        }
    }
}

/// Stages `messages` like [`stage`]. If the database refuses the statement because of its
/// rows (`refuses_rows`), stages them one at a time and returns the ids of those it still
/// refuses (one per copy), so the caller can leave just those on the queue. They are not staged;
/// each is recorded in `loader.refusals` (id, SQLSTATE, constraint) and counted in
/// `loader.ingest_runs.refused`, apart from `received`.
///
/// When it refuses every one of several messages and some are on their first delivery, the
/// fault is not in the messages (a broken trigger, a rule that fits nothing): that is returned
/// as the batch's error instead, and nothing is recorded. Several redelivered messages all
/// refused are recorded: poison messages come back together once the rest has been staged.
pub async fn stage_isolating(
    conn: &mut PgConnection,
    run: &Run,
    messages: &[RawMessage],
) -> Result<(StageOutcome, Vec<String>)> {
    let batch_error = match stage(conn, run, messages).await {
        Ok(outcome) => return Ok((outcome, Vec::new())),
        Err(e) if !refuses_rows(&e) => return Err(e),
        Err(e) => e,
    };
    tracing::warn!(
        reason = refusal(&batch_error),
        records = messages.len(),
        "batch refused; staging its records one at a time"
    );
    let mut total = StageOutcome::default();
    let mut refused = Vec::new();
    for message in messages {
        match stage(conn, run, std::slice::from_ref(message)).await {
            Ok(outcome) => total += outcome,
            Err(e) if !refuses_rows(&e) => return Err(e),
            Err(e) => {
                tracing::warn!(message_id = %message.message_id, reason = refusal(&e), "message refused; left on the queue");
                refused.push(Refusal::new(&message.message_id, &e));
            }
        }
    }
    // Every one of several refused, some of them on their first delivery: a systematic fault.
    // Redelivered messages refused together are the usual poison messages on their way to
    // the DLQ (the first delivery let the others through), so those are recorded instead.
    let fresh = messages.iter().any(|m| m.receive_count.is_none_or(|n| n <= 1));
    if messages.len() > 1 && refused.len() == messages.len() && fresh {
        return Err(batch_error.context("PostgreSQL refuses every message, one by one too"));
    }
    if !refused.is_empty() {
        run.record_refusals(&mut *conn, &refused).await?;
    }
    Ok((total, refused.into_iter().map(|r| r.message_id).collect()))
}

/// True when Postgres refused the rows themselves: a data exception (class 22), an integrity
/// constraint (class 23) or an error raised by a trigger (P0001). Anything else (an outage, a
/// missing table, a permission) would refuse every record alike, so it fails the invocation.
fn refuses_rows(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<sqlx::Error>()?.as_database_error()?.code())
        .any(|code| code.starts_with("22") || code.starts_with("23") || code == "P0001")
}

/// Why Postgres refused a statement, without the values (a constraint's DETAIL line can quote
/// the row, and so personal data): the SQLSTATE and the constraint or table it names.
fn refusal(e: &anyhow::Error) -> String {
    match database_error(e) {
        Some(db) => format!(
            "SQLSTATE {} on {}",
            db.code().as_deref().unwrap_or("?"),
            db.constraint().or(db.table()).unwrap_or("the statement")
        ),
        None => format!("{e:#}"),
    }
}

/// The first error PostgreSQL itself sent in `e`'s chain, if any.
fn database_error(e: &anyhow::Error) -> Option<&dyn sqlx::error::DatabaseError> {
    e.chain().find_map(|c| c.downcast_ref::<sqlx::Error>()?.as_database_error())
}

/// SQLSTATE class 22: Postgres refused a value (here: a body the `jsonb` cast could not take).
fn is_data_exception(e: &sqlx::Error) -> bool {
    sqlstate(e).is_some_and(|c| c.starts_with("22"))
}

/// SQS's SentTimestamp (milliseconds since the epoch, as text) as a time; None when malformed.
pub fn parse_epoch_millis(v: &str) -> Option<OffsetDateTime> {
    let millis: i128 = v.parse().ok()?;
    OffsetDateTime::from_unix_timestamp_nanos(millis * 1_000_000).ok()
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
        let b = Batch::new(&[m("a", "1"), m("b", "x"), m("a", "2")]);
        assert_eq!(b.ids, ["a", "b"]);
        assert_eq!(b.bodies, ["1", "x"]);
        assert_eq!(b.is_json, [true, false]);
    }

    #[test]
    fn sent_timestamp_is_epoch_milliseconds() {
        let t = parse_epoch_millis("1700000000123").unwrap();
        assert_eq!(t.unix_timestamp(), 1_700_000_000);
        assert_eq!(t.millisecond(), 123);
        assert!(parse_epoch_millis("yesterday").is_none());
    }
}
