//! The queue's gauges (`loader_queue_messages`, `loader_dead_letter_messages`), read from SQS
//! every `--queue-metrics-interval` while `ingest` or `run` works the queue.

use std::time::Duration;

use crate::metrics;
use crate::sqs::Queue;

/// Publishes the queue's approximate counts, and its dead-letter queue's visible count, as
/// metrics every `period`, until the task is dropped (`ingest` and `run` with
/// `--metrics-addr`). A failed read is logged and the gauges keep their last values (a scrape
/// shows the last known state; `loader_receive_errors_total` shows the outage).
pub async fn publish_queue_counts(queue: Queue, period: Duration) {
    let name = queue.name();
    loop {
        match queue.depth().await {
            Ok(d) => metrics::queue_messages(name, d.visible, d.in_flight, d.delayed),
            Err(e) => {
                tracing::warn!(queue = %name, error = format!("{e:#}"), "reading the queue's counts")
            }
        }
        // Looked up each time: a redrive policy added or changed while loader runs shows up.
        match queue.dead_letter_queue().await {
            Ok(Some(dlq)) => match dlq.depth().await {
                Ok(d) => metrics::dead_letter_messages(name, dlq.name(), d.visible),
                Err(e) => {
                    tracing::warn!(queue = %dlq.name(), error = format!("{e:#}"), "reading the DLQ's counts")
                }
            },
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(queue = %name, error = format!("{e:#}"), "reading the redrive policy")
            }
        }
        tokio::time::sleep(period).await;
    }
}
