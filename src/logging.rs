//! Logging: to stderr, filtered by `RUST_LOG`, pretty on a terminal and JSON otherwise.

use std::io::IsTerminal;

use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, fmt};

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable, coloured on a terminal.
    Pretty,
    /// One JSON object per line (for log shippers, CloudWatch).
    Json,
}

impl LogFormat {
    /// The names the command line and `LOADER_LOG_FORMAT` accept.
    pub const NAMES: [&str; 2] = ["pretty", "json"];
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pretty" => Ok(Self::Pretty),
            "json" => Ok(Self::Json),
            _ => Err(format!("unknown log format {s:?}: pretty or json")),
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `warn,loader=info`). Other crates never log
/// finer than DEBUG, whatever `RUST_LOG` says: the AWS SDK logs whole responses (message bodies,
/// so IPs and device ids) at TRACE, and loader never logs personal data at any level.
pub fn init(format: Option<LogFormat>) {
    let terminal = std::io::stderr().is_terminal();
    let env =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn,loader=info"));
    // Both filters are global, so a disabled callsite is never evaluated again (the SDK has
    // many spans; per-layer filters would check each one at every call).
    let no_foreign_trace =
        Targets::new().with_target("loader", Level::TRACE).with_default(Level::DEBUG);
    let layer = fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(no_foreign_trace).with(env);
    match format.unwrap_or(if terminal { LogFormat::Pretty } else { LogFormat::Json }) {
        LogFormat::Pretty => registry.with(layer.with_ansi(terminal)).init(),
        LogFormat::Json => registry.with(layer.json().with_current_span(true)).init(),
    }
}
