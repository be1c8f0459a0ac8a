//! The dead-letter queue: messages PostgreSQL refuses reach it with their reason recorded,
//! `loader dlq list` shows them (harmlessly, without bodies), and once the cause is fixed
//! `loader dlq redrive` plus an ingest stage them, with reconcile accounting for each by id.

use std::time::Duration;

use serde_json::Value;

use crate::support::TestEnv;

async fn wait_for_dead_letters(env: &TestEnv, dlq: &crate::support::TestQueue, expected: u64) {
    for _ in 0..20 {
        if dlq.depth().await.0 == expected {
            return;
        }
        // Each drain receives the refused messages once more; past maxReceiveCount SQS moves
        // them to the DLQ instead of handing them out.
        env.cli().ok(&["ingest", "--wait-seconds", "1"]);
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    panic!("the DLQ never held {expected} messages: {:?}", dlq.depth().await);
}

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[tokio::test]
async fn refused_messages_reach_the_dlq_with_their_reason_and_come_back_after_the_fix() {
    let env = TestEnv::new(1).await;
    let (db, q) = (&env.db, &env.queue);
    let dlq = q.attach_dead_letter_queue(2).await;
    let bodies = loader::send::generate(20, 11);
    let poison: Vec<String> = [3, 12]
        .iter()
        .map(|&i| {
            serde_json::from_str::<Value>(&bodies[i]).unwrap()["user_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    sqlx::raw_sql(&format!(
        "alter table loader.raw_logins add constraint test_refuses_two
           check (body->>'user_id' not in ('{}', '{}'))",
        poison[0], poison[1]
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    q.send(&bodies).await;
    wait_for_dead_letters(&env, &dlq, 2).await;
    assert_eq!(db.staged().await, 18);

    // The ledger: both messages, refused once per receive, with code and constraint only.
    let ledger: Vec<(String, String, Option<String>, i64)> = sqlx::query_as(
        "select message_id, sqlstate, constraint_name, count(*) from loader.refusals
          group by 1, 2, 3 order by 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(ledger.len(), 2, "{ledger:?}");
    for (_, sqlstate, constraint, times) in &ledger {
        assert_eq!((sqlstate.as_str(), constraint.as_deref()), ("23514", Some("test_refuses_two")));
        assert!(*times >= 2, "refused at every receive: {times}");
    }
    let refused_ids: Vec<&str> = ledger.iter().map(|l| l.0.as_str()).collect();

    // dlq list: ids, counts, reasons; never bodies. Listing leaves them visible in the DLQ.
    let listed = json(&env.cli().ok(&["dlq", "list", "--json"]));
    let listed = listed.as_array().unwrap();
    let mut ids: Vec<&str> = listed.iter().map(|l| l["message_id"].as_str().unwrap()).collect();
    ids.sort();
    assert_eq!(ids, refused_ids);
    for l in listed {
        assert_eq!(l["refusal"]["sqlstate"], "23514", "{l}");
        assert_eq!(l["refusal"]["constraint_name"], "test_refuses_two", "{l}");
        assert!(l["receive_count"].as_i64().unwrap() >= 1 && l["sent_at"].is_string(), "{l}");
    }
    let table = env.cli().ok(&["dlq", "list"]);
    assert!(table.contains("test_refuses_two") && table.contains(refused_ids[0]), "{table}");
    for user in &poison {
        assert!(!table.contains(user.as_str()), "a body leaked into the listing");
    }
    assert_eq!(dlq.depth().await, (2, 0, 0), "listing left them visible in the DLQ");

    // Reconcile names both, in the DLQ, and is clean otherwise.
    let out = crate::support::Cli::new(&db.url, &q.name).run(&["reconcile", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    let report = json(&String::from_utf8_lossy(&out.stdout));
    let r = &report["refusals"];
    assert_eq!((r["refused_messages"].as_i64(), r["staged_later"].as_i64()), (Some(2), Some(0)));
    let mut in_dlq: Vec<&str> =
        r["in_dead_letter_queue"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    in_dlq.sort();
    assert_eq!(in_dlq, refused_ids);
    assert_eq!(r["on_queue"].as_array().unwrap().len(), 0);

    // The fix, the redrive, an ingest: every message staged once, the DLQ empty.
    sqlx::raw_sql("alter table loader.raw_logins drop constraint test_refuses_two")
        .execute(&db.pool)
        .await
        .unwrap();
    let moved = env.cli().ok(&["dlq", "redrive"]);
    assert!(moved.contains("completed, 2 of 2 moved"), "{moved}");
    assert_eq!(dlq.depth().await.0, 0);
    env.cli().ok(&["ingest", "--wait-seconds", "1"]);
    assert_eq!(db.staged().await, 20);
    env.cli().ok(&["transform"]);
    let report = json(&env.cli().ok(&["reconcile", "--json"]));
    let r = &report["refusals"];
    assert_eq!((r["refused_messages"].as_i64(), r["staged_later"].as_i64()), (Some(2), Some(2)));
    assert_eq!(r["in_dead_letter_queue"].as_array().unwrap().len(), 0);
}
