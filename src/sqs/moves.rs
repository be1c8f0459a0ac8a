//! Dead-letter redrives: SQS's own message move tasks (StartMessageMoveTask,
//! ListMessageMoveTasks), which move each message once whatever happens to loader.

use anyhow::{Context, Result};
use aws_sdk_sqs::types::QueueAttributeName;

use super::Queue;
use super::errors::sdk_error;

impl Queue {
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
