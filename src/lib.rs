//! `loader` moves user-login events from AWS SQS into PostgreSQL, with personal data masked.
//!
//! Messages are staged raw first (`loader ingest`: receive, stage, commit, then delete), and
//! turned into the analysts' table by SQL functions inside Postgres (`loader transform`), so
//! nothing is lost between the queue and the database and the masking can be rerun in psql.
//!
//! # Layout
//! - [`cli`]: the command line (clap); every option has an environment variable.
//! - [`config`]: settings resolved once from the command line.
//! - [`sqs`]: the queue adapter: receive, delete, send, attributes.
//! - [`staging`]: raw messages into `loader.raw_logins`, one statement per flush.
//! - [`ingest`]: receivers, the writer that stages and deletes flushes, and the unit of work
//!   [`ingest::Ingestor::process`].
//! - [`send`]: publishing fixture files or synthetic events.
//! - [`transform`]: `loader transform`, one call into the SQL functions of `sql/`.
//! - [`retry`]: transient versus permanent errors, backoff, state-change logging.
//! - [`run`]: `loader run`: ingest and transform together, graceful shutdown.
//! - [`reconcile`]: counts per stage and the invariants (`loader reconcile`, exit 3 on a gap).
//! - [`keys`]: masking keys: list, rotate, install (bytes never leave Postgres).
//! - [`db`]: the Postgres pool and `loader migrate` (`migrations/`, then `sql/`).
//! - [`metrics`]: the Prometheus metrics and their names (`--metrics-addr`).
//! - [`progress`]: the progress line while draining on a terminal.
//! - [`display`]: how timestamps are shown.
//! - [`bench`]: `loader bench`: the queue's ceiling and staging alone.
//! - [`app`]: one function per subcommand, returning the process exit code.
//! - [`logging`]: log format and filters (no foreign crate logs at TRACE: the AWS SDK logs
//!   message bodies there).
//! - `lambda` (cargo feature `lambda`): the AWS Lambda handler behind the `loader-lambda`
//!   binary: SQS events staged with [`staging`], partial batch responses.

pub mod app;
pub mod bench;
pub mod cli;
pub mod config;
pub mod db;
pub mod display;
pub mod ingest;
pub mod keys;
#[cfg(feature = "lambda")]
pub mod lambda;
pub mod logging;
pub mod metrics;
pub mod progress;
pub mod reconcile;
pub mod retry;
pub mod run;
pub mod send;
pub mod sqs;
pub mod staging;
pub mod transform;
