//! The SQS client: one rustls+ring HTTPS stack, bounded timeouts and retries, the configured
//! endpoint and region.

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::stalled_stream_protection::StalledStreamProtectionConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::Credentials;
use aws_smithy_http_client::tls;

use crate::config::AwsSettings;

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
