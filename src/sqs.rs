//! The queue: connect, resolve a name to a URL, receive, delete, send.
//!
//! Requests always go to the configured endpoint: LocalStack's queue URLs name a host
//! (`localhost.localstack.cloud`) that may not resolve, and the SDK only passes the URL as a
//! parameter.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use aws_config::retry::RetryConfig;
use aws_config::stalled_stream_protection::StalledStreamProtectionConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::Credentials;
use aws_sdk_sqs::error::{DisplayErrorContext, SdkError};
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
    MessageSystemAttributeName, QueueAttributeName, SendMessageBatchRequestEntry,
};
use aws_smithy_http_client::tls;
use time::OffsetDateTime;
use tokio::task::JoinSet;

use crate::config::AwsSettings;
use crate::metrics::ReceiveError;
use crate::retry::Transient;

/// SQS caps ReceiveMessage, DeleteMessageBatch and SendMessageBatch at ten entries.
pub const MAX_BATCH: usize = 10;

/// How many times an SQS call is tried at most (the first try and two retries), with the SDK's
/// standard backoff.
pub const MAX_ATTEMPTS: u32 = 3;

/// Builds an SQS client: one rustls+ring HTTPS stack, bounded timeouts and retries (so an
/// unreachable endpoint fails in seconds), and LocalStack's test credentials when a custom
/// endpoint is set and no AWS credentials are configured.
pub async fn client(settings: &AwsSettings) -> Client {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http)
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(3))
                // Long polls wait up to 20 s; anything beyond that is a stuck connection.
                .operation_attempt_timeout(Duration::from_secs(30))
                .build(),
        )
        .retry_config(RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS))
        // Its per-request throughput monitor cost ~5% of ingest's CPU; SQS responses are small
        // and the attempt timeout above already ends a stuck one.
        .stalled_stream_protection(StalledStreamProtectionConfig::disabled());
    if let Some(region) = &settings.region {
        loader = loader.region(Region::new(region.clone()));
    }
    if let Some(endpoint) = &settings.endpoint_url {
        loader = loader.endpoint_url(endpoint);
        if !aws_credentials_configured() {
            loader = loader.credentials_provider(Credentials::new(
                "test",
                "test",
                None,
                None,
                "loader-localstack-default",
            ));
        }
    }
    // Without a region given, the configuration chain (profile files, then instance metadata)
    // decides; failing all of them, us-east-1.
    let mut config = loader.load().await;
    if config.region().is_none() {
        config = config.into_builder().region(Region::new("us-east-1")).build();
    }
    Client::new(&config)
}

/// True when the environment or the shared AWS files name credentials or a profile.
fn aws_credentials_configured() -> bool {
    let env_set = |k: &str| std::env::var_os(k).is_some_and(|v| !v.is_empty());
    if env_set("AWS_ACCESS_KEY_ID")
        || env_set("AWS_PROFILE")
        || env_set("AWS_WEB_IDENTITY_TOKEN_FILE")
    {
        return true;
    }
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from);
    let file = |env: &str, default: &str| {
        std::env::var_os(env)
            .map(std::path::PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".aws").join(default)))
    };
    [file("AWS_SHARED_CREDENTIALS_FILE", "credentials"), file("AWS_CONFIG_FILE", "config")]
        .into_iter()
        .flatten()
        .any(|p| p.exists())
}

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

    /// Whether these credentials may receive: one ReceiveMessage of at most one message with a
    /// visibility timeout of 0 (a message it gets stays visible; SQS counts the receive).
    pub async fn can_receive(&self) -> Result<()> {
        self.client
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(1)
            .wait_time_seconds(0)
            .visibility_timeout(0)
            .send()
            .await
            .map_err(|e| sdk_error(format!("receiving from '{}'", self.name), &e))?;
        Ok(())
    }

    /// Whether these credentials may delete, without deleting anything: a DeleteMessage with a
    /// receipt handle that cannot exist is refused for the handle when deleting is allowed,
    /// and for the permission when it is not.
    pub async fn can_delete(&self) -> Result<()> {
        let result = self
            .client
            .delete_message()
            .queue_url(&self.url)
            .receipt_handle("loader-doctor-no-such-receipt-handle")
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(SdkError::ServiceError(s))
                if aws_sdk_sqs::error::ProvideErrorMetadata::code(s.err()).is_some_and(|c| {
                    c.contains("ReceiptHandleIsInvalid") || c.contains("InvalidParameterValue")
                }) =>
            {
                Ok(())
            }
            Err(e) => Err(sdk_error(format!("deleting from '{}'", self.name), &e)),
        }
    }

    /// The queue's ARN (what redrive policies and message move tasks name).
    pub async fn arn(&self) -> Result<String> {
        let mut a = self.attributes([QueueAttributeName::QueueArn]).await?;
        a.remove(&QueueAttributeName::QueueArn)
            .with_context(|| format!("'{}' has no QueueArn attribute", self.name))
    }

    /// Starts moving every message of this queue (a dead-letter queue, whose ARN is
    /// `source_arn`) to the queue `destination_arn` (StartMessageMoveTask); SQS does the moving.
    /// Returns the task's handle.
    pub async fn start_move(&self, source_arn: &str, destination_arn: &str) -> Result<String> {
        let out = self
            .client
            .start_message_move_task()
            .source_arn(source_arn)
            .destination_arn(destination_arn)
            .send()
            .await
            .map_err(|e| sdk_error(format!("starting to move '{}' back", self.name), &e))?;
        Ok(out.task_handle().unwrap_or_default().to_owned())
    }

    /// The most recent message move task out of this queue (whose ARN is `source_arn`), if
    /// any (ListMessageMoveTasks).
    pub async fn latest_move(&self, source_arn: &str) -> Result<Option<MoveTask>> {
        let out = self
            .client
            .list_message_move_tasks()
            .source_arn(source_arn)
            .max_results(1)
            .send()
            .await
            .map_err(|e| sdk_error(format!("reading the move tasks of '{}'", self.name), &e))?;
        Ok(out.results().first().map(|t| MoveTask {
            status: t.status().unwrap_or("UNKNOWN").to_owned(),
            moved: t.approximate_number_of_messages_moved(),
            to_move: t.approximate_number_of_messages_to_move(),
            failure: t.failure_reason().map(str::to_owned),
        }))
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

/// A message move task (a DLQ redrive), as ListMessageMoveTasks reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoveTask {
    /// RUNNING, COMPLETED, CANCELLING, CANCELLED or FAILED.
    pub status: String,
    /// Approximate messages moved so far.
    pub moved: i64,
    /// Messages to move, counted when the task started (once SQS has counted them).
    pub to_move: Option<i64>,
    /// Why it failed, when it did.
    pub failure: Option<String>,
}

/// `completed, 2 of 2 moved` (the count to move once SQS has counted it).
impl std::fmt::Display for MoveTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}, {}", self.status.to_lowercase(), self.moved)?;
        if let Some(n) = self.to_move {
            write!(f, " of {n}")?;
        }
        write!(f, " moved")
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

/// One line for an SDK error: the service's code and message, or the innermost transport cause
/// (for example "Connection refused"), without the SDK's debug dump.
fn describe<E, R>(e: &SdkError<E, R>) -> String
where
    E: std::error::Error + aws_sdk_sqs::error::ProvideErrorMetadata + 'static,
    R: std::fmt::Debug,
{
    if let Some(missing) = credentials_error(e) {
        return missing;
    }
    match e {
        SdkError::ServiceError(s) => {
            let err = s.err();
            format!(
                "{}: {}",
                err.code().unwrap_or("service error"),
                err.message().unwrap_or_default()
            )
        }
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => {
            let mut cause: &dyn std::error::Error = e;
            while let Some(next) = cause.source() {
                cause = next;
            }
            format!("cannot reach the SQS endpoint: {cause}")
        }
        _ => DisplayErrorContext(e).to_string(),
    }
}

/// One line for credentials that could not be had (the SDK's own text lists every provider it
/// tried, a line each), or None when `e` is not about credentials.
fn credentials_error(e: &dyn std::error::Error) -> Option<String> {
    use aws_credential_types::provider::error::CredentialsError;
    let mut cause: Option<&(dyn std::error::Error + 'static)> = e.source();
    while let Some(c) = cause {
        if let Some(err) = c.downcast_ref::<CredentialsError>() {
            return Some(match err {
                CredentialsError::CredentialsNotLoaded(_) => "no AWS credentials: none in the \
                    environment, a profile, web identity, ECS or the instance role (set \
                    AWS_PROFILE or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
                    .to_owned(),
                CredentialsError::ProviderTimedOut(_) => {
                    "AWS credentials: the credentials provider timed out".to_owned()
                }
                _ => format!("AWS credentials: {}", err.to_string().lines().next().unwrap_or("")),
            });
        }
        cause = c.source();
    }
    None
}

/// An SDK error as `context: description`, marked [`Transient`] when waiting may help: the
/// endpoint unreachable or slow, a 5xx, or throttling. The one mapping of SQS errors: callers
/// that retry branch on the mark, the others only print the line.
fn sdk_error<E, R>(context: String, e: &SdkError<E, R>) -> anyhow::Error
where
    E: std::error::Error + aws_sdk_sqs::error::ProvideErrorMetadata + 'static,
    R: std::fmt::Debug,
{
    let message = format!("{context}: {}", describe(e));
    if credentials_error(e).is_some() {
        return anyhow!(message);
    }
    // ResponseError: a reply that could not be read (a proxy's 5xx page, a cut connection).
    let transient = match e {
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(s) => s.err().code().is_some_and(|c| {
            c.contains("Throttl")
                || [
                    "RequestThrottled",
                    "ServiceUnavailable",
                    "InternalError",
                    "InternalFailure",
                    "OverLimit",
                ]
                .contains(&c)
        }),
        _ => false,
    };
    if transient { anyhow::Error::new(Transient(message)) } else { anyhow!(message) }
}

/// A short, fixed label for an SDK error (a metrics label: never message content).
fn error_kind<E, R>(e: &SdkError<E, R>) -> ReceiveError {
    match e {
        SdkError::ConstructionFailure(_) => ReceiveError::Construction,
        SdkError::TimeoutError(_) => ReceiveError::Timeout,
        SdkError::DispatchFailure(_) => ReceiveError::Dispatch,
        SdkError::ResponseError(_) => ReceiveError::Response,
        SdkError::ServiceError(_) => ReceiveError::Service,
        _ => ReceiveError::Other,
    }
}

/// The message system attributes staging records, as ReceiveMessage and a Lambda event's
/// records both carry them (text, by name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SystemAttributes {
    /// SentTimestamp: when SQS accepted the message.
    pub sent_at: Option<OffsetDateTime>,
    /// ApproximateReceiveCount, this delivery included.
    pub receive_count: Option<i32>,
}

impl SystemAttributes {
    /// Reads them through `get` (attribute name to value); a malformed value is None.
    pub fn parse<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Self {
        Self {
            sent_at: get("SentTimestamp").and_then(parse_epoch_millis),
            receive_count: get("ApproximateReceiveCount").and_then(|v| v.parse().ok()),
        }
    }
}

/// SQS's SentTimestamp (milliseconds since the epoch, as text) as a time; None when malformed.
fn parse_epoch_millis(v: &str) -> Option<OffsetDateTime> {
    let millis: i128 = v.parse().ok()?;
    OffsetDateTime::from_unix_timestamp_nanos(millis * 1_000_000).ok()
}

/// The queue name an SQS ARN ends with (`arn:aws:sqs:eu-west-1:123456789012:login-queue`).
pub fn name_from_arn(arn: &str) -> Option<&str> {
    arn.strip_prefix("arn:").and_then(|_| arn.rsplit(':').next()).filter(|name| !name.is_empty())
}

fn is_url(s: &str) -> bool {
    s.starts_with("https://") || s.starts_with("http://")
}

/// The queue name is the last path segment of a queue URL.
fn name_from_url(url: &str) -> Result<String> {
    match url.trim_end_matches('/').rsplit('/').next() {
        Some(name) if !name.is_empty() && !name.contains(':') => Ok(name.to_owned()),
        _ => bail!("'{url}' is not a queue URL (expected .../<account>/<queue-name>)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_attributes_parse_by_name_and_tolerate_garbage() {
        let a = SystemAttributes::parse(|n| match n {
            "SentTimestamp" => Some("1700000000123"),
            "ApproximateReceiveCount" => Some("3"),
            _ => None,
        });
        let sent = a.sent_at.unwrap();
        assert_eq!((sent.unix_timestamp(), sent.millisecond()), (1_700_000_000, 123));
        assert_eq!(a.receive_count, Some(3));
        let none = SystemAttributes::parse(|_| Some("yesterday"));
        assert_eq!((none.sent_at, none.receive_count), (None, None));
    }

    #[test]
    fn queue_name_comes_from_the_arn() {
        assert_eq!(
            name_from_arn("arn:aws:sqs:eu-west-1:123456789012:login-queue"),
            Some("login-queue")
        );
        assert_eq!(name_from_arn("arn:aws:sqs:eu-west-1:123456789012:"), None);
        assert_eq!(name_from_arn("login-queue"), None);
    }

    #[test]
    fn queue_name_comes_from_the_url_path() {
        let url = "http://localhost.localstack.cloud:4566/000000000000/login-queue";
        assert_eq!(name_from_url(url).unwrap(), "login-queue");
        assert_eq!(name_from_url("https://sqs.us-east-1.amazonaws.com/1/q/").unwrap(), "q");
        assert!(name_from_url("http://host:4566").is_err());
    }
}
