//! `loader forget`: a person erased from every table loader keeps, in committed batches,
//! resumable, recorded without their id; nothing of theirs comes back with a redelivery, and a
//! message of theirs sent before the request but staged after it is suppressed.

use crate::support::{TestDb, TestEnv, fixture_messages, kill_9, stage, traces};

use time::macros::datetime;

const SENT: time::OffsetDateTime = datetime!(2024-05-01 12:00 UTC);

/// The fixture's user id at `i`.
fn user_of(messages: &[(String, String)], i: usize) -> String {
    let v: serde_json::Value = serde_json::from_str(&messages[i].1).unwrap();
    v["user_id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_person_is_erased_from_every_table_and_nothing_of_theirs_comes_back() {
    let db = TestDb::migrated().await;
    let fixture = fixture_messages();
    let person = user_of(&fixture, 5);
    let other = user_of(&fixture, 6);
    stage(&db, &fixture, SENT).await;
    // Their traces everywhere: loaded rows, a reject that quotes them (a field that is not a
    // scalar), a body that is not JSON, a row still pending, a refusal, an online rebuild's copy.
    let extra = vec![
        ("p-reject".to_owned(), format!(r#"{{"user_id": "{person}", "ip": ["1.2.3.4"]}}"#)),
        ("p-text".to_owned(), format!(r#"{{"user_id": "{person}", "ip": "10.0.0.1""#)),
    ];
    stage(&db, &extra, SENT).await;
    sqlx::query("call loader.transform()").execute(&db.pool).await.unwrap();
    stage(&db, &[("p-pending".to_owned(), format!(r#"{{"user_id": "{person}"}}"#))], SENT).await;
    sqlx::raw_sql(
        "insert into loader.refusals (message_id, sqlstate, constraint_name, ingest_run_id)
         select 'fixture-5', '23514', 'c', min(id) from loader.ingest_runs",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::raw_sql(
        "select * from loader.rebuild_start(range_rows => 1000); select loader.rebuild_copy_range()",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    assert!(!traces(&db, &person).await.is_empty());

    // A dry run counts what would go, per table, and changes nothing (no ledger entry either).
    let before = traces(&db, &person).await;
    let out = db.cli().ok(&["forget", "--user-id", &person, "--dry-run"]);
    assert!(
        out.contains("user_logins 1,")
            && out.contains("login_rejects 2,")
            && out.contains("raw_logins 4"),
        "{out}"
    );
    assert_eq!(traces(&db, &person).await, before);
    assert_eq!(db.count("select count(*) from loader.erasures").await, 0);

    let out = db.cli().ok(&["forget", "--user-id", &person, "--reference", "DSR-7"]);
    assert!(out.contains("reference \"DSR-7\"") && out.contains("vacuumed"), "{out}");
    assert_eq!(traces(&db, &person).await, Vec::<String>::new(), "no trace left: {out}");
    assert!(!traces(&db, &other).await.is_empty(), "another person's rows are kept");
    let (reference, users, finished, counts): (String, i32, bool, serde_json::Value) =
        sqlx::query_as(
            "select reference, users, finished_at is not null, counts from loader.erasures",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!((reference.as_str(), users, finished), ("DSR-7", 1, true));
    assert_eq!(counts["user_logins"], 1, "{counts}");
    assert_eq!(counts["login_rejects"], 2, "{counts}");
    assert_eq!(counts["raw_logins"], 4, "{counts}");
    assert_eq!(counts["refusals"], 1, "{counts}");
    assert_eq!(counts["rebuild_copies"], 3, "{counts}");

    // A redelivery of an erased message: a duplicate, no body kept, no outcome.
    stage(&db, &[("fixture-5".to_owned(), fixture[5].1.clone())], SENT).await;
    sqlx::query("call loader.transform()").execute(&db.pool).await.unwrap();
    assert_eq!(traces(&db, &person).await, Vec::<String>::new(), "the redelivery brought nothing");

    // A message of theirs sent before the request, still on the queue then: suppressed. One
    // sent after it and staged after the quarantine (erasure_quarantine_days, here 0 days): a
    // new login, loaded (sql_api_erasure tests the quarantine itself).
    sqlx::raw_sql("update loader.settings set value = '0' where name = 'erasure_quarantine_days'")
        .execute(&db.pool)
        .await
        .unwrap();
    let late = format!(r#"{{"user_id": "{person}", "ip": "10.9.9.9", "device_id": "late"}}"#);
    stage(&db, &[("p-late".to_owned(), late.clone())], SENT).await;
    let new = format!(r#"{{"user_id": "{person}", "ip": "10.9.9.9", "device_id": "new"}}"#);
    stage(&db, &[("p-new".to_owned(), new)], time::OffsetDateTime::now_utc()).await;
    sqlx::query("call loader.transform()").execute(&db.pool).await.unwrap();
    let outcomes: Vec<(String, Option<String>)> = sqlx::query_as(
        "select r.message_id, j.reason from loader.raw_logins r
           left join loader.login_rejects j on j.message_id = r.message_id
          where r.message_id in ('p-late', 'p-new') order by 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let expected =
        vec![("p-late".to_owned(), Some("erased".to_owned())), ("p-new".to_owned(), None)];
    assert_eq!(outcomes, expected);
    let late_body: serde_json::Value =
        sqlx::query_scalar("select body from loader.raw_logins where message_id = 'p-late'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(late_body, serde_json::Value::Null, "the suppressed message kept no body");
    assert_eq!(
        db.count("select count(*) from public.user_logins where message_id = 'p-new'").await,
        1
    );

    // Reconcile accounts for every erased message; the rebuild that was copying finishes
    // without bringing anything back.
    sqlx::raw_sql("select loader.rebuild_abandon()").execute(&db.pool).await.unwrap();
    db.cli().ok(&["reconcile", "--skip-queue"]);
    db.cli().ok(&["transform", "--rebuild"]);
    let loaded_of_person: i64 =
        sqlx::query_scalar("select count(*) from public.user_logins where user_id = $1")
            .bind(&person)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(loaded_of_person, 1, "only the login sent after the request");
}

#[tokio::test]
async fn an_erasure_killed_half_way_finishes_when_run_again() {
    let env = TestEnv::new(30).await;
    let db = &env.db;
    sqlx::raw_sql(
        "insert into loader.raw_logins (message_id, body, body_is_json, queue, sent_at)
         select 'k-' || g, jsonb_build_object('user_id', 'many-logins', 'ip', '10.0.' || (g % 250) || '.1'),
                true, 'q', now() - interval '1 day'
           from generate_series(1, 20000) g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("call loader.transform()").execute(&db.pool).await.unwrap();
    let args = ["forget", "--user-id", "many-logins", "--reference", "DSR-8", "--batch-size", "50"];
    let running = db.cli().spawn(&args);
    // Up to a minute: on a loaded machine (a CI build beside it) the first 2,000 took longer
    // than the 4 s this waited, and the kill then came before them.
    for _ in 0..6000 {
        let erased =
            db.count("select count(*) from loader.raw_logins where erased_at is not null").await;
        if erased >= 2000 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    kill_9(running);
    crate::support::wait_for_loader_sessions_to_end(db).await;
    let erased =
        db.count("select count(*) from loader.raw_logins where erased_at is not null").await;
    assert!((2000..20000).contains(&erased), "killed half-way: {erased}");
    assert_eq!(db.count("select count(*) from loader.erasures where finished_at is null").await, 1);
    // Whole batches only: every erased message has no outcome, every other one still has its.
    assert_eq!(db.loaded().await, 20000 - erased);

    db.cli().ok(&args);
    assert_eq!(db.count("select count(*) from loader.erasures").await, 1, "resumed, not restarted");
    assert_eq!(db.count("select count(*) from loader.erasures where finished_at is null").await, 0);
    assert_eq!(db.loaded().await, 0);
    assert_eq!(traces(db, "many-logins").await, Vec::<String>::new());
    db.cli().ok(&["reconcile", "--skip-queue"]);
}

/// Copies every range of the copying rebuild and swaps it in, as the owner.
async fn finish_rebuild(db: &TestDb) {
    sqlx::raw_sql(
        "do $$ begin while loader.rebuild_copy_range() is not null loop end loop; end $$;
         select * from loader.rebuild_swap();
         select loader.rebuild_drop_retired();",
    )
    .execute(&db.pool)
    .await
    .unwrap();
}

/// An erasure while a rebuild copies, with the rebuild then swapped in (not abandoned): a row
/// from before loader (no message_id) that the rebuild's start had carried came back with the
/// swap; and a message of the erased person transformed meanwhile got `erased` in the live table
/// but `body_not_object` in the copy (the copy read the body the live write had emptied), which
/// the swap made the outcome. Now neither: the erasure takes the carried row out of the copy,
/// and the copy's outcome is computed from the body as staged.
#[tokio::test]
async fn an_erasure_during_a_rebuild_holds_after_the_swap() {
    let db = TestDb::migrated().await;
    let fixture = fixture_messages();
    stage(&db, &fixture, SENT).await;
    db.cli().ok(&["transform"]);
    sqlx::raw_sql(
        "insert into public.user_logins (user_id, device_type, masked_ip)
         values ('before-loader', 'ios', 'x'), ('later-person', 'ios', 'y')",
    )
    .execute(&db.pool)
    .await
    .unwrap();

    sqlx::raw_sql("select * from loader.rebuild_start(rotate => true)")
        .execute(&db.pool)
        .await
        .unwrap();
    db.cli().ok(&["forget", "--user-id", "before-loader", "--reference", "DSR-9"]);
    db.cli().ok(&["forget", "--user-id", "later-person", "--reference", "DSR-10"]);
    // A message of the erased person, staged (and transformed) while the rebuild copies.
    let late =
        vec![("late-1".to_owned(), r#"{"user_id": "later-person", "ip": "10.9.9.9"}"#.to_owned())];
    stage(&db, &late, time::OffsetDateTime::now_utc()).await;
    db.cli().ok(&["transform"]);
    finish_rebuild(&db).await;

    let back = db.count("select count(*) from public.user_logins where user_id in ('before-loader', 'later-person')").await;
    assert_eq!(back, 0, "nothing of an erased person came back with the swap");
    let reason: String =
        sqlx::query_scalar("select reason from loader.login_rejects where message_id = 'late-1'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(reason, "erased");
}

/// A copy range still open when an erasure ran had read the person's bodies before it: the
/// erasure took their rows out of the copies it could see, the range then committed its own,
/// and the swap brought them back. A copy range now holds the erasure key row, so the erasure
/// waits for it and then finds its rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_waits_for_a_copy_range_in_flight_and_takes_its_rows_out_too() {
    let db = TestDb::migrated().await;
    let fixture = fixture_messages();
    let person = user_of(&fixture, 5);
    stage(&db, &fixture, SENT).await;
    db.cli().ok(&["transform"]);
    sqlx::raw_sql("select * from loader.rebuild_start()").execute(&db.pool).await.unwrap();
    // One range copied in a transaction held open, as a slow copy would be.
    let mut copying = db.pool.begin().await.unwrap();
    sqlx::raw_sql("select loader.rebuild_copy_range()").execute(&mut *copying).await.unwrap();
    let forget = db.cli().spawn(&["forget", "--user-id", &person, "--reference", "DSR-11"]);
    // Until the erasure has finished without waiting, or waits on a lock.
    let finished_or_waiting = "select (select count(*) from loader.erasures where finished_at is not null)
                                    + (select count(*) from pg_stat_activity
                                        where datname = current_database() and application_name = 'loader'
                                          and wait_event_type = 'Lock')";
    let seen = crate::support::wait_for_count(&db, finished_or_waiting, 1).await;
    assert_eq!(seen, 1, "the erasure neither finished nor waited");
    copying.commit().await.unwrap();
    crate::support::wait_ok_within(forget, std::time::Duration::from_secs(60), "the erasure").await;
    sqlx::raw_sql(
        "do $$ begin while loader.rebuild_copy_range() is not null loop end loop; end $$;
         select * from loader.rebuild_swap();
         select loader.rebuild_drop_retired();",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let back: i64 =
        sqlx::query_scalar("select count(*) from public.user_logins where user_id = $1")
            .bind(&person)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(back, 0, "nothing of the erased person came back with the swap");
}
