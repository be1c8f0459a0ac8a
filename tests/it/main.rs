//! The integration tests: one binary (the AWS SDK and sqlx link once), one module per
//! feature, against the real PostgreSQL and LocalStack that `scripts/test.sh` starts. Every
//! test makes its own database and queue ([`support`]), so they run in parallel.

mod boundary;
mod cli;
mod dlq;
mod docs;
mod doctor;
mod envelopes;
mod erasure;
mod examples;
mod faults;
mod fifo;
mod ingest;
#[cfg(feature = "lambda")]
mod lambda;
mod months;
mod observability;
mod partitions;
mod pooler;
mod rebuild;
mod reconcile;
mod retention;
mod run;
mod schedule;
mod security;
mod support;
mod transform;
