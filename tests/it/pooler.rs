//! Every command through PgBouncer (Debian's, started by `scripts/pgbouncer.sh`), in transaction
//! pooling mode and in session mode. In transaction mode a client's transactions land on
//! whichever server session is free (the pool holds three per database, fewer than the
//! sessions the commands open at once), so anything that outlived a transaction (a named
//! prepared statement, a session SET, a temporary table) would break here.

use crate::support::{TestEnv, TestQueue, required_env};

/// `db`'s URL through the pooler that `pooler_url_var` names (same owner, same database).
fn through(env: &TestEnv, pooler_url_var: &str) -> String {
    let pooler = required_env(pooler_url_var);
    let (_, host) = pooler.split_once('@').expect("user@host in the pooler URL");
    let host = host.split('/').next().unwrap();
    format!("postgres://{}@{host}/{}", crate::support::OWNER, env.db.name)
}

/// The tour: migrate, send, ingest (small flushes: many statements), run, transform with four
/// sessions, an online rebuild and a rotation, reconcile, doctor, the DLQ listed and redriven,
/// purge and the masked data's retention; every message staged once and accounted for.
async fn every_command_through(pooler_url_var: &str) {
    let env = TestEnv::new(2).await;
    let dlq: TestQueue = env.queue.attach_dead_letter_queue(2).await;
    let url = through(&env, pooler_url_var);
    let q = env.queue.name.as_str();
    let ok = |args: &[&str]| crate::support::Cli::new(&url, q).ok(args);

    let migrated = ok(&["migrate"]);
    assert!(migrated.contains("up to date"), "{migrated}");
    sqlx::raw_sql(
        "alter table loader.raw_logins add constraint test_pooler_poison
           check (body->>'user_id' is distinct from 'poison')",
    )
    .execute(&env.db.pool)
    .await
    .unwrap();
    let mut bodies = loader::send::generate(300, 5);
    bodies.push(r#"{"user_id": "poison"}"#.to_owned());
    env.queue.send(&bodies).await;
    ok(&["send", crate::support::FIXTURE]);

    ok(&["ingest", "--wait-seconds", "1", "--flush-messages", "20", "--receivers", "4"]);
    ok(&["run", "--once", "--wait-seconds", "1", "--workers", "4", "--batch-size", "25"]);
    let transformed = ok(&["transform", "--workers", "4", "--batch-size", "25"]);
    assert!(transformed.contains("pending 0"), "{transformed}");
    ok(&["transform", "--rebuild", "--workers", "4"]);
    let rotated = ok(&["keys", "rotate", "--workers", "4"]);
    assert!(rotated.contains("active"), "{rotated}");
    assert_eq!(env.db.staged().await, 400, "every message but the poison one, once");
    assert_eq!(env.db.loaded().await + env.db.rejected().await, 400);

    // The poison message, refused at each receive, reaches the DLQ; listed, then redriven
    // once the constraint is gone.
    for _ in 0..10 {
        if dlq.depth().await.0 == 1 {
            break;
        }
        ok(&["ingest", "--wait-seconds", "1"]);
        tokio::time::sleep(std::time::Duration::from_millis(2200)).await;
    }
    assert_eq!(dlq.depth().await.0, 1, "the poison message is in the DLQ");
    let listed = ok(&["dlq", "list"]);
    assert!(listed.contains("test_pooler_poison"), "{listed}");
    sqlx::raw_sql("alter table loader.raw_logins drop constraint test_pooler_poison")
        .execute(&env.db.pool)
        .await
        .unwrap();
    ok(&["dlq", "redrive"]);
    ok(&["run", "--once", "--wait-seconds", "1"]);

    let reconciled = ok(&["reconcile"]);
    assert!(!reconciled.contains("FAIL"), "{reconciled}");
    // The short visibility timeout served the DLQ above; doctor wants loader's minimum.
    let sqs = &env.queue.queue;
    sqs.client()
        .set_queue_attributes()
        .queue_url(sqs.url())
        .attributes(aws_sdk_sqs::types::QueueAttributeName::VisibilityTimeout, "30")
        .send()
        .await
        .unwrap();
    let doctor = crate::support::doctor(&crate::support::Cli::new(&url, q), &[]);
    let doctor_out = String::from_utf8_lossy(&doctor.stdout);
    assert!(doctor.status.success(), "{doctor_out}");
    let purged = ok(&["purge", "--older-than-days", "0", "--batch-size", "50"]);
    assert!(purged.contains("purged 401"), "{purged}");
    assert_eq!(env.db.staged().await, 401);
    assert_eq!(env.db.pending().await, 0);
    // The masked data's retention, in batches that move between server sessions too.
    sqlx::query(
        "update public.user_logins set create_date = '2020-01-01'
          where message_id in (select message_id from public.user_logins order by message_id limit 120)",
    )
    .execute(&env.db.pool)
    .await
    .unwrap();
    let ended = ok(&["purge", "--masked-older-than-months", "12", "--batch-size", "50"]);
    assert!(ended.starts_with("ended 120 masked rows"), "{ended}");
    ok(&["reconcile", "--skip-queue"]);
}

#[tokio::test]
async fn every_command_works_through_pgbouncer_in_transaction_mode() {
    every_command_through("LOADER_PGBOUNCER_TRANSACTION_URL").await;
}

#[tokio::test]
async fn every_command_works_through_pgbouncer_in_session_mode() {
    every_command_through("LOADER_PGBOUNCER_SESSION_URL").await;
}
