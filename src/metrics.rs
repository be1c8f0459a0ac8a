//! Prometheus metrics (`--metrics-addr`): one place that names every metric loader exports.
//! Without `--metrics-addr` no recorder is installed and these calls cost next to nothing.
//!
//! | metric | type | meaning |
//! | --- | --- | --- |
//! | `loader_messages_received_total` | counter | messages received from SQS |
//! | `loader_messages_staged_total` | counter | rows newly staged |
//! | `loader_messages_duplicate_total` | counter | received messages already staged |
//! | `loader_messages_deleted_total` | counter | messages deleted after staging |
//! | `loader_delete_failures_total` | counter | delete entries SQS refused |
//! | `loader_messages_refused_total` | counter | messages PostgreSQL refused, left on the queue |
//! | `loader_receive_errors_total{kind}` | counter | failed ReceiveMessage calls, by kind |
//! | `loader_rows_loaded_total`, `loader_rows_rejected_total` | counter | transform outcomes |
//! | `loader_batch_size` | histogram | messages per flush (SQS batches staged in one statement) |
//! | `loader_staging_seconds` | histogram | one flush's staging statement |
//! | `loader_transform_seconds` | histogram | one `call loader.transform()` |
//! | `loader_oldest_pending_age_seconds` | gauge | age of the oldest staged row still pending |
//! | `loader_receives_in_flight` | gauge | ReceiveMessage calls the concurrency controller allows |
//! | `loader_deletes_in_flight` | gauge | DeleteMessageBatch calls allowed per flush being deleted |

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

use crate::counts::{Totals, TransformReport};

/// Serves `/metrics` (any path, in fact) on `addr`. Needs a Tokio runtime.
pub fn install(addr: SocketAddr) -> Result<()> {
    let latency = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)?
        .set_buckets_for_metric(
            Matcher::Full("loader_batch_size".into()),
            &[1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0],
        )?
        .install()
        .with_context(|| format!("serving metrics on {addr}"))
}

/// One flush (one or more received batches), staged and deleted.
pub fn batch(totals: &Totals, staging: Duration) {
    counter!("loader_messages_received_total").increment(totals.from_queue);
    counter!("loader_messages_staged_total").increment(totals.staged);
    counter!("loader_messages_duplicate_total").increment(totals.duplicates);
    counter!("loader_messages_deleted_total").increment(totals.deleted);
    counter!("loader_delete_failures_total").increment(totals.delete_failures);
    counter!("loader_messages_refused_total").increment(totals.refused);
    histogram!("loader_batch_size").record(totals.from_queue as f64);
    histogram!("loader_staging_seconds").record(staging.as_secs_f64());
}

/// A ReceiveMessage call that failed; `kind` is a short, fixed label (no message content).
pub fn receive_error(kind: &'static str) {
    counter!("loader_receive_errors_total", "kind" => kind).increment(1);
}

/// One transform call.
pub fn transform(report: &TransformReport, took: Duration) {
    counter!("loader_rows_loaded_total").increment(report.loaded.max(0) as u64);
    counter!("loader_rows_rejected_total").increment(report.rejected.max(0) as u64);
    histogram!("loader_transform_seconds").record(took.as_secs_f64());
}

/// Age of the oldest staged row still waiting for the transform (0 when none waits).
/// The receive concurrency the controller settled on.
pub fn receives_in_flight(n: usize) {
    gauge!("loader_receives_in_flight").set(n as f64);
}

/// The delete concurrency of the flush being deleted.
pub fn deletes_in_flight(n: usize) {
    gauge!("loader_deletes_in_flight").set(n as f64);
}

pub fn oldest_pending(age: Duration) {
    gauge!("loader_oldest_pending_age_seconds").set(age.as_secs_f64());
}
