//! Settings resolved once from the command line and environment, then passed down.

use std::fmt;

use anyhow::{Result, bail};

/// Where the queue lives and how to reach it.
#[derive(Debug, Clone)]
pub struct AwsSettings {
    /// A custom endpoint (LocalStack); `None` means real AWS.
    pub endpoint_url: Option<String>,
    /// Region from the command line or `AWS_REGION`; `None` defers to the AWS configuration chain.
    pub region: Option<String>,
}

/// A database URL that never prints its password.
#[derive(Clone)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for DatabaseUrl {
    fn from(url: String) -> Self {
        Self(url)
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DatabaseUrl(<redacted>)")
    }
}

/// Everything a subcommand may need, resolved once by the caller (the command line, the
/// Lambda handler, a test).
#[derive(Debug, Clone)]
pub struct Settings {
    database_url: Option<DatabaseUrl>,
    /// Queue name or URL as given.
    pub queue: String,
    pub aws: AwsSettings,
}

impl Settings {
    /// Settings from raw values; blank strings count as not given.
    pub fn new(
        database_url: Option<&str>,
        queue: &str,
        endpoint_url: Option<&str>,
        region: Option<&str>,
    ) -> Self {
        let non_empty = |v: Option<&str>| v.filter(|s| !s.trim().is_empty()).map(str::to_owned);
        Self {
            database_url: non_empty(database_url).map(DatabaseUrl),
            queue: queue.to_owned(),
            aws: AwsSettings { endpoint_url: non_empty(endpoint_url), region: non_empty(region) },
        }
    }

    /// The database URL, or a clear error when none was configured.
    pub fn database_url(&self) -> Result<&DatabaseUrl> {
        match &self.database_url {
            Some(url) => Ok(url),
            None => bail!("no database configured: set DATABASE_URL or pass --database-url"),
        }
    }
}
