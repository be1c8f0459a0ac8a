//! A TCP proxy that adds latency, so an emulator behind it answers like real SQS (10-30 ms per
//! call): `scripts/bench-ingest.sh --latency-ms N` and `scripts/bench-latency.sh` put it
//! between loader and LocalStack. A development tool, kept out of the `loader` binary:
//!
//! The proxy itself is `delay.rs`, which the integration tests compile too (`#[path]`).
//!
//! ```sh
//! cargo run --release --example latency-proxy -- --target 127.0.0.1:4566 --latency-ms 20
//! ```

mod delay;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;

/// Forwards every connection to --target, each chunk half a round trip late each way; runs
/// until SIGINT/SIGTERM.
#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on
    #[arg(long, default_value = "127.0.0.1:4577")]
    listen: SocketAddr,
    /// Where to forward, e.g. 127.0.0.1:4566
    #[arg(long)]
    target: SocketAddr,
    /// Milliseconds added to every request/response round trip (half each way)
    #[arg(long, default_value_t = 20)]
    latency_ms: u64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    eprintln!("proxy: {} -> {}, +{} ms per round trip", args.listen, args.target, args.latency_ms);
    let stop = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    delay::delay_proxy(listener, args.target, Duration::from_millis(args.latency_ms), stop).await
}
