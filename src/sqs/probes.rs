//! What `loader doctor` asks of the credentials, changing no message: whether they may
//! receive (only when asked: SQS counts the receive) and delete.

use anyhow::Result;
use aws_sdk_sqs::error::SdkError;

use super::Queue;
use super::errors::sdk_error;

impl Queue {
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
}
