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
