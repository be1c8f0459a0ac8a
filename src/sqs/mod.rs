//! The queue: resolve a name to a URL, receive, delete, send, visibility and depth; the
//! client in [`client`], SDK errors in one line in [`errors`], what doctor probes in
//! [`probes`], dead-letter redrives in [`moves`], and what SQS returns parsed in [`parse`].
//!
//! Requests always go to the configured endpoint: LocalStack's queue URLs name a host
//! (`localhost.localstack.cloud`) that may not resolve, and the SDK only passes the URL as a
//! parameter.

mod client;
mod errors;
mod moves;
mod parse;
mod probes;

pub use client::{MAX_ATTEMPTS, client};
pub use moves::MoveTask;
pub use parse::{SystemAttributes, name_from_arn};

use errors::{error_kind, sdk_error};
use parse::{is_url, name_from_url};

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
    MessageSystemAttributeName, QueueAttributeName, SendMessageBatchRequestEntry,
};
use time::OffsetDateTime;
use tokio::task::JoinSet;

/// SQS caps ReceiveMessage, DeleteMessageBatch and SendMessageBatch at ten entries.
pub const MAX_BATCH: usize = 10;

/// What a message sent to a FIFO queue needs besides its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FifoEntry {
    /// MessageGroupId: SQS keeps the order of the messages of one group.
    pub group_id: String,
    /// MessageDeduplicationId: required unless the queue deduplicates by content.
    pub deduplication_id: Option<String>,
}

/// True for a FIFO queue's name (`.fifo`, as SQS requires of FIFO queues and of them only).
pub fn is_fifo_name(name: &str) -> bool {
    name.ends_with(".fifo")
}

/// One message as received: what staging needs, plus the handle to delete it.
#[derive(Debug, Clone)]
pub struct Received {
    pub message_id: String,
    pub receipt_handle: String,
    pub body: String,
    /// SQS `SentTimestamp`.
    pub sent_at: Option<OffsetDateTime>,
    /// SQS `ApproximateReceiveCount`.
    pub receive_count: Option<i32>,
}

/// DeleteMessageBatch calls in flight at once for one flush.
pub const DELETE_CONCURRENCY: usize = 8;

/// Result of deleting a set of received messages.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DeleteOutcome {
    pub deleted: usize,
    /// `(message_id, error code)` for each entry SQS refused; those messages come back later
    /// and are then recognised as duplicates.
    pub failed: Vec<(String, String)>,
}

impl DeleteOutcome {
    /// Every one of `messages` failed: SQS could not be reached to delete them.
    pub fn unreachable(messages: &[Received]) -> DeleteOutcome {
        DeleteOutcome {
            deleted: 0,
            failed: messages
                .iter()
                .map(|m| (m.message_id.clone(), "Unreachable".to_owned()))
                .collect(),
        }
    }

    fn merge(&mut self, other: DeleteOutcome) {
        self.deleted += other.deleted;
        self.failed.extend(other.failed);
    }
}

/// A resolved queue.
#[derive(Debug, Clone)]
pub struct Queue {
    client: Client,
    url: String,
    name: String,
}

impl Queue {
    /// Resolves a queue name or URL; a missing queue is an error.
    pub async fn open(client: Client, name_or_url: &str) -> Result<Self> {
        if is_url(name_or_url) {
            let name = name_from_url(name_or_url)?;
            return Ok(Self { client, url: name_or_url.to_owned(), name });
        }
        let out = client.get_queue_url().queue_name(name_or_url).send().await.map_err(|e| {
            if e.as_service_error().is_some_and(|s| s.is_queue_does_not_exist()) {
                anyhow!("queue '{name_or_url}' does not exist (create it, or run `loader send`)")
            } else {
                sdk_error(format!("looking up queue '{name_or_url}'"), &e)
            }
        })?;
        let url = out.queue_url().context("GetQueueUrl returned no URL")?.to_owned();
        Ok(Self { client, url, name: name_or_url.to_owned() })
    }

    /// Resolves a queue, creating it when it does not exist: a FIFO queue when the name ends
    /// in `.fifo` (as SQS requires), else a standard one.
    pub async fn open_or_create(client: Client, name_or_url: &str) -> Result<Self> {
        if is_url(name_or_url) {
            return Self::open(client, name_or_url).await;
        }
        let mut create = client.create_queue().queue_name(name_or_url);
        if is_fifo_name(name_or_url) {
            create = create.attributes(QueueAttributeName::FifoQueue, "true");
        }
        let out = create
            .send()
            .await
            .map_err(|e| sdk_error(format!("creating queue '{name_or_url}'"), &e))?;
        let url = out.queue_url().context("CreateQueue returned no URL")?.to_owned();
        Ok(Self { client, url, name: name_or_url.to_owned() })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// A FIFO queue (its name ends in `.fifo`: SQS requires that of FIFO queues only).
    pub fn is_fifo(&self) -> bool {
        is_fifo_name(&self.name)
    }

    /// Whether SQS deduplicates this FIFO queue's messages by a hash of their bodies
    /// (ContentBasedDeduplication); false for a standard queue.
    pub async fn content_based_deduplication(&self) -> Result<bool> {
        if !self.is_fifo() {
            return Ok(false);
        }
        let mut a = self.attributes([QueueAttributeName::ContentBasedDeduplication]).await?;
        Ok(a.remove(&QueueAttributeName::ContentBasedDeduplication).is_some_and(|v| v == "true"))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// One ReceiveMessage call: up to ten messages, long polling `wait_seconds`.
    pub async fn receive(&self, wait_seconds: i32) -> Result<Vec<Received>> {
        let out = self
            .client
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(MAX_BATCH as i32)
            .wait_time_seconds(wait_seconds)
            // Only what staging records: fewer attributes, less to parse per message.
            .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .send()
            .await
            .map_err(|e| {
                crate::metrics::receive_error(error_kind(&e));
                sdk_error(format!("receiving from '{}'", self.name), &e)
            })?;
        let messages = out.messages.unwrap_or_default();
        let mut received = Vec::with_capacity(messages.len());
        for m in messages {
            // SQS always sets both; a message without them cannot be staged idempotently or
            // deleted, so it is left on the queue (and reaches the DLQ if one is configured).
            let (Some(message_id), Some(receipt_handle)) = (m.message_id, m.receipt_handle) else {
                tracing::warn!(
                    "received a message without MessageId or ReceiptHandle; left on the queue"
                );
                continue;
            };
            let system = SystemAttributes::parse(|name| {
                let name = MessageSystemAttributeName::from(name);
                m.attributes.as_ref().and_then(|a| a.get(&name)).map(String::as_str)
            });
            received.push(Received {
                message_id,
                receipt_handle,
                sent_at: system.sent_at,
                receive_count: system.receive_count,
                body: m.body.unwrap_or_default(),
            });
        }
        Ok(received)
    }

    /// Deletes the given messages, ten per DeleteMessageBatch call with up to
    /// [`DELETE_CONCURRENCY`] calls in flight, reporting per-entry failures (for example an
    /// expired receipt handle) instead of failing the whole set.
    pub async fn delete(&self, messages: &[Received]) -> Result<DeleteOutcome> {
        self.delete_concurrently(messages, DELETE_CONCURRENCY).await
    }

    /// [`Queue::delete`] with up to `in_flight` calls at once (at least one).
    pub async fn delete_concurrently(
        &self,
        messages: &[Received],
        in_flight: usize,
    ) -> Result<DeleteOutcome> {
        let outcomes = self
            .per_batch(messages, in_flight, |queue, chunk| async move {
                queue.delete_batch(&chunk).await
            })
            .await?;
        let mut outcome = DeleteOutcome::default();
        outcomes.into_iter().for_each(|o| outcome.merge(o));
        Ok(outcome)
    }

    /// Runs `call` on every batch of ten of `items`, each in a task of its own with up to
    /// `in_flight` (at least one) running at once, and returns their results in completion
    /// order. The first error ends it.
    async fn per_batch<T, R, F, Fut>(
        &self,
        items: &[T],
        in_flight: usize,
        call: F,
    ) -> Result<Vec<R>>
    where
        T: Clone + Send + 'static,
        R: Send + 'static,
        F: Fn(Queue, Vec<T>) -> Fut,
        Fut: Future<Output = Result<R>> + Send + 'static,
    {
        let mut results = Vec::with_capacity(items.len().div_ceil(MAX_BATCH));
        let mut calls = JoinSet::new();
        for chunk in items.chunks(MAX_BATCH) {
            if calls.len() >= in_flight.max(1) {
                results
                    .push(calls.join_next().await.expect("non-empty").context("SQS call task")??);
            }
            calls.spawn(call(self.clone(), chunk.to_vec()));
        }
        while let Some(done) = calls.join_next().await {
            results.push(done.context("SQS call task")??);
        }
        Ok(results)
    }

    /// One DeleteMessageBatch call (at most ten messages).
    async fn delete_batch(&self, chunk: &[Received]) -> Result<DeleteOutcome> {
        let entries = chunk
            .iter()
            .enumerate()
            .map(|(i, m)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(&m.receipt_handle)
                    .build()
            })
            .collect::<Result<Vec<_>, _>>()?;
        let out = self
            .client
            .delete_message_batch()
            .queue_url(&self.url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| sdk_error(format!("deleting from '{}'", self.name), &e))?;
        let failed =
            out.failed()
                .iter()
                .map(|f| {
                    let message_id =
                        f.id().parse::<usize>().ok().and_then(|i| chunk.get(i)).map_or_else(
                            || format!("<entry {}>", f.id()),
                            |m| m.message_id.clone(),
                        );
                    (message_id, f.code().to_owned())
                })
                .collect();
        Ok(DeleteOutcome { deleted: out.successful().len(), failed })
    }

    /// Sends up to ten bodies in one SendMessageBatch call; any refused entry is an error.
    pub async fn send_batch(&self, bodies: &[String]) -> Result<()> {
        self.send_batch_to_groups(bodies.iter().map(|b| (b.as_str(), None))).await
    }

    /// SendMessageBatch of `(body, fifo)` entries: on a FIFO queue each names its message
    /// group and, unless the queue deduplicates by content, its deduplication id.
    pub async fn send_batch_to_groups<'a>(
        &self,
        entries: impl Iterator<Item = (&'a str, Option<FifoEntry>)>,
    ) -> Result<()> {
        let entries = entries
            .enumerate()
            .map(|(i, (body, fifo))| {
                let entry =
                    SendMessageBatchRequestEntry::builder().id(i.to_string()).message_body(body);
                match fifo {
                    Some(f) => entry
                        .message_group_id(f.group_id)
                        .set_message_deduplication_id(f.deduplication_id),
                    None => entry,
                }
                .build()
            })
            .collect::<Result<Vec<_>, _>>()?;
        let sent = entries.len();
        let out = self
            .client
            .send_message_batch()
            .queue_url(&self.url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| sdk_error(format!("sending to '{}'", self.name), &e))?;
        if let Some(f) = out.failed().first() {
            bail!(
                "sending to '{}': {} of {sent} entries refused, first: {} {}",
                self.name,
                out.failed().len(),
                f.code(),
                f.message().unwrap_or_default()
            );
        }
        Ok(())
    }

    /// The queue's VisibilityTimeout.
    pub async fn visibility_timeout(&self) -> Result<Duration> {
        let mut a = self.attributes([QueueAttributeName::VisibilityTimeout]).await?;
        let seconds = a
            .remove(&QueueAttributeName::VisibilityTimeout)
            .and_then(|v| v.parse::<u64>().ok())
            .with_context(|| format!("queue '{}' reports no VisibilityTimeout", self.name))?;
        Ok(Duration::from_secs(seconds))
    }

    /// Makes the messages with these receipt handles invisible for `timeout` more, from now
    /// (ChangeMessageVisibilityBatch, ten per call, up to `in_flight` calls at once). Returns
    /// how many entries SQS refused (e.g. a handle that already expired).
    pub async fn extend_visibility(
        &self,
        receipts: &[String],
        timeout: Duration,
        in_flight: usize,
    ) -> Result<usize> {
        let seconds = i32::try_from(timeout.as_secs()).unwrap_or(i32::MAX);
        let refused = self
            .per_batch(receipts, in_flight, move |queue, chunk| async move {
                queue.change_visibility_batch(&chunk, seconds).await
            })
            .await?;
        Ok(refused.into_iter().sum())
    }

    /// One ChangeMessageVisibilityBatch call (at most ten receipt handles); returns how many
    /// entries SQS refused.
    async fn change_visibility_batch(&self, receipts: &[String], seconds: i32) -> Result<usize> {
        let entries = receipts
            .iter()
            .enumerate()
            .map(|(i, receipt)| {
                ChangeMessageVisibilityBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(receipt)
                    .visibility_timeout(seconds)
                    .build()
            })
            .collect::<Result<Vec<_>, _>>()?;
        let out = self
            .client
            .change_message_visibility_batch()
            .queue_url(&self.url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| sdk_error(format!("extending visibility in '{}'", self.name), &e))?;
        Ok(out.failed().len())
    }

    /// The dead-letter queue named by this queue's RedrivePolicy, if any.
    pub async fn dead_letter_queue(&self) -> Result<Option<Queue>> {
        let mut a = self.attributes([QueueAttributeName::RedrivePolicy]).await?;
        let Some(policy) = a.remove(&QueueAttributeName::RedrivePolicy) else {
            return Ok(None);
        };
        let policy: serde_json::Value =
            serde_json::from_str(&policy).context("the queue's RedrivePolicy is not JSON")?;
        let name = policy["deadLetterTargetArn"]
            .as_str()
            .and_then(name_from_arn)
            .context("RedrivePolicy without a deadLetterTargetArn")?;
        Ok(Some(Queue::open(self.client.clone(), name).await?))
    }

    /// The queue attributes `names` (GetQueueAttributes): the one place loader reads them.
    async fn attributes<const N: usize>(
        &self,
        names: [QueueAttributeName; N],
    ) -> Result<HashMap<QueueAttributeName, String>> {
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(&self.url)
            .set_attribute_names(Some(names.to_vec()))
            .send()
            .await
            .map_err(|e| sdk_error(format!("reading attributes of '{}'", self.name), &e))?;
        Ok(out.attributes.unwrap_or_default())
    }

    /// The queue's approximate message counts.
    pub async fn depth(&self) -> Result<Depth> {
        use QueueAttributeName::{
            ApproximateNumberOfMessages, ApproximateNumberOfMessagesDelayed,
            ApproximateNumberOfMessagesNotVisible,
        };
        let a = self
            .attributes([
                ApproximateNumberOfMessages,
                ApproximateNumberOfMessagesNotVisible,
                ApproximateNumberOfMessagesDelayed,
            ])
            .await?;
        let get = |n: QueueAttributeName| a.get(&n).and_then(|v| v.parse().ok()).unwrap_or(0);
        Ok(Depth {
            visible: get(QueueAttributeName::ApproximateNumberOfMessages),
            in_flight: get(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
            delayed: get(QueueAttributeName::ApproximateNumberOfMessagesDelayed),
        })
    }
}

/// A queue's approximate message counts (SQS's own, eventually consistent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Depth {
    /// Ready to be received.
    pub visible: u64,
    /// Received and not yet deleted (within their visibility timeout).
    pub in_flight: u64,
    /// Sent with a delay that has not passed yet.
    pub delayed: u64,
}
