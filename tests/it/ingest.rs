//! `loader send` and `loader ingest` against real PostgreSQL and LocalStack: the fixture, redelivery,
//! crash safety around the commit, and hostile bodies.

use crate::support::{FIXTURE, TestDb, TestEnv, TestQueue, wait_until_visible};
use loader::ingest::{Ingestor, Mode};
use loader::staging::{self, RawMessage};

fn generated(n: u64) -> Vec<String> {
    loader::send::generate(n, 42)
}

#[tokio::test]
async fn fixture_is_staged_exactly_once_and_the_queue_emptied() {
    let db = TestDb::migrated().await;
    let queue = crate::support::unique_name("loader-fixture").replace('_', "-");

    // `send` creates the queue when it is missing.
    let out = crate::support::Cli::new(&db.url, &queue).ok(&["send", FIXTURE]);
    assert_eq!(out.trim(), format!("sent 100 messages to {queue}"));

    let out = crate::support::Cli::new(&db.url, &queue).ok(&["ingest"]);
    assert!(
        out.contains("received 100, staged 100 new, 0 duplicates, deleted 100 (0 delete failures)"),
        "{out}"
    );
    assert_eq!(db.staged().await, 100);
    assert_eq!(db.count("select count(distinct message_id) from loader.raw_logins").await, 100);
    // The malformed message is staged like any other.
    assert_eq!(db.count("select count(*) from loader.raw_logins where body ? 'foo'").await, 1);
    assert_eq!(db.count("select count(*) from loader.raw_logins where sent_at is null").await, 0);

    let q = TestQueue { name: queue.clone(), queue: open(&queue).await };
    assert_eq!(q.depth().await, (0, 0, 0), "the queue is empty after ingest");

    let out = crate::support::Cli::new(&db.url, &queue).ok(&["ingest"]);
    assert!(out.contains("received 0, staged 0 new"), "{out}");
    assert_eq!(db.staged().await, 100);

    // The run bookkeeping agrees with the table.
    let (received, staged, deleted): (i64, i64, i64) = sqlx::query_as(
        "select sum(received)::int8, sum(staged)::int8, sum(deleted)::int8 from loader.ingest_runs",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((received, staged, deleted), (100, 100, 100));
    assert_eq!(
        db.count("select count(*) from loader.ingest_runs where finished_at is null").await,
        0
    );
}

async fn open(name: &str) -> loader::sqs::Queue {
    let client = loader::sqs::client(&crate::support::aws_settings()).await;
    loader::sqs::Queue::open(client, name).await.unwrap()
}

#[tokio::test]
async fn a_redelivered_message_is_staged_once() {
    let env = TestEnv::new(1).await;
    let (db, q) = (&env.db, &env.queue);
    q.send(&generated(25)).await;

    let ingestor = Ingestor::start(q.queue.clone(), db.pool.clone(), Mode::Drain, 1).await.unwrap();
    // Receive without staging or deleting: the messages come back after the visibility timeout.
    let first = ingestor.receive().await.unwrap();
    assert!(!first.is_empty());
    wait_until_visible(q, 25).await;

    let totals = ingestor.ingest(std::future::pending()).await.unwrap();
    assert_eq!((totals.staged, totals.deleted), (25, 25));
    assert_eq!(db.staged().await, 25);
    let ids: Vec<String> = first.iter().map(|m| m.message_id.clone()).collect();
    let redelivered: i64 = sqlx::query_scalar(
        "select count(*) from loader.raw_logins where message_id = any($1) and receive_count >= 2",
    )
    .bind(&ids)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(redelivered, ids.len() as i64, "the second delivery was the one staged");
    assert_eq!(q.depth().await, (0, 0, 0));
}

#[tokio::test]
async fn a_crash_between_commit_and_delete_loses_and_duplicates_nothing() {
    let env = TestEnv::new(1).await;
    let (db, q) = (&env.db, &env.queue);
    q.send(&generated(30)).await;

    // Stage one batch and commit, then "crash": the delete never happens.
    let ingestor = Ingestor::start(q.queue.clone(), db.pool.clone(), Mode::Drain, 1).await.unwrap();
    let batch = ingestor.receive().await.unwrap();
    let raw: Vec<RawMessage> = batch.iter().map(RawMessage::from).collect();
    let mut conn = db.pool.acquire().await.unwrap();
    let staged = staging::stage(&mut conn, ingestor.staging_run(), &raw).await.unwrap();
    assert_eq!(staged.outcome.staged, batch.len() as u64);
    drop(ingestor);

    // Nothing was deleted: all 30 are still on the queue once the visibility timeout passes.
    wait_until_visible(q, 30).await;
    assert_eq!(q.depth().await.0, 30);

    let out = env.cli().ok(&["ingest", "--wait-seconds", "1"]);
    let expected = format!(
        "received 30, staged {} new, {} duplicates, deleted 30 (0 delete failures)",
        30 - batch.len(),
        batch.len()
    );
    assert!(out.contains(&expected), "{out}");
    assert_eq!(db.staged().await, 30);
    assert_eq!(db.count("select count(distinct message_id) from loader.raw_logins").await, 30);
    assert_eq!(q.depth().await, (0, 0, 0));
}

#[tokio::test]
async fn a_failed_commit_deletes_nothing_and_a_rerun_stages_everything_once() {
    let env = TestEnv::new(1).await;
    let (db, q) = (&env.db, &env.queue);
    q.send(&generated(30)).await;

    // A deferred constraint trigger makes every COMMIT that staged a row fail, for real.
    sqlx::raw_sql(
        "create function fail_commit() returns trigger language plpgsql as
             $$ begin raise exception 'injected commit failure'; end $$;
         create constraint trigger fail_commit after insert on loader.raw_logins
             deferrable initially deferred for each row execute function fail_commit();",
    )
    .execute(&db.pool)
    .await
    .unwrap();

    let out = env.cli().run(&["ingest", "--wait-seconds", "1"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("injected commit failure"), "{stderr}");
    assert_eq!(db.staged().await, 0);
    // No message was deleted before (or without) its commit.
    wait_until_visible(q, 30).await;
    assert_eq!(q.depth().await, (30, 0, 0));

    sqlx::raw_sql("drop trigger fail_commit on loader.raw_logins").execute(&db.pool).await.unwrap();
    let out = env.cli().ok(&["ingest", "--wait-seconds", "1"]);
    assert!(out.contains("received 30, staged 30 new, 0 duplicates, deleted 30"), "{out}");
    assert_eq!(db.count("select count(distinct message_id) from loader.raw_logins").await, 30);
    assert_eq!(q.depth().await, (0, 0, 0));
}

#[tokio::test]
async fn hostile_bodies_are_all_staged_verbatim() {
    let env = TestEnv::new(30).await;
    let (db, q) = (&env.db, &env.queue);
    // SQS's own limit is 256 KiB for the whole message.
    let big = format!("{{\"user_id\": \"big\", \"pad\": \"{}\"}}", "x".repeat(256 * 1024 - 40));
    let bodies: Vec<(String, bool)> = vec![
        ("this is not json".into(), false),
        (r#"{"user_id": "nul\u0000inside"}"#.into(), false),
        (r#"{"user_id": "lone \ud800 surrogate"}"#.into(), false),
        (big.clone(), true),
        ("[1, 2, 3]".into(), true),
        ("null".into(), true),
        ("{\"user_id\": \"trailing\"} garbage".into(), false),
        ("\"just a string\"".into(), true),
    ];
    let texts: Vec<String> = bodies.iter().map(|(b, _)| b.clone()).collect();
    q.send(&texts).await;

    let out = env.cli().ok(&["ingest", "--wait-seconds", "1"]);
    assert!(out.contains(&format!("staged {} new", bodies.len())), "{out}");

    // JSON bodies come back as equal JSON; the others as the exact raw text in a JSON string.
    let rows: Vec<(bool, String)> = sqlx::query_as(
        "select body_is_json, case when body_is_json then body::text else body #>> '{}' end
           from loader.raw_logins",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), bodies.len());
    let as_json = |s: &str| serde_json::from_str::<serde_json::Value>(s).ok();
    for (body, is_json) in &bodies {
        let found = rows.iter().any(|(stored_as_json, text)| {
            *stored_as_json == *is_json
                && if *is_json { as_json(text) == as_json(body) } else { text == body }
        });
        assert!(found, "body {body:.40} not staged as expected (json: {is_json})");
    }
    assert_eq!(q.depth().await, (0, 0, 0));
}

#[tokio::test]
async fn copies_of_one_message_id_in_a_batch_stage_once() {
    let db = TestDb::migrated().await;
    let run = staging::IngestRun::register(&db.pool, "q", "drain").await.unwrap();
    let m = |id: &str| RawMessage {
        message_id: id.into(),
        body: "{}".into(),
        sent_at: None,
        receive_count: Some(1),
    };
    let mut conn = db.pool.acquire().await.unwrap();

    let first = staging::stage(&mut conn, &run, &[m("a"), m("b"), m("a")]).await.unwrap().outcome;
    assert_eq!((first.received, first.staged, first.duplicates), (3, 2, 1));
    let again = staging::stage(&mut conn, &run, &[m("b"), m("c")]).await.unwrap().outcome;
    assert_eq!((again.received, again.staged, again.duplicates), (2, 1, 1));

    assert_eq!(db.staged().await, 3);
    let counters: (i64, i64, i64) =
        sqlx::query_as("select received, staged, duplicates from loader.ingest_runs where id = $1")
            .bind(run.id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(counters, (5, 3, 2), "run counters commit with the rows");
}

#[tokio::test]
async fn follow_mode_stages_as_messages_arrive_and_stops_cleanly_on_sigterm() {
    let env = TestEnv::new(30).await;
    let (db, q) = (&env.db, &env.queue);
    let child = crate::support::Cli::new(&db.url, &q.name).spawn(&[
        "ingest",
        "--follow",
        "--wait-seconds",
        "1",
    ]);

    q.send(&generated(15)).await;
    let staged =
        crate::support::wait_for_count(db, "select count(*) from loader.raw_logins", 15).await;
    assert_eq!(staged, 15, "messages sent after start are staged");
    q.send(&generated(5)).await; // may be in hand when the signal arrives: must still finish

    let stdout = crate::support::terminate_ok(child);
    assert!(stdout.contains("staged"), "summary line printed: {stdout}");
    // Every message is either staged (and deleted) or still on the queue: none lost.
    let staged = db.staged().await;
    let (visible, in_flight, _) = q.depth().await;
    assert_eq!(
        staged as u64 + visible + in_flight,
        20,
        "staged {staged}, queue {visible}+{in_flight}"
    );
    assert_eq!(
        db.count("select count(*) from loader.ingest_runs where finished_at is null").await,
        0
    );
}

#[tokio::test]
async fn kill_9_at_random_points_during_a_20k_drain_loses_and_doubles_nothing() {
    let env = TestEnv::new(2).await;
    let (db, q) = (&env.db, &env.queue);
    let messages = generated(20_000);
    q.send(&messages).await;

    let mut rng = fastrand::Rng::with_seed(7);
    for started in 1..=4 {
        let child = env.cli().spawn(&["ingest", "--wait-seconds", "1"]);
        // Killed while it drains, not while it starts up: on a loaded machine a kill after a
        // fixed delay could come before the run was registered (this test once found three
        // unfinished runs instead of four).
        let registered = "select count(*) from loader.ingest_runs";
        assert_eq!(crate::support::wait_for_count(db, registered, started).await, started);
        tokio::time::sleep(std::time::Duration::from_millis(rng.u64(300..1500))).await;
        crate::support::kill_9(child);
    }
    let staged_before = db.staged().await;
    assert!(staged_before > 0 && staged_before < 20_000, "killed mid-drain: {staged_before}");

    // Messages held by the killed processes come back after the visibility timeout.
    wait_until_visible(q, 0).await;
    let out = env.cli().ok(&["ingest", "--wait-seconds", "1"]);
    assert!(out.contains("staged"), "{out}");
    assert_eq!(db.staged().await, 20_000);
    assert_eq!(db.count("select count(distinct message_id) from loader.raw_logins").await, 20_000);
    assert_eq!(
        db.count("select count(distinct body ->> 'user_id') from loader.raw_logins").await,
        20_000
    );
    assert_eq!(q.depth().await, (0, 0, 0));
    // The killed runs never finished; reconcile lists them, and its invariants still hold.
    assert_eq!(
        db.count("select count(*) from loader.ingest_runs where finished_at is null").await,
        4
    );
    let out = env.cli().run(&["reconcile", "--skip-queue"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
}

#[tokio::test]
async fn a_flush_holding_one_message_twice_stages_it_once_and_deletes_it_once() {
    let env = TestEnv::new(1).await;
    let (db, q) = (&env.db, &env.queue);
    q.send(&generated(1)).await;
    let ingestor = Ingestor::start(q.queue.clone(), db.pool.clone(), Mode::Drain, 1).await.unwrap();
    let first = ingestor.receive().await.unwrap();
    wait_until_visible(q, 1).await;
    let second = ingestor.receive().await.unwrap();
    assert_eq!(first[0].message_id, second[0].message_id);
    assert_ne!(first[0].receipt_handle, second[0].receipt_handle);

    let flush = [first, second].concat();
    let t = ingestor.process(&flush).await.unwrap();
    assert_eq!(
        (t.from_queue, t.staged, t.duplicates, t.deleted, t.delete_failures),
        (2, 1, 1, 2, 0)
    );
    assert_eq!(db.staged().await, 1);
    // Deleted for good: nothing comes back after the visibility timeout.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert_eq!(q.depth().await, (0, 0, 0));
}

#[tokio::test]
async fn a_message_postgres_refuses_is_left_on_the_queue_and_the_rest_go_on() {
    let env = TestEnv::new(30).await;
    let (db, q) = (&env.db, &env.queue);
    let bodies = generated(30);
    let poison: serde_json::Value = serde_json::from_str(&bodies[4]).unwrap();
    let poison_user = poison["user_id"].as_str().unwrap();
    // A rule added by an operator (a constraint, a trigger) that one message breaks.
    sqlx::raw_sql(&format!(
        "alter table loader.raw_logins
           add constraint test_refuses_one check (body->>'user_id' <> '{poison_user}')"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    q.send(&bodies).await;

    let out = env.cli().ok(&["ingest"]);

    assert!(
        out.contains(
            "received 29, staged 29 new, 0 duplicates, deleted 29 (0 delete failures); \
             1 refused by PostgreSQL, left on the queue"
        ),
        "{out}"
    );
    assert_eq!(db.staged().await, 29);
    assert_eq!(q.depth().await, (0, 1, 0), "the refused message is in flight, not deleted");
    let run: (i64, i64, i64, i64, i64) = sqlx::query_as(
        "select received, staged, duplicates, deleted, refused from loader.ingest_runs",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(run, (29, 29, 0, 29, 1), "staged and deleted 29; refused 1, left on the queue");
}

/// At real-SQS latency (a proxy adds 20 ms to every call), the receivers in flight grow past
/// the starting four while batches come back full, fall back as polls come back empty, and
/// the backlog is staged exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_sqs_latency_receivers_grow_with_a_backlog_and_fall_back_when_it_is_gone() {
    let env = TestEnv::new(30).await;
    env.queue.send(&generated(3_000)).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = format!("http://{}", listener.local_addr().unwrap());
    let target = crate::support::socket_of(&crate::support::aws_settings().endpoint_url.unwrap());
    let latency = std::time::Duration::from_millis(20);
    let proxy_task = tokio::spawn(crate::support::delay::delay_proxy(
        listener,
        target,
        latency,
        std::future::pending(),
    ));

    let out = crate::support::Cli::new(&env.db.url, &env.queue.name)
        .command(&["ingest", "--wait-seconds", "1"])
        .env("AWS_ENDPOINT_URL", &proxy)
        .env("LOADER_LOG_FORMAT", "json")
        .output()
        .unwrap();
    proxy_task.abort();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let targets: Vec<u64> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["fields"]["message"] == "receive concurrency changed")
        .filter_map(|l| l["fields"]["receivers"].as_u64())
        .collect();
    let peak = targets.iter().copied().max().unwrap_or(4);
    assert!(peak > 4, "receivers grew past the starting four: {targets:?}");
    assert!(targets.last().copied().unwrap_or(peak) < peak, "and fell back: {targets:?}");
    assert_eq!(env.db.staged().await, 3_000);
    let distinct = env.db.count("select count(distinct message_id) from loader.raw_logins");
    assert_eq!(distinct.await, 3_000, "exactly once");
    assert_eq!(env.queue.depth().await, (0, 0, 0));
}

/// Messages of 1 MiB (SQS's limit since 2025) stage whole with a budget of 20 MiB: receives
/// wait for room, flushes close by bytes, nothing is lost or cut (scripts/bench-memory.sh
/// measures the memory this bounds).
#[tokio::test]
async fn one_mebibyte_messages_stage_whole_within_a_small_memory_budget() {
    let env = TestEnv::new(60).await;
    let q = &env.queue.queue;
    q.client()
        .set_queue_attributes()
        .queue_url(q.url())
        .attributes(aws_sdk_sqs::types::QueueAttributeName::MaximumMessageSize, "1048576")
        .send()
        .await
        .unwrap();
    let note = "n".repeat(1_000_000);
    let bodies: Vec<String> = (0..24)
        .map(|i| {
            serde_json::json!({"user_id": format!("big-{i}"), "ip": "10.0.0.1", "note": note})
                .to_string()
        })
        .collect();
    env.queue.send(&bodies).await;
    let out = env.cli().ok(&["ingest", "--wait-seconds", "1", "--memory-budget-mb", "20"]);
    assert!(out.contains("staged 24 new"), "{out}");
    let whole = env
        .db
        .count("select count(*) from loader.raw_logins where length(body ->> 'note') = 1000000")
        .await;
    assert_eq!(whole, 24, "every body staged whole");
    env.cli().ok(&["transform"]);
    assert_eq!(env.db.loaded().await, 24);
    assert_eq!(env.queue.depth().await, (0, 0, 0));
}
