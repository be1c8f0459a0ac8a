//! SDK errors as people read them: one line, the service's code and message or the innermost
//! transport cause, credentials named; and their kind, for the receive-error metric.

use anyhow::anyhow;
use aws_sdk_sqs::error::{DisplayErrorContext, SdkError};

use crate::metrics::ReceiveError;
use crate::retry::Transient;

/// One line for an SDK error: the service's code and message, or the innermost transport cause
/// (for example "Connection refused"), without the SDK's debug dump.
pub(super) fn describe<E, R>(e: &SdkError<E, R>) -> String
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
pub(super) fn credentials_error(e: &dyn std::error::Error) -> Option<String> {
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
pub(super) fn sdk_error<E, R>(context: String, e: &SdkError<E, R>) -> anyhow::Error
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
pub(super) fn error_kind<E, R>(e: &SdkError<E, R>) -> ReceiveError {
    match e {
        SdkError::ConstructionFailure(_) => ReceiveError::Construction,
        SdkError::TimeoutError(_) => ReceiveError::Timeout,
        SdkError::DispatchFailure(_) => ReceiveError::Dispatch,
        SdkError::ResponseError(_) => ReceiveError::Response,
        SdkError::ServiceError(_) => ReceiveError::Service,
        _ => ReceiveError::Other,
    }
}
