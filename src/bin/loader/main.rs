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
        Err(e) => {
            eprintln!("error: {}", loader::display::error_line(&e));
            ExitCode::from(exit::ERROR)
        }
    }
}
