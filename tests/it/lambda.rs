//! The Lambda handler (cargo feature `lambda`) against a real PostgreSQL: SQS events built from
//! the fixture, redelivery, a record the database refuses, the scheduled transform.

use crate::support::{TestDb, fixture_messages};
use loader::lambda::Handler;
use serde_json::{Value, json};

const QUEUE_ARN: &str = "arn:aws:sqs:eu-west-1:123456789012:login-queue";

/// An SQS event as Lambda delivers it, one record per `(message id, body)`.
fn sqs_event(messages: &[(String, String)]) -> Value {
    let records: Vec<Value> = messages
        .iter()
        .map(|(id, body)| {
            json!({
                "messageId": id,
                "receiptHandle": format!("handle-{id}"),
                "body": body,
                "attributes": {
                    "ApproximateReceiveCount": "1",
                    "SentTimestamp": "1583020799000",
                    "SenderId": "AIDAEXAMPLE",
                    "ApproximateFirstReceiveTimestamp": "1583020799500"
                },
                "messageAttributes": {},
                "md5OfBody": "00000000000000000000000000000000",
                "eventSource": "aws:sqs",
                "eventSourceARN": QUEUE_ARN,
                "awsRegion": "eu-west-1"
            })
        })
        .collect();
    json!({ "Records": records })
}

fn failures(response: &Value) -> Vec<String> {
    response["batchItemFailures"]
        .as_array()
        .expect("a partial batch response")
        .iter()
        .map(|f| f["itemIdentifier"].as_str().unwrap().to_owned())
        .collect()
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&db.pool).await.unwrap()
}

#[tokio::test]
async fn fixture_records_are_staged_once_however_often_delivered() {
    let db = TestDb::migrated().await;
    let handler = Handler::new(db.pool.clone(), false);
    let event = sqs_event(&fixture_messages());

    let first = handler.handle(event.clone()).await.unwrap();
    assert_eq!(failures(&first), Vec::<String>::new());
    assert_eq!(count(&db, "select count(*) from loader.raw_logins").await, 100);
    let (queue, sent, receives): (String, i64, i32) = sqlx::query_as(
        "select queue, extract(epoch from sent_at)::bigint, receive_count
           from loader.raw_logins where message_id = 'fixture-0'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((queue.as_str(), sent, receives), ("login-queue", 1_583_020_799, 1));

    let again = handler.handle(event).await.unwrap();
    assert_eq!(failures(&again), Vec::<String>::new());
    assert_eq!(count(&db, "select count(*) from loader.raw_logins").await, 100);
    let run: (String, i64, i64, i64, i64) = sqlx::query_as(
        "select mode, received, staged, duplicates, deleted from loader.ingest_runs",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(run, ("lambda".to_owned(), 200, 100, 100, 0), "one run per environment");
}

#[tokio::test]
async fn a_record_the_database_refuses_is_the_only_failure_reported() {
    let db = TestDb::migrated().await;
    // A constraint failure for exactly one record, as a broken trigger or a new rule would cause.
    sqlx::raw_sql(
        "alter table loader.raw_logins
           add constraint test_refuses_one check (message_id <> 'fixture-7')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let handler = Handler::new(db.pool.clone(), false);

    let response = handler.handle(sqs_event(&fixture_messages())).await.unwrap();

    assert_eq!(failures(&response), ["fixture-7"]);
    assert_eq!(count(&db, "select count(*) from loader.raw_logins").await, 99);
    assert_eq!(
        count(&db, "select count(*) from loader.raw_logins where message_id = 'fixture-7'").await,
        0
    );
    let (received, staged, refused): (i64, i64, i64) =
        sqlx::query_as("select received, staged, refused from loader.ingest_runs")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((received, staged, refused), (99, 99, 1), "the refused record is counted apart");
    // And recorded in the ledger, as `loader ingest` records it, for `loader dlq list`.
    let ledger: (String, String, Option<String>) =
        sqlx::query_as("select message_id, sqlstate, constraint_name from loader.refusals")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(ledger, ("fixture-7".into(), "23514".into(), Some("test_refuses_one".into())));
}

#[tokio::test]
async fn a_schedule_runs_the_transform_and_staging_can_trigger_it() {
    let db = TestDb::migrated().await;
    let handler = Handler::new(db.pool.clone(), false);
    handler.handle(sqs_event(&fixture_messages())).await.unwrap();
    assert_eq!(count(&db, "select count(*) from public.user_logins").await, 0);

    let tick = json!({"source": "aws.events", "detail-type": "Scheduled Event", "detail": {}});
    let report = handler.handle(tick).await.unwrap();
    assert_eq!(report, json!({"loaded": 99, "rejected": 1, "pending": 0}));

    let db2 = TestDb::migrated().await;
    let eager = Handler::new(db2.pool.clone(), true);
    eager.handle(sqs_event(&fixture_messages()[..10])).await.unwrap();
    assert_eq!(count(&db2, "select count(*) from public.user_logins").await, 10);
}

#[tokio::test]
async fn an_unknown_event_is_an_error_not_a_guess() {
    let db = TestDb::migrated().await;
    let handler = Handler::new(db.pool.clone(), false);
    let err = handler.handle(json!({"hello": "world"})).await.unwrap_err();
    assert!(err.to_string().contains("unrecognised event"), "{err:#}");
    assert_eq!(count(&db, "select count(*) from loader.ingest_runs").await, 0);
}

/// The real `loader-lambda` binary under cargo-lambda's Runtime API emulator
/// (`cargo lambda watch --only-lambda-apis`, from PyPI; scripts/test.sh installs it and sets
/// `CARGO_LAMBDA`): the runtime loop fetches events, the handler answers, the emulator relays.
#[tokio::test]
async fn the_runtime_loop_serves_invocations_under_the_emulator() {
    let db = TestDb::migrated().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let _emulator = tokio::process::Command::new(crate::support::required_env("CARGO_LAMBDA"))
        .args(["lambda", "watch", "--only-lambda-apis", "-A", "127.0.0.1", "-P"])
        .arg(port.to_string())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("starting cargo-lambda");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(std::time::Instant::now() < deadline, "the emulator did not listen");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let _function = tokio::process::Command::new(env!("CARGO_BIN_EXE_loader-lambda"))
        .env("DATABASE_URL", &db.url)
        .env("AWS_LAMBDA_RUNTIME_API", format!("http://127.0.0.1:{port}/.rt"))
        .env("AWS_LAMBDA_FUNCTION_NAME", "loader-lambda")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "1")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("starting loader-lambda");

    let invoke = |event: Value| async move {
        // "_": the emulator names a function that polls its bare `/.rt` path this way.
        let url = format!("http://127.0.0.1:{port}/2015-03-31/functions/_/invocations");
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "--fail-with-body", "--max-time", "60", "-X", "POST", &url, "-d"])
            .arg(event.to_string())
            .output()
            .await
            .expect("running curl");
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "invoke failed: {body} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str::<Value>(&body).unwrap_or_else(|_| panic!("not JSON: {body}"))
    };

    let staged = invoke(sqs_event(&fixture_messages())).await;
    assert_eq!(failures(&staged), Vec::<String>::new());
    assert_eq!(count(&db, "select count(*) from loader.raw_logins").await, 100);

    let again = invoke(sqs_event(&fixture_messages()[..5])).await;
    assert_eq!(failures(&again), Vec::<String>::new());
    assert_eq!(count(&db, "select count(*) from loader.ingest_runs").await, 1, "one environment");

    let report = invoke(json!({"action": "transform"})).await;
    assert_eq!(report, json!({"loaded": 99, "rejected": 1, "pending": 0}));

    // A failed invocation's errorType is a stable name, not a Rust type's.
    let url = format!("http://127.0.0.1:{port}/2015-03-31/functions/_/invocations");
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "60", "-X", "POST", &url, "-d", r#"{"what": "this"}"#])
        .output()
        .await
        .expect("running curl");
    let body: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(body["errorType"], "Loader.BadEvent", "{body}");
}

/// Each kind of failure has its documented errorType (docs/deploying.md).
#[tokio::test]
async fn failed_invocations_report_stable_error_types() {
    let db = TestDb::migrated().await;
    let handler = Handler::new(db.pool.clone(), false);
    let bad = handler.handle(json!({"what": "this"})).await.unwrap_err();
    assert_eq!(Handler::error_type(&bad), "Loader.BadEvent");
    let not_sqs = handler.handle(json!({"Records": 1})).await.unwrap_err();
    assert_eq!(Handler::error_type(&not_sqs), "Loader.BadEvent");
    let stranger = crate::support::TestRole::new(&db, "loader_ingest").await;
    let no_transform = Handler::new(stranger.pool.clone(), false);
    let denied = no_transform.handle(json!({"action": "transform"})).await.unwrap_err();
    assert_eq!(Handler::error_type(&denied), "Loader.Permission", "{denied:#}");
    let empty = crate::support::TestDb::empty().await;
    let unmigrated = Handler::new(empty.pool.clone(), false);
    let missing = unmigrated.handle(json!({"action": "transform"})).await.unwrap_err();
    assert_eq!(Handler::error_type(&missing), "Loader.NotMigrated", "{missing:#}");
    let unreachable = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(std::time::Duration::from_secs(1))
        .connect_lazy("postgres://nobody@127.0.0.1:9/none")
        .unwrap();
    let down = Handler::new(unreachable, false).handle(json!({"action": "transform"})).await;
    assert_eq!(Handler::error_type(&down.unwrap_err()), "Loader.Unavailable");
}

#[tokio::test]
async fn the_ingest_role_is_enough_to_stage() {
    let db = TestDb::migrated().await;
    let role = crate::support::TestRole::new(&db, "loader_ingest").await;
    let handler = Handler::new(role.pool.clone(), false);
    let response = handler.handle(sqs_event(&fixture_messages())).await.unwrap();
    assert_eq!(failures(&response), Vec::<String>::new());
    assert_eq!(count(&db, "select count(*) from loader.raw_logins").await, 100);
}

#[tokio::test]
async fn an_error_that_is_not_about_the_rows_fails_the_whole_invocation() {
    let db = TestDb::migrated().await;
    // The ingest role without its execute grant on staging (in this database only): every
    // record would fail alike, so none is singled out and the invocation fails.
    sqlx::raw_sql("revoke execute on function loader.stage from loader_ingest")
        .execute(&db.pool)
        .await
        .unwrap();
    let role = crate::support::TestRole::new(&db, "loader_ingest").await;
    let handler = Handler::new(role.pool.clone(), false);
    let err = handler.handle(sqs_event(&fixture_messages()[..3])).await.unwrap_err();
    assert!(format!("{err:#}").contains("permission denied for function stage"), "{err:#}");
    let (received,): (i64,) = sqlx::query_as("select received from loader.ingest_runs")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(received, 0, "the run was registered, nothing was staged");
}

/// From a FIFO queue, a refused record fails every later record of its message group too
/// (SQS's rule for FIFO partial batch responses, so the group is redelivered in order); other
/// groups' records are staged and not reported.
#[tokio::test]
async fn from_a_fifo_queue_a_refused_record_fails_the_rest_of_its_group() {
    let db = TestDb::migrated().await;
    sqlx::raw_sql(
        "alter table loader.raw_logins add constraint test_refuses_one check (message_id <> 'g-a-2')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let handler = Handler::new(db.pool.clone(), false);
    let messages: Vec<(String, String)> = ["a-1", "b-1", "a-2", "b-2", "a-3", "c-1", "a-4"]
        .iter()
        .map(|id| (format!("g-{id}"), format!(r#"{{"user_id": "{id}"}}"#)))
        .collect();
    let mut event = sqs_event(&messages);
    for record in event["Records"].as_array_mut().unwrap() {
        let id = record["messageId"].as_str().unwrap().to_owned();
        record["eventSourceARN"] = json!("arn:aws:sqs:eu-west-1:123456789012:login-queue.fifo");
        record["attributes"]["MessageGroupId"] = json!(&id[2..3]);
    }
    let response = handler.handle(event).await.unwrap();
    assert_eq!(failures(&response), ["g-a-2", "g-a-3", "g-a-4"]);
    let staged: Vec<String> =
        sqlx::query_scalar("select message_id from loader.raw_logins order by message_id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(staged, ["g-a-1", "g-a-3", "g-a-4", "g-b-1", "g-b-2", "g-c-1"]);
}
