//! `loader schedule` on a real pg_cron ([`CronDb`]): staged rows get loaded by the database
//! itself, with no loader process running.

use std::time::Duration;

use crate::support::{CronDb, unique_name};

#[tokio::test]
async fn pg_cron_transforms_staged_rows_with_no_loader_process() {
    let cron = CronDb::take().await;
    let (admin, url) = (&cron.admin, cron.url.clone());
    let pool = sqlx::PgPool::connect(&url).await.unwrap();

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

    let installed = cron.cli().ok(&[
        "schedule",
        "install",
        "--purge-older-than-days",
        "30",
        "--masked-older-than-months",
        "13",
        "--keep-history-days",
        "3",
    ]);
    for expected in [
        "loader-transform: '* * * * *' as loader_cron_owner: call loader.transform()",
        "loader-purge: '30 3 * * *' as loader_cron_owner: call loader.purge_staged(interval '30 days')",
        "loader-expire-masked: '30 3 * * *' as loader_cron_owner: call loader.expire_masked(13)",
        "loader-prune-cron-history: '0 4 * * *'",
        "interval '3 days'",
    ] {
        assert!(installed.contains(expected), "{expected}: {installed}");
    }
    // A schedule in seconds on pg_cron before 1.5 (Debian 12 ships 1.4) is refused by loader,
    // naming the version it needs, and changes nothing.
    let out = cron.cli().run(&["schedule", "install", "--transform-every", "10 seconds"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let version: String =
        sqlx::query_scalar("select extversion from pg_extension where extname = 'pg_cron'")
            .fetch_one(admin)
            .await
            .unwrap();
    if version.starts_with("1.4") {
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("need pg_cron 1.5 or later"), "{stderr}");
    }
    // Installing again replaces, never duplicates.
    cron.cli().ok(&["schedule", "install"]);
    let jobs: Vec<String> =
        sqlx::query_scalar("select jobname from cron.job where jobname like 'loader-%' order by 1")
            .fetch_all(admin)
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
    let listed = cron.cli().ok(&["schedule", "list"]);
    assert!(
        listed.contains("loader-transform") && listed.contains("last run: succeeded"),
        "{listed}"
    );

    assert_eq!(cron.cli().ok(&["schedule", "remove"]).trim(), "removed 2 loader jobs from pg_cron");
    assert!(cron.cli().ok(&["schedule", "list"]).contains("no loader jobs"));
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
