//! The `loader` binary: parse the command line, set up logging, run, map the result to an exit
//! code. Errors are printed once, with their cause chain.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use loader::app::{self, exit};
use loader::cli::{Cli, LogFormat};
use tracing::Level;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, fmt};

fn main() -> ExitCode {
    // `.env` first, so its values feed clap's `env = ...` defaults. A missing file is fine.
    if let Err(e) = dotenvy::dotenv()
        && !e.not_found()
    {
        eprintln!("error: reading .env: {e}");
        return ExitCode::from(exit::ERROR);
    }
    let cli = Cli::parse();
    init_logging(cli.global.log_format);

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::from(exit::ERROR);
        }
    };
    match runtime.block_on(app::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::from(exit::ERROR)
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `warn,loader=info`). Other crates never log
/// finer than DEBUG, whatever `RUST_LOG` says: the AWS SDK logs whole responses (message bodies,
/// so IPs and device ids) at TRACE, and loader never logs personal data at any level.
fn init_logging(format: Option<LogFormat>) {
    let terminal = std::io::stderr().is_terminal();
    let env =
        || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn,loader=info"));
    let no_foreign_trace = || {
        filter_fn(|meta| {
            *meta.level() < Level::TRACE
                || meta.target() == "loader"
                || meta.target().starts_with("loader::")
        })
    };
    let layer = fmt::layer().with_writer(std::io::stderr);
    match format.unwrap_or(if terminal { LogFormat::Pretty } else { LogFormat::Json }) {
        LogFormat::Pretty => tracing_subscriber::registry()
            .with(layer.with_ansi(terminal).with_filter(env()).with_filter(no_foreign_trace()))
            .init(),
        LogFormat::Json => tracing_subscriber::registry()
            .with(
                layer
                    .json()
                    .with_current_span(true)
                    .with_filter(env())
                    .with_filter(no_foreign_trace()),
            )
            .init(),
    }
}

/// The error and its causes on one line. Some errors (sqlx's) repeat their source in their own
/// message; a cause already contained in the previous one is skipped.
fn error_chain(e: &anyhow::Error) -> String {
    let mut line = String::new();
    let mut previous = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if previous.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
        previous = text;
    }
    line
}
