//! `loader reconcile` and `loader status`: the counts, and each invariant caught when broken.

use std::collections::HashMap;

use crate::support::{TestDb, TestEnv, TestQueue};
use serde_json::Value;

/// Runs `loader reconcile --json` and returns (exit code, report).
fn reconcile(db: &TestDb, queue: &str, extra: &[&str]) -> (Option<i32>, Value) {
    let mut args = vec!["reconcile", "--json"];
    args.extend_from_slice(extra);
    let out = crate::support::Cli::new(&db.url, queue).run(&args);
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code(), report)
}

/// The failing checks as name -> offenders.
fn failures(report: &Value) -> HashMap<String, Vec<String>> {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ok"] == Value::Bool(false))
        .map(|c| {
            let ids =
                c["offenders"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned());
            (c["name"].as_str().unwrap().to_owned(), ids.collect())
        })
        .collect()
}

/// Runs reconcile on the database alone and asserts it exits 3 with exactly one failing check,
/// naming exactly these ids.
fn expect_gap(db: &TestDb, check: &str, ids: &[&str]) {
    let (code, report) = reconcile(db, "unused", &["--skip-queue"]);
    assert_eq!(code, Some(3), "{report:#}");
    let expected =
        HashMap::from([(check.to_owned(), ids.iter().map(|s| (*s).to_owned()).collect())]);
    assert_eq!(failures(&report), expected);
}

/// Runs SQL on the test database.
async fn exec(db: &TestDb, sql: &'static str) {
    sqlx::raw_sql(sql).execute(&db.pool).await.expect(sql);
}

/// A database with the fixture ingested from a real queue (with a DLQ) and transformed.
async fn healthy() -> (TestEnv, TestQueue) {
    let env = TestEnv::new(30).await;
    let q = &env.queue;
    let dlq = q.attach_dead_letter_queue(5).await;
    q.send(&crate::support::fixture_messages().into_iter().map(|(_, b)| b).collect::<Vec<_>>())
        .await;
    env.cli().ok(&["ingest", "--wait-seconds", "1"]);
    env.cli().ok(&["transform"]);
    (env, dlq)
}

#[tokio::test]
async fn a_clean_pipeline_reconciles_with_counts_at_every_stage() {
    let (env, dlq) = healthy().await;
    let (db, q) = (&env.db, &env.queue);
    let dlq_name = dlq.name.clone();
    let (code, report) = reconcile(db, &q.name, &[]);
    assert_eq!(code, Some(0), "{report:#}");
    let s = &report["stages"];
    assert_eq!((s["staged"].as_i64(), s["loaded"].as_i64()), (Some(100), Some(99)));
    assert_eq!((s["rejected"].as_i64(), s["pending"].as_i64()), (Some(1), Some(0)));
    let run = &report["recent_runs"][0];
    assert_eq!((run["received"].as_i64(), run["deleted"].as_i64()), (Some(100), Some(100)));
    assert_eq!(report["queue"]["visible"].as_u64(), Some(0));
    assert_eq!(report["queue"]["dead_letter"]["name"].as_str(), Some(dlq_name.as_str()));
    assert_eq!(report["queue"]["dead_letter"]["visible"].as_u64(), Some(0));

    let human = env.cli().ok(&["reconcile"]);
    assert!(human.contains("staged (loader.raw_logins)"), "{human}");
    assert!(human.contains(&format!("dead-letter queue {dlq_name}: 0 visible")), "{human}");
    assert!(!human.contains("FAIL"), "{human}");

    let status = env.cli().ok(&["status"]);
    assert!(status.contains("pending transform: 0"), "{status}");
    assert!(status.contains("received 100, staged 100"), "{status}");
    assert!(status.contains("active key: 1"), "{status}");
    // The same as one JSON object, for scripts and monitors.
    let json: serde_json::Value =
        serde_json::from_str(&env.cli().ok(&["status", "--json"])).unwrap();
    assert_eq!(json["pending"], 0, "{json}");
    assert_eq!(json["active_key_id"], 1, "{json}");
    assert_eq!(
        (json["last_run"]["received"].as_i64(), json["last_run"]["staged"].as_i64()),
        (Some(100), Some(100))
    );
    assert_eq!(json["queue"]["visible"], 0, "{json}");
    assert!(json["last_drained_at"].is_string(), "{json}");
}

#[tokio::test]
async fn each_broken_invariant_exits_3_and_names_the_message() {
    let db = TestDb::migrated().await;
    crate::support::stage(
        &db,
        &crate::support::fixture_messages(),
        time::OffsetDateTime::now_utc(),
    )
    .await;
    db.cli().ok(&["transform"]);
    let (code, report) = reconcile(&db, "unused", &["--skip-queue"]);
    assert_eq!(code, Some(0), "{report:#}");

    // A loaded row disappears: its staged message has no outcome and is not pending.
    exec(&db, "delete from public.user_logins where message_id = 'fixture-3'").await;
    expect_gap(&db, "staged_message_accounted_for", &["fixture-3"]);
    exec(&db, "insert into loader.transform_queue select id from loader.raw_logins where message_id = 'fixture-3'").await;
    exec(&db, "call loader.transform()").await;
    assert_eq!(reconcile(&db, "unused", &["--skip-queue"]).0, Some(0), "repaired by requeueing");

    // An orphan: an output row whose message was never staged.
    exec(&db, "insert into public.user_logins (user_id, message_id) values ('x', 'orphan-1')")
        .await;
    expect_gap(&db, "outcome_has_staged_message", &["orphan-1"]);
    exec(&db, "delete from public.user_logins where message_id = 'orphan-1'").await;

    // Two outcomes for one message.
    exec(&db, "insert into loader.login_rejects (message_id, reason, detail) values ('fixture-5', 'x', 'x')").await;
    expect_gap(&db, "single_outcome", &["fixture-5"]);
    exec(&db, "delete from loader.login_rejects where message_id = 'fixture-5'").await;

    // A forged run whose counts disagree.
    let run: i64 = sqlx::query_scalar(
        "insert into loader.ingest_runs (queue, mode, loader_version, finished_at, received, staged,
                                         duplicates, deleted)
         values ('q', 'drain', 'forged', now(), 10, 0, 10, 7) returning id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    expect_gap(&db, "run_deletes_match", &[&run.to_string()]);
    sqlx::query(
        "update loader.ingest_runs set staged = 4, duplicates = 6, deleted = 10 where id = $1",
    )
    .bind(run)
    .execute(&db.pool)
    .await
    .unwrap();
    expect_gap(&db, "run_staged_matches_rows", &[&run.to_string()]);
    sqlx::query("delete from loader.ingest_runs where id = $1")
        .bind(run)
        .execute(&db.pool)
        .await
        .unwrap();

    // A row staged long before the last drained transform, still pending.
    exec(
        &db,
        "insert into loader.raw_logins (message_id, body, body_is_json, queue, staged_at)
         values ('stale-1', '{}', true, 'q', now() - interval '2 hours')",
    )
    .await;
    expect_gap(&db, "nothing_pending_before_last_transform", &["stale-1"]);
    let human = db.cli().run(&["reconcile", "--skip-queue"]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.contains("FAIL") && text.contains("stale-1"), "{text}");
}

#[tokio::test]
async fn since_checks_only_the_window_and_the_full_audit_still_sees_everything() {
    let db = TestDb::migrated().await;
    let messages = crate::support::fixture_messages();
    let now = time::OffsetDateTime::now_utc();
    crate::support::stage(&db, &messages[..40], now).await;
    crate::support::stage(&db, &messages[40..], now).await;
    db.cli().ok(&["transform"]);
    // Ten days ago: the first run's 40 messages, with their outcomes; one of them has lost its
    // outcome since (a gap only the full audit can see).
    exec(
        &db,
        "update loader.ingest_runs set started_at = started_at - interval '10 days'
          where id = (select min(id) from loader.ingest_runs);
         update loader.raw_logins set staged_at = staged_at - interval '10 days'
          where message_id in (select 'fixture-' || g from generate_series(0, 39) g);
         update public.user_logins set loaded_at = loaded_at - interval '10 days'
          where message_id in (select 'fixture-' || g from generate_series(0, 39) g);
         update loader.login_rejects set rejected_at = rejected_at - interval '10 days'
          where message_id in (select 'fixture-' || g from generate_series(0, 39) g);
         delete from public.user_logins where message_id = 'fixture-7'",
    )
    .await;

    let (code, report) = reconcile(&db, "unused", &["--skip-queue", "--since", "1d"]);
    assert_eq!(code, Some(0), "the last day is clean: {report:#}");
    let stages = &report["stages"];
    let outcomes = stages["loaded"].as_i64().unwrap() + stages["rejected"].as_i64().unwrap();
    assert_eq!((stages["staged"].as_i64(), outcomes), (Some(60), 60), "the window's rows only");
    assert!(stages["window_start"].is_string(), "{stages:#}");
    let (code, report) = reconcile(&db, "unused", &["--skip-queue"]);
    assert_eq!(code, Some(3), "{report:#}");
    assert_eq!(failures(&report)["staged_message_accounted_for"], ["fixture-7"]);
    assert!(report["stages"]["window_start"].is_null());

    // A gap inside the window is caught by the scoped check too.
    exec(&db, "delete from public.user_logins where message_id = 'fixture-70'").await;
    let (code, report) = reconcile(&db, "unused", &["--skip-queue", "--since", "1d"]);
    assert_eq!(code, Some(3), "{report:#}");
    assert_eq!(failures(&report)["staged_message_accounted_for"], ["fixture-70"]);
    // The human report says which window it covered.
    let out = db.cli().run(&["reconcile", "--skip-queue", "--since", "36h"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("since"), "{out:?}");
}

/// A run whose SQS deletes succeeded but whose `record_deletes` failed (the database refused
/// it; through a pooler that once was a prepared-statement clash) used to end finished with
/// `deleted` short of `staged`, and reconcile exited 3 forever though nothing was lost. Such a
/// run now ends marked as stopped on an error, which reconcile lists and does not hold to
/// `run_deletes_match`.
#[tokio::test]
async fn a_run_that_stopped_after_deleting_what_it_could_not_record_is_no_gap() {
    let env = TestEnv::new(30).await;
    let (db, q) = (&env.db, &env.queue);
    q.send(&loader::send::generate(30, 3)).await;
    sqlx::raw_sql(
        "create function public.test_refuse() returns trigger language plpgsql as
             $$ begin raise exception 'recording deletes refused (test)'; end $$;
         create trigger test_refuse_deletes before update of deleted on loader.ingest_runs
             for each row execute function public.test_refuse()",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let out = env.cli().run(&["ingest", "--wait-seconds", "1"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(q.depth().await, (0, 0, 0), "the staged messages were deleted from the queue");
    let run: (i64, i64, bool, bool) = sqlx::query_as(
        "select staged, deleted, finished_at is not null, stopped_on_error from loader.ingest_runs",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(run, (30, 0, true, true), "finished, marked, its deletes unrecorded");

    env.cli().ok(&["transform"]);
    let (code, report) = reconcile(db, &q.name, &[]);
    assert_eq!(code, Some(0), "{report:#}");
    assert_eq!(report["stages"]["stopped_runs"], 1, "{report:#}");
}
