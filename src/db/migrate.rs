//! `loader migrate`: refinery migrations over sqlx, then the `sql/` function files, in one
//! transaction.
//!
//! refinery has no sqlx driver; [`Migrator`] implements its async traits over one sqlx
//! connection, so the binary carries a single Postgres driver.

use std::time::Duration;

use anyhow::{Context, Result};
use refinery_core::Migration;
use refinery_core::traits::r#async::{AsyncMigrate, AsyncQuery, AsyncTransaction};
use sqlx::{Connection, Executor, PgConnection, PgPool, Row};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

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
    /// The tables this run moved from their unpartitioned shape to the partitioned one:
    /// `loader.raw_logins` (from before V20), `public.user_logins` (from before V27).
    pub partitioned: Vec<&'static str>,
    /// The tables left unpartitioned for now: `public.user_logins` while an online rebuild
    /// copies it whole (the next migrate after its swap or abandon moves it).
    pub not_yet_partitioned: Vec<&'static str>,
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
    let (applied, sql_files, mut evicted) = migrate_schema(pool, evict_after).await?;
    let (moved, waiting, more) = partition_tables(pool, evict_after).await?;
    evicted.extend(more);
    Ok(MigrateReport {
        applied,
        sql_files,
        evicted,
        partitioned: moved,
        not_yet_partitioned: waiting,
    })
}

/// Migrations and sql/ files, without the moves of an unpartitioned `loader.raw_logins` and
/// `public.user_logins` that [`migrate`] makes next: what a migrate killed right after them
/// leaves. Tests build the state of a deployment upgraded from before V20 (or V27) with it.
#[doc(hidden)]
pub async fn migrate_leaving_staging_unpartitioned(pool: &PgPool) -> Result<()> {
    migrate_schema(pool, evict::DEFAULT_AFTER).await.map(|_| ())
}

async fn migrate_schema(
    pool: &PgPool,
    evict_after: Duration,
) -> Result<(Vec<String>, Vec<String>, Vec<evict::Evicted>)> {
    let mut conn = pool.acquire().await.context("connecting to PostgreSQL")?;
    bootstrap(&mut conn).await?;
    let mut tx = conn.begin().await?;
    let watch = evict::Watch::start(pool, "loader migrate", evict_after);
    watch.follow(evict::backend_pid(&mut tx).await?);
    let migrated = migrate_in(&mut tx).await;
    let evicted = watch.stop().await;
    let (applied, sql_files) = migrated?;
    tx.commit().await.context("committing the migration")?;
    Ok((applied, sql_files, evicted))
}

/// A table `loader migrate` moves, once, from its unpartitioned shape to a partitioned one:
/// `loader.raw_logins` by day (V20, sql/16_partitions.sql), `public.user_logins` by month
/// (V27, sql/17_masked_partitions.sql). Each step is a function of those files.
struct Move {
    table: &'static str,
    /// The CHECK constraint (NOT VALID until validated) that proves the legacy partition's bound.
    constraint: &'static str,
    /// Pushes the cutover ahead when it came near.
    move_cutover: &'static str,
    /// The move itself; returns whether it moved the table (false: not now, the table is
    /// partitioned already or an online rebuild copies it).
    partition: &'static str,
    /// Creates the partitions ahead, on the partitioned table.
    ahead: &'static str,
    doing_ahead: &'static str,
}

const MOVES: [Move; 2] = [
    Move {
        table: "loader.raw_logins",
        constraint: "raw_logins_before_cutover",
        move_cutover: "loader._move_staging_cutover",
        partition: "loader._partition_staging",
        ahead: "loader.create_staging_days",
        doing_ahead: "creating the staging days ahead",
    },
    Move {
        table: "public.user_logins",
        constraint: "user_logins_before_cutover",
        move_cutover: "loader._move_masked_cutover",
        partition: "loader._partition_masked",
        ahead: "loader.create_masked_months",
        doing_ahead: "creating the masked months ahead",
    },
];

/// The move of each unpartitioned table of [`MOVES`] into its partitioned shape, in steps that
/// each commit, so a kill anywhere leaves a state the next migrate goes on from: the cutover
/// pushed ahead when it came near; the cutover constraint validated (a scan of the whole table,
/// under a lock no writer or reader waits on); then one short transaction under
/// [`MIGRATE_LOCK_TABLE`] that attaches the table as the legacy partition and applies the sql/
/// files again (triggers, views and grants follow the new table). On a partitioned table,
/// creates the partitions ahead. Returns which tables it moved, and which it left
/// unpartitioned for now.
async fn partition_tables(
    pool: &PgPool,
    evict_after: Duration,
) -> Result<(Vec<&'static str>, Vec<&'static str>, Vec<evict::Evicted>)> {
    let (mut moved, mut waiting, mut evicted) = (Vec::new(), Vec::new(), Vec::new());
    for step in &MOVES {
        let (done, more) = partition_table(pool, evict_after, step).await?;
        evicted.extend(more);
        match done {
            Some(true) => moved.push(step.table),
            Some(false) => waiting.push(step.table),
            None => {}
        }
    }
    Ok((moved, waiting, evicted))
}

async fn partition_table(
    pool: &PgPool,
    evict_after: Duration,
    step: &Move,
) -> Result<(Option<bool>, Vec<evict::Evicted>)> {
    let table = step.table;
    let mut conn = pool.acquire().await.context("connecting to PostgreSQL")?;
    let partitioned: bool = sqlx::query_scalar(
        "select c.relkind = 'p' from pg_catalog.pg_class c where c.oid = $1::regclass",
    )
    .bind(table)
    .persistent(false)
    .fetch_one(&mut *conn)
    .await
    .with_context(|| format!("reading the shape of {table}"))?;
    if partitioned {
        drop(conn);
        // Attaching a partition locks the default partition, which a session below the owner
        // may hold open: ended after the grace period (evict::retrying).
        let (created, evicted) = evict::retrying(
            pool,
            evict_after,
            step.doing_ahead,
            &format!("select {}()::text", step.ahead),
            None,
        )
        .await?;
        if created.is_none() {
            anyhow::bail!(
                "{}: a lock stayed held past --evict-after (a superuser's session, or the \
                 owner lacks pg_signal_backend: loader doctor)",
                step.doing_ahead
            );
        }
        return Ok((None, evicted));
    }
    let mut evicted = Vec::new();
    let watch = evict::Watch::start(pool, "loader migrate", evict_after);
    watch.follow(evict::backend_pid(&mut conn).await?);
    let validated = async {
        sqlx::raw_sql(&format!(
            "set lock_timeout = '{MIGRATE_LOCK_TIMEOUT}';
             select {}();",
            step.move_cutover
        ))
        .execute(&mut *conn)
        .await
        .with_context(|| format!("moving the cutover of {table} ahead"))?;
        let valid: bool = sqlx::query_scalar(
            "select k.convalidated from pg_catalog.pg_constraint k
              where k.conrelid = $1::regclass and k.conname = $2",
        )
        .bind(table)
        .bind(step.constraint)
        .persistent(false)
        .fetch_one(&mut *conn)
        .await
        .with_context(|| format!("reading the cutover constraint of {table}"))?;
        if !valid {
            sqlx::raw_sql(&format!("alter table {table} validate constraint {}", step.constraint))
                .execute(&mut *conn)
                .await
                .with_context(|| {
                    format!("validating that every row of {table} is before the cutover")
                })?;
        }
        sqlx::raw_sql("reset lock_timeout").execute(&mut *conn).await?;
        anyhow::Ok(())
    }
    .await;
    evicted.extend(watch.stop().await);
    validated?;

    let mut tx = conn.begin().await?;
    let watch = evict::Watch::start(pool, "loader migrate", evict_after);
    watch.follow(evict::backend_pid(&mut tx).await?);
    let moved = async {
        take_migrate_lock(&mut tx).await?;
        let moved: bool = sqlx::query_scalar(&format!("select {}()", step.partition))
            .persistent(false)
            .fetch_one(&mut *tx)
            .await
            .with_context(|| {
                format!("attaching {table} as the first partition of its new shape")
            })?;
        if moved {
            apply_sql_files(&mut tx, true).await?;
        }
        anyhow::Ok(moved)
    }
    .await;
    evicted.extend(watch.stop().await);
    let moved = moved?;
    tx.commit().await.with_context(|| format!("committing the move of {table}"))?;
    Ok((Some(moved), evicted))
}

/// [`MIGRATE_LOCK_TABLE`], for the rest of the caller's transaction: one migrate at a time.
async fn take_migrate_lock(tx: &mut PgConnection) -> Result<()> {
    sqlx::raw_sql(&format!(
        "set local lock_timeout = '{MIGRATE_LOCK_TIMEOUT}';
         lock table {MIGRATE_LOCK_TABLE} in exclusive mode"
    ))
    .execute(&mut *tx)
    .await
    .context("waiting for another `loader migrate` (lock_timeout reached)")?;
    Ok(())
}

/// The migration's work inside its transaction: pending migrations, then the changed sql/
/// files; returns the names of both.
async fn migrate_in(tx: &mut PgConnection) -> Result<(Vec<String>, Vec<String>)> {
    take_migrate_lock(tx).await?;

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

    let changed = apply_sql_files(&mut *tx, !applied.is_empty()).await?;
    Ok((applied, changed))
}

/// Applies the sql/ files that differ from what the last migrate applied, or all of them when
/// `all` (after a migration: V14, which records them, is one), and those of [`EVERY_TIME`];
/// returns the names of the changed ones.
async fn apply_sql_files(tx: &mut PgConnection, all: bool) -> Result<Vec<String>> {
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
    .bind(all)
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
    Ok(changed)
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
