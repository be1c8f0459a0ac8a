//! The private pg_cron cluster `scripts/postgres.sh cron` starts (pg_cron preloaded, jobs in
//! database loader_cron), set up as pg_cron's documentation says for an owner that is not a
//! superuser: `loader_cron_owner` owns the database and has `usage on schema cron`, nothing
//! more. Its schedule is one per database: one test at a time holds it.

use sqlx::Connection;

use super::{Cli, required_env, url_as};

/// The owner role `scripts/postgres.sh cron` creates in the pg_cron cluster.
pub const CRON_OWNER: &str = "loader_cron_owner";

/// loader's database in the pg_cron cluster, migrated by [`CRON_OWNER`], held by this test
/// until dropped.
pub struct CronDb {
    /// The cluster's superuser, in database loader_cron (the DBA's part).
    pub admin_url: String,
    pub admin: sqlx::PgPool,
    /// Logs in as [`CRON_OWNER`].
    pub url: String,
    /// A session holding the advisory lock; dropping it closes the session, which frees it.
    _lock: sqlx::PgConnection,
}

impl CronDb {
    /// Waits for the other tests using the cluster, then migrates it as the owner, with no loader
    /// job scheduled (a schema another role migrated, from an older run, is dropped first: it is
    /// not the owner's).
    pub async fn take() -> Self {
        let admin_url = required_env("LOADER_CRON_DATABASE_URL");
        let mut lock = sqlx::PgConnection::connect(&admin_url).await.unwrap();
        sqlx::query("select pg_advisory_lock(7263)").execute(&mut lock).await.unwrap();
        let admin = sqlx::PgPool::connect(&admin_url).await.unwrap();
        let owner_is_superuser: bool =
            sqlx::query_scalar("select rolsuper from pg_roles where rolname = $1")
                .bind(CRON_OWNER)
                .fetch_one(&admin)
                .await
                .unwrap();
        assert!(!owner_is_superuser, "the owner in the pg_cron cluster must not be a superuser");
        sqlx::raw_sql(&format!(
            "do $$ begin
                 if exists (select from pg_namespace where nspname = 'loader'
                             and nspowner <> '{CRON_OWNER}'::regrole) then
                     drop schema loader cascade;
                     drop schema if exists loader_rebuild cascade;
                 end if;
                 if exists (select from pg_class where oid = to_regclass('public.user_logins')
                             and relowner <> '{CRON_OWNER}'::regrole) then
                     drop table public.user_logins;
                 end if;
             end $$"
        ))
        .execute(&admin)
        .await
        .unwrap();
        // And no job of an earlier test left scheduled.
        sqlx::query("select cron.unschedule(jobid) from cron.job where jobname like 'loader-%'")
            .execute(&admin)
            .await
            .unwrap();
        let url = url_as(&admin_url, CRON_OWNER);
        Cli::new(&url, "unused").ok(&["migrate"]);
        Self { admin_url, admin, url, _lock: lock }
    }

    /// The `loader` binary as the owner.
    pub fn cli(&self) -> Cli {
        Cli::new(&self.url, "unused")
    }
}
