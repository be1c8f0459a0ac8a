//! What a login granted `loader_ingest` tries: writing outside its own run, and recording what
//! its staging did not see.

use super::*;

/// The ingest role could insert server-owned columns (purged_at, staged_at, ids with
/// OVERRIDING SYSTEM VALUE) and update any run's counters. Now its only write path is the
/// staging functions, for a run it registered itself.
#[tokio::test]
async fn the_ingest_role_stages_into_its_own_run_and_nothing_else() {
    let db = TestDb::migrated().await;
    let ingest = TestRole::new(&db, "loader_ingest").await;
    let other =
        loader::staging::IngestRun::register(&db.pool, "other-queue", "drain").await.unwrap();

    for forged in [
        "insert into loader.raw_logins (message_id, body, body_is_json, queue, purged_at)
         values ('f1', '{}', true, 'q', now())",
        "insert into loader.raw_logins (message_id, body, body_is_json, queue, staged_at)
         values ('f2', '{}', true, 'q', 'infinity')",
        "insert into loader.raw_logins (id, message_id, body, body_is_json, queue)
         overriding system value values (1000000, 'f3', '{}', true, 'q')",
        "update loader.ingest_runs set staged = 0",
        "insert into loader.ingest_runs (queue, mode, loader_version) values ('q', 'drain', 'x')",
        "select token from loader.ingest_runs",
        "select message_id from loader.raw_logins",
        "call loader.purge_staged('0')",
        "select loader.purge_staged_batch(now(), 10)",
    ] {
        denied(&ingest.pool, forged).await;
    }

    // Its own run: stages, with every server-owned column set by the server.
    let mine =
        loader::staging::IngestRun::register(&ingest.pool, "login-queue", "drain").await.unwrap();
    let mut conn = ingest.pool.acquire().await.unwrap();
    let messages: Vec<_> = fixture_messages()
        .into_iter()
        .map(|(id, body)| loader::staging::RawMessage {
            message_id: id,
            body,
            sent_at: Some(SENT),
            receive_count: Some(1),
        })
        .collect();
    let staged = loader::staging::stage(&mut conn, &mine, &messages).await.unwrap();
    assert_eq!(staged.outcome.staged, 100);
    let (run_ids, queues, purged, fresh): (i64, i64, i64, i64) = sqlx::query_as(
        "select count(distinct ingest_run_id), count(distinct queue), count(purged_at),
                count(*) filter (where staged_at > now() - interval '1 minute')
           from loader.raw_logins",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((run_ids, queues, purged, fresh), (1, 1, 0, 100));

    // Another run, named by its id with a token that is not its own: refused, untouched.
    let (_, my_token): (i64, String) =
        sqlx::query_as("select * from loader.register_run('q', 'drain', 'x')")
            .fetch_one(&ingest.pool)
            .await
            .unwrap();
    let id = other.id;
    for forged in [
        format!("select loader.record_deletes({id}, '{my_token}', 1000, 0)"),
        format!("select loader.finish_run({id}, '{my_token}')"),
        format!(
            "select loader.stage({id}, '{my_token}', array['f4'], array['{{}}'], array[true],
                                 array[now()], array[1], array[1])"
        ),
    ] {
        denied(&ingest.pool, &forged).await;
    }
    let untouched: (i64, i64, i64, Option<time::OffsetDateTime>) = sqlx::query_as(
        "select received, deleted, refused, finished_at from loader.ingest_runs where id = $1",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(untouched, (0, 0, 0, None), "the other run is as it was");
    // A finished run takes nothing more, even from its own process.
    mine.finish(&ingest.pool, false).await.unwrap();
    let err = loader::staging::stage(&mut conn, &mine, &messages[..1]).await.unwrap_err();
    assert!(format!("{err:#}").contains("is not open"), "{err:#}");
}

/// The ingest role could record refusals for messages it never staged
/// (another run's, or ids never received), negative delete counts, and back-date staged_at by
/// holding its transaction open. Now a refusal is recorded only by `loader.stage` itself,
/// counts only grow and never past what the run received, staged_at is the time of the call,
/// and each run names the login that registered it (its queue name is that login's claim).
#[tokio::test]
async fn the_ingest_role_can_record_only_what_its_own_staging_saw() {
    let db = TestDb::migrated().await;
    let ingest = TestRole::new(&db, "loader_ingest").await;
    let run =
        loader::staging::IngestRun::register(&ingest.pool, "login-queue", "drain").await.unwrap();
    let (token,): (String,) = sqlx::query_as("select token from loader.ingest_runs where id = $1")
        .bind(run.id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let id = run.id;

    // No way to write a refusal by hand.
    let err = sqlx::raw_sql(&format!(
        "select loader.record_refusals({id}, '{token}', array['never-received'], array['23514'], array[null])"
    ))
    .execute(&ingest.pool)
    .await
    .unwrap_err();
    assert_eq!(sqlstate(&err), "42883", "{err}");

    // Counts never negative, never past what the run received.
    for (deleted, failures) in [(1000, -3), (-1, 0), (1, 0)] {
        let err = sqlx::raw_sql(&format!(
            "select loader.record_deletes({id}, '{token}', {deleted}, {failures})"
        ))
        .execute(&ingest.pool)
        .await
        .unwrap_err();
        assert_eq!(sqlstate(&err), "22023", "{deleted} {failures}: {err}");
    }

    // A transaction held open before staging does not back-date staged_at.
    let mut conn = ingest.pool.acquire().await.unwrap();
    sqlx::raw_sql("begin; select pg_sleep(1.5)").execute(&mut *conn).await.unwrap();
    let messages: Vec<loader::staging::RawMessage> = fixture_messages()[..10]
        .iter()
        .map(|(id, body)| loader::staging::RawMessage {
            message_id: id.clone(),
            body: body.clone(),
            sent_at: Some(SENT),
            receive_count: Some(1),
        })
        .collect();
    let staged = loader::staging::stage(&mut conn, &run, &messages).await.unwrap();
    assert_eq!(staged.outcome.staged, 10);
    sqlx::raw_sql("commit").execute(&mut *conn).await.unwrap();
    let late: i64 = db
        .count(
            "select count(*) from loader.raw_logins r join loader.ingest_runs i on i.id = r.ingest_run_id
              where r.staged_at < i.started_at + interval '1.4 seconds'",
        )
        .await;
    assert_eq!(late, 0, "staged_at is the time of the staging call");
    sqlx::raw_sql(&format!("select loader.record_deletes({id}, '{token}', 10, 0)"))
        .execute(&ingest.pool)
        .await
        .unwrap();

    // A refusal is the staging call's own, for a message of this run, with its code only.
    sqlx::raw_sql(
        "alter table loader.raw_logins add constraint test_no_poison
             check (body->>'user_id' is distinct from 'poison')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let poison = loader::staging::RawMessage {
        message_id: "poison-1".into(),
        body: r#"{"user_id": "poison", "ip": "10.9.9.9"}"#.into(),
        sent_at: Some(SENT),
        receive_count: Some(3),
    };
    let fine = loader::staging::RawMessage {
        message_id: "fine-1".into(),
        body: r#"{"user_id": "fine"}"#.into(),
        ..poison.clone()
    };
    let staged = loader::staging::stage(&mut conn, &run, &[poison, fine]).await.unwrap();
    assert_eq!(staged.outcome.staged, 1);
    assert_eq!(staged.refused.into_iter().collect::<Vec<_>>(), ["poison-1"]);
    let ledger: Vec<(String, String, Option<String>, i64)> = sqlx::query_as(
        "select message_id, sqlstate, constraint_name, ingest_run_id from loader.refusals",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        ledger,
        [("poison-1".to_owned(), "23514".to_owned(), Some("test_no_poison".to_owned()), id)]
    );

    let (queue, by, received, staged, refused): (String, Option<String>, i64, i64, i64) =
        sqlx::query_as(
            "select queue, registered_by, received, staged, refused from loader.ingest_runs where id = $1",
        )
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!((queue.as_str(), by.as_deref()), ("login-queue", Some(ingest.name.as_str())));
    assert_eq!((received, staged, refused), (11, 11, 1));
}
