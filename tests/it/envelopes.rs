//! Logins wrapped on their way to the queue, through the real services (LocalStack with SNS and
//! EventBridge delivering into the queue, `scripts/envelopes.py` publishing): an SNS topic with
//! raw message delivery off (SNS's default: the body is a notification whose Message is the
//! login) and on, and an EventBridge rule (the login is the event's detail). Staging keeps the
//! envelope; the transform unwraps it and applies the login's own rules, so each wrapped login
//! gets exactly the outcome the same login sent plain gets.

use std::collections::BTreeMap;
use std::process::Command;

use crate::support::{FIXTURE, TestDb, TestEnv, required_env};

/// Publishes the JSON array `file` to the test's queue through `via` (`sns`, `sns --raw` or
/// `events`).
fn publish(env: &TestEnv, via: &[&str], file: &str) {
    let mut args = vec![
        concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/envelopes.py"),
        via[0],
        env.queue.queue.url(),
        file,
    ];
    args.extend_from_slice(&via[1..]);
    let out = Command::new(required_env("LOADER_AWS_PYTHON"))
        .args(&args)
        .env("AWS_ENDPOINT_URL", required_env("AWS_ENDPOINT_URL"))
        .output()
        .expect("running scripts/envelopes.py");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Every outcome by user id (the fixture's are distinct): the loaded row's columns, or the
/// reject's reason, without the message id (which differs between a wrapped and a plain copy).
async fn outcomes_by_user(db: &TestDb) -> BTreeMap<String, String> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "select user_id, concat_ws('|', device_type, masked_ip, masked_device_id, locale,
                                   app_version, create_date, ip_network, app_version_text)
           from public.user_logins",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let mut by_user: BTreeMap<String, String> = rows.into_iter().collect();
    let rejects: Vec<String> = sqlx::query_scalar("select reason from loader.login_rejects")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    for (i, reason) in rejects.into_iter().enumerate() {
        by_user.insert(format!("reject-{i}"), reason);
    }
    by_user
}

/// The fixture sent plain, through a queue, into a database of its own: what each wrapped copy
/// must equal.
async fn plain_outcomes() -> BTreeMap<String, String> {
    let env = TestEnv::new(30).await;
    same_key(&env.db).await;
    env.cli().ok(&["send", FIXTURE]);
    env.cli().ok(&["ingest", "--wait-seconds", "1"]);
    env.cli().ok(&["transform"]);
    outcomes_by_user(&env.db).await
}

/// One fixed key, so masks compare across databases.
async fn same_key(db: &TestDb) {
    crate::support::install_key(db, 0xcd).await;
}

#[tokio::test]
async fn logins_through_sns_and_eventbridge_load_as_they_would_sent_plain() {
    let plain = plain_outcomes().await;
    assert_eq!(plain.len(), 100);
    for via in [&["sns"][..], &["sns", "--raw"], &["events"]] {
        let env = TestEnv::new(30).await;
        same_key(&env.db).await;
        publish(&env, via, FIXTURE);
        env.cli().ok(&["ingest", "--wait-seconds", "1"]);
        assert_eq!(env.db.staged().await, 100, "{via:?}");
        if via == ["sns"] {
            let wrapped = env
                .db
                .count(
                    "select count(*) from loader.raw_logins where body ->> 'Type' = 'Notification'",
                )
                .await;
            assert_eq!(wrapped, 100, "staging kept the SNS envelopes as they came");
        }
        env.cli().ok(&["transform"]);
        assert_eq!(outcomes_by_user(&env.db).await, plain, "{via:?}");
    }
}

#[tokio::test]
async fn an_sns_message_that_is_no_json_object_is_a_reject_of_its_own() {
    let env = TestEnv::new(30).await;
    let dir = std::env::temp_dir().join(format!("loader-envelopes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("not-objects.json");
    std::fs::write(&file, r#"["plain text, not JSON", [1, 2], {"user_id": "fine"}]"#).unwrap();
    publish(&env, &["sns"], file.to_str().unwrap());
    env.cli().ok(&["ingest", "--wait-seconds", "1"]);
    env.cli().ok(&["transform"]);
    let reasons: Vec<String> =
        sqlx::query_scalar("select reason from loader.login_rejects order by reason")
            .fetch_all(&env.db.pool)
            .await
            .unwrap();
    assert_eq!(reasons, ["sns_message_not_object", "sns_message_not_object"]);
    assert_eq!(env.db.loaded().await, 1);
    std::fs::remove_dir_all(&dir).ok();
}

/// Logins staged wrapped before the transform knew envelopes were rejected (user_id_missing):
/// staging kept them raw, so a rebuild loads them.
#[tokio::test]
async fn a_rebuild_loads_wrapped_logins_an_older_transform_rejected() {
    let env = TestEnv::new(30).await;
    publish(&env, &["sns"], FIXTURE);
    env.cli().ok(&["ingest", "--wait-seconds", "1"]);
    // What the transform before envelopes did: every one a user_id_missing reject.
    sqlx::raw_sql(
        "insert into loader.login_rejects (message_id, reason, detail)
         select r.message_id, 'user_id_missing', 'user_id is missing or null'
           from loader.raw_logins r;
         delete from loader.transform_queue",
    )
    .execute(&env.db.pool)
    .await
    .unwrap();
    assert_eq!(env.db.rejected().await, 100);
    env.cli().ok(&["transform", "--rebuild"]);
    assert_eq!((env.db.loaded().await, env.db.rejected().await), (99, 1));
    env.cli().ok(&["reconcile"]);
}

/// The Lambda handler gets the same through the same SQL: an SNS-wrapped record loads.
#[cfg(feature = "lambda")]
#[tokio::test]
async fn the_lambda_handler_unwraps_through_the_same_sql() {
    let db = TestDb::migrated().await;
    let handler = loader::lambda::Handler::new(db.pool.clone(), true);
    let (id, body) = crate::support::fixture_messages().into_iter().next().unwrap();
    let notification = serde_json::json!({
        "Type": "Notification", "MessageId": "n-1", "TopicArn": "arn:aws:sns:us-east-1:000000000000:t",
        "Message": body, "Timestamp": "2024-01-01T00:00:00.000Z", "SignatureVersion": "1",
        "Signature": "s", "SigningCertURL": "https://c", "UnsubscribeURL": "https://u",
    });
    let event = serde_json::json!({"Records": [{
        "messageId": id, "receiptHandle": "h", "body": notification.to_string(),
        "attributes": {"ApproximateReceiveCount": "1", "SentTimestamp": "1583020799000"},
        "messageAttributes": {}, "md5OfBody": "0", "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:eu-west-1:123456789012:login-queue", "awsRegion": "eu-west-1"
    }]});
    handler.handle(event).await.unwrap();
    assert_eq!(db.loaded().await, 1);
}
