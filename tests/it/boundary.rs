//! The boundary where roles meet (docs/security.md "Duties" and "Erasing a person"): no login a
//! deployment documents both chooses an input and sees what became of it; the server owns the
//! values it can check; "this person's message" is one rule for every form a body takes and
//! every path that asks; a reveal honours erasure and its record is exact; and nothing a role
//! below the owner holds open stops loading. Each test logs in as the real LOGIN role the
//! deployment uses, below an owner that is not a superuser.

use std::time::Duration;

use loader::staging::{self, IngestRun, RawMessage};
use sqlx::PgPool;
use time::OffsetDateTime;

use sqlx::Connection;

use crate::support::{Cli, TestDb, TestEnv, TestRole, sqlstate, traces};

/// Stages `(message id, body, sent_at)` as `pool`'s login (granted `loader_ingest`), through
/// the same code `loader ingest` uses, committed.
async fn stage_as(pool: &PgPool, messages: &[(&str, &str, OffsetDateTime)]) {
    let run = IngestRun::register(pool, "direct", "drain").await.unwrap();
    let raw: Vec<RawMessage> = messages
        .iter()
        .map(|(id, body, sent_at)| RawMessage {
            message_id: (*id).to_owned(),
            body: (*body).to_owned(),
            sent_at: Some(*sent_at),
            receive_count: Some(1),
        })
        .collect();
    let mut conn = pool.acquire().await.unwrap();
    staging::stage(&mut conn, &run, &raw).await.expect("staging");
}

/// An SNS notification (raw message delivery off) carrying `message` as its Message.
fn sns(message: &str) -> String {
    serde_json::json!({
        "Type": "Notification", "MessageId": "5f0c", "TopicArn": "arn:aws:sns:us-east-1:1:t",
        "Message": message, "Timestamp": "2026-12-05T10:00:00.000Z", "SignatureVersion": "1",
        "Signature": "c2ln", "SigningCertURL": "https://sns/cert.pem",
        "UnsubscribeURL": "https://sns/unsubscribe"
    })
    .to_string()
}

/// An EventBridge event carrying `detail`.
fn eventbridge(detail: serde_json::Value) -> String {
    serde_json::json!({
        "version": "0", "id": "6a7e", "detail-type": "login", "source": "app",
        "account": "1", "time": "2026-12-05T10:00:00Z", "region": "us-east-1",
        "resources": [], "detail": detail
    })
    .to_string()
}

/// Every form a message of `user` can take, each with an ip and a device id of its own made
/// from `tag` (so each leaves traces a test can look for): `(form, body, ip, device id)`.
fn every_form(user: &str, tag: u8) -> Vec<(&'static str, String, String, String)> {
    let value = |i: u8| format!("10.{tag}.{i}.9");
    let device = |form: &str| format!("dev-{tag}-{form}");
    let login = |i: u8, form: &str| serde_json::json!({"user_id": user, "ip": value(i), "device_id": device(form)});
    vec![
        ("plain", login(1, "plain").to_string(), value(1), device("plain")),
        (
            "text",
            format!(r#"user_id="{user}" ip={} device_id={}"#, value(2), device("text")),
            value(2),
            device("text"),
        ),
        (
            "sns-broken",
            sns(&format!(
                r#"{{"user_id":"{user}","ip":"{}","device_id":"{}","#,
                value(3),
                device("sns-broken")
            )),
            value(3),
            device("sns-broken"),
        ),
        (
            "array",
            serde_json::json!({"user_id": [user], "ip": value(4), "device_id": device("array")})
                .to_string(),
            value(4),
            device("array"),
        ),
        ("sns", sns(&login(5, "sns").to_string()), value(5), device("sns")),
        ("eventbridge", eventbridge(login(6, "eventbridge")), value(6), device("eventbridge")),
        (
            "eventbridge-text",
            eventbridge(serde_json::json!(format!("user_id={user} ip={}", value(7)))),
            value(7),
            device("eventbridge-text"),
        ),
        (
            "query-string",
            format!("user_id={user}&ip={}&device_id={}", value(8), device("query-string")),
            value(8),
            device("query-string"),
        ),
        ("pipes", format!("{user}|{}|{}", value(9), device("pipes")), value(9), device("pipes")),
        (
            // A JSON unicode escape for the id's first letter, in JSON cut off mid-way.
            "escaped",
            format!(
                r#"{{"user_id":"\u{:04x}{}","ip":"{}","device_id":"{}","#,
                user.chars().next().unwrap() as u32,
                &user[1..],
                value(10),
                device("escaped")
            ),
            value(10),
            device("escaped"),
        ),
        (
            "key",
            serde_json::json!({"users": {user: {"ip": value(11), "device_id": device("key")}}})
                .to_string(),
            value(11),
            device("key"),
        ),
        (
            // The id's first letter percent-encoded, as a form body or a URL has it.
            "percent",
            format!(
                "user_id=%{:02X}{}&ip={}&device_id={}",
                user.as_bytes()[0],
                &user[1..],
                value(12),
                device("percent")
            ),
            value(12),
            device("percent"),
        ),
        (
            "sentence",
            format!("login by {user}. ip {} device {}", value(13), device("sentence")),
            value(13),
            device("sentence"),
        ),
        (
            // A user_id that names nobody (blank): the body belongs to every id it mentions.
            "blank-id",
            serde_json::json!({"user_id": " ", "who": user, "ip": value(14), "device_id": device("blank-id")})
                .to_string(),
            value(14),
            device("blank-id"),
        ),
    ]
}

/// Whether any table still holds `values`, one list per value that does.
async fn traces_of(db: &TestDb, values: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    for v in values {
        for t in traces(db, v).await {
            found.push(format!("{v} in {t}"));
        }
    }
    found
}

/// Erasure missed a text body, a broken SNS envelope and an array user_id,
/// and later messages in those forms were not suppressed. Now one rule (loader._claimants)
/// finds every form, in one run, and suppresses every form later; another person's messages in
/// the same forms are untouched.
#[tokio::test]
async fn every_form_of_a_persons_message_is_erased_and_suppressed_by_one_rule() {
    let db = TestDb::migrated().await;
    let ingest = TestRole::new(&db, "loader_ingest").await;
    let sent = OffsetDateTime::now_utc() - Duration::from_secs(3600);
    let alice_rejected = every_form("alice", 1);
    let alice_pending = every_form("alice", 2);
    let bob = every_form("bob", 3);
    let staged = |set: &[(&'static str, String, String, String)], prefix: &str| {
        set.iter()
            .map(|(form, body, ..)| (format!("{prefix}-{form}"), body.clone()))
            .collect::<Vec<_>>()
    };
    let stage_set = async |set: Vec<(String, String)>| {
        let rows: Vec<(&str, &str, OffsetDateTime)> =
            set.iter().map(|(id, body)| (id.as_str(), body.as_str(), sent)).collect();
        stage_as(&ingest.pool, &rows).await;
    };
    // Transformed (loaded or rejected), then a second set left pending.
    stage_set(staged(&alice_rejected, "a1")).await;
    stage_set(staged(&bob, "b")).await;
    db.cli().ok(&["transform"]);
    stage_set(staged(&alice_pending, "a2")).await;
    let alice_values: Vec<String> = alice_rejected
        .iter()
        .chain(&alice_pending)
        .flat_map(|(_, _, ip, device)| [ip.clone(), device.clone()])
        .collect();
    assert!(!traces_of(&db, &alice_values).await.is_empty());

    let out = db.cli().ok(&["forget", "--user-id", "alice", "--reference", "DSR-26"]);
    assert_eq!(traces_of(&db, &alice_values).await, Vec::<String>::new(), "one run: {out}");
    assert_eq!(traces(&db, "alice").await, Vec::<String>::new());
    let bob_values: Vec<String> = bob.iter().map(|(_, _, ip, _)| ip.clone()).collect();
    for v in &bob_values {
        assert!(!traces(&db, v).await.is_empty(), "bob's {v} is kept");
    }

    // Later messages in every form, sent before the request (still on the queue then) and
    // after it (within the quarantine): every one suppressed, nothing of it kept.
    let late_before = every_form("alice", 4);
    let late_after = every_form("alice", 5);
    stage_set(staged(&late_before, "a3")).await;
    let after: Vec<(String, String)> = staged(&late_after, "a4");
    let rows: Vec<(&str, &str, OffsetDateTime)> = after
        .iter()
        .map(|(id, body)| (id.as_str(), body.as_str(), OffsetDateTime::now_utc()))
        .collect();
    stage_as(&ingest.pool, &rows).await;
    db.cli().ok(&["transform"]);
    let reasons: Vec<String> = sqlx::query_scalar(
        "select coalesce(j.reason, 'loaded') from loader.raw_logins r
           left join loader.login_rejects j using (message_id)
          where r.message_id like 'a3-%' or r.message_id like 'a4-%' order by r.message_id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(reasons, vec!["erased"; late_before.len() * 2]);
    let late_values: Vec<String> = late_before
        .iter()
        .chain(&late_after)
        .flat_map(|(_, _, ip, device)| [ip.clone(), device.clone()])
        .collect();
    assert_eq!(traces_of(&db, &late_values).await, Vec::<String>::new());
    // An id holding a separator of the word rule (auth0|...) is found whole in a text body.
    stage_as(
        &ingest.pool,
        &[("pipe-id", "user_id=auth0|carl ip=10.77.0.1", OffsetDateTime::now_utc())],
    )
    .await;
    db.cli().ok(&["forget", "--user-id", "auth0|carl", "--reference", "DSR-26b"]);
    assert_eq!(traces(&db, "10.77.0.1").await, Vec::<String>::new());
    // Bob's plain, SNS and EventBridge logins loaded; his other forms are rejects as before.
    assert_eq!(db.count("select count(*) from public.user_logins where user_id = 'bob'").await, 3);
    db.cli().ok(&["reconcile", "--skip-queue"]);
}

/// Receives every message of `from` and sends each body to `to`, deleting it from `from`: what
/// AWS's dead-letter redrive (StartMessageMoveTask) does, a new MessageId and SentTimestamp for
/// each. LocalStack's own move task keeps both, so the test does it as AWS does. Returns the new
/// message ids.
async fn redrive_as_aws_does(from: &loader::sqs::Queue, to: &loader::sqs::Queue) -> Vec<String> {
    let client = from.client();
    let mut sent = Vec::new();
    for _ in 0..10 {
        let got = client
            .receive_message()
            .queue_url(from.url())
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .send()
            .await
            .unwrap();
        let messages = got.messages();
        if messages.is_empty() {
            break;
        }
        for m in messages {
            let out = client
                .send_message()
                .queue_url(to.url())
                .message_body(m.body().unwrap())
                .send()
                .await
                .unwrap();
            sent.push(out.message_id().unwrap().to_owned());
            client
                .delete_message()
                .queue_url(from.url())
                .receipt_handle(m.receipt_handle().unwrap())
                .send()
                .await
                .unwrap();
        }
    }
    sent
}

/// On AWS a dead-letter redrive gives a message a new MessageId and a new
/// SentTimestamp, so an erased person's message came back as neither a duplicate nor "sent
/// before the erasure". Now a body that was erased is suppressed whenever it comes back (its
/// keyed fingerprint), and one that was never staged is suppressed within the quarantine; a
/// new login after the quarantine loads.
#[tokio::test]
async fn a_redrive_with_new_ids_and_timestamps_brings_no_erased_person_back() {
    let env = TestEnv::new(30).await;
    let db = &env.db;
    let dlq = crate::support::TestQueue::new(30).await;
    let svc = TestRole::new(db, "loader_ingest, loader_transformer").await;
    let cli = Cli::new(&svc.url, &env.queue.name);
    let first = r#"{"user_id": "carol", "ip": "10.44.0.1", "device_id": "carol-phone"}"#;
    let never_staged = r#"{"user_id": "carol", "ip": "10.44.0.2", "device_id": "carol-tablet"}"#;
    env.queue.send(&[first.to_owned()]).await;
    cli.ok(&["ingest"]);
    cli.ok(&["transform"]);
    assert_eq!(db.loaded().await, 1);
    // A second copy of the first (at-least-once) and a message never staged, both in the DLQ.
    dlq.send(&[first.to_owned(), never_staged.to_owned()]).await;
    db.cli().ok(&["forget", "--user-id", "carol", "--reference", "DSR-3"]);

    let new_ids = redrive_as_aws_does(&dlq.queue, &env.queue.queue).await;
    assert_eq!(new_ids.len(), 2);
    cli.ok(&["ingest"]);
    cli.ok(&["transform"]);
    let staged_ids: Vec<String> =
        sqlx::query_scalar("select message_id from loader.raw_logins order by staged_at")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(staged_ids.len(), 3, "new MessageIds: no duplicate of the first");
    assert_eq!(
        db.count("select count(*) from loader.login_rejects where reason = 'erased'").await,
        2
    );
    assert_eq!(db.loaded().await, 0);
    let values =
        ["10.44.0.1", "10.44.0.2", "carol-phone", "carol-tablet", "carol"].map(String::from);
    assert_eq!(traces_of(db, &values).await, Vec::<String>::new());

    // After the quarantine (here 0 days) a redriven copy of an erased body is still suppressed;
    // a new login of the same person is new data, and loads.
    sqlx::raw_sql("update loader.settings set value = '0' where name = 'erasure_quarantine_days'")
        .execute(&db.pool)
        .await
        .unwrap();
    dlq.send(&[first.to_owned()]).await;
    redrive_as_aws_does(&dlq.queue, &env.queue.queue).await;
    env.queue
        .send(&[
            r#"{"user_id": "carol", "ip": "10.44.0.3", "device_id": "carol-laptop"}"#.to_owned()
        ])
        .await;
    cli.ok(&["ingest"]);
    cli.ok(&["transform"]);
    assert_eq!(
        db.count("select count(*) from loader.login_rejects where reason = 'erased'").await,
        3
    );
    assert_eq!(db.loaded().await, 1);
    assert_eq!(traces_of(db, &values[..4]).await, Vec::<String>::new());
    db.cli().ok(&["reconcile", "--skip-queue"]);
}

/// A login granted loader_ingest and loader_analyst (the documented grant
/// for `loader run` and the Lambda handler) could stage a chosen IP with a back-dated sent_at,
/// transform, read its mask and whether its user was erased, and roll it all back. Now the
/// login that stages and transforms holds loader_transformer, which reads nothing the transform
/// produces; a transaction that staged cannot transform; the server replaces a sent_at SQS
/// could not have given; and `loader doctor` names a login holding a writer and a reader role.
#[tokio::test]
async fn a_login_that_stages_and_transforms_sees_nothing_of_what_its_input_became() {
    let env = TestEnv::new(30).await;
    let db = &env.db;
    let svc = TestRole::new(db, "loader_ingest, loader_transformer").await;
    let mut tx = svc.pool.begin().await.unwrap();
    let (run, token): (i64, String) =
        sqlx::query_as("select * from loader.register_run('q', 'drain', 'attack')")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    sqlx::query(
        "select * from loader.stage($1, $2, array['x-1', 'x-2'],
                array['{\"user_id\": \"u1\", \"ip\": \"10.99.0.1\"}', '{\"user_id\": \"u2\"}'],
                array[true, true], array['2000-01-01', '2100-01-01']::timestamptz[],
                array[1, 1], array[1, 1])",
    )
    .bind(run)
    .bind(&token)
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    let refused = sqlx::query("select * from loader.transform_batch(100)")
        .fetch_one(&mut *tx)
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&refused), "55000", "{refused}");
    tx.rollback().await.unwrap();
    for table in
        ["public.user_logins", "loader.login_rejects", "loader.raw_logins", "loader.ingest_runs"]
    {
        let denied = sqlx::query(&format!("select * from {table} limit 1"))
            .fetch_optional(&svc.pool)
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&denied), "42501", "{table}: {denied}");
    }

    // Committed, the same staging is on record; its sent_at values were replaced by the
    // staging time, and counted.
    let run = IngestRun::register(&svc.pool, "q", "drain").await.unwrap();
    let mut conn = svc.pool.acquire().await.unwrap();
    let old = time::macros::datetime!(2000-01-01 0:00 UTC);
    let future = OffsetDateTime::now_utc() + Duration::from_secs(86_400);
    let recent = OffsetDateTime::now_utc() - Duration::from_secs(86_400);
    let raw = [("y-1", old), ("y-2", future), ("y-3", recent)].map(|(id, sent_at)| RawMessage {
        message_id: id.into(),
        body: r#"{"user_id": "u"}"#.into(),
        sent_at: Some(sent_at),
        receive_count: Some(1),
    });
    staging::stage(&mut conn, &run, &raw).await.unwrap();
    // A body larger than any SQS message (1 MiB) is refused, recorded, and left on the queue;
    // the rest of its batch stages.
    let huge = format!(r#"{{"user_id": "u", "pad": "{}"}}"#, "x".repeat(1_100_000));
    let raw = [("z-1", huge), ("z-2", r#"{"user_id": "u"}"#.to_owned())].map(|(id, body)| {
        RawMessage { message_id: id.into(), body, sent_at: Some(recent), receive_count: Some(1) }
    });
    let staged = staging::stage(&mut conn, &run, &raw).await.unwrap();
    assert_eq!(staged.refused, std::collections::HashSet::from(["z-1".to_owned()]));
    assert_eq!(
        db.count("select count(*) from loader.refusals where constraint_name = 'body_size'").await,
        1
    );
    drop(conn);
    assert_eq!(
        db.count("select count(*) from loader.raw_logins where sent_at = staged_at").await,
        2
    );
    assert_eq!(db.count("select sum(sent_at_replaced)::bigint from loader.ingest_runs").await, 2);
    let out = Cli::new(&svc.url, &env.queue.name).ok(&["transform"]);
    assert!(out.contains("loaded 4, rejected 0, pending 0"), "{out}");

    // doctor: the documented split passes; a login holding a writer and a reader role fails,
    // named.
    let check = |out: &str| {
        let findings: serde_json::Value = serde_json::from_str(out).unwrap();
        findings
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["check"] == "duties separated")
            .cloned()
            .unwrap()
    };
    let before =
        check(&String::from_utf8_lossy(&crate::support::doctor(&env.cli(), &["--json"]).stdout));
    assert_eq!(before["ok"], true, "{before}");
    let exclusive = crate::support::CLUSTER_LOGINS.write().await;
    let both = TestRole::new(db, "loader_ingest, loader_analyst").await;
    let out = env.cli().run(&["doctor", "--json"]);
    let finding = check(&String::from_utf8_lossy(&out.stdout));
    assert_eq!((out.status.code(), &finding["ok"]), (Some(3), &serde_json::json!(false)));
    assert!(finding["problem"].as_str().unwrap().contains(&both.name), "{finding}");
    // The fix, as doctor words it: revoke the reading role.
    assert!(finding["fix"].as_str().unwrap().contains("revoke the reading role"), "{finding}");
    sqlx::raw_sql(&format!("revoke loader_analyst from {}", both.name))
        .execute(&db.admin)
        .await
        .unwrap();
    let out = env.cli().run(&["doctor", "--json"]);
    assert_eq!(check(&String::from_utf8_lossy(&out.stdout))["ok"], true);
    drop(both);
    drop(exclusive);
}

/// A reveal returned an erased person's values (a late message, staged
/// and not yet transformed), and a record written before its message was staged returned that
/// message's values afterwards while saying values_returned = 0. Now an erased person's message
/// is `erased` in every state, and a record returns values only of the messages it covers.
#[tokio::test]
async fn a_reveal_honours_erasure_and_returns_no_more_than_its_record_says() {
    let db = TestDb::migrated().await;
    let ingest = TestRole::new(&db, "loader_ingest").await;
    let reader = TestRole::new(&db, "loader_pii_reader").await;
    let sent = OffsetDateTime::now_utc() - Duration::from_secs(600);
    stage_as(&ingest.pool, &[("d-1", r#"{"user_id": "dave", "ip": "10.55.0.1"}"#, sent)]).await;
    db.cli().ok(&["transform"]);
    db.cli().ok(&["forget", "--user-id", "dave", "--reference", "DSR-4"]);
    // Sent before the request, staged after it, not transformed yet; and one in a text body.
    stage_as(
        &ingest.pool,
        &[
            ("late-dave", r#"{"user_id": "dave", "ip": "10.55.0.2", "device_id": "x"}"#, sent),
            ("late-dave-text", "user_id=dave ip=10.55.0.3", sent),
        ],
    )
    .await;
    let (revealed,): (serde_json::Value,) =
        sqlx::query_as("call loader.reveal(array['late-dave', 'late-dave-text'], 'INC-1')")
            .fetch_one(&reader.pool)
            .await
            .unwrap();
    for entry in revealed.as_array().unwrap() {
        assert_eq!(entry["status"], "erased", "{revealed}");
        assert!(entry["ip"].is_null() && entry["device_id"].is_null(), "{revealed}");
    }
    assert_eq!(
        db.count(
            "select values_returned::bigint from loader.pii_access_log order by id desc limit 1"
        )
        .await,
        0
    );

    // A session whose client_encoding cannot hold every value is refused before any record:
    // converting a value would fail with an error quoting its bytes.
    let mut latin1 = reader.pool.acquire().await.unwrap();
    let before = db.count("select count(*) from loader.pii_access_log").await;
    let refused = sqlx::raw_sql(
        "set client_encoding = 'LATIN1'; call loader.reveal(array['late-dave'], 'INC-9')",
    )
    .execute(&mut *latin1)
    .await
    .unwrap_err();
    assert_eq!(sqlstate(&refused), "0A000", "{refused}");
    assert_eq!(db.count("select count(*) from loader.pii_access_log").await, before);
    drop(latin1);

    // A record written before its message was staged covers nothing of it, on every read.
    let (access,): (i64,) = sqlx::query_as("select loader._reveal_log(array['early'], 'INC-2')")
        .fetch_one(&reader.pool)
        .await
        .unwrap();
    stage_as(
        &ingest.pool,
        &[("early", r#"{"user_id": "erin", "ip": "10.55.0.4", "device_id": "日本-7"}"#, sent)],
    )
    .await;
    for _ in 0..2 {
        let (read,): (serde_json::Value,) = sqlx::query_as("select loader._reveal_read($1)")
            .bind(access)
            .fetch_one(&reader.pool)
            .await
            .unwrap();
        assert_eq!(read[0]["status"], "not staged", "{read}");
        assert!(read[0]["ip"].is_null(), "{read}");
    }
    assert_eq!(
        db.count(
            "select values_returned::bigint from loader.pii_access_log order by id desc limit 1"
        )
        .await,
        0
    );
    // A record written once it is staged covers it: one value, returned.
    let (revealed,): (serde_json::Value,) =
        sqlx::query_as("call loader.reveal(array['early'], 'INC-3')")
            .fetch_one(&reader.pool)
            .await
            .unwrap();
    assert_eq!(revealed[0]["ip"], "10.55.0.4", "{revealed}");
    // Outside ASCII a value comes escaped, so no client_encoding can fail to hold it.
    assert_eq!(revealed[0]["device_id"], "\\u65e5\\u672c-7", "{revealed}");
    assert_eq!(
        db.count(
            "select values_returned::bigint from loader.pii_access_log order by id desc limit 1"
        )
        .await,
        1
    );

    // A snapshot taken before an erasure would still see the erased body: a reveal under
    // REPEATABLE READ is refused, and once the erasure commits a read says erased.
    let (access,): (i64,) = sqlx::query_as("select loader._reveal_log(array['early'], 'INC-4')")
        .fetch_one(&reader.pool)
        .await
        .unwrap();
    let mut old = reader.pool.begin().await.unwrap();
    sqlx::raw_sql("set transaction isolation level repeatable read; select 1")
        .execute(&mut *old)
        .await
        .unwrap();
    db.cli().ok(&["forget", "--user-id", "erin", "--reference", "DSR-5"]);
    let refused = sqlx::query("select loader._reveal_read($1)")
        .bind(access)
        .execute(&mut *old)
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&refused), "25000", "{refused}");
    old.rollback().await.unwrap();
    let (read,): (serde_json::Value,) = sqlx::query_as("select loader._reveal_read($1)")
        .bind(access)
        .fetch_one(&reader.pool)
        .await
        .unwrap();
    assert_eq!(read[0]["status"], "erased", "{read}");
    assert!(read[0]["ip"].is_null(), "{read}");
}

/// An analyst that claimed the whole work list in a transaction it left
/// idle (its own idle timeout off) stopped all loading while `loader transform` exited 0 with
/// rows pending and `last_drained_at` kept moving. Now the claimed rows do not count as drained,
/// and the next transform ends that session once it has held them past evict_after_seconds
/// (recorded with its pid and login), then loads them.
#[tokio::test]
async fn an_analyst_holding_claimed_rows_stops_no_loading_and_no_progress_signal() {
    let env = TestEnv::new(30).await;
    let db = &env.db;
    sqlx::raw_sql("update loader.settings set value = '2' where name = 'evict_after_seconds'")
        .execute(&db.pool)
        .await
        .unwrap();
    let messages: Vec<(String, String)> = (0..50)
        .map(|i| (format!("h-{i}"), format!(r#"{{"user_id": "u{i}", "ip": "10.0.0.{i}"}}"#)))
        .collect();
    crate::support::stage(db, &messages, OffsetDateTime::now_utc()).await;
    db.cli().ok(&["transform"]);
    let drained_before: OffsetDateTime =
        sqlx::query_scalar("select last_drained_at from loader.pipeline_status")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let more: Vec<(String, String)> =
        (50..100).map(|i| (format!("h-{i}"), format!(r#"{{"user_id": "u{i}"}}"#))).collect();
    crate::support::stage(db, &more, OffsetDateTime::now_utc()).await;

    let analyst = TestRole::new(db, "loader_analyst").await;
    let mut held = analyst.pool.acquire().await.unwrap();
    sqlx::raw_sql(
        "set idle_in_transaction_session_timeout = 0; set statement_timeout = 0;
         begin; select * from loader.transform_batch(2147483647);",
    )
    .execute(&mut *held)
    .await
    .unwrap();
    // A stranger's write transaction left open too (a role of no loader's, say another
    // application's): loader never ends it. (Its own connection, closed at the end: a session
    // left open in a transaction would hold the cluster's xmin for the other tests.)
    let stranger = TestRole::new(db, "").await;
    let mut bystander = sqlx::PgConnection::connect(&stranger.url).await.unwrap();
    sqlx::raw_sql("begin; select pg_current_xact_id();").execute(&mut bystander).await.unwrap();
    // Nothing drained while the rows wait.
    sqlx::raw_sql("select * from loader.transform_batch(10)").execute(&db.pool).await.unwrap();
    let drained_now: OffsetDateTime =
        sqlx::query_scalar("select last_drained_at from loader.pipeline_status")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(drained_now, drained_before, "held rows are not drained");

    // The downstream cursor's horizon (docs/analysts.md) cannot pass the held transaction.
    let held_xid: i64 = sqlx::query_scalar(
        "select backend_xid::text::bigint from pg_stat_activity where usename = $1",
    )
    .bind(&analyst.name)
    .fetch_one(&db.admin)
    .await
    .unwrap();
    let horizon = "select pg_snapshot_xmin(pg_current_snapshot())::text::bigint";
    let before: i64 = sqlx::query_scalar(horizon).fetch_one(&db.pool).await.unwrap();
    assert!(before <= held_xid, "{before} {held_xid}");

    let transformer = TestRole::new(db, "loader_transformer").await;
    let started = std::time::Instant::now();
    let out = Cli::new(&transformer.url, &env.queue.name).ok(&["transform"]);
    assert!(out.contains("loaded 50, rejected 0, pending 0"), "{out}");
    assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());
    // One row per termination loader sent: two transform sessions may both end the same one.
    let ended: Vec<(String, f64)> = sqlx::query_as(
        "select role, min(extract(epoch from held_for))::float8 from loader.evictions
          group by pid, role",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let alive = sqlx::raw_sql("select 1").execute(&mut bystander).await.is_ok();
    bystander.close().await.unwrap();
    assert!(alive, "a role of no loader's is never ended");
    assert_eq!(ended.len(), 1, "the analyst's session: {ended:?}");
    for (role, held_for) in ended {
        assert_eq!(role, analyst.name);
        assert!(held_for >= 2.0, "{held_for}");
    }
    assert!(sqlx::raw_sql("select 1").execute(&mut *held).await.is_err(), "the session was ended");
    let after: i64 = sqlx::query_scalar(horizon).fetch_one(&db.pool).await.unwrap();
    assert!(after > held_xid, "the downstream horizon moved on: {after} > {held_xid}");
    let drained_after: OffsetDateTime =
        sqlx::query_scalar("select last_drained_at from loader.pipeline_status")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(drained_after > drained_before);
    db.cli().ok(&["reconcile", "--skip-queue"]);
}

/// Hostile values of each argument type a routine of schema loader takes, as SQL: NULL, empty,
/// huge, negative, back-dated and future times, another run's id and token, staged messages'
/// ids (vector 1 stages two messages into the caller's own run, with impossible sent_at). Vector `k` gives every argument its type's `k`-th value. `:myrun` and `:'mytoken'` are
/// the caller's own run (psql variables: a run it registered, or nonsense for a role that
/// cannot register one).
fn hostile(sql_type: &str, k: usize) -> String {
    let values: [&str; 5] = match sql_type {
        "bigint" => ["NULL", ":myrun", "0", "9223372036854775807", ":otherrun"],
        "integer" => ["NULL", "-1", "0", "2147483647", "1"],
        "text" => ["NULL", ":'mytoken'", "repeat('x', 100000)", ":'othertoken'", "'planted'"],
        "text[]" => [
            "NULL",
            "array['hostile-1', 'hostile-2']",
            "array[NULL]",
            "array(select 'm-' || g from generate_series(1, 1000) g)",
            "array['planted', 'planted-pending']",
        ],
        "boolean" => ["NULL", "true", "false", "true", "false"],
        "boolean[]" => [
            "NULL",
            "array[true, false]",
            "array[NULL]",
            "array(select true from generate_series(1, 1000))",
            "array[true, true]",
        ],
        "timestamp with time zone[]" => [
            "NULL",
            "array['2000-01-01', '2100-01-01']",
            "array[NULL]",
            "array(select '2000-01-01'::timestamptz from generate_series(1, 1000))",
            "array['2100-01-01', '1970-01-01']",
        ],
        "integer[]" => [
            "NULL",
            "array[1, 1]",
            "'{}'",
            "array(select -1 from generate_series(1, 1000))",
            "array[1, 2147483647]",
        ],
        "jsonb" => ["NULL", "'{}'", "'null'", "'[]'", r#"'{"x": 1}'"#],
        other => panic!("no hostile values for {other}: add them (a new routine's argument type)"),
    };
    format!("({})::{sql_type}", values[k])
}

/// Issue 26, "attacks as a class" (docs/security.md "What holds"): every function and
/// procedure a role below the owner may execute, taken from the database's own privileges (a
/// routine granted tomorrow is covered the day it is), called by that role's login with
/// hostile arguments in a transaction then left open, all at once (classes 3, 4, 6, 13; each
/// role's calls in one transaction, so also combined). While they are open, new logins load
/// with nothing left pending (the holders are ended past evict_after_seconds); no planted raw
/// value, mask key or erasure key reaches any caller (2, 14); and once they are gone, reconcile
/// proves every message accounted for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_routine_below_the_owner_holds_under_hostile_arguments_and_open_transactions() {
    use std::io::Write;
    let db = TestDb::migrated().await;
    sqlx::raw_sql("update loader.settings set value = '2' where name = 'evict_after_seconds'")
        .execute(&db.pool)
        .await
        .unwrap();
    let sent = OffsetDateTime::now_utc();
    let secret =
        r#"{"user_id": "planted-user", "ip": "10.123.45.67", "device_id": "secret-device-xyz"}"#;
    crate::support::stage(&db, &[("planted".into(), secret.into())], sent).await;
    db.cli().ok(&["transform"]);
    let pending = secret.replace("10.123.45.67", "10.123.45.68");
    crate::support::stage(&db, &[("planted-pending".into(), pending)], sent).await;
    let other_ingest = TestRole::new(&db, "loader_ingest").await;
    let other = IngestRun::register(&other_ingest.pool, "q", "drain").await.unwrap();
    let (other_run, other_token): (i64, String) =
        sqlx::query_as("select id, token from loader.ingest_runs where id = $1")
            .bind(other.id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let keys: Vec<String> = sqlx::query_scalar(
        "select encode(key, 'hex') from loader.mask_keys
         union all select encode(key, 'hex') from loader.erasure_key",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();

    let roles = ["loader_ingest", "loader_analyst", "loader_transformer", "loader_pii_reader"];
    let mut logins = Vec::new();
    let mut sessions = Vec::new();
    for role in roles {
        let routines: Vec<(String, String, Vec<String>)> = sqlx::query_as(
            "select p.proname::text, p.prokind::text,
                    array(select format_type(t, null) from unnest(p.proargtypes) t)
               from pg_proc p
              where p.pronamespace = 'loader'::regnamespace
                and has_function_privilege($1, p.oid, 'execute')
              order by 1 desc", // stage before finish_run: the caller's own run stays open
        )
        .bind(role)
        .fetch_all(&db.pool)
        .await
        .unwrap();
        assert!(!routines.is_empty(), "{role} may execute something");
        let login = TestRole::new(&db, role).await;
        for k in 0..5 {
            let mut script = format!(
                "\\set ON_ERROR_ROLLBACK on\n\\set myrun 1\n\\set mytoken nonsense\n\
                 \\set otherrun {other_run}\n\\set othertoken {other_token}\n\
                 set idle_in_transaction_session_timeout = 0;\nset statement_timeout = 0;\n\
                 set client_min_messages = debug5;\nbegin;\n"
            );
            if role == "loader_ingest" {
                script.push_str(
                    "select run_id as myrun, run_token as mytoken \
                     from loader.register_run('q', 'drain', 'hostile') \\gset\n",
                );
            }
            for (name, kind, args) in &routines {
                let args: Vec<String> = args.iter().map(|t| hostile(t, k)).collect();
                let call = if kind == "p" { "call" } else { "select * from" };
                script.push_str(&format!("{call} loader.{name}({});\n", args.join(", ")));
            }
            let mut child = std::process::Command::new("psql")
                .args([login.url.as_str(), "-X", "-q", "-f", "-"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            child.stdin.as_mut().unwrap().write_all(script.as_bytes()).unwrap();
            sessions.push((role, k, child));
        }
        logins.push(login);
    }
    // Every session has made its calls and now idles in its transaction (or was ended).
    let names: Vec<String> = logins.iter().map(|l| l.name.clone()).collect();
    for _ in 0..300 {
        let busy: i64 = sqlx::query_scalar(
            "select count(*) from pg_stat_activity
              where usename = any ($1) and state not like 'idle in transaction%'",
        )
        .bind(&names)
        .fetch_one(&db.admin)
        .await
        .unwrap();
        if busy == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Owner work and new logins go on while they are open.
    let messages: Vec<(String, String)> = (0..200)
        .map(|i| {
            (format!("new-{i}"), format!(r#"{{"user_id": "n{i}", "ip": "10.1.0.{}"}}"#, i % 250))
        })
        .collect();
    crate::support::stage(&db, &messages, OffsetDateTime::now_utc()).await;
    let transformer = TestRole::new(&db, "loader_transformer").await;
    let out = Cli::new(&transformer.url, "unused").ok(&["transform"]);
    assert!(out.contains("pending 0"), "{out}");
    assert_eq!(
        db.count("select count(*) from public.user_logins where message_id like 'new-%'").await,
        200
    );
    db.cli().ok(&["forget", "--user-id", "n1", "--reference", "DSR-sweep"]);
    // No session below the owner still holds a write transaction (and with it every snapshot's
    // xmin, so the downstream cursor): each was ended.
    let writers: i64 = sqlx::query_scalar(
        "select count(*) from pg_stat_activity where usename = any ($1) and backend_xid is not null",
    )
    .bind(&names)
    .fetch_one(&db.admin)
    .await
    .unwrap();
    assert_eq!(writers, 0);

    // What every caller received: no raw value, no key.
    for (role, k, mut child) in sessions {
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for value in ["10.123.45.67", "10.123.45.68", "secret-device-xyz", "planted-user"] {
            assert!(!text.contains(value), "{role} vector {k} saw {value}:\n{text}");
        }
        for key in &keys {
            assert!(!text.to_lowercase().contains(&key[..16]), "{role} vector {k} saw a key");
        }
    }
    let report = db.cli().ok(&["reconcile", "--skip-queue"]);
    assert!(report.contains("ok"), "{report}");
    assert_eq!(
        db.count(
            "select count(*) from loader.raw_logins r
              where r.erased_at is null
                and (select count(*) from public.user_logins u where u.message_id = r.message_id)
                  + (select count(*) from loader.login_rejects j where j.message_id = r.message_id)
                  + (select count(*) from loader.transform_queue q where q.raw_id = r.id) <> 1"
        )
        .await,
        0
    );
}

/// The transform kept each erased body's fingerprint with INSERT ... ON CONFLICT on a unique
/// key: a batch holding one uncommitted (two copies of one erased body, the usual redrive or
/// replay) made every other batch inserting the same one wait for it, with no bound. Now the
/// fingerprints have no unique key, and nothing waits.
#[tokio::test]
async fn a_fingerprint_held_by_an_open_batch_makes_no_transform_wait() {
    let db = TestDb::migrated().await;
    sqlx::raw_sql("update loader.settings set value = '600' where name = 'evict_after_seconds'")
        .execute(&db.pool)
        .await
        .unwrap();
    db.cli().ok(&["forget", "--user-id", "erin", "--reference", "DSR-5"]);
    let body = r#"{"user_id": "erin", "ip": "10.66.0.1"}"#;
    let sent = OffsetDateTime::now_utc();
    crate::support::stage(&db, &[("c-1".into(), body.into()), ("c-2".into(), body.into())], sent)
        .await;
    let analyst = TestRole::new(&db, "loader_analyst").await;
    let mut held = analyst.pool.acquire().await.unwrap();
    sqlx::raw_sql("begin; select * from loader.transform_batch(1)")
        .execute(&mut *held)
        .await
        .unwrap();
    let mut owner = db.pool.acquire().await.unwrap();
    sqlx::raw_sql("set statement_timeout = '5s'").execute(&mut *owner).await.unwrap();
    let (rejected,): (i64,) = sqlx::query_as("select rejected from loader.transform_batch(100)")
        .fetch_one(&mut *owner)
        .await
        .expect("the other copy is suppressed at once, without waiting for the open batch");
    assert_eq!(rejected, 1);
    sqlx::raw_sql("commit").execute(&mut *held).await.unwrap();
    assert_eq!(
        db.count("select count(*) from loader.login_rejects where reason = 'erased'").await,
        2
    );
}
