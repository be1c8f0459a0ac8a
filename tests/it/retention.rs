//! Retention (`loader purge`, `loader.purge_staged`): old raw bodies go, outcomes stay, and
//! rebuilds, rotations, redeliveries and reconcile all still hold.

use crate::support::{TestDb, fixture_messages, stage};
use time::macros::datetime;

const SENT: time::OffsetDateTime = datetime!(2020-02-29 23:59:59 UTC);

/// Staged 40 days ago: the first `old` fixture messages.
async fn age(db: &TestDb, ids: &[String]) {
    sqlx::query("update loader.raw_logins set staged_at = now() - interval '40 days' where message_id = any($1)")
        .bind(ids)
        .execute(&db.pool)
        .await
        .unwrap();
}

async fn masks(db: &TestDb, ids: &[String]) -> Vec<(String, String, i32)> {
    sqlx::query_as(
        "select message_id, masked_device_id, mask_key_id from public.user_logins
          where message_id = any($1) order by message_id",
    )
    .bind(ids)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn purge_removes_old_bodies_keeps_outcomes_and_survives_rotation() {
    let db = TestDb::migrated().await;
    let messages = fixture_messages();
    stage(&db, &messages[..60], SENT).await;
    assert_eq!(db.cli().ok(&["transform"]).trim(), "transform: loaded 59, rejected 1, pending 0");
    // 40 more, staged but not yet transformed, also old: pending rows are never purged.
    stage(&db, &messages[60..], SENT).await;
    let ids: Vec<String> = messages.iter().map(|(id, _)| id.clone()).collect();
    age(&db, &ids[..30]).await;
    age(&db, &ids[60..70]).await;

    // A dry run says what would go and what is kept, and changes nothing.
    let out = db.cli().ok(&["purge", "--older-than-days", "30", "--dry-run"]);
    assert!(
        out.contains("would purge 30 staged bodies") && out.contains("10 pending rows"),
        "{out}"
    );
    assert_eq!(
        db.count("select count(*) from loader.raw_logins where purged_at is not null").await,
        0
    );
    let out = db.cli().ok(&["purge", "--older-than-days", "30"]);
    assert_eq!(out.trim(), "purged 30 staged bodies older than 30 days");
    assert_eq!(
        db.count("select count(*) from loader.raw_logins where purged_at is not null").await,
        30
    );
    assert_eq!(
        db.count("select count(*) from loader.raw_logins where body = 'null'::jsonb").await,
        30,
        "the bodies, and the personal data in them, are gone"
    );
    assert_eq!(db.staged().await, 100, "the rows stay");
    let first: serde_json::Value = serde_json::from_str(&messages[0].1).unwrap();
    let device = first["device_id"].as_str().unwrap();
    let left: i64 = sqlx::query_scalar(
        "select count(*) from loader.raw_logins where strpos(body::text, $1) > 0",
    )
    .bind(device)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(left, 0, "no purged device id can be found in staging");

    // The pending ones load normally afterwards; a second purge has nothing more to do.
    assert_eq!(db.cli().ok(&["transform"]).trim(), "transform: loaded 40, rejected 0, pending 0");
    let out = db.cli().ok(&["purge", "--older-than-days", "30"]);
    assert_eq!(out.trim(), "purged 10 staged bodies older than 30 days");

    // Rotation re-masks what it can recompute and leaves purged outcomes as they were.
    let purged_before = masks(&db, &ids[..30]).await;
    let kept_before = masks(&db, &ids[30..60]).await;
    assert_eq!(purged_before.len(), 29, "30 purged: 29 loaded, 1 rejected");
    db.cli().ok(&["keys", "rotate"]);
    assert_eq!(masks(&db, &ids[..30]).await, purged_before);
    let kept_after = masks(&db, &ids[30..60]).await;
    assert_eq!(kept_after.len(), kept_before.len());
    assert!(kept_after.iter().zip(&kept_before).all(|(a, b)| a.1 != b.1 && a.2 != b.2));
    assert_eq!(db.rejected().await, 1, "the reject stays");

    // A redelivered copy of a purged message is still a duplicate, and every invariant holds.
    stage(&db, &messages[..5], SENT).await;
    assert_eq!(db.staged().await, 100);
    assert_eq!(
        db.count("select count(*) from loader.raw_logins where body = 'null'::jsonb").await,
        40
    );
    let report = db.cli().ok(&["reconcile", "--skip-queue"]);
    assert!(report.contains("of which bodies purged                40"), "{report}");
}

#[tokio::test]
async fn purge_refuses_a_negative_age_or_a_future_cutoff() {
    let db = TestDb::migrated().await;
    let err = sqlx::query("call loader.purge_staged(interval '-1 day')")
        .execute(&db.pool)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("non-negative"), "{err}");
    let err = sqlx::query("select loader.purge_staged_batch(now() + interval '1 hour')")
        .execute(&db.pool)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("must be a time in the past"), "{err}");
}

#[tokio::test]
async fn a_killed_or_stopped_purge_kept_its_committed_batches_and_a_rerun_finishes_it() {
    const ROWS: i64 = 100_000;
    const BATCH: i64 = 200;
    let db = TestDb::migrated().await;
    sqlx::raw_sql(&format!(
        "insert into loader.raw_logins (message_id, body, body_is_json, queue, staged_at)
         select 'p-' || g, jsonb_build_object('user_id', 'u' || g, 'device_id', 'd' || g),
                true, 'q', now() - interval '2 days'
           from generate_series(1, {ROWS}) g"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("call loader.transform()").execute(&db.pool).await.unwrap();
    let purged = "select count(*) from loader.raw_logins where purged_at is not null";

    let running =
        db.cli().spawn(&["purge", "--older-than-days", "1", "--batch-size", &BATCH.to_string()]);
    // Killed as soon as its first batches have committed.
    let mut seen = 0;
    for _ in 0..3000 {
        seen = db.count(purged).await;
        if seen >= 3 * BATCH {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    crate::support::kill_9(running);
    // The batch the server was running when its client died still ends (and commits, as
    // a statement of its own would): wait for it before counting.
    while db
        .count(
            "select count(*) from pg_stat_activity
              where datname = current_database() and state = 'active'
                and query like '%purge_staged_batch%' and pid <> pg_backend_pid()",
        )
        .await
        > 0
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let after_kill = db.count(purged).await;
    assert!(seen > 0 && after_kill < ROWS, "killed mid-way: {after_kill} of {ROWS}");
    assert_eq!(after_kill % BATCH, 0, "whole batches only, never part of one: {after_kill}");
    assert_eq!(
        db.count(
            "select count(*) from loader.raw_logins where purged_at is not null and body <> 'null'"
        )
        .await,
        0
    );

    // SIGTERM: the batch in hand commits, the purge says how far it got and exits 4.
    let running =
        db.cli().spawn(&["purge", "--older-than-days", "1", "--batch-size", &BATCH.to_string()]);
    while db.count(purged).await < after_kill + 3 * BATCH {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let out = crate::support::terminate(running);
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    let after_stop = db.count(purged).await;
    assert!(after_stop < ROWS, "stopped mid-way: {after_stop} of {ROWS}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!(
            "stopped after purging {} staged bodies older than 1 days; run again to continue",
            after_stop - after_kill
        )
    );

    let out = db.cli().ok(&["purge", "--older-than-days", "1"]);
    assert_eq!(out.trim(), format!("purged {} staged bodies older than 1 days", ROWS - after_stop));
    assert_eq!(db.count(purged).await, ROWS);
    assert_eq!(db.loaded().await, ROWS, "outcomes stay");
    db.cli().ok(&["reconcile", "--skip-queue"]);
}

/// Rows from before loader (no message_id) in an adopted table: two old, one recent, one with
/// no create_date.
async fn rows_before_loader(db: &TestDb) {
    sqlx::raw_sql(
        "insert into public.user_logins (user_id, device_type, create_date) values
             ('old-1', 'ios', '2019-05-01'), ('old-2', 'ios', '2019-05-02'),
             ('recent', 'ios', current_date), ('undated', 'ios', null)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn masked_rows_end_after_their_period_with_their_bodies_and_reconcile_accounts_for_them() {
    let db = TestDb::migrated().await;
    let messages = fixture_messages();
    let ids: Vec<String> = messages.iter().map(|(id, _)| id.clone()).collect();
    // 60 sent in 2020 (create_date 2020-02-29; one of them is the malformed one, a reject), 40
    // sent now.
    stage(&db, &messages[..60], SENT).await;
    stage(&db, &messages[60..], time::OffsetDateTime::now_utc()).await;
    rows_before_loader(&db).await;
    assert_eq!(db.cli().ok(&["transform"]).trim(), "transform: loaded 99, rejected 1, pending 0");
    let cutoff: time::Date =
        sqlx::query_scalar("select loader._masked_cutoff(12)").fetch_one(&db.pool).await.unwrap();

    let out = db.cli().ok(&["purge", "--masked-older-than-months", "12", "--dry-run"]);
    assert_eq!(
        out.trim(),
        format!(
            "dry run: would end 61 masked rows (2 of them from before loader) created before \
             {cutoff} (older than 12 months), with their staged bodies and those of rejects \
             staged before it; rows without a create_date, kept: 1\nnothing changed"
        )
    );
    assert_eq!(db.count("select count(*) from public.user_logins").await, 103);
    // The reject's body, staged two years ago, has no masked row to end with: it goes too. And a
    // run stopped on an earlier day left its cutoff unfinished: this one covers it.
    sqlx::raw_sql(
        "update loader.raw_logins set staged_at = now() - interval '2 years'
          where message_id in (select message_id from loader.login_rejects);
         insert into loader.mask_expiries (cutoff, started_at, requested_by)
         values ('2001-01-01', now(), 'someone')",
    )
    .execute(&db.pool)
    .await
    .unwrap();

    let out = db.cli().ok(&["purge", "--masked-older-than-months", "12", "--batch-size", "7"]);
    assert_eq!(
        out.trim(),
        format!(
            "ended 61 masked rows created before {cutoff} (older than 12 months), and purged 1 \
             staged bodies with no masked row (rejects)"
        )
    );
    assert_eq!(
        db.count("select count(*) from loader.mask_expiries where finished_at is null").await,
        0
    );
    let kept: Vec<(Option<String>, Option<String>)> = sqlx::query_as(
        "select message_id, user_id from public.user_logins
          where message_id is null or message_id <> all ($1) order by 2",
    )
    .bind(&ids[60..])
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(kept, [(None, Some("recent".into())), (None, Some("undated".into()))]);
    assert_eq!(
        db.count("select count(*) from public.user_logins where message_id is not null").await,
        40
    );
    // Each ended message keeps its staged row, without its body, stamped.
    assert_eq!(
        db.count(
            "select count(*) from loader.raw_logins
              where expired_at is not null and purged_at is not null and body = 'null'::jsonb"
        )
        .await,
        59
    );
    assert_eq!(db.staged().await, 100);
    assert_eq!(db.count("select count(*) from loader.login_rejects").await, 1, "rejects stay");
    assert_eq!(db.count("select count(*) from loader.raw_logins where body = 'null'").await, 60);
    let record: (time::Date, i64, i64, i64, bool, String) = sqlx::query_as(
        "select cutoff, expired, before_loader, bodies, finished_at is not null, requested_by
           from loader.mask_expiries where cutoff = loader._masked_cutoff(12)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(record, (cutoff, 59, 2, 1, true, crate::support::OWNER.to_owned()));

    // Reconcile accounts for every message: the ended ones by their stamp.
    let report = db.cli().ok(&["reconcile", "--skip-queue"]);
    assert!(report.contains("of which masks expired                59"), "{report}");
    // Status says how far back the data goes now, and the last cutoff.
    let status = db.cli().ok(&["status"]);
    assert!(
        status.contains(&format!("(retention last ended the rows created before {cutoff})"))
            && status.contains("oldest body kept: staged "),
        "{status}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&db.cli().ok(&["status", "--json"])).unwrap();
    assert_eq!(json["last_masked_cutoff"], cutoff.to_string(), "{json}");
    assert!(json["oldest_masked_create_date"].as_str().unwrap() >= cutoff.to_string().as_str());

    // A redelivery of an ended message is a duplicate: no outcome comes back.
    stage(&db, &messages[..1], SENT).await;
    assert_eq!(db.staged().await, 100);
    assert_eq!(db.cli().ok(&["transform"]).trim(), "transform: loaded 0, rejected 0, pending 0");

    // The SQL path (psql, pg_cron) under the same rule: nothing is left before the cutoff.
    let (expired,): (i64,) =
        sqlx::query_as("call loader.expire_masked(12)").fetch_one(&db.pool).await.unwrap();
    assert_eq!(expired, 0);
    // An analyst reads the record (for downstream copies), and nothing else changed.
    let analyst = crate::support::TestRole::new(&db, "loader_analyst").await;
    let ended: i64 =
        sqlx::query_scalar("select sum(expired + before_loader)::bigint from loader.mask_expiries where cutoff > '2001-01-01'")
            .fetch_one(&analyst.pool)
            .await
            .unwrap();
    assert_eq!(ended, 61);
    db.cli().ok(&["reconcile", "--skip-queue"]);

    // A period under a month, or a cutoff within the last month, is refused.
    let out = db.cli().run(&["purge", "--masked-older-than-months", "0"]);
    assert_eq!(out.status.code(), Some(2));
    let err = sqlx::query("select loader.expire_masked_batch(current_date)")
        .execute(&db.pool)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("kept at least a month"), "{err}");
}

#[tokio::test]
async fn masked_rows_ended_while_a_rotation_copies_stay_ended_after_its_swap() {
    let db = TestDb::migrated().await;
    let messages = fixture_messages();
    stage(&db, &messages[..60], SENT).await;
    stage(&db, &messages[60..], time::OffsetDateTime::now_utc()).await;
    rows_before_loader(&db).await;
    db.cli().ok(&["transform"]);
    // A rotation in ranges of 20 staged rows: the first copied before the expiry, the rest
    // after; the rows before loader were carried into the copy at its start.
    sqlx::query("select * from loader.rebuild_start(rotate => true, range_rows => 20)")
        .execute(&db.pool)
        .await
        .unwrap();
    let copied: Option<i64> =
        sqlx::query_scalar("select loader.rebuild_copy_range()").fetch_one(&db.pool).await.unwrap();
    assert_eq!(copied, Some(20), "the first range");

    let out = db.cli().ok(&["purge", "--masked-older-than-months", "12"]);
    assert!(out.starts_with("ended 61 masked rows"), "{out}");
    assert_eq!(
        db.count("select count(*) from loader_rebuild.user_logins_next where create_date < current_date - 400").await,
        0,
        "the copy lost them too"
    );
    crate::support::copy_every_range(&db).await;
    sqlx::query("select * from loader.rebuild_swap()").execute(&db.pool).await.unwrap();
    assert_eq!(
        db.count("select count(*) from public.user_logins where create_date < current_date - 400")
            .await,
        0,
        "no ended row came back with the swap"
    );
    assert_eq!(db.count("select count(*) from public.user_logins").await, 42);
    db.cli().ok(&["reconcile", "--skip-queue"]);
}

#[tokio::test]
async fn a_swap_between_two_expiry_batches_leaves_every_ended_message_stamped() {
    let db = TestDb::migrated().await;
    let messages = fixture_messages();
    stage(&db, &messages[..60], SENT).await;
    stage(&db, &messages[60..], time::OffsetDateTime::now_utc()).await;
    rows_before_loader(&db).await;
    db.cli().ok(&["transform"]);
    sqlx::raw_sql(
        "select * from loader.rebuild_start(rotate => true, range_rows => 1000);
         select loader.rebuild_copy_range();
         select loader.expire_masked_batch(loader._masked_cutoff(12), 10);
         select * from loader.rebuild_swap();",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    // What the swap left: no message without an outcome, a stamp or a body to load again.
    db.cli().ok(&["reconcile", "--skip-queue"]);
    db.cli().ok(&["purge", "--masked-older-than-months", "12"]);
    db.cli().ok(&["transform", "--rebuild"]);
    assert_eq!(
        db.count("select count(*) from public.user_logins where create_date < current_date - 400")
            .await,
        0,
        "no ended row came back with the next rebuild"
    );
    assert_eq!(
        db.count(
            "select count(*) from loader.raw_logins where expired_at is not null and body <> 'null'"
        )
        .await,
        0
    );
    db.cli().ok(&["reconcile", "--skip-queue"]);
}

#[tokio::test]
async fn an_expiry_beside_an_erasure_neither_deadlocks_nor_stops_before_the_end() {
    let db = TestDb::migrated().await;
    stage(&db, &fixture_messages(), SENT).await;
    db.cli().ok(&["transform"]);
    // The oldest rows are one person's, whom an erasure is deleting (uncommitted) when the
    // expiry's first batch picks them.
    let user: String = sqlx::query_scalar(
        "update public.user_logins set create_date = '2001-01-01'
          where user_id = (select min(user_id) from public.user_logins) returning user_id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let erasure: i64 = sqlx::query_scalar("select loader._forget_start(array[$1], 'T-1')")
        .bind(&user)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let mut forgetting = db.pool.begin().await.unwrap();
    sqlx::query("select loader._forget_batch($1, 1000)")
        .bind(erasure)
        .execute(&mut *forgetting)
        .await
        .unwrap();
    let expiring =
        db.cli().spawn(&["purge", "--masked-older-than-months", "12", "--batch-size", "1"]);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    forgetting.commit().await.unwrap();
    crate::support::wait_ok(expiring);
    assert_eq!(
        db.count("select count(*) from public.user_logins").await,
        0,
        "none left before the cutoff"
    );

    // Lock order: an expiry and an erasure's start both waiting on the maintenance lock.
    stage(&db, &fixture_messages()[..1], SENT).await;
    let mut holder = db.pool.begin().await.unwrap();
    sqlx::query("lock table loader.maintenance_lock in exclusive mode")
        .execute(&mut *holder)
        .await
        .unwrap();
    let expiring = db.cli().spawn(&["purge", "--masked-older-than-months", "12"]);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let forgetting = db.cli().spawn(&["forget", "--user-id", "someone", "--reference", "T-2"]);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    holder.commit().await.unwrap();
    crate::support::wait_ok(expiring);
    crate::support::wait_ok(forgetting);
    db.cli().ok(&["reconcile", "--skip-queue"]);
}
