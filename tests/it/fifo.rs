//! FIFO queues end to end: `loader send` (a file and --generate) to a `.fifo` queue, ingest and
//! run, a refused message through a FIFO dead-letter queue and back (`dlq list`, `dlq
//! redrive`), and `loader doctor`, which knows that a FIFO queue's DLQ must be FIFO too.

use std::time::Duration;

use crate::support::{FIXTURE, TestDb, TestEnv, TestQueue};

#[tokio::test]
async fn a_fifo_queue_with_a_fifo_dlq_works_end_to_end() {
    let env = TestEnv { db: TestDb::migrated().await, queue: TestQueue::new_fifo(2).await };
    let dlq = env.queue.attach_dead_letter_queue(2).await;
    assert!(dlq.name.ends_with(".fifo"));
    let (db, q) = (&env.db, &env.queue);
    sqlx::raw_sql(
        "alter table loader.raw_logins add constraint test_fifo_poison
           check (body->>'user_id' is distinct from 'poison')",
    )
    .execute(&db.pool)
    .await
    .unwrap();

    assert!(env.cli().ok(&["send", FIXTURE]).contains("sent 100"));
    assert!(env.cli().ok(&["send", "--generate", "50", "--seed", "3"]).contains("sent 50"));
    let dir = std::env::temp_dir().join(format!("loader-fifo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let poison = dir.join("poison.json");
    std::fs::write(&poison, r#"[{"user_id": "poison"}]"#).unwrap();
    env.cli().ok(&["send", poison.to_str().unwrap()]);
    // The same file sent again is sent again (a deduplication id per send and position).
    assert!(env.cli().ok(&["send", "--generate", "50", "--seed", "3"]).contains("sent 50"));

    env.cli().ok(&["ingest", "--wait-seconds", "1"]);
    env.cli().ok(&["run", "--once", "--wait-seconds", "1"]);
    // 100 + 50 + 50 sent as different messages (their MessageIds differ), the poison refused.
    assert_eq!(db.staged().await, 200);
    assert_eq!(db.loaded().await + db.rejected().await, 200);

    for _ in 0..10 {
        if dlq.depth().await.0 == 1 {
            break;
        }
        env.cli().ok(&["ingest", "--wait-seconds", "1"]);
        tokio::time::sleep(Duration::from_millis(2200)).await;
    }
    assert_eq!(dlq.depth().await.0, 1, "the refused message moved to the FIFO DLQ");
    let listed = env.cli().ok(&["dlq", "list"]);
    assert!(listed.contains("test_fifo_poison"), "{listed}");
    sqlx::raw_sql("alter table loader.raw_logins drop constraint test_fifo_poison")
        .execute(&db.pool)
        .await
        .unwrap();
    let moved = env.cli().ok(&["dlq", "redrive"]);
    assert!(moved.contains("1 of 1 moved"), "{moved}");
    assert_eq!(dlq.depth().await, (0, 0, 0), "the move task emptied the FIFO DLQ");
    // LocalStack moves the message with its deduplication id, and the FIFO source queue drops
    // it as a duplicate inside its 5-minute window (AWS gives a redriven message a new id:
    // docs/deploying.md "FIFO queues"): nothing arrives to stage here.
    env.cli().ok(&["run", "--once", "--wait-seconds", "1"]);
    assert!(db.staged().await >= 200);
    env.cli().ok(&["reconcile"]);

    let sqs = &q.queue;
    sqs.client()
        .set_queue_attributes()
        .queue_url(sqs.url())
        .attributes(aws_sdk_sqs::types::QueueAttributeName::VisibilityTimeout, "30")
        .send()
        .await
        .unwrap();
    let doctor = crate::support::doctor(&env.cli(), &[]);
    assert!(doctor.status.success(), "{}", String::from_utf8_lossy(&doctor.stdout));
    std::fs::remove_dir_all(&dir).ok();
}

/// A FIFO queue whose redrive policy names a standard queue is named by doctor (where SQS lets
/// such a policy be set at all: AWS refuses it, and then nothing is there to find).
#[tokio::test]
async fn doctor_names_a_fifo_queue_whose_dlq_is_not_fifo() {
    use aws_sdk_sqs::types::QueueAttributeName;
    let env = TestEnv { db: TestDb::migrated().await, queue: TestQueue::new_fifo(30).await };
    let standard = TestQueue::new(30).await;
    let sqs = &env.queue.queue;
    let arn = standard
        .queue
        .client()
        .get_queue_attributes()
        .queue_url(standard.queue.url())
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap()
        .attributes()
        .unwrap()[&QueueAttributeName::QueueArn]
        .clone();
    let set = sqs
        .client()
        .set_queue_attributes()
        .queue_url(sqs.url())
        .attributes(
            QueueAttributeName::RedrivePolicy,
            format!(r#"{{"deadLetterTargetArn":"{arn}","maxReceiveCount":"3"}}"#),
        )
        .send()
        .await;
    if let Err(e) = set {
        eprintln!("SQS refused a standard DLQ for a FIFO queue ({e}): nothing for doctor to find");
        return;
    }
    let out = env.cli().run(&["doctor", "--json"]);
    let findings: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let dlq = findings.as_array().unwrap().iter().find(|f| f["check"] == "dead-letter queue");
    let dlq = dlq.expect("a dead-letter queue finding");
    assert_eq!(dlq["ok"], false, "{dlq}");
    assert!(dlq["problem"].as_str().unwrap().contains("is a FIFO queue"), "{dlq}");
}
