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
use crate::evict;
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

/// How long `loader migrate` waits for a lock before failing with a clear error: another
/// migrate (owner work, waited for), or a session of a lesser role, which [`evict`] ends after
/// the grace period long before this.
const MIGRATE_LOCK_TIMEOUT: &str = "60s";

/// The sql/ files applied by every migrate, changed or not: the comments (a dropped and
/// recreated function loses its own) and the privileges, which converge to that file every time
/// (a grant made by hand goes; a replaced function gets its pinned settings back). Neither
/// waits on a reader: GRANT, REVOKE, COMMENT and ALTER FUNCTION take no lock that a SELECT or
/// a running function holds.
const EVERY_TIME: &[&str] = &["80_comments.sql", "90_privileges.sql"];

/// What a database error is about, for a message or an error type that names its cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The login lacks a privilege (42501).
    Permission,
    /// loader's schema, a table or a function does not exist (3F000, 42P01, 42883).
    NotMigrated,
    /// The server is shutting down or the connection failed (class 08, 57P0x).
    ShuttingDown,
    /// No connection could be had (I/O, pool timeout or closed).
    Unreachable,
    Other,
}

impl Cause {
    /// The cause of `e`.
    pub fn of(e: &sqlx::Error) -> Self {
        match sqlstate(e).as_deref() {
            Some("42501") => Cause::Permission,
            Some("3F000" | "42P01" | "42883") => Cause::NotMigrated,
            Some(code) if code.starts_with("08") || code.starts_with("57P0") => Cause::ShuttingDown,
            None if matches!(
                e,
                sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed
            ) =>
            {
                Cause::Unreachable
            }
            _ => Cause::Other,
        }
    }

    /// The cause of the first database error in `e`'s chain, if it has one.
    pub fn in_chain(e: &anyhow::Error) -> Option<Self> {
        e.chain().find_map(|c| c.downcast_ref::<sqlx::Error>()).map(Self::of)
    }
}

/// `result` with a context that names the cause of a database error while `doing`: a missing
/// privilege names the role the login needs (`role`), a schema, table or function that does
/// not exist says to migrate, an unreachable server says so; anything else names what was being
/// done. (One cause each: an outage is never blamed on migrations.)
pub fn explained<T>(result: Result<T, sqlx::Error>, doing: &str, role: &str) -> Result<T> {
    result.map_err(|e| {
        let why = match Cause::of(&e) {
            Cause::Permission => format!(
                "{doing}: this login lacks a privilege: it needs {role} (docs/security.md \"Duties\")"
            ),
            Cause::NotMigrated => format!(
                "{doing}: the database lacks loader's schema or functions: run `loader migrate` \
                 as the owner role"
            ),
            Cause::ShuttingDown => format!("{doing}: PostgreSQL is unreachable or shutting down"),
            Cause::Unreachable => format!("{doing}: PostgreSQL is unreachable"),
            Cause::Other => doing.to_owned(),
        };
        anyhow::Error::new(e).context(why)
    })
}

/// Opens a small pool. Fails within seconds, with one clear line, when the database is
/// unreachable or the URL is wrong: one connection is opened up front so its own error (refused,
/// bad password, no such database) is what the user sees, not a pool timeout.
pub async fn connect(url: &DatabaseUrl, max_connections: u32) -> Result<PgPool> {
    let options = options(url)?;
    let first = tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&options))
        .await
        .map_err(|_| anyhow::anyhow!("timed out after {CONNECT_TIMEOUT:?}"))
        .and_then(|r| {
            r.map_err(|e| {
                // The login refused, by the server (class 28) or by a pooler in front of it
                // (PgBouncer says so with 08P01).
                let refused = crate::retry::sqlstate(&e).is_some_and(|c| c.starts_with("28"))
                    || e.to_string().contains("authentication failed");
                let e = anyhow::Error::from(e);
                if refused {
                    e.context(
                        "the login was refused: check the user and password in DATABASE_URL \
                         (through PgBouncer or RDS Proxy, the user must also be in its auth_file \
                         or secrets)",
                    )
                } else {
                    e
                }
            })
        })
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

/// Connection options: the URL, named `loader` in `pg_stat_activity`, and nothing that would
/// outlive a transaction, so a pooler in transaction mode (PgBouncer, RDS Proxy) may hand each
/// transaction to another server session: no statement cache (sqlx would keep named prepared
/// statements on the server session, and a second client of that session would collide with
/// `sqlx_s_1`), and no `extra_float_digits` startup parameter, which PgBouncer refuses (loader
/// reads no float as text). Every statement that binds parameters runs inside a transaction
/// ([`transaction`]): sqlx parses it and binds it in two exchanges, which a transaction keeps on
/// one server session. sqlx's slow-statement warning is lowered to debug: `call
/// loader.transform()` on a backlog, a rebuild or a purge run for seconds by design, and their
/// durations are in the metrics and the summary lines.
fn options(url: &DatabaseUrl) -> Result<PgConnectOptions> {
    Ok(PgConnectOptions::from_str(url.expose())
        .context("DATABASE_URL is not a valid PostgreSQL URL")?
        .application_name("loader")
        .statement_cache_capacity(0)
        .extra_float_digits(None)
        .log_slow_statements(log::LevelFilter::Debug, Duration::from_secs(1)))
}

/// Runs `work` in a transaction of its own and commits it: how every statement that binds
/// parameters reaches the database outside a transaction the caller began (see [`options`]:
/// behind a pooler in transaction mode, the parse and the bind of a statement must reach one
/// server session).
pub async fn transaction<T, E>(
    pool: &PgPool,
    work: impl AsyncFnOnce(&mut PgConnection) -> Result<T, E>,
) -> Result<T, E>
where
    E: From<sqlx::Error>,
{
    let mut tx = pool.begin().await?;
    let value = work(&mut tx).await?;
    tx.commit().await?;
    Ok(value)
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What `loader migrate` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateReport {
    /// Names of the migrations applied by this run (empty when already up to date).
    pub applied: Vec<String>,
    /// Names of the `sql/` files that changed since the last migrate (all of them after a
    /// migration), and so were applied; empty when none did. The comments and privileges are
    /// applied every time ([`EVERY_TIME`]).
    pub sql_files: Vec<String>,
    /// Sessions of other roles ended because they held up the migration ([`evict`]).
    pub evicted: Vec<evict::Evicted>,
}

/// Applies pending migrations, then the `sql/` files that changed (create-or-replace, grants
/// last), all in ONE transaction under [`MIGRATE_LOCK_TABLE`]. One transaction is part of the
/// security model: a function is never visible to other sessions before its privileges are
/// locked down, so no role can call a private function, or wire one into a trigger of its own,
/// while a migrate runs. Idempotent; a migrate with nothing to change replaces nothing, so it
/// takes no lock that a reader holds. A session of another role that holds up a lock it needs
/// for longer than `evict_after` is ended ([`evict`]).
///
/// Roles and the schema's first objects are created `if not exists`: two first migrates at once
/// (of one database, or of two sharing the cluster-wide roles) may both create one; the loser
/// fails on the catalog's unique index and is tried once more.
pub async fn migrate_evicting(pool: &PgPool, evict_after: Duration) -> Result<MigrateReport> {
    match migrate_once(pool, evict_after).await {
        Err(e) if e.chain().any(|c| c.downcast_ref::<sqlx::Error>().is_some_and(is_duplicate)) => {
            migrate_once(pool, evict_after).await
        }
        result => result,
    }
}

/// [`migrate_evicting`] with the default grace period ([`evict::DEFAULT_AFTER`]).
pub async fn migrate(pool: &PgPool) -> Result<MigrateReport> {
    migrate_evicting(pool, evict::DEFAULT_AFTER).await
}

async fn migrate_once(pool: &PgPool, evict_after: Duration) -> Result<MigrateReport> {
    let mut conn = pool.acquire().await.context("connecting to PostgreSQL")?;
    bootstrap(&mut conn).await?;
    let mut tx = conn.begin().await?;
    let watch = evict::Watch::start(pool, "loader migrate", evict_after);
    watch.follow(evict::backend_pid(&mut tx).await?);
    let migrated = migrate_in(&mut tx).await;
    let evicted = watch.stop().await;
    let (applied, sql_files) = migrated?;
    tx.commit().await.context("committing the migration")?;
    Ok(MigrateReport { applied, sql_files, evicted })
}

/// The migration's work inside its transaction: pending migrations, then the changed sql/
/// files; returns the names of both.
async fn migrate_in(tx: &mut PgConnection) -> Result<(Vec<String>, Vec<String>)> {
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
        .run_async(&mut Migrator(&mut *tx))
        .await
        .context("applying migrations")?;
    let applied: Vec<String> =
        report.applied_migrations().iter().map(ToString::to_string).collect();

    // The sql/ files that differ from what the last migrate applied (all of them after a
    // migration: V14, which records them, is one).
    let names: Vec<&str> = SQL_FILES.iter().map(|(name, _)| *name).collect();
    let texts: Vec<&str> = SQL_FILES.iter().map(|(_, sql)| *sql).collect();
    let changed: Vec<String> = sqlx::query_scalar(
        "select f.name from unnest($1::text[], $2::text[]) f (name, sql)
          where $3
             or not exists (select from loader.sql_files s
                             where s.name = f.name and s.md5 = md5(f.sql))",
    )
    .bind(&names)
    .bind(&texts)
    .bind(!applied.is_empty())
    .persistent(false)
    .fetch_all(&mut *tx)
    .await
    .context("comparing the sql/ files with those applied")?;
    for (name, sql) in SQL_FILES {
        if !(changed.iter().any(|c| c == name) || EVERY_TIME.contains(name)) {
            continue;
        }
        sqlx::raw_sql(sql)
            .execute(&mut *tx)
            .await
            .with_context(|| format!("applying sql/{name}"))?;
        sqlx::query(
            "insert into loader.sql_files (name, md5) values ($1, md5($2))
             on conflict (name) do update set md5 = excluded.md5, applied_at = now()",
        )
        .bind(name)
        .bind(sql)
        .persistent(false)
        .execute(&mut *tx)
        .await
        .context("recording the sql/ file applied")?;
    }
    if !changed.is_empty() {
        sqlx::query("delete from loader.sql_files where name <> all ($1)")
            .bind(&names)
            .persistent(false)
            .execute(&mut *tx)
            .await
            .context("forgetting sql/ files this loader no longer has")?;
    }
    Ok((applied, changed))
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
    // One read-only transaction (see `options`), rolled back at the end.
    let mut tx = pool.begin().await?;
    let migrated: bool =
        sqlx::query_scalar(&format!("select to_regclass('{HISTORY_TABLE}') is not null"))
            .persistent(false)
            .fetch_one(&mut *tx)
            .await?;
    if !migrated {
        return Ok(SchemaState { applied: None, latest, sql_current: false });
    }
    let applied: Option<i64> =
        sqlx::query_scalar(&format!("select max(version)::bigint from {HISTORY_TABLE}"))
            .persistent(false)
            .fetch_one(&mut *tx)
            .await
            .context("reading the migration history")?;
    // Every sql/ file this binary carries, as the last migrate applied it.
    let sql_current: bool = sqlx::query_scalar(
        "select coalesce(bool_and(exists (select from loader.sql_files s
                                           where s.name = f.name and s.md5 = md5(f.sql))), false)
           from unnest($1::text[], $2::text[]) f (name, sql)
          where to_regclass('loader.sql_files') is not null",
    )
    .bind(SQL_FILES.iter().map(|(name, _)| *name).collect::<Vec<_>>())
    .bind(SQL_FILES.iter().map(|(_, sql)| *sql).collect::<Vec<_>>())
    .persistent(false)
    .fetch_one(&mut *tx)
    .await
    .unwrap_or(false);
    tx.rollback().await?;
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
        let rows = sqlx::query(query).persistent(false).fetch_all(&mut *self.0).await?;
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
