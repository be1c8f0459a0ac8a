//! What the work reports: ingest totals and transform reports, with how they print and sum.
//! A leaf: the work modules fill them in, and `metrics`, `pipeline` and the binaries read them.

use std::fmt;
use std::ops::AddAssign;

use serde::Serialize;
use time::OffsetDateTime;

/// Counters for one flush, and summed over a run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// Messages received from the queue, every copy counted, refused ones included
    /// (= staged + duplicates + refused): the `loader_messages_received_total` metric. The
    /// summary line's "received", like `loader.ingest_runs.received`, `loader status` and
    /// `loader reconcile`, is [`Totals::received`]: refused messages are counted apart.
    pub from_queue: u64,
    pub staged: u64,
    pub duplicates: u64,
    pub deleted: u64,
    pub delete_failures: u64,
    /// Messages PostgreSQL refused (a constraint or trigger): not staged, not deleted, so SQS
    /// redelivers them and its redrive policy eventually moves them to the DLQ.
    pub refused: u64,
}

impl AddAssign for Totals {
    fn add_assign(&mut self, o: Self) {
        self.from_queue += o.from_queue;
        self.staged += o.staged;
        self.duplicates += o.duplicates;
        self.deleted += o.deleted;
        self.delete_failures += o.delete_failures;
        self.refused += o.refused;
    }
}

impl Totals {
    /// What reached staging: staged + duplicates. What every report of loader calls received.
    pub fn received(&self) -> u64 {
        self.staged + self.duplicates
    }
}

impl fmt::Display for Totals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "received {}, staged {} new, {} duplicates, deleted {} ({} delete failures)",
            self.received(),
            self.staged,
            self.duplicates,
            self.deleted,
            self.delete_failures
        )?;
        if self.refused > 0 {
            write!(f, "; {} refused by PostgreSQL, left on the queue", self.refused)?;
        }
        Ok(())
    }
}

/// What a transform call reports: the SQL function's own row.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct TransformReport {
    pub loaded: i64,
    pub rejected: i64,
    /// Rows still waiting, as of the end of the call (not summed: the latest wins).
    pub pending: i64,
}

impl AddAssign for TransformReport {
    fn add_assign(&mut self, o: Self) {
        self.loaded += o.loaded;
        self.rejected += o.rejected;
        self.pending = o.pending;
    }
}

impl fmt::Display for TransformReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "loaded {}, rejected {}, pending {}", self.loaded, self.rejected, self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_line_names_every_counter() {
        let t = Totals {
            from_queue: 12,
            staged: 10,
            duplicates: 2,
            deleted: 11,
            delete_failures: 1,
            refused: 0,
        };
        assert_eq!(
            t.to_string(),
            "received 12, staged 10 new, 2 duplicates, deleted 11 (1 delete failures)"
        );
        let t = Totals { refused: 3, from_queue: 15, ..t };
        assert!(t.to_string().ends_with("; 3 refused by PostgreSQL, left on the queue"), "{t}");
    }
}

/// Counters of one ingest run, as recorded in `loader.ingest_runs`.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct RunCounts {
    pub id: i64,
    pub mode: String,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
    pub received: i64,
    pub staged: i64,
    pub duplicates: i64,
    pub deleted: i64,
    pub delete_failures: i64,
    /// Messages PostgreSQL refused and left on the queue (not part of `received`).
    pub refused: i64,
}
