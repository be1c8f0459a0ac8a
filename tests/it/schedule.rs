//! `loader schedule` on a real pg_cron: the private cluster `scripts/postgres.sh cron` starts
//! (pg_cron in shared_preload_libraries, jobs in database loader_cron), set up as pg_cron's own
//! documentation says for an owner that is not a superuser: `loader_cron_owner` owns the
//! database and has `usage on schema cron`, nothing more. Staged rows get loaded by the
//! database itself, with no loader process running.

use std::time::Duration;

use crate::support::{required_env, unique_name, url_as};

/// The owner role `scripts/postgres.sh cron` creates in the pg_cron cluster.
const CRON_OWNER: &str = "loader_cron_owner";

#[tokio::test]
async fn pg_cron_transforms_staged_rows_with_no_loader_process() {
    let admin_url = required_env("LOADER_CRON_DATABASE_URL");
    let admin = sqlx::PgPool::connect(&admin_url).await.unwrap();
    // One test at a time owns this database's schedule: the others wait for the lock.
    let mut lock = admin.acquire().await.unwrap();
    sqlx::query("select pg_advisory_lock(7263)").execute(&mut *lock).await.unwrap();
    let owner_is_superuser: bool =
        sqlx::query_scalar("select rolsuper from pg_roles where rolname = $1")
            .bind(CRON_OWNER)
            .fetch_one(&admin)
            .await
            .unwrap();
    assert!(!owner_is_superuser, "the test must run as an owner that is not a superuser");
    // A schema left by a migrate of another role (an older run of this test) is not the
    // owner's to migrate: start it afresh.
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
    let url = url_as(&admin_url, CRON_OWNER);
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    crate::support::Cli::new(&url, "unused").ok(&["migrate"]);

    let prefix = unique_name("cron");
    sqlx::raw_sql(&format!(
        "insert into loader.raw_logins (message_id, body, body_is_json, queue)
         select '{prefix}-' || g,
                jsonb_build_object('user_id', 'u' || g, 'device_id', 'd' || g, 'ip', '10.1.2.' || g),
                true, 'cron'
           from generate_series(1, 30) g;
         insert into loader.raw_logins (message_id, body, body_is_json, queue)
         values ('{prefix}-bad', '{{\"no\": \"user\"}}', true, 'cron')"
    ))
    .execute(&pool)
    .await
    .unwrap();

    let installed = crate::support::Cli::new(&url, "unused").ok(&[
        "schedule",
        "install",
        "--purge-older-than-days",
        "30",
        "--keep-history-days",
        "3",
    ]);
    for expected in [
        "loader-transform: '* * * * *' as loader_cron_owner: call loader.transform()",
        "loader-purge: '30 3 * * *' as loader_cron_owner: call loader.purge_staged(interval '30 days')",
        "loader-prune-cron-history: '0 4 * * *'",
        "interval '3 days'",
    ] {
        assert!(installed.contains(expected), "{expected}: {installed}");
    }
    // A schedule in seconds on pg_cron before 1.5 (Debian 12 ships 1.4) is refused by loader,
    // naming the version it needs, and changes nothing.
    let out = crate::support::Cli::new(&url, "unused").run(&[
        "schedule",
        "install",
        "--transform-every",
        "10 seconds",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let version: String =
        sqlx::query_scalar("select extversion from pg_extension where extname = 'pg_cron'")
            .fetch_one(&admin)
            .await
            .unwrap();
    if version.starts_with("1.4") {
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("need pg_cron 1.5 or later"), "{stderr}");
    }
    // Installing again replaces, never duplicates.
    crate::support::Cli::new(&url, "unused").ok(&["schedule", "install"]);
    let jobs: Vec<String> =
        sqlx::query_scalar("select jobname from cron.job where jobname like 'loader-%' order by 1")
            .fetch_all(&admin)
            .await
            .unwrap();
    assert_eq!(jobs, ["loader-prune-cron-history", "loader-transform"]);

    // pg_cron runs the transform at the next minute: every row gets its outcome.
    let like = format!("{prefix}-%");
    let mut outcomes = 0;
    for _ in 0..150 {
        outcomes = sqlx::query_scalar::<_, i64>(
            "select (select count(*) from public.user_logins where message_id like $1)
                  + (select count(*) from loader.login_rejects where message_id like $1)",
        )
        .bind(&like)
        .fetch_one(&pool)
        .await
        .unwrap();
        if outcomes == 31 {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(outcomes, 31, "pg_cron loaded 30 and rejected 1 within 150 s");
    let listed = crate::support::Cli::new(&url, "unused").ok(&["schedule", "list"]);
    assert!(
        listed.contains("loader-transform") && listed.contains("last run: succeeded"),
        "{listed}"
    );

    assert_eq!(
        crate::support::Cli::new(&url, "unused").ok(&["schedule", "remove"]).trim(),
        "removed 2 loader jobs from pg_cron"
    );
    assert!(
        crate::support::Cli::new(&url, "unused")
            .ok(&["schedule", "list"])
            .contains("no loader jobs")
    );
    sqlx::query("select pg_advisory_unlock(7263)").execute(&mut *lock).await.unwrap();
}

#[tokio::test]
async fn schedule_explains_the_setup_where_pg_cron_is_missing() {
    let db = crate::support::TestDb::migrated().await;
    let out = db.cli().run(&["schedule", "list"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("pg_cron is not installed") && stderr.contains("shared_preload_libraries"),
        "{stderr}"
    );
}
