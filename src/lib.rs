//! `loader` moves user-login events from AWS SQS into PostgreSQL, with personal data masked.
//!
//! Messages are staged raw first (`loader ingest`: receive, stage, commit, then delete), and
//! turned into the analysts' table by SQL functions inside Postgres (`loader transform`), so
//! nothing is lost between the queue and the database and the masking can be rerun in psql.
//!
//! # Layout
//! Layers, top to bottom; a module imports only from layers below its own (the library never
//! names the argument parser or the command line, which live in `src/bin/loader/`).
//!
//! - **binaries** (`src/bin/`): `loader` (argument parsing, dispatch, printing, exit codes) and
//!   `loader-lambda` (feature `lambda`).
//! - **compositions** of the work below:
//!   - [`pipeline`], `loader run`: ingest and transform together, graceful shutdown;
//!   - `lambda` (feature `lambda`): the AWS Lambda handler: SQS events staged with
//!     [`staging`], schedules running [`transform`];
//!   - [`bench`](mod@bench): the queue's ceiling, and staging alone with [`send`]'s generator.
//! - **work**:
//!   - [`ingest`]: receivers, the writer that stages and deletes flushes, and the unit of work
//!     [`ingest::Ingestor::process`]; the queue's gauges for `--metrics-addr`
//!     ([`ingest::publish_queue_counts`]);
//!   - [`transform`]: the SQL transform of `sql/` in parallel sessions;
//!   - [`rebuild`]: online rebuild and key rotation (parallel copy, then one swap);
//!   - [`retention`]: purging old raw bodies in committed batches;
//!   - [`forget`]: erasing a person on request (`loader forget`);
//!   - [`reveal`]: the audited recovery of raw values (`loader reveal`);
//!   - [`reconcile`]: counts per stage and the invariants (exit 3 on a gap); where each
//!     refused message is now, with [`dlq`];
//!   - [`status`]: the pipeline at a glance (`loader status`);
//!   - [`dlq`]: the dead-letter queue listed with the recorded refusals, and redriven;
//!   - [`doctor`]: whether a deployment is set up right, one finding per check;
//!   - [`privileges`]: the documented privileges of each role, and a role's as the database
//!     has them;
//!   - [`schedule`]: the transform and the purge as pg_cron jobs;
//!   - [`keys`]: masking keys: list, rotate, install (bytes never leave Postgres);
//!   - [`send`]: publishing fixture files or synthetic events.
//! - **adapters**: [`db`] (the pool, and `loader migrate`), [`evict`] (owner work ends the
//!   sessions of lesser roles that hold it up), [`sqs`] (the queue, the client, SDK errors,
//!   doctor's probes, message move tasks), [`metrics`] (the Prometheus names and HELP texts,
//!   `--metrics-addr`).
//! - **leaves**: [`config`] (resolved settings), [`counts`] (what the work reports),
//!   [`staging`] (the one write path into `loader.raw_logins`), [`retry`] (transient versus
//!   permanent errors, backoff), [`logging`] (format and filters: no foreign crate logs at
//!   TRACE, the AWS SDK logs message bodies there), [`progress`] (the terminal line while
//!   draining), [`display`] (how timestamps and errors are shown), [`shutdown`] (the one owner of "has
//!   shutdown begun").

pub mod bench;
pub mod config;
pub mod counts;
pub mod db;
pub mod display;
pub mod dlq;
pub mod doctor;
pub mod evict;
pub mod forget;
pub mod ingest;
pub mod keys;
#[cfg(feature = "lambda")]
pub mod lambda;
pub mod logging;
pub mod metrics;
pub mod pipeline;
pub mod privileges;
pub mod progress;
pub mod rebuild;
pub mod reconcile;
pub mod retention;
pub mod retry;
pub mod reveal;
pub mod schedule;
pub mod send;
pub mod shutdown;
pub mod sqs;
pub mod staging;
pub mod status;
pub mod transform;
