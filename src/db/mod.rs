//! PostgreSQL: the connection pool, transactions that pass a pooler, and what a database
//! error is about; `loader migrate` in [`migrate`](mod@migrate).

mod migrate;

use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

pub use migrate::{
    MigrateReport, SchemaState, migrate, migrate_evicting, migrate_leaving_staging_unpartitioned,
    schema_state,
};

use crate::config::DatabaseUrl;
use crate::retry::sqlstate;

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
                let refused = sqlstate(&e).is_some_and(|c| c.starts_with("28"))
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
