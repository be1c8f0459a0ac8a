//! What a login granted `loader_pii_reader` tries: raw values without a record committed
//! before anything is read.

use super::*;

#[tokio::test]
async fn a_reader_sees_raw_values_only_through_the_recorded_path() {
    let db = TestDb::migrated().await;
    let fixture = fixture_messages();
    stage(&db, &fixture, SENT).await;
    sqlx::query("call loader.transform()").execute(&db.pool).await.unwrap();
    let reader = TestRole::new(&db, "loader_pii_reader").await;
    let analyst = TestRole::new(&db, "loader_analyst").await;
    let ingest = TestRole::new(&db, "loader_ingest").await;
    let body: serde_json::Value = serde_json::from_str(&fixture[3].1).unwrap();

    // The command, as the reader's login: the raw values, and one record of the call.
    let out = reader.cli().ok(&[
        "reveal",
        "--message-id",
        "fixture-3",
        "--message-id",
        "nope",
        "--purpose",
        "INC-1: fraud",
        "--json",
    ]);
    let revealed: Vec<loader::reveal::Revealed> = serde_json::from_str(&out).unwrap();
    assert_eq!(revealed[0].ip.as_deref(), body["ip"].as_str());
    assert_eq!(revealed[0].device_id.as_deref(), body["device_id"].as_str());
    assert_eq!(
        (revealed[0].status.as_str(), revealed[1].status.as_str()),
        ("revealed", "not staged")
    );
    assert_eq!(
        access_log(&db).await,
        [(
            reader.name.clone(),
            "INC-1: fraud".to_owned(),
            vec!["fixture-3".to_owned(), "nope".to_owned()],
            1
        )]
    );

    // No purpose, no values; too many messages, no values (until the owner raises the bound).
    for purpose in ["null", "''", "'   '"] {
        let err = sqlx::raw_sql(&format!("call loader.reveal(array['fixture-3'], {purpose})"))
            .execute(&reader.pool)
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&err), "22023", "{purpose}: {err}");
    }
    let many = (0..101).map(|i| format!("'fixture-{}'", i % 100)).collect::<Vec<_>>().join(", ");
    let too_many = format!("call loader.reveal(array[{many}], 'bulk')");
    let err = sqlx::raw_sql(&too_many).execute(&reader.pool).await.unwrap_err();
    assert_eq!(sqlstate(&err), "54000", "{err}");
    sqlx::raw_sql("update loader.settings set value = '200' where name = 'reveal_max_messages'")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::raw_sql(&too_many).execute(&reader.pool).await.unwrap();
    assert_eq!(access_log(&db).await.len(), 2, "refused calls record nothing, the bulk one does");

    // No read without a committed record: the parts called in one transaction, or someone
    // else's record, give nothing.
    let mut conn = reader.pool.acquire().await.unwrap();
    sqlx::raw_sql("begin").execute(&mut *conn).await.unwrap();
    let id: i64 = sqlx::query_scalar("select loader._reveal_log(array['fixture-3'], 'sneaky')")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    let err = sqlx::query("select loader._reveal_read($1)")
        .bind(id)
        .execute(&mut *conn)
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "42501", "{err}");
    sqlx::raw_sql("rollback").execute(&mut *conn).await.unwrap();
    let other = TestRole::new(&db, "loader_pii_reader").await;
    let first: i64 = sqlx::query_scalar("select min(id) from loader.pii_access_log")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let err = sqlx::query("select loader._reveal_read($1)")
        .bind(first)
        .execute(&other.pool)
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "42501", "another reader's record: {err}");

    // The log cannot be changed by the reader (nor by the owner, without removing its guard);
    // the reader reads no table, no key, and hashes nothing.
    for sql in [
        "update loader.pii_access_log set purpose = 'x'",
        "delete from loader.pii_access_log",
        "truncate loader.pii_access_log",
        "insert into loader.pii_access_log (at, role, purpose, message_ids, values_returned) values (now(), 'x', 'x', '{}', 0)",
        "select * from loader.pii_access_log",
        "select * from loader.raw_logins",
        "select * from loader.mask_keys",
        "select * from loader.erasure_key",
        "select loader._user_hash('u', '\\x00')",
        "select loader._mask('dev-1', decode(repeat('41', 32), 'hex'))",
        "select * from public.user_logins",
    ] {
        denied(&reader.pool, sql).await;
    }
    for sql in [
        "update loader.pii_access_log set purpose = 'x'",
        "delete from loader.pii_access_log",
        "truncate loader.pii_access_log",
    ] {
        let err = sqlx::raw_sql(sql).execute(&db.pool).await.unwrap_err();
        assert!(err.to_string().contains("append-only"), "the owner too: {sql}: {err}");
    }

    // Neither an analyst nor the ingest role can call any part of it.
    for role in [&analyst, &ingest] {
        for sql in [
            "call loader.reveal(array['fixture-3'], 'curious')",
            "select loader._reveal_log(array['fixture-3'], 'curious')",
            "select loader._reveal_read(1)",
        ] {
            denied(&role.pool, sql).await;
        }
    }

    // Purged and erased messages give their status, never a value.
    let user: String = body["user_id"].as_str().unwrap().to_owned();
    db.cli().ok(&["forget", "--user-id", &user, "--reference", "DSR-9"]);
    sqlx::raw_sql("call loader.purge_staged('0')").execute(&db.pool).await.unwrap();
    let out = reader.cli().ok(&[
        "reveal",
        "--message-id",
        "fixture-3",
        "--message-id",
        "fixture-4",
        "--purpose",
        "INC-2",
        "--json",
    ]);
    let revealed: Vec<loader::reveal::Revealed> = serde_json::from_str(&out).unwrap();
    let statuses: Vec<(&str, Option<&str>)> =
        revealed.iter().map(|r| (r.status.as_str(), r.ip.as_deref())).collect();
    assert_eq!(statuses, [("erased", None), ("purged", None)]);
}
