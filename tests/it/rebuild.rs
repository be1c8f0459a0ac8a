//! Online rebuild and key rotation (`sql/35_rebuild.sql`, `loader keys rotate`, `loader
//! transform --rebuild`): the transform goes on while the copies fill, readers never see two
//! keys, and a killed rotation resumes where it stopped.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use crate::support::{TestDb, kill_9};

/// `rows` staged logins (one in a hundred a reject), transformed.
async fn transformed(db: &TestDb, rows: i64) {
    sqlx::raw_sql(&format!(
        "insert into loader.raw_logins (message_id, body, body_is_json, queue)
         select 'r-' || g,
                case when g % 100 = 0 then '[]'::jsonb
                     else jsonb_build_object('user_id', 'u' || g, 'ip', '10.1.' || (g % 250) || '.7',
                                             'device_id', 'd' || g) end,
                true, 'q'
           from generate_series(1, {rows}) g"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("call loader.transform()").execute(&db.pool).await.unwrap();
}

/// Starts a rotation with small ranges, as `loader keys rotate` would with its own; the command
/// then resumes it.
async fn start_rotation(db: &TestDb, range_rows: i32) -> i64 {
    sqlx::query_scalar("select ranges from loader.rebuild_start(rotate => true, range_rows => $1)")
        .bind(range_rows)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

async fn key_ids(db: &TestDb) -> Vec<i32> {
    sqlx::query_scalar(
        "select distinct mask_key_id from public.user_logins where message_id is not null order by 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

async fn active_key(db: &TestDb) -> i32 {
    sqlx::query_scalar("select id from loader.mask_key_info where active")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn the_transform_goes_on_during_a_rotation_and_readers_never_see_two_keys() {
    let db = TestDb::migrated().await;
    transformed(&db, 20_000).await;
    let old = active_key(&db).await;
    assert_eq!(start_rotation(&db, 100).await, 200);

    // A reader polling all along: each query sees one key id.
    let (stop, most, reads) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicI64::new(0)),
        Arc::new(AtomicI64::new(0)),
    );
    let reader = tokio::spawn({
        let (pool, stop, most, reads) =
            (db.pool.clone(), stop.clone(), most.clone(), reads.clone());
        async move {
            while !stop.load(Ordering::Relaxed) {
                let keys: i64 = sqlx::query_scalar(
                    "select count(distinct mask_key_id) from public.user_logins where message_id is not null",
                )
                .fetch_one(&pool)
                .await
                .unwrap();
                most.fetch_max(keys, Ordering::Relaxed);
                reads.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });

    let rotation = db.cli().spawn(&["keys", "rotate", "--workers", "1"]);
    // Meanwhile new logins arrive and the incremental transform loads them at once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    sqlx::raw_sql(
        "insert into loader.raw_logins (message_id, body, body_is_json, queue)
         select 'new-' || g, jsonb_build_object('user_id', 'n' || g, 'device_id', 'x' || g), true, 'q'
           from generate_series(1, 1000) g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let (_, _, pending): (i64, i64, i64) =
        sqlx::query_as("call loader.transform()").fetch_one(&db.pool).await.unwrap();
    let took = started.elapsed();
    let copying: bool =
        sqlx::query_scalar("select exists (select from loader.rebuilds where state = 'copying')")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(copying, "the rotation was still copying when the new rows loaded");
    assert_eq!(pending, 0, "new rows get their outcome during the rotation ({took:?})");
    assert_eq!(key_ids(&db).await, [old], "before the swap readers see the old key only");

    let out = crate::support::wait_ok(rotation);
    assert!(out.contains("resumed"), "{out}");
    stop.store(true, Ordering::Relaxed);
    reader.await.unwrap();
    assert!(reads.load(Ordering::Relaxed) > 10, "the reader read all along");
    assert_eq!(most.load(Ordering::Relaxed), 1, "no reader ever saw two key ids at once");

    let new = active_key(&db).await;
    assert_ne!(new, old);
    assert_eq!(key_ids(&db).await, [new], "every row, old and new, on the new key");
    assert_eq!(db.loaded().await + db.rejected().await, 21_000, "nothing lost or doubled");
    db.cli().ok(&["reconcile", "--skip-queue"]);
}

#[tokio::test]
async fn a_rotation_killed_half_way_resumes_and_ends_with_every_row_on_the_new_key() {
    let db = TestDb::migrated().await;
    transformed(&db, 20_000).await;
    let (old, loaded, rejected) = (active_key(&db).await, db.loaded().await, db.rejected().await);
    assert_eq!(start_rotation(&db, 100).await, 200);

    let rotation = db.cli().spawn(&["keys", "rotate", "--workers", "1"]);
    let done = "select count(*) from loader.rebuild_ranges where done";
    for _ in 0..3000 {
        if db.count(done).await >= 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    kill_9(rotation);
    crate::support::wait_for_loader_sessions_to_end(&db).await;
    let copied = db.count(done).await;
    assert!((20..200).contains(&copied), "killed half-way: {copied} of 200 ranges");
    assert_eq!(key_ids(&db).await, [old], "nothing swapped: the live table is all on the old key");
    assert_eq!(active_key(&db).await, old);
    // Nothing else that would change what it copies may start meanwhile, nor another kind of
    // rebuild resume it by mistake. Retention goes on: a purge takes the bodies of the ranges
    // already copied, never one the copy still needs.
    let err = sqlx::query("select * from loader.rebuild_start(null, false)")
        .execute(&db.pool)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("is copying"), "a rebuild during the rotation: {err}");
    let purged: i64 = sqlx::query_scalar("select loader.purge_staged_batch(now(), 100000)")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let needed = db
        .count(
            "select count(*) from loader.raw_logins r join loader.rebuild_ranges g
                 on r.id between g.lo and g.hi and not g.done
              where r.purged_at is not null",
        )
        .await;
    assert_eq!(needed, 0, "no body a range still to copy needs was purged");
    assert_eq!(purged, copied * 100, "the copied ranges' bodies were purged");
    let out = db.cli().run(&["transform", "--rebuild"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("is copying"), "{stderr}");

    let out = db.cli().ok(&["keys", "rotate", "--workers", "2"]);
    assert!(out.contains("key") && !out.contains("already"), "{out}");
    let new = active_key(&db).await;
    assert_ne!(new, old);
    assert_eq!(key_ids(&db).await, [new]);
    assert_eq!(
        (db.loaded().await, db.rejected().await),
        (loaded, rejected),
        "nothing lost or doubled"
    );
    assert_eq!(
        db.count("select count(*) from pg_class where relname in ('user_logins_next', 'login_rejects_next') or relname ~ '_retired_r[0-9]+$'")
            .await,
        0,
        "the copies became the tables, the old ones are gone"
    );
    db.cli().ok(&["reconcile", "--skip-queue"]);
}

/// The tables a rotation swaps in have their BRIN indexes (the times `reconcile --since` reads
/// by, `staged_on`) summarized: a block range not summarized is a match for every query, so until
/// a vacuum every read by time read the whole of the new table. (The function skips the last,
/// partial block range of a table: more than one is needed to tell.) On `user_logins` by month
/// (V27), and on the one table of a database not moved yet (whose summary the first cut of V27
/// left out: a plain table has no partition tree).
#[tokio::test]
async fn a_rotation_swaps_in_tables_whose_brin_indexes_are_summarized() {
    let partitioned = TestDb::migrated().await;
    let plain = TestDb::empty().await;
    loader::db::migrate_leaving_staging_unpartitioned(&plain.pool).await.unwrap();
    for db in [&partitioned, &plain] {
        transformed(db, 20_000).await;
        db.cli().ok(&["keys", "rotate", "--workers", "2"]);
        assert!(
            db.count(
                "select (coalesce((select sum(pg_relation_size(relid))
                                     from pg_partition_tree('public.user_logins')), 0)
                         + pg_relation_size('public.user_logins'))::bigint
                        / current_setting('block_size')::bigint"
            )
            .await
                > 2 * 128,
            "more than two block ranges"
        );
        assert_eq!(
            db.count(
                "select sum(brin_summarize_new_values(i.indexrelid))::bigint
                   from pg_index i join pg_class c on c.oid = i.indexrelid join pg_am a on a.oid = c.relam
                  where a.amname = 'brin'
                    and i.indrelid in (select relid from pg_partition_tree('public.user_logins')
                                       union all select 'public.user_logins'::regclass
                                       union all select 'loader.login_rejects'::regclass)"
            )
            .await,
            0,
            "left to summarize"
        );
    }
}

#[tokio::test]
async fn a_batch_open_when_a_rotation_starts_is_refused_at_commit_and_loads_again() {
    let db = TestDb::migrated().await;
    sqlx::raw_sql(
        "insert into loader.raw_logins (message_id, body, body_is_json, queue)
         select 'b-' || g, jsonb_build_object('user_id', 'u' || g, 'device_id', 'd' || g), true, 'q'
           from generate_series(1, 100) g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    // A batch masks its rows, and its transaction stays open while a rotation starts: those
    // rows are in neither copy the rotation makes.
    let mut open = db.pool.acquire().await.unwrap();
    sqlx::raw_sql("begin").execute(&mut *open).await.unwrap();
    let (loaded,): (i64,) = sqlx::query_as("select loaded from loader.transform_batch(60)")
        .fetch_one(&mut *open)
        .await
        .unwrap();
    assert_eq!(loaded, 60);
    start_rotation(&db, 1000).await;
    let err = sqlx::raw_sql("commit").execute(&mut *open).await.unwrap_err();
    assert_eq!(err.as_database_error().and_then(|e| e.code()).as_deref(), Some("40001"), "{err}");
    // The failed COMMIT is reported before its row locks are released; the next statement on
    // the session waits for that.
    sqlx::raw_sql("select 1").execute(&mut *open).await.unwrap();
    assert_eq!(db.pending().await, 100, "its rows are pending again");

    db.cli().ok(&["keys", "rotate"]);
    let new = active_key(&db).await;
    assert_eq!(key_ids(&db).await, [new]);
    assert_eq!(db.loaded().await, 100);
    db.cli().ok(&["reconcile", "--skip-queue"]);
}

/// `loader keys rotate` killed (SIGKILL, SIGTERM or Ctrl-C) and run again at once failed four
/// times in a row ("ranges are not copied yet"): the killed process's server session was still
/// copying its range, and the rerun skipped it and tried the swap. Now the rerun waits for a
/// range another session holds (and copies it if it is given back). Killed at random points
/// with each signal, every immediate rerun resumes, and the last one finishes the rotation.
#[tokio::test]
async fn a_rotation_stopped_at_any_point_resumes_at_once() {
    let db = TestDb::migrated().await;
    transformed(&db, 20_000).await;
    let (old, loaded, rejected) = (active_key(&db).await, db.loaded().await, db.rejected().await);
    assert_eq!(start_rotation(&db, 50).await, 400);
    for (round, signal) in ["KILL", "TERM", "INT", "KILL", "TERM", "INT"].iter().enumerate() {
        let rotation = db.cli().spawn(&["keys", "rotate", "--workers", "2"]);
        tokio::time::sleep(Duration::from_millis(100 + fastrand::u64(0..250))).await;
        if *signal == "KILL" {
            kill_9(rotation);
        } else {
            crate::support::signal(rotation, signal);
        }
        // At once: no waiting for the killed process's sessions.
        let rerun = db.cli().spawn(&["keys", "rotate", "--workers", "2"]);
        tokio::time::sleep(Duration::from_millis(50 + fastrand::u64(0..200))).await;
        if round < 5 {
            kill_9(rerun);
        } else {
            let out =
                crate::support::wait_ok_within(rerun, Duration::from_secs(120), "the rerun").await;
            assert!(out.contains("key") && !out.contains("already"), "{out}");
        }
    }
    crate::support::wait_for_loader_sessions_to_end(&db).await;
    let new = active_key(&db).await;
    assert_ne!(new, old);
    assert_eq!(key_ids(&db).await.len(), 1, "one key in user_logins");
    assert_eq!(
        (db.loaded().await, db.rejected().await),
        (loaded, rejected),
        "nothing lost or doubled"
    );
    db.cli().ok(&["reconcile", "--skip-queue"]);
}

/// An outcome whose staged message is gone (deleted by hand: loader never deletes one) has
/// nothing to recompute from. The in-place rebuild refused such a database and the online one
/// dropped the row without a word (no test covered either); now the one rebuild carries it
/// into the new tables as it was, with its key id, says so, and counts it.
#[tokio::test]
async fn an_outcome_whose_staged_message_is_gone_is_carried_as_it_was_and_counted() {
    let db = TestDb::migrated().await;
    transformed(&db, 300).await;
    let (loaded_gone, old_key): (String, i32) = sqlx::query_as(
        "select message_id, mask_key_id from public.user_logins order by message_id limit 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let rejected_gone: String = sqlx::query_scalar(
        "select message_id from loader.login_rejects order by message_id limit 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    sqlx::query("delete from loader.raw_logins where message_id in ($1, $2)")
        .bind(&loaded_gone)
        .bind(&rejected_gone)
        .execute(&db.pool)
        .await
        .unwrap();

    let out = db.cli().ok(&["keys", "rotate", "--workers", "1"]);
    assert!(out.contains("carried 2 outcomes as they were"), "{out}");
    assert_eq!(db.count("select coalesce(sum(carried), 0)::bigint from loader.rebuilds").await, 2);
    let kept: i32 =
        sqlx::query_scalar("select mask_key_id from public.user_logins where message_id = $1")
            .bind(&loaded_gone)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(kept, old_key, "carried with the key that masked it");
    let rejects: i64 =
        sqlx::query_scalar("select count(*) from loader.login_rejects where message_id = $1")
            .bind(&rejected_gone)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(rejects, 1);
    assert_eq!(db.off_the_active_key().await, 1, "every other row is masked with the new key");
    assert_eq!(db.loaded().await + db.rejected().await, 300);
}

/// A rotation killed right after its swap committed, before it dropped the tables it retired:
/// run again, `loader keys rotate` started a second full rotation. Now it finishes the first
/// (drops the retired tables, transforms what is pending) and rotates no further.
#[tokio::test]
async fn a_rotation_stopped_after_its_swap_is_finished_not_repeated() {
    let db = TestDb::migrated().await;
    transformed(&db, 300).await;
    sqlx::raw_sql(
        "select * from loader.rebuild_start(rotate => true);
         do $$ begin while loader.rebuild_copy_range() is not null loop end loop; end $$;
         select * from loader.rebuild_swap();",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let keys = db.count("select count(*) from loader.mask_keys").await;
    let retired = "select count(*) from pg_class
                    where relnamespace = 'loader_rebuild'::regnamespace and relname like '%_retired_r%'";
    assert_eq!(db.count(retired).await, 2);

    let out = db.cli().ok(&["keys", "rotate", "--workers", "1"]);
    assert!(out.contains("active"), "{out}");
    assert_eq!(db.count("select count(*) from loader.mask_keys").await, keys, "no second rotation");
    assert_eq!(db.count(retired).await, 0, "the retired tables are dropped");
    assert_eq!(db.off_the_active_key().await, 0);
    // The next rotation is a rotation again.
    db.cli().ok(&["keys", "rotate", "--workers", "1"]);
    assert_eq!(db.count("select count(*) from loader.mask_keys").await, keys + 1);
}

/// A transform batch that committed while a rebuild was starting (after the start had cut
/// raw_logins' ids into ranges, before it rewrote the key row) wrote only the live tables, for
/// rows above every range: the swap lost them. The start rewrites the key row first again, so
/// such a batch waits for the start and is refused at COMMIT; its rows load with the copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_committing_while_a_rebuild_starts_loses_nothing_at_the_swap() {
    let db = TestDb::migrated().await;
    transformed(&db, 100).await;
    // The DBA holds the range table, so the start stops between its first steps and its end.
    let mut hold = db.admin.begin().await.unwrap();
    sqlx::raw_sql("lock table loader.rebuild_ranges in access exclusive mode")
        .execute(&mut *hold)
        .await
        .unwrap();
    let starting = {
        let pool = db.pool.clone();
        tokio::spawn(async move {
            sqlx::raw_sql("select * from loader.rebuild_start()").execute(&pool).await.unwrap();
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    crate::support::stage(
        &db,
        &[("late-a".to_owned(), r#"{"user_id": "u-late", "ip": "10.0.0.9"}"#.to_owned())],
        time::OffsetDateTime::now_utc(),
    )
    .await;
    let transform = {
        let pool = db.pool.clone();
        tokio::spawn(async move {
            sqlx::query_as::<_, (i64,)>("select loaded from loader.transform_batch(100, false)")
                .fetch_one(&pool)
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    hold.commit().await.unwrap();
    starting.await.unwrap();
    // The batch saw no rebuild and one was copying at its COMMIT: refused, its row pending again.
    let refused = transform.await.unwrap();
    assert!(refused.is_err(), "the batch that spanned the start committed: {refused:?}");
    db.cli().ok(&["transform"]);
    db.cli().ok(&["transform", "--rebuild", "--workers", "1"]);
    let late =
        db.count("select count(*) from public.user_logins where message_id = 'late-a'").await;
    assert_eq!(late, 1, "the row loaded during the start survived the swap");
    assert_eq!(db.loaded().await + db.rejected().await, 101);
}

#[tokio::test]
async fn a_swap_waits_for_a_batch_between_its_copy_and_live_writes_instead_of_deadlocking() {
    let db = TestDb::migrated().await;
    for sql in [
        "insert into loader.raw_logins (message_id, body, body_is_json, queue)
         select 'dl-' || g, jsonb_build_object('user_id', 'u' || g, 'device_id', 'd' || g), true, 'q'
           from generate_series(1, 50) g",
        "call loader.transform()",
        "select * from loader.rebuild_start(rotate => true)",
    ] {
        sqlx::query(sql).execute(&db.pool).await.unwrap();
    }
    crate::support::copy_every_range(&db).await;
    // A transform batch while the rebuild copies writes the copies first, then the live tables:
    // here, one between its two writes.
    let mut batch = db.pool.begin().await.unwrap();
    sqlx::query("lock table loader_rebuild.user_logins_next in row exclusive mode")
        .execute(&mut *batch)
        .await
        .unwrap();
    let pool = db.pool.clone();
    let swap = tokio::spawn(async move {
        sqlx::query("select * from loader.rebuild_swap()").execute(&pool).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    sqlx::query("set local lock_timeout = '5s'").execute(&mut *batch).await.unwrap();
    sqlx::query("lock table public.user_logins in row exclusive mode")
        .execute(&mut *batch)
        .await
        .expect("the batch reaches the live table: the swap holds it up nowhere");
    batch.commit().await.unwrap();
    swap.await.unwrap().expect("then the swap goes through, no deadlock");
    assert_eq!(db.count("select count(*) from loader.rebuilds where state = 'swapped'").await, 1);
}
