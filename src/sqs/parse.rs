//! What SQS hands over, parsed: the message system attributes staging records, and queue
//! names from ARNs and URLs.

use anyhow::{Result, bail};
use time::OffsetDateTime;

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
pub(super) fn parse_epoch_millis(v: &str) -> Option<OffsetDateTime> {
    let millis: i128 = v.parse().ok()?;
    OffsetDateTime::from_unix_timestamp_nanos(millis * 1_000_000).ok()
}

/// The queue name an SQS ARN ends with (`arn:aws:sqs:eu-west-1:123456789012:login-queue`).
pub fn name_from_arn(arn: &str) -> Option<&str> {
    arn.strip_prefix("arn:").and_then(|_| arn.rsplit(':').next()).filter(|name| !name.is_empty())
}

pub(super) fn is_url(s: &str) -> bool {
    s.starts_with("https://") || s.starts_with("http://")
}

/// The queue name is the last path segment of a queue URL.
pub(super) fn name_from_url(url: &str) -> Result<String> {
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
