//! PostgreSQL: the connection pool, and `loader migrate` (refinery migrations over sqlx, then
//! the `sql/` function files).
//!
//! refinery has no sqlx driver; [`Migrator`] implements its async traits over one sqlx
//! connection, so the binary carries a single Postgres driver.

use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result};
use refinery_core::Migration;
use refinery_core::traits::r#async::{AsyncMigrate, AsyncQuery, AsyncTransaction};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, Executor, PgConnection, PgPool, Row};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::config::DatabaseUrl;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// The `sql/` files, in name order, embedded at build time (see build.rs).
const SQL_FILES: &[(&str, &str)] = include!(concat!(env!("OUT_DIR"), "/sql_files.rs"));

/// Where refinery records applied migrations.
const HISTORY_TABLE: &str = "loader.refinery_schema_history";

/// Serialises concurrent `loader migrate` runs (refinery takes no lock of its own).
const MIGRATE_LOCK: i64 = 0x6c6f_6164_6572_0001;

/// Opens a small pool. Fails within seconds, with one clear line, when the database is
/// unreachable or the URL is wrong: one connection is opened up front so its own error (refused,
/// bad password, no such database) is what the user sees, not a pool timeout.
pub async fn connect(url: &DatabaseUrl, max_connections: u32) -> Result<PgPool> {
    let options = options(url)?;
    let first = tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&options))
        .await
        .map_err(|_| anyhow::anyhow!("timed out after {CONNECT_TIMEOUT:?}"))
        .and_then(|r| r.map_err(anyhow::Error::from))
        .context("connecting to PostgreSQL")?;
    first.close().await.ok();
    pool(url, max_connections)
}

/// A pool that connects on first use; fails only on a malformed URL.
pub fn pool(url: &DatabaseUrl, max_connections: u32) -> Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect_lazy_with(options(url)?))
}

fn options(url: &DatabaseUrl) -> Result<PgConnectOptions> {
    Ok(PgConnectOptions::from_str(url.expose())
        .context("DATABASE_URL is not a valid PostgreSQL URL")?
        .application_name("loader"))
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What `loader migrate` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateReport {
    /// Names of the migrations applied by this run (empty when already up to date).
    pub applied: Vec<String>,
    /// Names of the `sql/` files (re)applied.
    pub sql_files: Vec<String>,
}

/// Applies pending migrations in one transaction, then every `sql/` file (each in its own
/// transaction; they are create-or-replace), all under an advisory lock. Idempotent.
pub async fn migrate(pool: &PgPool) -> Result<MigrateReport> {
    let mut conn = pool.acquire().await.context("connecting to PostgreSQL")?;
    sqlx::query("select pg_advisory_lock($1)").bind(MIGRATE_LOCK).execute(&mut *conn).await?;
    let result = migrate_locked(&mut conn).await;
    // Unlock even after a failure: the connection goes back to the pool.
    sqlx::query("select pg_advisory_unlock($1)").bind(MIGRATE_LOCK).execute(&mut *conn).await?;
    result
}

async fn migrate_locked(conn: &mut PgConnection) -> Result<MigrateReport> {
    // refinery's history table lives in schema loader, which must exist before V1 runs.
    sqlx::query("create schema if not exists loader").execute(&mut *conn).await?;
    let mut runner = embedded::migrations::runner();
    runner.set_migration_table_name(HISTORY_TABLE);
    let report = runner
        .set_grouped(true)
        .run_async(&mut Migrator(conn))
        .await
        .context("applying migrations")?;
    let applied = report.applied_migrations().iter().map(ToString::to_string).collect();

    let mut sql_files = Vec::new();
    for (name, sql) in SQL_FILES {
        let mut tx = conn.begin().await?;
        sqlx::raw_sql(sql)
            .execute(&mut *tx)
            .await
            .with_context(|| format!("applying sql/{name}"))?;
        tx.commit().await?;
        sql_files.push((*name).to_owned());
    }
    Ok(MigrateReport { applied, sql_files })
}

/// refinery's async driver traits over one sqlx connection.
struct Migrator<'c>(&'c mut PgConnection);

impl AsyncTransaction for Migrator<'_> {
    type Error = sqlx::Error;

    async fn execute<'a, T: Iterator<Item = &'a str> + Send + 'a>(
        &mut self,
        queries: T,
    ) -> Result<usize, Self::Error> {
        let mut tx = self.0.begin().await?;
        let mut count = 0;
        for query in queries {
            // Migration files hold many statements: a query without arguments goes over the
            // simple query protocol, which allows that. They come from the binary itself.
            tx.execute(query).await?;
            count += 1;
        }
        tx.commit().await?;
        Ok(count)
    }
}

impl AsyncQuery<Vec<Migration>> for Migrator<'_> {
    async fn query(&mut self, query: &str) -> Result<Vec<Migration>, Self::Error> {
        let rows = sqlx::query(query).fetch_all(&mut *self.0).await?;
        rows.iter()
            .map(|row| {
                let decode = |e: Box<dyn std::error::Error + Send + Sync>| sqlx::Error::Decode(e);
                let applied_on: String = row.try_get(2)?;
                let checksum: String = row.try_get(3)?;
                Ok(Migration::applied(
                    row.try_get(0)?,
                    row.try_get(1)?,
                    OffsetDateTime::parse(&applied_on, &Rfc3339).map_err(|e| decode(e.into()))?,
                    checksum.parse::<u64>().map_err(|e| decode(e.into()))?,
                ))
            })
            .collect()
    }
}

impl AsyncMigrate for Migrator<'_> {}
