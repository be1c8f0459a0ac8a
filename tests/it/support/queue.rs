//! Queues: each test's own, on the LocalStack that `scripts/test.sh` starts.

use std::collections::HashMap;

use aws_sdk_sqs::types::QueueAttributeName;
use loader::config::AwsSettings;
use loader::sqs::{self, Queue};

use super::{required_env, unique_name};

pub fn aws_settings() -> AwsSettings {
    AwsSettings {
        endpoint_url: Some(required_env("AWS_ENDPOINT_URL")),
        region: Some(std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into())),
    }
}

/// A queue of this test's own, deleted when dropped.
pub struct TestQueue {
    pub name: String,
    pub queue: Queue,
}

impl TestQueue {
    /// A standard queue with the given visibility timeout (seconds): short ones let tests see
    /// redelivery quickly. LocalStack's timers tick in whole seconds.
    pub async fn new(visibility_timeout: u32) -> Self {
        Self::create(visibility_timeout, false).await
    }

    /// A FIFO queue (`.fifo`, no content-based deduplication).
    pub async fn new_fifo(visibility_timeout: u32) -> Self {
        Self::create(visibility_timeout, true).await
    }

    async fn create(visibility_timeout: u32, fifo: bool) -> Self {
        let mut name = unique_name("loader-test").replace('_', "-");
        let mut attributes = HashMap::from([(
            QueueAttributeName::VisibilityTimeout,
            visibility_timeout.to_string(),
        )]);
        if fifo {
            name.push_str(".fifo");
            attributes.insert(QueueAttributeName::FifoQueue, "true".into());
        }
        let client = sqs::client(&aws_settings()).await;
        client
            .create_queue()
            .queue_name(&name)
            .set_attributes(Some(attributes))
            .send()
            .await
            .expect("creating the test queue");
        let queue = Queue::open(client, &name).await.expect("opening the test queue");
        Self { name, queue }
    }

    /// `(visible, in flight, delayed)`.
    pub async fn depth(&self) -> (u64, u64, u64) {
        let d = self.queue.depth().await.expect("reading queue depth");
        (d.visible, d.in_flight, d.delayed)
    }

    /// A new queue of its own, of the same kind (FIFO or standard), made this queue's
    /// dead-letter queue (RedrivePolicy, after `max_receives`); returned so the test keeps it
    /// alive.
    pub async fn attach_dead_letter_queue(&self, max_receives: u32) -> TestQueue {
        self.attach(TestQueue::create(30, self.queue.is_fifo()).await, max_receives).await
    }

    /// `dlq` made this queue's dead-letter queue.
    pub async fn attach(&self, dlq: TestQueue, max_receives: u32) -> TestQueue {
        let client = self.queue.client();
        let attrs = client
            .get_queue_attributes()
            .queue_url(dlq.queue.url())
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .expect("reading the DLQ's ARN");
        let arn = &attrs.attributes().expect("attributes")[&QueueAttributeName::QueueArn];
        client
            .set_queue_attributes()
            .queue_url(self.queue.url())
            .attributes(
                QueueAttributeName::RedrivePolicy,
                format!(r#"{{"deadLetterTargetArn":"{arn}","maxReceiveCount":"{max_receives}"}}"#),
            )
            .send()
            .await
            .expect("setting the redrive policy");
        dlq
    }

    pub async fn send(&self, bodies: &[String]) {
        loader::send::send_all(&self.queue, bodies.to_vec()).await.expect("sending");
    }
}

impl Drop for TestQueue {
    fn drop(&mut self) {
        let url = self.queue.url().to_owned();
        // Drop cannot await; a short-lived runtime on its own thread deletes the queue, with a
        // client of its own (the test's client is bound to the test's runtime, blocked here).
        let _ = std::thread::spawn(move || {
            tokio::runtime::Runtime::new().expect("runtime").block_on(async {
                let client = sqs::client(&aws_settings()).await;
                client.delete_queue().queue_url(url).send().await.ok()
            })
        })
        .join();
    }
}
