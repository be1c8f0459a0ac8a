//! Prometheus metrics (`--metrics-addr`): one place that names and describes every metric loader
//! exports. Without `--metrics-addr` no recorder is installed and these calls cost next to
//! nothing. The exposition passes `promtool check metrics` (tests/it/observability.rs); the
//! alert rules and the dashboard built on it are in `deploy/prometheus/` and `deploy/grafana/`.
//!
//! [`FAMILIES`] names and describes every family; the table in docs/operating.md "Metrics" is
//! generated from it, and tests/it/observability.rs holds both to a live scrape.
//!
//! Every label has a fixed, small set of values: queue names, error kinds and reason codes
//! (`loader._reason`), never message content.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

use crate::counts::{Totals, TransformReport};

/// The reject reason codes of the transform (`loader._reason`, and the comment on
/// `loader.login_rejects.reason`, which tests/it/observability.rs holds this list to):
/// `loader_rows_rejected_total{reason}` exists for each from the start.
pub const REJECT_REASONS: &[&str] = &[
    "erased",
    "sns_message_not_object",
    "eventbridge_detail_not_object",
    "body_not_json",
    "body_not_object",
    "field_not_scalar",
    "user_id_missing",
    "user_id_empty",
    "value_too_long",
];

/// What a failed ReceiveMessage call was (`loader_receive_errors_total{kind}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiveError {
    Construction,
    Timeout,
    Dispatch,
    Response,
    Service,
    Other,
}

impl ReceiveError {
    pub const ALL: [ReceiveError; 6] = [
        Self::Construction,
        Self::Timeout,
        Self::Dispatch,
        Self::Response,
        Self::Service,
        Self::Other,
    ];

    /// The `kind` label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Construction => "construction",
            Self::Timeout => "timeout",
            Self::Dispatch => "dispatch",
            Self::Response => "response",
            Self::Service => "service",
            Self::Other => "other",
        }
    }
}

/// How often process metrics are sampled.
const PROCESS_PERIOD: Duration = Duration::from_secs(5);

/// Serves `/metrics` (any path, in fact) on `addr`, describes every metric, and samples process
/// metrics every 5 s. Needs a Tokio runtime.
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
        .with_context(|| format!("serving metrics on {addr}"))?;
    describe();
    gauge!("loader_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    // Every labelled counter whose label values are known is exported at 0 from the start, so
    // a rate over it reads 0 rather than "no data" until the first event (Prometheus's
    // instrumentation guidance).
    for kind in ReceiveError::ALL {
        counter!("loader_receive_errors_total", "kind" => kind.label()).absolute(0);
    }
    for reason in REJECT_REASONS {
        counter!("loader_rows_rejected_total", "reason" => *reason).absolute(0);
    }
    // And every unlabelled counter, gauge and histogram, so an alert on an instance stuck since
    // it started (LoaderQuiet, LoaderDeletesStuck) has a series to fire on. A histogram
    // registered without a sample exports its buckets, sum and count at 0.
    for f in FAMILIES.iter().filter(|f| f.labels.is_empty()) {
        match f.kind {
            Kind::Counter => counter!(f.name).absolute(0),
            Kind::Gauge if f.name != "loader_build_info" => gauge!(f.name).set(0.0),
            Kind::Gauge => {}
            Kind::Histogram => {
                let _ = histogram!(f.name);
            }
        }
    }
    let process = metrics_process::Collector::default();
    process.describe();
    tokio::spawn(async move {
        loop {
            process.collect();
            tokio::time::sleep(PROCESS_PERIOD).await;
        }
    });
    Ok(())
}

/// What kind of metric a family is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    /// The Prometheus `# TYPE`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric family loader exports: its name, labels, kind, base unit and HELP text.
#[derive(Debug, Clone, Copy)]
pub struct Family {
    pub name: &'static str,
    pub labels: &'static [&'static str],
    pub kind: Kind,
    pub unit: Option<Unit>,
    pub help: &'static str,
}

const fn family(
    name: &'static str,
    labels: &'static [&'static str],
    kind: Kind,
    unit: Option<Unit>,
    help: &'static str,
) -> Family {
    Family { name, labels, kind, unit, help }
}

/// Every loader metric family (the `process_*` ones are [`PROCESS_FAMILIES`]).
pub const FAMILIES: &[Family] = &[
    family(
        "loader_build_info",
        &["version"],
        Kind::Gauge,
        None,
        "Always 1; the loader version as a label.",
    ),
    family(
        "loader_messages_received_total",
        &[],
        Kind::Counter,
        None,
        "Messages received from SQS, every copy, refused ones included.",
    ),
    family(
        "loader_messages_staged_total",
        &[],
        Kind::Counter,
        None,
        "Messages newly staged in loader.raw_logins.",
    ),
    family(
        "loader_messages_duplicate_total",
        &[],
        Kind::Counter,
        None,
        "Received messages whose message id was already staged.",
    ),
    family(
        "loader_messages_deleted_total",
        &[],
        Kind::Counter,
        None,
        "Messages deleted from SQS after their staging committed.",
    ),
    family(
        "loader_delete_failures_total",
        &[],
        Kind::Counter,
        None,
        "DeleteMessageBatch entries SQS refused (the message comes back and is a duplicate).",
    ),
    family(
        "loader_messages_refused_total",
        &[],
        Kind::Counter,
        None,
        "Messages PostgreSQL refused to stage, left on the queue for its redrive policy.",
    ),
    family(
        "loader_receive_errors_total",
        &["kind"],
        Kind::Counter,
        None,
        "Failed ReceiveMessage calls, by kind (dispatch and timeout: SQS unreachable; service: \
         permissions, throttling).",
    ),
    family(
        "loader_rows_loaded_total",
        &[],
        Kind::Counter,
        None,
        "Staged rows the transform loaded into user_logins.",
    ),
    family(
        "loader_rows_rejected_total",
        &["reason"],
        Kind::Counter,
        None,
        "Staged rows the transform rejected into loader.login_rejects, by reason code (a producer \
         changing its format shows as a new reason).",
    ),
    family(
        "loader_batch_size",
        &[],
        Kind::Histogram,
        Some(Unit::Count),
        "Messages per flush (SQS batches staged by one statement).",
    ),
    family(
        "loader_staging_seconds",
        &[],
        Kind::Histogram,
        Some(Unit::Seconds),
        "Time of one flush's staging statement and commit.",
    ),
    family(
        "loader_transform_seconds",
        &[],
        Kind::Histogram,
        Some(Unit::Seconds),
        "Time of one transform run (all its sessions).",
    ),
    family(
        "loader_pending_rows",
        &[],
        Kind::Gauge,
        Some(Unit::Count),
        "Staged rows without an outcome, as of the end of the last transform.",
    ),
    family(
        "loader_oldest_pending_age_seconds",
        &[],
        Kind::Gauge,
        Some(Unit::Seconds),
        "Age of the oldest staged row still waiting for the transform (0 when none waits).",
    ),
    family(
        "loader_receives_in_flight",
        &[],
        Kind::Gauge,
        Some(Unit::Count),
        "ReceiveMessage calls the concurrency controller allows at once (at --max-receivers for \
         long: raise it, or SQS is slow).",
    ),
    family(
        "loader_deletes_in_flight",
        &[],
        Kind::Gauge,
        Some(Unit::Count),
        "DeleteMessageBatch calls allowed at once for the flush being deleted.",
    ),
    family(
        "loader_queue_messages",
        &["queue", "state"],
        Kind::Gauge,
        Some(Unit::Count),
        "SQS's approximate message counts of the queue, by state (visible, in_flight, delayed), \
         read every --queue-metrics-interval by ingest and run.",
    ),
    family(
        "loader_dead_letter_messages",
        &["queue", "dead_letter_queue"],
        Kind::Gauge,
        Some(Unit::Count),
        "Visible messages in the dead-letter queue the queue's redrive policy names.",
    ),
];

/// The process families [metrics-process](https://docs.rs/metrics-process) exports on Linux,
/// sampled every 5 s and named as the Go client names them.
pub const PROCESS_FAMILIES: &[&str] = &[
    "process_cpu_seconds_total",
    "process_max_fds",
    "process_open_fds",
    "process_resident_memory_bytes",
    "process_start_time_seconds",
    "process_threads",
    "process_virtual_memory_bytes",
    "process_virtual_memory_max_bytes",
];

/// HELP text and unit of every loader metric (`promtool check metrics` wants both).
fn describe() {
    for f in FAMILIES {
        match (f.kind, f.unit) {
            (Kind::Counter, None) => describe_counter!(f.name, f.help),
            (Kind::Counter, Some(unit)) => describe_counter!(f.name, unit, f.help),
            (Kind::Gauge, None) => describe_gauge!(f.name, f.help),
            (Kind::Gauge, Some(unit)) => describe_gauge!(f.name, unit, f.help),
            (Kind::Histogram, None) => describe_histogram!(f.name, f.help),
            (Kind::Histogram, Some(unit)) => describe_histogram!(f.name, unit, f.help),
        }
    }
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

/// A ReceiveMessage call that failed.
pub fn receive_error(kind: ReceiveError) {
    counter!("loader_receive_errors_total", "kind" => kind.label()).increment(1);
}

/// One transform run: its counts, its rejects by reason code, and how long it took.
pub fn transform(
    report: &TransformReport,
    rejected_by_reason: &BTreeMap<String, u64>,
    took: Duration,
) {
    counter!("loader_rows_loaded_total").increment(report.loaded.max(0) as u64);
    for (reason, n) in rejected_by_reason {
        counter!("loader_rows_rejected_total", "reason" => reason.clone()).increment(*n);
    }
    gauge!("loader_pending_rows").set(report.pending.max(0) as f64);
    histogram!("loader_transform_seconds").record(took.as_secs_f64());
}

/// The receive concurrency the controller settled on.
pub fn receives_in_flight(n: usize) {
    gauge!("loader_receives_in_flight").set(n as f64);
}

/// The delete concurrency of the flush being deleted.
pub fn deletes_in_flight(n: usize) {
    gauge!("loader_deletes_in_flight").set(n as f64);
}

/// Age of the oldest staged row still waiting for the transform (0 when none waits).
pub fn oldest_pending(age: Duration) {
    gauge!("loader_oldest_pending_age_seconds").set(age.as_secs_f64());
}

/// SQS's approximate counts of `queue`: ready, received and not deleted, delayed.
pub fn queue_messages(queue: &str, visible: u64, in_flight: u64, delayed: u64) {
    for (state, n) in [("visible", visible), ("in_flight", in_flight), ("delayed", delayed)] {
        gauge!("loader_queue_messages", "queue" => queue.to_owned(), "state" => state)
            .set(n as f64);
    }
}

/// The visible messages in `dead_letter_queue`, the DLQ of `queue`.
pub fn dead_letter_messages(queue: &str, dead_letter_queue: &str, visible: u64) {
    gauge!(
        "loader_dead_letter_messages",
        "queue" => queue.to_owned(),
        "dead_letter_queue" => dead_letter_queue.to_owned()
    )
    .set(visible as f64);
}
