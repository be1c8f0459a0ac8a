//! The `loader` binary: parse the command line, set up logging, run, map the result to an exit
//! code. Errors are printed once, with their cause chain.

use std::process::ExitCode;

use clap::Parser;
use loader::app::{self, exit};
use loader::cli::Cli;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // `.env` first, so its values feed clap's `env = ...` defaults. A missing file is fine.
    if let Err(e) = dotenvy::dotenv()
        && !e.not_found()
    {
        eprintln!("error: reading .env: {e}");
        return ExitCode::from(exit::ERROR);
    }
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("warn,loader=info")),
        )
        .with_writer(std::io::stderr)
        .init();

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
