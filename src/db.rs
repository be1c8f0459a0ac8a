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
use sqlx::{ConnectOptions, Connection, Executor, PgConnection, PgPool, Row};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::config::DatabaseUrl;
use crate::retry::sqlstate;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// The `sql/` files, in name order, embedded at build time (see build.rs).
const SQL_FILES: &[(&str, &str)] = include!(concat!(env!("OUT_DIR"), "/sql_files.rs"));

/// Where refinery records applied migrations.
const HISTORY_TABLE: &str = "loader.refinery_schema_history";

/// An owner-only table whose lock serialises concurrent `loader migrate` runs (refinery takes
/// no lock of its own). A table, not an advisory lock: any role that can connect may take any
/// advisory lock key, and so could stall migrations; locking a table needs privileges on it.
const MIGRATE_LOCK_TABLE: &str = "loader.migrate_lock";

/// How long `loader migrate` waits for a lock (another migrate, or a DDL statement waiting on
/// a long-running reader) before failing with a clear error instead of queueing every reader
/// behind it.
const MIGRATE_LOCK_TIMEOUT: &str = "60s";

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

/// Connection options: the URL, named `loader` in `pg_stat_activity`. sqlx's slow-statement
/// warning is lowered to debug: `call loader.transform()` on a backlog, a rebuild or a purge
/// run for seconds by design, and their durations are in the metrics and the summary lines.
fn options(url: &DatabaseUrl) -> Result<PgConnectOptions> {
    Ok(PgConnectOptions::from_str(url.expose())
        .context("DATABASE_URL is not a valid PostgreSQL URL")?
        .application_name("loader")
        .log_slow_statements(log::LevelFilter::Debug, Duration::from_secs(1)))
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

/// Applies pending migrations, then every `sql/` file (create-or-replace, grants last), all in
/// ONE transaction under [`MIGRATE_LOCK_TABLE`]. One transaction is part of the security model:
/// a function is never visible to other sessions before its privileges are locked down, so no
/// role can call a private function, or wire one into a trigger of its own, while a migrate
/// runs. Idempotent.
///
/// Roles and the schema's first objects are created `if not exists`: two first migrates at once
/// (of one database, or of two sharing the cluster-wide roles) may both create one; the loser
/// fails on the catalog's unique index and is tried once more.
pub async fn migrate(pool: &PgPool) -> Result<MigrateReport> {
    match migrate_once(pool).await {
        Err(e) if e.chain().any(|c| c.downcast_ref::<sqlx::Error>().is_some_and(is_duplicate)) => {
            migrate_once(pool).await
        }
        result => result,
    }
}

async fn migrate_once(pool: &PgPool) -> Result<MigrateReport> {
    let mut conn = pool.acquire().await.context("connecting to PostgreSQL")?;
    bootstrap(&mut conn).await?;
    let mut tx = conn.begin().await?;
    sqlx::raw_sql(&format!(
        "set local lock_timeout = '{MIGRATE_LOCK_TIMEOUT}';
         lock table {MIGRATE_LOCK_TABLE} in exclusive mode"
    ))
    .execute(&mut *tx)
    .await
    .context("waiting for another `loader migrate` (lock_timeout reached)")?;

    let mut runner = embedded::migrations::runner();
    runner.set_migration_table_name(HISTORY_TABLE);
    // Grouped: refinery calls Migrator::execute once, with every pending migration; inside
    // this transaction that is a savepoint.
    let report = runner
        .set_grouped(true)
        .run_async(&mut Migrator(&mut tx))
        .await
        .context("applying migrations")?;
    let applied = report.applied_migrations().iter().map(ToString::to_string).collect();

    let mut sql_files = Vec::new();
    for (name, sql) in SQL_FILES {
        sqlx::raw_sql(sql)
            .execute(&mut *tx)
            .await
            .with_context(|| format!("applying sql/{name}"))?;
        sql_files.push((*name).to_owned());
    }
    sqlx::query(
        "insert into loader.sql_applied (sql_md5, loader_version) values (md5($1), $2)
         on conflict (singleton) do update
            set sql_md5 = excluded.sql_md5, loader_version = excluded.loader_version,
                applied_at = now()",
    )
    .bind(all_sql())
    .bind(env!("CARGO_PKG_VERSION"))
    .execute(&mut *tx)
    .await
    .context("recording the sql/ files applied")?;
    tx.commit().await.context("committing the migration")?;
    Ok(MigrateReport { applied, sql_files })
}

/// Creates schema `loader` (refinery's history table lives there) and the migrate lock table,
/// each owner-only. Two first migrates at once may both try to create them: the loser's error
/// is a duplicate, which [`migrate`] answers with a second try that finds them.
async fn bootstrap(conn: &mut PgConnection) -> Result<()> {
    let sql = format!(
        "create schema if not exists loader;
         create table if not exists {MIGRATE_LOCK_TABLE} ();
         comment on table {MIGRATE_LOCK_TABLE} is
             'Locked by loader migrate for its whole transaction (owner only)';"
    );
    sqlx::raw_sql(&sql).execute(&mut *conn).await.context("creating schema loader")?;
    Ok(())
}

/// Every sql/ file this binary carries, concatenated in order (what `loader.sql_applied`
/// fingerprints).
fn all_sql() -> String {
    SQL_FILES.iter().map(|(_, sql)| *sql).collect()
}

/// How the database's schema compares with this binary's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaState {
    /// The newest migration applied (None: never migrated).
    pub applied: Option<i64>,
    /// The newest migration this binary carries.
    pub latest: i64,
    /// True when the sql/ files the last migrate applied are this binary's.
    pub sql_current: bool,
}

/// Reads [`SchemaState`] (the owner can; other roles cannot read the history).
pub async fn schema_state(pool: &PgPool) -> Result<SchemaState> {
    let latest = embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| i64::from(m.version()))
        .max()
        .unwrap_or(0);
    let migrated: bool =
        sqlx::query_scalar(&format!("select to_regclass('{HISTORY_TABLE}') is not null"))
            .fetch_one(pool)
            .await?;
    if !migrated {
        return Ok(SchemaState { applied: None, latest, sql_current: false });
    }
    let applied: Option<i64> =
        sqlx::query_scalar(&format!("select max(version)::bigint from {HISTORY_TABLE}"))
            .fetch_one(pool)
            .await
            .context("reading the migration history")?;
    let sql_current: bool = sqlx::query_scalar(
        "select coalesce((select sql_md5 = md5($1) from loader.sql_applied
                           where to_regclass('loader.sql_applied') is not null), false)",
    )
    .bind(all_sql())
    .fetch_one(pool)
    .await
    .unwrap_or(false);
    Ok(SchemaState { applied, latest, sql_current })
}

/// A concurrent `create ... if not exists` lost the race: 23505 on the catalog's unique index,
/// or 42P06/42P07 (duplicate schema or table).
fn is_duplicate(e: &sqlx::Error) -> bool {
    matches!(sqlstate(e).as_deref(), Some("23505" | "42P06" | "42P07"))
}

/// refinery's async driver traits over one sqlx connection (inside migrate's transaction).
struct Migrator<'c>(&'c mut PgConnection);

impl AsyncTransaction for Migrator<'_> {
    type Error = sqlx::Error;

    async fn execute<'a, T: Iterator<Item = &'a str> + Send + 'a>(
        &mut self,
        queries: T,
    ) -> Result<usize, Self::Error> {
        // A savepoint inside migrate's transaction: nothing commits until the sql/ files and
        // their grants are applied too.
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
