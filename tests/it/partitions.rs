//! `loader.raw_logins` by UTC day (sql/16_partitions.sql): the shape a migrate leaves, the day
//! partitions made ahead, and the move of a populated table from before V20, killed half-way
//! and run again.

use std::time::Duration;

use time::OffsetDateTime;

use crate::support::{self, TestDb};

/// 'p' once partitioned, 'r' before.
async fn relkind(db: &TestDb) -> String {
    sqlx::query_scalar(
        "select relkind::text from pg_class where oid = 'loader.raw_logins'::regclass",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

/// The partitions of raw_logins, by name.
async fn partitions(db: &TestDb) -> Vec<String> {
    sqlx::query_scalar(
        "select c.relname::text from pg_inherits i join pg_class c on c.oid = i.inhrelid
          where i.inhparent = 'loader.raw_logins'::regclass order by 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

/// The name of the partition of the UTC day `days` from today.
async fn day_partition(db: &TestDb, days: i32) -> String {
    sqlx::query_scalar(
        "select 'raw_logins_p' || to_char((now() at time zone 'UTC')::date + $1, 'YYYYMMDD')",
    )
    .bind(days)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

/// Stages messages as a run of its own; returns how many were new.
async fn stage_new(db: &TestDb, messages: &[(String, String)]) -> u64 {
    let run = loader::staging::IngestRun::register(&db.pool, "direct", "drain").await.unwrap();
    let raw: Vec<loader::staging::RawMessage> = messages
        .iter()
        .map(|(id, body)| loader::staging::RawMessage {
            message_id: id.clone(),
            body: body.clone(),
            sent_at: Some(OffsetDateTime::now_utc()),
            receive_count: Some(1),
        })
        .collect();
    let mut conn = db.pool.acquire().await.unwrap();
    loader::staging::stage(&mut conn, &run, &raw).await.unwrap().outcome.staged
}

#[tokio::test]
async fn a_new_database_stages_into_day_partitions_made_ahead() {
    let db = TestDb::migrated().await;
    assert_eq!(relkind(&db).await, "p");
    let today = day_partition(&db, 0).await;
    let parts = partitions(&db).await;
    for name in ["raw_logins_default", "raw_logins_legacy", today.as_str()] {
        assert!(parts.iter().any(|p| p == name), "{name} missing from {parts:?}");
    }
    // Today and 14 days ahead (staging_days_ahead's default).
    assert_eq!(parts.iter().filter(|p| p.starts_with("raw_logins_p")).count(), 15, "{parts:?}");
    assert!(parts.contains(&day_partition(&db, 14).await));

    let messages = support::fixture_messages();
    assert_eq!(stage_new(&db, &messages).await, 100);
    let in_today: i64 = sqlx::query_scalar(&format!("select count(*) from loader.{today}"))
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(in_today, 100, "today's rows are in today's partition");
    assert_eq!(db.count("select count(*) from loader.staged_ids").await, 100);
    // A redelivery stages nothing, whichever partition its first copy is in.
    assert_eq!(stage_new(&db, &messages[..10]).await, 0);
    assert_eq!(db.staged().await, 100);
    db.cli().ok(&["transform"]);
    assert_eq!((db.loaded().await, db.rejected().await, db.pending().await), (99, 1, 0));

    // More days on demand; those that exist are left alone.
    let created: i32 = sqlx::query_scalar("select loader.create_staging_days(20)")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(created, 6);
    let created: i32 = sqlx::query_scalar("select loader.create_staging_days(20)")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(created, 0);

    // A row of a day no partition exists for lands in the default partition (staging never
    // fails for a missing day), and that day is then skipped, not failed.
    sqlx::raw_sql(
        "insert into loader.raw_logins (message_id, body, body_is_json, queue, staged_at)
         values ('far-ahead', '{}', true, 'direct', now() + interval '40 days')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    assert_eq!(db.count("select count(*) from loader.raw_logins_default").await, 1);
    let created: i32 = sqlx::query_scalar("select loader.create_staging_days(45)")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(created, 24, "every day from 21 to 45 ahead but the 40th");
    assert!(!partitions(&db).await.contains(&day_partition(&db, 40).await));
}

/// Waits until a session of this database waits on a lock running a statement like `like`.
async fn wait_for_lock_wait(db: &TestDb, like: &str) {
    for _ in 0..300 {
        let waiting: bool = sqlx::query_scalar(
            "select exists (select from pg_stat_activity
                             where datname = current_database() and wait_event_type = 'Lock'
                               and query ilike $1)",
        )
        .bind(like)
        .fetch_one(&db.admin)
        .await
        .unwrap();
        if waiting {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no session waited on a lock running {like}");
}

#[tokio::test]
async fn a_populated_table_from_before_v20_moves_to_day_partitions_killed_half_way_and_run_again() {
    let db = TestDb::empty().await;
    loader::db::migrate_leaving_staging_unpartitioned(&db.pool).await.unwrap();
    assert_eq!(relkind(&db).await, "r");

    // Rows in every state: loaded, rejected, erased, purged, pending, refused.
    let messages = support::fixture_messages();
    assert_eq!(stage_new(&db, &messages[..80]).await, 80);
    db.cli().ok(&["transform"]);
    let person: String = sqlx::query_scalar(
        "select body ->> 'user_id' from loader.raw_logins where message_id = 'fixture-5'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    db.cli().ok(&["forget", "--user-id", &person, "--reference", "DSR-V20"]);
    db.cli().ok(&["purge", "--older-than-days", "0"]);
    assert_eq!(stage_new(&db, &messages[80..]).await, 20);
    sqlx::raw_sql("alter table loader.raw_logins add constraint test_refuses check (message_id <> 'refused-1')")
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(stage_new(&db, &[("refused-1".into(), "{}".into())]).await, 0);
    sqlx::raw_sql("alter table loader.raw_logins drop constraint test_refuses")
        .execute(&db.pool)
        .await
        .unwrap();
    // The version before wrote no ids: the legacy rows' own unique index is their idempotency.
    sqlx::raw_sql("truncate loader.staged_ids").execute(&db.pool).await.unwrap();
    let states = "select count(*), count(*) filter (where purged_at is not null),
                         count(*) filter (where erased_at is not null), max(id)
                    from loader.raw_logins";
    let before: (i64, i64, i64, i64) = sqlx::query_as(states).fetch_one(&db.pool).await.unwrap();
    let (loaded, rejected, pending) = (db.loaded().await, db.rejected().await, db.pending().await);
    assert_eq!(before.0, 100);
    assert!(before.1 > 0 && before.2 > 0 && pending == 20, "{before:?} {pending}");
    assert_eq!(db.count("select count(*) from loader.refusals").await, 1);

    // Killed while it waits for the table (a DBA's session holds it against the comments of the
    // migration's transaction and the validation of the cutover, which take the same lock).
    let mut blocker = db.admin.begin().await.unwrap();
    sqlx::raw_sql("lock table loader.raw_logins in share update exclusive mode")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let running = db.cli().spawn(&["migrate"]);
    wait_for_lock_wait(&db, "%").await;
    support::kill_9(running);
    blocker.rollback().await.unwrap();
    assert_eq!(relkind(&db).await, "r");

    // Killed while waiting to move it (a reader holds it open).
    let mut blocker = db.admin.begin().await.unwrap();
    sqlx::raw_sql("select from loader.raw_logins limit 1").execute(&mut *blocker).await.unwrap();
    let running = db.cli().spawn(&["migrate"]);
    wait_for_lock_wait(&db, "%_partition_staging%").await;
    support::kill_9(running);
    blocker.rollback().await.unwrap();
    assert_eq!(relkind(&db).await, "r");

    // The same command again finishes it.
    let out = db.cli().ok(&["migrate"]);
    assert!(out.contains("raw_logins is now partitioned"), "{out}");
    assert_eq!(relkind(&db).await, "p");
    let after: (i64, i64, i64, i64) = sqlx::query_as(states).fetch_one(&db.pool).await.unwrap();
    assert_eq!(after, before, "no row moved, none lost");
    assert_eq!(db.count("select count(*) from loader.raw_logins_legacy").await, 100);
    assert_eq!(
        (db.loaded().await, db.rejected().await, db.pending().await),
        (loaded, rejected, pending)
    );
    db.cli().ok(&["reconcile", "--skip-queue"]);
    let again = db.cli().ok(&["migrate"]);
    assert!(!again.contains("now partitioned"), "{again}");

    // A redelivery of a message staged before the move is a duplicate; a new one is staged,
    // with an id after every old one, in the partition of its time (the legacy one until the
    // cutover, at least a day ahead: no staging waited for the move).
    assert_eq!(stage_new(&db, &messages[..10]).await, 0);
    assert_eq!(stage_new(&db, &[("after-the-move".into(), messages[1].1.clone())]).await, 1);
    let (id, home): (i64, String) = sqlx::query_as(
        "select id, tableoid::regclass::text from loader.raw_logins where message_id = 'after-the-move'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(id > before.3, "{id} after {}", before.3);
    let cutover_ahead: bool =
        sqlx::query_scalar("select cutover > now() from loader.staging_layout")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(cutover_ahead);
    assert_eq!(home, "loader.raw_logins_legacy");
    db.cli().ok(&["transform"]);
    assert_eq!(db.pending().await, 0);
    assert_eq!(db.loaded().await, loaded + 20 + 1);
    db.cli().ok(&["reconcile", "--skip-queue"]);
    // The day partitions start at the cutover.
    let first_day: String = sqlx::query_scalar(
        "select 'raw_logins_p' || to_char(cutover at time zone 'UTC', 'YYYYMMDD') from loader.staging_layout",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(partitions(&db).await.contains(&first_day));
}
