//! `public.user_logins` by month of create_date (V27, sql/17_masked_partitions.sql): a
//! rotation copies the months that may hold a row it re-masks and leaves the others as they
//! are; a populated table from before V27 moves to that shape, killed half-way and run again.

use crate::partitions::{past_days, stage_new, staged_on_day, wait_for_lock_wait};
use crate::support::{self, TestDb, TestRole};

/// Every partition of `public.user_logins` with its oid (a partition a swap replaced has a new one).
async fn masked_partitions(db: &TestDb) -> Vec<(String, i64)> {
    sqlx::query_as("select rel::text, rel::oid::bigint from loader._masked_partitions()")
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

/// The partitions holding the rows whose message_id is like `like`, with their oids.
async fn homes(db: &TestDb, like: &str) -> Vec<(String, i64)> {
    sqlx::query_as(
        "select distinct tableoid::regclass::text, tableoid::bigint from public.user_logins
          where message_id like $1 order by 1",
    )
    .bind(like)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

async fn relkind(db: &TestDb) -> String {
    sqlx::query_scalar(
        "select relkind::text from pg_class where oid = 'public.user_logins'::regclass",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

/// A deployment half a year old: rows of 150 and 100 days ago (their days dropped by retention,
/// their bodies gone), of 10 days ago and today (bodies kept), and one staged today that SQS
/// received 120 days ago (from before staging bounded SentTimestamp: its row is in an old month
/// but can be re-masked). The rotation copies the months from the one of the oldest body kept,
/// less sent_at_max_age_days (28), on: the old months stay the same tables, untouched, with the
/// rows they hold on the older key, but for the one row re-masked there, which the swap puts in
/// place of its old one. A month made while it copies gets its copy too.
#[tokio::test]
async fn a_rotation_copies_only_the_months_it_can_re_mask_and_leaves_the_others_as_they_are() {
    let db = TestDb::migrated().await;
    assert_eq!(relkind(&db).await, "p");
    sqlx::query(
        "select loader._add_masked_month('public.user_logins', 'loader', 'user_logins_m' || to_char(m, 'YYYYMM'), m)
           from generate_series(date_trunc('month', now() at time zone 'UTC') - interval '6 months',
                                date_trunc('month', now() at time zone 'UTC'), interval '1 month') g,
                lateral (select g::date as m) x
          where to_regclass('loader.user_logins_m' || to_char(m, 'YYYYMM')) is null",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    for (prefix, rows, days) in
        [("old-a", 200, -150), ("old-b", 100, -100), ("new-a", 100, -10), ("new-b", 100, 0)]
    {
        if days < 0 {
            past_days(&db, days, days).await;
        }
        staged_on_day(&db, prefix, rows, days, 0).await;
    }
    sqlx::query(
        "insert into loader.raw_logins (message_id, body, body_is_json, queue, staged_at, sent_at)
         values ('stray-1', '{\"user_id\": \"s\", \"ip\": \"10.9.9.9\", \"device_id\": \"d\"}', true, 'q',
                 now(), now() - interval '120 days')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("call loader.transform()").execute(&db.pool).await.unwrap();
    assert_eq!(db.loaded().await, 501);
    db.cli().ok(&["purge", "--older-than-days", "30"]);
    assert_eq!(db.count("select count(*) from loader.staged_days").await, 2);
    let old_homes = [homes(&db, "old-%").await, homes(&db, "stray-%").await].concat();
    let new_homes = homes(&db, "new-%").await;
    assert!(old_homes.len() >= 3 && !new_homes.is_empty(), "{old_homes:?} {new_homes:?}");
    let before = masked_partitions(&db).await;

    // An analyst login's idle session with a temporary view and a temporary table of the row
    // type of this month's partition (any login may make them): they follow the partition the
    // swap retires and go with it, holding up nothing.
    let analyst = TestRole::new(&db, "loader_analyst").await;
    let mut idle = analyst.pool.acquire().await.unwrap();
    let this_month = new_homes.last().unwrap().0.clone();
    sqlx::raw_sql(&format!(
        "create temp view mine as select * from {this_month};
         create temp table also_mine (x {this_month})"
    ))
    .execute(&mut *idle)
    .await
    .unwrap();

    // Started, a month made ahead while it copies, then run to the end.
    sqlx::query("select * from loader.rebuild_start(rotate => true)")
        .execute(&db.pool)
        .await
        .unwrap();
    assert!(db.count("select loader.create_masked_months(6)::bigint").await >= 1);
    let out = db.cli().ok(&["keys", "rotate"]);
    assert!(
        out.contains("month partitions before") && out.contains("they keep their older key"),
        "{out}"
    );
    let left = db
        .count(
            "select count(*) from loader._masked_partitions() p
              where p.hi <= (select copy_from from loader.rebuilds order by id desc limit 1)",
        )
        .await;
    assert!(left >= 3, "{left}");
    assert!(out.contains(&format!("left the {left} month partitions before")), "{out}");
    assert!(
        !out.lines().any(|l| l.starts_with("kept ")),
        "no row of a copied month was past retention: {out}"
    );

    let after = masked_partitions(&db).await;
    for home in &old_homes {
        assert!(after.contains(home), "{home:?} is the same table after the swap: {after:?}");
    }
    for (name, oid) in &new_homes {
        assert!(
            after.iter().any(|(n, o)| n == name && o != oid),
            "{name} was replaced by its copy: {after:?}"
        );
    }
    let ahead: String = sqlx::query_scalar(
        "select 'loader.user_logins_m' || to_char(now() at time zone 'UTC' + interval '6 months', 'YYYYMM')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(after.iter().any(|(n, _)| *n == ahead), "{ahead} made while copying: {after:?}");
    assert!(before.len() < after.len());
    assert_eq!(
        db.count(
            "select count(*) from pg_class where relnamespace = 'loader_rebuild'::regnamespace
                   and relname !~ '_retired_r[0-9]+$'"
        )
        .await,
        0,
        "no copy left behind"
    );

    assert_eq!(
        db.count("select (select count(*) from pg_class where relname = 'mine')
                       + (select count(*) from pg_attribute a join pg_class t on t.oid = a.attrelid
                           where t.relname = 'also_mine' and a.attname = 'x' and not a.attisdropped)")
            .await,
        0,
        "the temporary objects went with the retired partition"
    );
    drop(idle);
    assert_eq!(db.loaded().await, 501, "nothing lost or doubled");
    assert_eq!(db.off_the_active_key().await, 300, "the old months' rows keep their key");
    assert_eq!(
        db.count(
            "select count(*) from public.user_logins where message_id like 'old-%'
                   and mask_key_id <> (select id from loader.mask_keys where retired_at is null)"
        )
        .await,
        300
    );
    assert_eq!(homes(&db, "stray-%").await, old_homes[old_homes.len() - 1..].to_vec());
    assert_eq!(
        db.count(
            "select count(*) from public.user_logins where message_id = 'stray-1'
                   and mask_key_id = (select id from loader.mask_keys where retired_at is null)"
        )
        .await,
        1,
        "the row of an old month with its body kept is re-masked, in its old month"
    );
    db.cli().ok(&["reconcile", "--skip-queue"]);
}

/// An adopted `user_logins` with rows from before loader (one without a create_date), loader's
/// rows, and a deployment's own grant to a BI login. A rotation copying when migrate runs keeps
/// the table as it is until its swap. A permanent view on the table stops the move, named. Killed
/// while it waits for the table, the same command again moves it: every row stays where it was
/// (the legacy partition, now the DEFAULT one), the BI login still reads it all, and a rotation
/// right after copies the legacy partition (it holds the kept bodies) and keeps the rows from
/// before loader.
#[tokio::test]
async fn a_populated_user_logins_moves_to_month_partitions_killed_half_way_and_run_again() {
    let db = TestDb::empty().await;
    support::adopted_user_logins(
        &db,
        "('before-1', 'ios', 'm', 'd', 'FR', 20300, '2020-01-01'),
         ('before-2', 'ios', 'm', 'd', 'FR', 20300, null)",
    )
    .await;
    loader::db::migrate_leaving_staging_unpartitioned(&db.pool).await.unwrap();
    assert_eq!(relkind(&db).await, "r");
    let messages = support::fixture_messages();
    assert_eq!(stage_new(&db, &messages[..60]).await, 60);
    db.cli().ok(&["transform"]);
    let total = db.count("select count(*) from public.user_logins").await;
    assert_eq!(
        db.count("select count(*) from public.user_logins where message_id is null").await,
        2
    );
    let bi = TestRole::new(&db, "").await;
    sqlx::raw_sql(&format!("grant select on public.user_logins to {}", bi.name))
        .execute(&db.pool)
        .await
        .unwrap();

    // A rotation copying: the table stays as it is, said, and the rotation finishes.
    sqlx::query("select * from loader.rebuild_start(rotate => true)")
        .execute(&db.pool)
        .await
        .unwrap();
    let out = db.cli().ok(&["migrate"]);
    assert!(out.contains("stays unpartitioned while an online rebuild copies it"), "{out}");
    assert_eq!(relkind(&db).await, "r");
    db.cli().ok(&["keys", "rotate"]);
    assert_eq!(db.off_the_active_key().await, 2, "the rows from before loader");
    // A rotation started before V27 made its copy without the cutover constraint, and its swap
    // put that copy in place: migrate marks the cutover again.
    sqlx::raw_sql("alter table public.user_logins drop constraint user_logins_before_cutover")
        .execute(&db.pool)
        .await
        .unwrap();

    // A permanent view on it stops the move, named.
    sqlx::raw_sql("create view public.bi_logins as select user_id from public.user_logins")
        .execute(&db.pool)
        .await
        .unwrap();
    let failed = db.cli().run(&["migrate"]);
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("bi_logins"), "{stderr}");
    sqlx::raw_sql("drop view public.bi_logins").execute(&db.pool).await.unwrap();
    assert_eq!(relkind(&db).await, "r");

    // Killed while waiting to move it (a reader holds it open).
    let mut blocker = db.admin.begin().await.unwrap();
    sqlx::raw_sql("select from public.user_logins limit 1").execute(&mut *blocker).await.unwrap();
    let running = db.cli().spawn(&["migrate"]);
    wait_for_lock_wait(&db, "%_partition_masked%").await;
    support::kill_9(running);
    blocker.rollback().await.unwrap();
    assert_eq!(relkind(&db).await, "r");

    // A rotation starting while the move waits for a reader (found by the attack on V27: the
    // start saw the old shape, then copied the new, empty parent, and its swap put a table
    // without partitions or a single index in place): the start waits for the move, and
    // copies the new shape.
    let mut blocker = db.admin.begin().await.unwrap();
    sqlx::raw_sql("select from public.user_logins limit 1").execute(&mut *blocker).await.unwrap();
    let running = db.cli().spawn(&["migrate"]);
    wait_for_lock_wait(&db, "%_partition_masked%").await;
    let pool = db.pool.clone();
    let starting = tokio::spawn(async move {
        sqlx::query("select * from loader.rebuild_start(rotate => true)").execute(&pool).await
    });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    blocker.rollback().await.unwrap();
    let out = support::wait_ok(running);
    starting.await.unwrap().unwrap();
    assert!(out.contains("user_logins is now partitioned by month"), "{out}");
    assert_eq!(relkind(&db).await, "p");
    db.cli().ok(&["keys", "rotate"]);
    assert_eq!(relkind(&db).await, "p");
    assert_eq!(
        db.count("select count(*) from pg_index where indrelid = 'loader.user_logins_legacy'::regclass and indisunique")
            .await,
        1,
        "the legacy partition's copy has its unique index"
    );
    assert_eq!(db.count("select count(*) from loader.user_logins_legacy").await, total);
    let read: i64 = sqlx::query_scalar("select count(*) from public.user_logins")
        .fetch_one(&bi.pool)
        .await
        .unwrap();
    assert_eq!(read, total, "the BI login's grant followed the table");
    let again = db.cli().ok(&["migrate"]);
    assert!(!again.contains("now partitioned"), "{again}");
    // Its months start at the cutover: doctor expects none before.
    let (_, failed) = crate::doctor::problems(&db.url, "no-such-queue", &[]);
    assert!(!failed.contains_key("masked months"), "{failed:?}");

    // A row of a month past the months made (nobody ran the daily job for months) is refused by
    // the legacy partition: the transform stops, and says what to do without quoting the row
    // (PostgreSQL's DETAIL would give a transformer login its user id, masks and network).
    sqlx::query(
        "insert into loader.raw_logins (message_id, body, body_is_json, queue, staged_at, sent_at)
         select 'late-1', '{\"user_id\": \"zz-secret\", \"ip\": \"10.7.7.7\"}', true, 'q', t, t
           from (select (cutover + 70)::timestamp at time zone 'UTC' as t from loader.masked_layout) x",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let transformer = TestRole::new(&db, "loader_transformer").await;
    let err = sqlx::query("select * from loader.transform_batch(100)")
        .execute(&transformer.pool)
        .await
        .expect_err("no partition for the row's month");
    let said = format!("{err:?}");
    assert!(said.contains("create_masked_months") && !said.contains("zz-secret"), "{said}");
    assert_eq!(db.pending().await, 1);
    db.count("select loader.create_masked_months(6)::bigint").await;
    db.cli().ok(&["transform"]);
    assert_eq!(db.pending().await, 0);
    assert_eq!(
        homes(&db, "late-1")
            .await
            .iter()
            .map(|(n, _)| n.starts_with("loader.user_logins_m"))
            .collect::<Vec<_>>(),
        [true]
    );

    // New rows go to the legacy partition until the cutover (at least a month ahead).
    assert_eq!(stage_new(&db, &messages[60..70]).await, 10);
    db.cli().ok(&["transform"]);
    assert_eq!(
        homes(&db, "fixture-6_").await.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["loader.user_logins_legacy"]
    );
    let legacy = masked_partitions(&db).await[0].clone();
    assert_eq!(legacy.0, "loader.user_logins_legacy");

    // A rotation now copies the legacy partition (it holds every kept body), rows from before
    // loader included, and swaps it in as the DEFAULT partition.
    db.cli().ok(&["keys", "rotate"]);
    let swapped = masked_partitions(&db).await[0].clone();
    assert_eq!(swapped.0, "loader.user_logins_legacy");
    assert_ne!(swapped.1, legacy.1, "the legacy partition was copied");
    assert_eq!(db.count("select count(*) from public.user_logins").await, total + 10 + 1);
    assert_eq!(
        db.count("select count(*) from public.user_logins where user_id like 'before-%'").await,
        2
    );
    assert_eq!(db.off_the_active_key().await, 2);
    let read: i64 = sqlx::query_scalar("select count(*) from public.user_logins")
        .fetch_one(&bi.pool)
        .await
        .unwrap();
    assert_eq!(read, total + 10 + 1);
    db.cli().ok(&["reconcile", "--skip-queue"]);
}

/// The daily job (pg_cron's `call loader.purge_staged(...)`) has no watch: an analyst's
/// transaction left open on `user_logins` holds the legacy partition, beside which each month
/// is attached, so it kept the months ahead from being made, day after day (found by the attack
/// on V27; after an upgrade the transform then stops). A session of loader's lesser roles that
/// has held it past evict_after_seconds is ended, and the month made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daily_job_ends_a_reader_that_holds_the_months_ahead_up() {
    let db = TestDb::migrated().await;
    sqlx::raw_sql(
        "update loader.settings set value = '1' where name = 'evict_after_seconds';
         do $$ begin
             execute format('drop table loader.user_logins_m%s',
                            to_char(date_trunc('month', now() at time zone 'UTC') + interval '2 months', 'YYYYMM'));
         end $$",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let before = masked_partitions(&db).await.len();
    let analyst = TestRole::new(&db, "loader_analyst").await;
    let mut reader = analyst.pool.begin().await.unwrap();
    sqlx::query("select count(*) from public.user_logins").execute(&mut *reader).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;

    sqlx::raw_sql("call loader.purge_staged('30 days')").execute(&db.pool).await.unwrap();
    assert_eq!(masked_partitions(&db).await.len(), before + 1, "the month ahead was made");
    let ended: i64 = sqlx::query_scalar("select count(*) from loader.evictions where role = $1")
        .bind(&analyst.name)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(ended, 1, "the reader's session was ended");
    assert!(reader.commit().await.is_err(), "its transaction is gone");
}
