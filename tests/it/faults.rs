//! Outages mid-drain, through a proxy that refuses and cuts connections for a few seconds:
//! ingest pauses, logs once, resumes by itself, and every message is staged exactly once.

use std::time::Duration;

use crate::support::{Proxy, TestDb, TestEnv, TestQueue};

const MESSAGES: usize = 8_000;

/// Drains `MESSAGES` through `loader ingest` while `outage` runs; returns the process output.
async fn drain_through(
    db: &TestDb,
    q: &TestQueue,
    db_url: &str,
    sqs_url: &str,
    proxy: &Proxy,
) -> std::process::Output {
    q.send(&loader::send::generate(MESSAGES as u64, 17)).await;
    let child = crate::support::Cli::new(db_url, &q.name)
        .command(&["ingest", "--wait-seconds", "1", "--log-format", "pretty"])
        .env("AWS_ENDPOINT_URL", sqs_url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Mid-drain: some rows are staged, not all.
    let staged =
        crate::support::wait_for_count(db, "select count(*) from loader.raw_logins", 1_000).await;
    assert!(staged >= 1_000 && staged < MESSAGES as i64, "mid-drain: {staged}");
    proxy.outage(Duration::from_secs(3)).await;
    tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap()
}

/// Checks the drain through the outage, then finishes with a normal drain (messages a cut
/// connection had received come back after their visibility timeout), and checks that every
/// message was staged exactly once.
async fn assert_exactly_once(db: &TestDb, q: &TestQueue, out: &std::process::Output, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Logged once per outage, not per attempt (an outage can also pass unseen inside the
    // drivers' own connect and retry timeouts).
    let warned = stderr.matches(&format!("{what} unavailable")).count();
    assert!(warned <= 1, "logged once, not per attempt: {stderr}");
    if warned == 1 {
        assert!(stderr.contains(&format!("{what} available again")), "{stderr}");
    }
    crate::support::wait_until_visible(q, 0).await;
    crate::support::Cli::new(&db.url, &q.name).ok(&["ingest", "--wait-seconds", "1"]);
    assert_eq!(db.staged().await, MESSAGES as i64);
    assert_eq!(
        db.count("select count(distinct message_id) from loader.raw_logins").await,
        MESSAGES as i64
    );
    crate::support::wait_until_visible(q, 0).await;
    assert_eq!(q.depth().await, (0, 0, 0));
}

#[tokio::test]
async fn postgres_down_mid_drain_pauses_and_resumes() {
    let env = TestEnv::new(3).await;
    let (db, q) = (&env.db, &env.queue);
    let (proxy, db_url) = Proxy::for_database(db).await;
    let sqs_url = crate::support::aws_settings().endpoint_url.unwrap();
    let out = drain_through(db, q, &db_url, &sqs_url, &proxy).await;
    assert_exactly_once(db, q, &out, "PostgreSQL").await;
}

#[tokio::test]
async fn sqs_unreachable_mid_drain_pauses_and_resumes() {
    let env = TestEnv::new(3).await;
    let (db, q) = (&env.db, &env.queue);
    let sqs = crate::support::aws_settings().endpoint_url.unwrap();
    let proxy = Proxy::start(crate::support::socket_of(&sqs)).await;
    let sqs_url = format!("http://127.0.0.1:{}", proxy.port);
    let out = drain_through(db, q, &db.url, &sqs_url, &proxy).await;
    assert_exactly_once(db, q, &out, "SQS").await;
}

/// `messages` sent to a queue with a 2 s visibility timeout, and an ingestor (draining, 1 s
/// polls) whose database connections go through a proxy that can cut them.
async fn behind_a_database_proxy(
    messages: u64,
    seed: u64,
) -> (TestDb, TestQueue, Proxy, loader::ingest::Ingestor) {
    let db = TestDb::migrated().await;
    let q = TestQueue::new(2).await;
    let (proxy, db_url) = Proxy::for_database(&db).await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(1))
        .connect(&db_url)
        .await
        .unwrap();
    q.send(&loader::send::generate(messages, seed)).await;
    let ingestor =
        loader::ingest::Ingestor::start(q.queue.clone(), pool, loader::ingest::Mode::Drain, 1)
            .await
            .unwrap();
    (db, q, proxy, ingestor)
}

#[tokio::test]
async fn a_flush_waiting_on_the_database_stays_invisible_on_the_queue() {
    // A 2 s visibility timeout and a 5 s database outage: without extensions SQS would hand
    // the messages out again while the flush waits.
    let (db, q, proxy, ingestor) = behind_a_database_proxy(10, 23).await;
    let batch = ingestor.receive().await.unwrap();
    assert_eq!(batch.len(), 10);

    let outage = proxy.outage(Duration::from_secs(5));
    let process = ingestor.process(&batch);
    let watch = async {
        // Well past the 2 s timeout, the messages are still invisible.
        tokio::time::sleep(Duration::from_millis(3500)).await;
        q.depth().await
    };
    let (_, totals, depth) = tokio::join!(outage, process, watch);
    assert_eq!(depth, (0, 10, 0), "still in flight during the outage, not visible again");
    let totals = totals.unwrap();
    assert_eq!((totals.staged, totals.deleted, totals.delete_failures), (10, 10, 0));
    assert_eq!(
        db.count("select count(*) from loader.raw_logins where receive_count = 1").await,
        10
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(q.depth().await, (0, 0, 0), "deleted with valid handles: nothing comes back");
}

#[tokio::test]
async fn batches_waiting_in_the_channel_stay_invisible_through_a_long_outage() {
    // A 2 s visibility timeout, an 8 s outage, and eight fixed receivers that fill the
    // writer's channel (room for 100 / 10 + 8 batches) before the first failed flush pauses
    // them: the batches waiting there, not only the flush being staged, must stay invisible.
    const SENT: u64 = 300;
    let (db, q, proxy, ingestor) = behind_a_database_proxy(SENT, 29).await;
    let flow = loader::ingest::Flow {
        receivers: 8,
        adaptive: false,
        flush_messages: 100,
        ..Default::default()
    };
    let ingestor = ingestor.with_flow(flow);

    let outage = proxy.outage(Duration::from_secs(8));
    let drain = ingestor.ingest(std::future::pending());
    let watch = async {
        // Three timeouts into the outage.
        tokio::time::sleep(Duration::from_secs(6)).await;
        q.depth().await
    };
    let (_, totals, (visible, in_flight, _)) = tokio::join!(outage, drain, watch);
    assert!(
        in_flight > 100,
        "more than the one flush being staged is held invisible: {in_flight} in flight, {visible} visible"
    );
    assert_eq!(visible + in_flight, SENT, "nothing staged during the outage");
    let totals = totals.unwrap();
    assert_eq!(
        (totals.from_queue, totals.staged, totals.duplicates, totals.delete_failures),
        (SENT, SENT, 0, 0),
        "each message received once, staged once, and deleted with a handle still valid"
    );
    assert_eq!(
        db.count("select count(*) from loader.raw_logins where receive_count = 1").await,
        SENT as i64
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(q.depth().await, (0, 0, 0), "nothing comes back after the timeout");
}

/// SIGTERM while SQS is unreachable, with a flush staging: the flush commits, its deletes
/// cannot reach SQS and are no longer retried, and `loader ingest` stops cleanly (exit 0) with
/// those messages recorded as delete failures. They come back and the next run counts them as
/// duplicates: nothing lost, nothing staged twice, and reconcile holds.
#[tokio::test]
async fn sigterm_while_sqs_is_unreachable_stops_cleanly_and_loses_nothing() {
    let env = TestEnv::new(3).await;
    let (db, q) = (&env.db, &env.queue);
    // Staging takes 3 s, so that the outage and the SIGTERM land while a flush stages.
    sqlx::raw_sql(
        "create function public.test_slow_staging() returns trigger language plpgsql as
           $$ begin perform pg_sleep(3); return null; end $$;
         create trigger test_slow_staging before insert on loader.raw_logins
           for each statement execute function public.test_slow_staging();",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    q.send(&loader::send::generate(10, 31)).await;
    let sqs = crate::support::aws_settings().endpoint_url.unwrap();
    let proxy = Proxy::start(crate::support::socket_of(&sqs)).await;
    let mut command =
        env.cli().command(&["ingest", "--follow", "--wait-seconds", "1", "--log-format", "pretty"]);
    command.env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", proxy.port));
    let child = crate::support::spawn(command);

    let sleeping = "select count(*) from pg_stat_activity
                     where datname = current_database() and wait_event = 'PgSleep'";
    assert_eq!(crate::support::wait_for_count(db, sleeping, 1).await, 1, "a flush is staging");
    let out = tokio::join!(proxy.outage(Duration::from_secs(8)), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        tokio::task::spawn_blocking(move || crate::support::terminate(child)).await.unwrap()
    })
    .1;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("SQS unreachable at shutdown"), "{stderr}");

    let (staged, deleted, failures): (i64, i64, i64) = sqlx::query_as(
        "select staged, deleted, delete_failures from loader.ingest_runs
          where finished_at is not null",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(staged >= 1 && deleted == 0 && failures == staged, "{staged} {deleted} {failures}");
    sqlx::raw_sql("drop trigger test_slow_staging on loader.raw_logins")
        .execute(&db.pool)
        .await
        .unwrap();
    crate::support::wait_until_visible(q, 10).await;
    let second = env.cli().ok(&["ingest", "--wait-seconds", "1"]);
    assert!(second.contains(&format!("{} duplicates", staged)), "{second}");
    assert_eq!(db.count("select count(distinct message_id) from loader.raw_logins").await, 10);
    assert_eq!(db.staged().await, 10);
    crate::support::wait_until_visible(q, 0).await;
    assert_eq!(q.depth().await, (0, 0, 0));
    env.cli().ok(&["reconcile"]);
}

/// Kills `args` (SIGKILL) after a random moment, three times, running it again at once each
/// time, then lets it finish: every long command resumes right after any stop.
async fn killed_at_random_then_finished(cli: &crate::support::Cli, args: &[&str]) {
    for _ in 0..3 {
        let running = cli.spawn(args);
        tokio::time::sleep(std::time::Duration::from_millis(150 + fastrand::u64(0..500))).await;
        crate::support::kill_9(running);
    }
    let out =
        crate::support::wait_ok_within(cli.spawn(args), Duration::from_secs(180), args[0]).await;
    assert!(!out.is_empty(), "{args:?}");
}

/// Issue 27: every long command resumes right after any stop. The transform, the purge, an
/// erasure and a drain, each killed at random points (SIGKILL: no clean-up at all) and run
/// again at once, three times, finish on the fourth run with nothing lost or doubled.
#[tokio::test]
async fn every_long_command_killed_at_random_resumes_at_once() {
    let env = TestEnv::new(3).await;
    let db = &env.db;
    let cli = env.cli();
    let old = time::OffsetDateTime::now_utc() - Duration::from_secs(40 * 86_400);
    let logins: Vec<(String, String)> = loader::send::generate(60_000, 4)
        .into_iter()
        .enumerate()
        .map(|(i, body)| (format!("k-{i}"), body))
        .collect();
    crate::support::stage(db, &logins, old).await;
    sqlx::raw_sql("update loader.raw_logins set staged_at = staged_at - interval '40 days'")
        .execute(&db.pool)
        .await
        .unwrap();

    killed_at_random_then_finished(&cli, &["transform", "--batch-size", "2000"]).await;
    assert_eq!(db.pending().await, 0);
    assert_eq!(db.loaded().await + db.rejected().await, 60_000, "each row once");

    let person: serde_json::Value = serde_json::from_str(&logins[0].1).unwrap();
    let person = person["user_id"].as_str().unwrap().to_owned();
    killed_at_random_then_finished(
        &cli,
        &["forget", "--user-id", &person, "--reference", "DSR-k", "--batch-size", "1"],
    )
    .await;
    assert_eq!(db.count("select count(*) from loader.erasures where finished_at is null").await, 0);

    killed_at_random_then_finished(
        &cli,
        &["purge", "--older-than-days", "30", "--batch-size", "500"],
    )
    .await;
    assert_eq!(
        db.count("select count(*) from loader.raw_logins where purged_at is null").await,
        0,
        "every old body purged"
    );

    env.queue.send(&loader::send::generate(8_000, 5)).await;
    for _ in 0..3 {
        let running = cli.spawn(&["ingest", "--wait-seconds", "1"]);
        tokio::time::sleep(std::time::Duration::from_millis(300 + fastrand::u64(0..700))).await;
        crate::support::kill_9(running);
    }
    crate::support::wait_until_visible(&env.queue, 0).await;
    cli.ok(&["ingest", "--wait-seconds", "1"]);
    assert_eq!(db.staged().await, 68_000, "each message staged once");
    cli.ok(&["transform"]);
    crate::support::wait_for_loader_sessions_to_end(db).await;
    cli.ok(&["reconcile"]);
}
