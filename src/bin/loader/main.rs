//! The `loader` binary: parse the command line, set up logging, run, map the result to an exit
//! code. Errors are printed once, with their cause chain.

use std::process::ExitCode;

use clap::Parser;

mod cli;
mod commands;
mod manual;
mod render;

use cli::Cli;
use commands::exit;

fn main() -> ExitCode {
    quiet_when_the_reader_goes();
    // `.env` first, so its values feed clap's `env = ...` defaults. A missing file is fine.
    if let Err(e) = dotenvy::dotenv()
        && !e.not_found()
    {
        eprintln!("error: reading .env: {e}");
        return ExitCode::from(exit::ERROR);
    }
    let cli = Cli::parse();
    loader::logging::init(cli.global.log_format);

    // One thread: loader waits on the network almost all the time, and on two cores the
    // multi-threaded scheduler cost ~25% more CPU per message for no throughput (docs/benchmarks.md).
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::from(exit::ERROR);
        }
    };
    match runtime.block_on(commands::dispatch(cli)) {
        Ok(code) => code,
        Err(e) if e.chain().any(is_broken_pipe) => ExitCode::from(exit::READER_GONE),
        Err(e) => {
            eprintln!("error: {}", loader::display::error_line(&e));
            ExitCode::from(exit::ERROR)
        }
    }
}

/// `loader doctor --json | head`: a reader that stops reading ends loader quietly, with the
/// exit code a Unix tool killed by SIGPIPE has (Rust ignores SIGPIPE, so a write to the closed
/// pipe fails instead, and `println!` panics on it: this hook turns that panic into the exit).
fn quiet_when_the_reader_goes() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.contains("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(i32::from(exit::READER_GONE));
        }
        default(info);
    }));
}

fn is_broken_pipe(cause: &(dyn std::error::Error + 'static)) -> bool {
    cause
        .downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}
