//! The SQL transform, called as an analyst would call it: field rules, masks, rejects,
//! idempotence, rebuild after rotation, concurrency, and privileges.

use std::collections::HashMap;

use crate::support::{TestDb, TestRole, fixture_messages, stage};
use serde_json::json;
use time::macros::datetime;

/// Staged at a fixed past instant, one second before midnight UTC.
const SENT: time::OffsetDateTime = datetime!(2020-02-29 23:59:59 UTC);

/// `call loader.transform()`: (loaded, rejected, pending).
async fn call_transform(pool: &sqlx::PgPool) -> (i64, i64, i64) {
    call_transform_by_reason(pool).await.0
}

/// `call loader.transform()`: (loaded, rejected, pending) and its rejects by reason, which
/// always add up to its rejected count.
async fn call_transform_by_reason(pool: &sqlx::PgPool) -> ((i64, i64, i64), HashMap<String, i64>) {
    type Row = (i64, i64, i64, sqlx::types::Json<HashMap<String, i64>>);
    let (loaded, rejected, pending, by_reason): Row = sqlx::query_as("call loader.transform()")
        .fetch_one(pool)
        .await
        .expect("call loader.transform()");
    assert_eq!(by_reason.0.values().sum::<i64>(), rejected, "{by_reason:?}");
    ((loaded, rejected, pending), by_reason.0)
}

fn msgs(bodies: &[(&str, serde_json::Value)]) -> Vec<(String, String)> {
    bodies.iter().map(|(id, b)| ((*id).to_owned(), b.to_string())).collect()
}

/// A fingerprint of the loader rows of user_logins, to compare table states.
async fn table_state(db: &TestDb) -> String {
    sqlx::query_scalar(
        "select coalesce(md5(string_agg(t::text, '|' order by message_id)), '')
           from (select message_id, user_id, device_type, masked_ip, masked_device_id, locale,
                        app_version, create_date, ip_network, app_version_text, mask_key_id
                   from public.user_logins where message_id is not null) t",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn fixture_loads_99_rows_and_rejects_1_as_an_analyst() {
    let db = TestDb::migrated().await;
    let analyst = TestRole::new(&db, "loader_analyst").await;
    stage(&db, &fixture_messages(), SENT).await;

    assert_eq!(call_transform(&analyst.pool).await, (99, 1, 0));

    let rows: i64 = sqlx::query_scalar("select count(*) from public.user_logins")
        .fetch_one(&analyst.pool)
        .await
        .unwrap();
    assert_eq!(rows, 99);
    let reject: (String, String) =
        sqlx::query_as("select message_id, reason from loader.login_rejects")
            .fetch_one(&analyst.pool)
            .await
            .unwrap();
    let malformed =
        fixture_messages().into_iter().find(|(_, b)| b.contains("oops_wrong_msg_type")).unwrap();
    assert_eq!(reject, (malformed.0, "user_id_missing".to_owned()));

    // The invariant: every staged message has exactly one outcome.
    assert_eq!(
        db.count(
            "select (select count(*) from loader.raw_logins)
                  - (select count(*) from public.user_logins where message_id is not null)
                  - (select count(*) from loader.login_rejects)
                  - (select count(*) from loader.transform_queue)"
        )
        .await,
        0
    );

    let versions: HashMap<String, Option<i32>> = sqlx::query_as::<_, (String, Option<i32>)>(
        "select user_id, app_version from public.user_logins",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    assert_eq!(versions["424cdd21-063a-43a7-b91b-7ca1a833afae"], Some(20300), "2.3.0");
    assert_eq!(versions["181452ad-20c3-4e93-86ad-1934c9248903"], Some(9600), "0.96");
    assert_eq!(versions["5082b1ae-6523-4e3b-a1d8-9750b4407ee8"], Some(30700), "3.7");

    // create_date is the UTC day of SentTimestamp, not today.
    assert_eq!(
        db.count("select count(*) from public.user_logins where create_date = '2020-02-29'").await,
        99
    );
    // locale null stays null: the fixture has some.
    let null_locales = fixture_messages()
        .iter()
        .filter(|(_, b)| {
            serde_json::from_str::<serde_json::Value>(b).unwrap().get("locale")
                == Some(&json!(null))
        })
        .count() as i64;
    assert!(null_locales > 0);
    assert_eq!(
        db.count("select count(*) from public.user_logins where locale is null").await,
        null_locales
    );
}

#[tokio::test]
async fn masks_are_keyed_hmacs_that_keep_duplicates_findable() {
    let db = TestDb::migrated().await;
    let login = |ip: &str, device: &str| json!({"user_id": "u", "ip": ip, "device_id": device});
    stage(
        &db,
        &msgs(&[
            ("a", login("10.1.2.3", "dev-1")),
            ("b", login("10.1.2.99", "dev-1")),
            ("c", login("2001:db8:1:2::1", "dev-2")),
            ("d", login("2001:0DB8:0001:0002:0000:0000:0000:0001", "dev-3")),
            ("e", login("not-an-ip", "dev-4")),
            ("f", login(" 10.1.2.3 ", "")),
            ("g", json!({"user_id": "no ip, no device"})),
        ]),
        SENT,
    )
    .await;
    assert_eq!(call_transform(&db.pool).await, (7, 0, 0));

    type Masks = (Option<String>, Option<String>, Option<String>);
    let rows: HashMap<String, Masks> = sqlx::query_as::<
        _,
        (String, Option<String>, Option<String>, Option<String>),
    >(
        "select message_id, masked_ip, masked_device_id, ip_network::text from public.user_logins",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
    .into_iter()
    .map(|(id, ip, dev, net)| (id, (ip, dev, net)))
    .collect();
    let hex64 = |s: &Option<String>| {
        s.as_ref().is_some_and(|s| {
            s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        })
    };
    for id in ["a", "b", "c", "d", "e"] {
        assert!(hex64(&rows[id].0) && hex64(&rows[id].1), "{id}: {:?}", rows[id]);
    }
    assert_eq!(rows["a"].1, rows["b"].1, "same device id, same mask");
    assert_ne!(rows["a"].0, rows["b"].0, "different IPs, different masks");
    assert_eq!(rows["c"].0, rows["d"].0, "two spellings of one IPv6 address mask alike");
    assert_eq!(rows["a"].0, rows["f"].0, "surrounding blanks do not change the IP mask");
    assert_eq!(rows["a"].2.as_deref(), Some("10.1.2.0/24"));
    assert_eq!(rows["b"].2.as_deref(), Some("10.1.2.0/24"));
    assert_eq!(rows["c"].2.as_deref(), Some("2001:db8:1::/48"));
    assert!(hex64(&rows["e"].0), "an unparseable IP is still masked");
    assert_eq!(rows["e"].2, None, "and has no network");
    assert_eq!(rows["f"].1, None, "a blank device id has no mask");
    assert_eq!(
        (rows["g"].0.as_ref(), rows["g"].1.as_ref(), rows["g"].2.as_ref()),
        (None, None, None)
    );

    // The mask is HMAC-SHA256 under the active key, checked with pgcrypto directly.
    let expected: String = sqlx::query_scalar(
        "select encode(public.hmac(convert_to('dev-1', 'UTF8'), key, 'sha256'), 'hex')
           from loader.mask_keys where retired_at is null",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(rows["a"].1.as_deref(), Some(expected.as_str()));

    // A different key gives different masks: the same data in another database.
    let other = TestDb::migrated().await;
    stage(&other, &msgs(&[("a", login("10.1.2.3", "dev-1"))]), SENT).await;
    call_transform(&other.pool).await;
    let (ip, dev): (String, String) =
        sqlx::query_as("select masked_ip, masked_device_id from public.user_logins")
            .fetch_one(&other.pool)
            .await
            .unwrap();
    assert_ne!(Some(ip), rows["a"].0);
    assert_ne!(Some(dev), rows["a"].1);
}

#[tokio::test]
async fn bad_messages_are_rejected_with_reason_codes() {
    let db = TestDb::migrated().await;
    let long = |n: usize| "x".repeat(n);
    let mut messages = msgs(&[
        ("array", json!([1, 2])),
        ("string", json!("hello")),
        ("null", json!(null)),
        ("no-user", json!({"device_id": "d"})),
        ("null-user", json!({"user_id": null})),
        ("empty-user", json!({"user_id": ""})),
        ("blank-user", json!({"user_id": "   "})),
        ("object-user", json!({"user_id": {"id": 1}})),
        ("nested-device-type", json!({"user_id": "u", "device_type": {"os": "ios"}})),
        ("array-ip", json!({"user_id": "u", "ip": ["1.2.3.4"]})),
        ("long-user", json!({"user_id": long(129)})),
        ("long-device-type", json!({"user_id": "u", "device_type": long(33)})),
        ("long-locale", json!({"user_id": "u", "locale": long(33)})),
        // Accepted: limits are inclusive, numbers are text, unknown keys are ignored.
        ("max-lengths", json!({"user_id": long(128), "device_type": long(32), "locale": long(32)})),
        ("numeric-version", json!({"user_id": "u", "app_version": 3})),
        ("odd-version", json!({"user_id": "u", "app_version": "1.2.3.4"})),
        ("extra-keys", json!({"user_id": 42, "extra": {"nested": true}})),
    ]);
    messages.push(("not-json".into(), "{oops".into()));
    stage(&db, &messages, SENT).await;
    let (counts, by_reason) = call_transform_by_reason(&db.pool).await;
    assert_eq!(counts, (4, 14, 0));
    let in_table: Vec<(String, i64)> = sqlx::query_as(
        "select reason, count(*) from loader.login_rejects group by reason order by reason",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        in_table,
        by_reason
            .into_iter()
            .collect::<std::collections::BTreeMap<_, _>>()
            .into_iter()
            .collect::<Vec<_>>()
    );

    let rejects: HashMap<String, (String, String)> = sqlx::query_as::<_, (String, String, String)>(
        "select message_id, reason, detail from loader.login_rejects",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
    .into_iter()
    .map(|(id, reason, detail)| (id, (reason, detail)))
    .collect();
    let expect = [
        ("not-json", "body_not_json"),
        ("array", "body_not_object"),
        ("string", "body_not_object"),
        ("null", "body_not_object"),
        ("no-user", "user_id_missing"),
        ("null-user", "user_id_missing"),
        ("empty-user", "user_id_empty"),
        ("blank-user", "user_id_empty"),
        ("object-user", "field_not_scalar"),
        ("nested-device-type", "field_not_scalar"),
        ("array-ip", "field_not_scalar"),
        ("long-user", "value_too_long"),
        ("long-device-type", "value_too_long"),
        ("long-locale", "value_too_long"),
    ];
    for (id, reason) in expect {
        assert_eq!(
            rejects.get(id).map(|r| r.0.as_str()),
            Some(reason),
            "{id}: {:?}",
            rejects.get(id)
        );
    }
    assert_eq!(rejects["long-device-type"].1, "device_type is 33 characters; the column allows 32");
    assert_eq!(rejects["array-ip"].1, "ip is a JSON array, not a scalar");
    // Details never carry values.
    assert!(rejects.values().all(|(_, d)| !d.contains("xxxx") && !d.contains("1.2.3.4")));

    let versions: HashMap<String, (Option<i32>, Option<String>)> =
        sqlx::query_as::<_, (String, Option<i32>, Option<String>)>(
            "select message_id, app_version, app_version_text from public.user_logins",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap()
        .into_iter()
        .map(|(id, v, t)| (id, (v, t)))
        .collect();
    assert_eq!(versions["numeric-version"], (Some(30000), Some("3".into())));
    assert_eq!(versions["odd-version"], (None, Some("1.2.3.4".into())), "kept as text, no integer");
    assert!(versions.contains_key("extra-keys") && versions.contains_key("max-lengths"));
}

#[tokio::test]
async fn app_version_parsing_never_collides() {
    let db = TestDb::migrated().await;
    let cases: [(&str, Option<i32>); 10] = [
        ("2.3.0", Some(20300)),
        ("23.0", Some(230000)),
        ("0.96", Some(9600)),
        ("2.00", Some(20000)),
        ("99.99.99", Some(999999)),
        ("100.0", None),
        ("1.2.3.4", None),
        ("v1.2", None),
        ("", None),
        ("1..2", None),
    ];
    for (text, expected) in cases {
        let got: Option<i32> = sqlx::query_scalar("select loader._app_version($1)")
            .bind(text)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(got, expected, "{text:?}");
    }
}

#[tokio::test]
async fn transform_is_idempotent_and_incremental_and_rotation_remasks_everything() {
    let db = TestDb::migrated().await;
    stage(&db, &fixture_messages(), SENT).await;
    assert_eq!(call_transform(&db.pool).await, (99, 1, 0));
    let first = table_state(&db).await;
    assert_eq!(call_transform(&db.pool).await, (0, 0, 0), "a rerun does nothing");
    assert_eq!(table_state(&db).await, first);

    // New messages: only they are loaded.
    let new: Vec<(String, String)> = loader::send::generate(20, 9)
        .into_iter()
        .enumerate()
        .map(|(i, b)| (format!("new-{i}"), b))
        .collect();
    stage(&db, &new, SENT).await;
    assert_eq!(call_transform(&db.pool).await, (20, 0, 0));
    assert_eq!(db.loaded().await, 119);

    let before: HashMap<String, (String, String, i32)> = masks(&db).await;
    let out = db.cli().ok(&["keys", "rotate"]);
    assert!(out.contains("copied 120 rows"), "{out}");
    let after = masks(&db).await;
    assert_eq!(after.len(), before.len(), "row count unchanged");
    let new_key: i32 =
        sqlx::query_scalar("select id from loader.mask_keys where retired_at is null")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    for (id, (ip, dev, key)) in &after {
        let (old_ip, old_dev, old_key) = &before[id];
        assert_ne!(ip, old_ip, "{id}: IP mask unchanged");
        assert_ne!(dev, old_dev, "{id}: device mask unchanged");
        assert_eq!(*key, new_key);
        assert_ne!(key, old_key);
    }
    assert_eq!(db.rejected().await, 1);

    // Installing a known key (as two environments would) makes masks reproducible.
    let key_hex = "ab".repeat(32);
    let install = |db: &TestDb| {
        let out = db
            .cli()
            .command(&["keys", "install"])
            .env("LOADER_MASK_KEY", &key_hex)
            .env("RUST_LOG", "trace")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!all.contains(&key_hex), "the key must never be printed or logged");
    };
    install(&db);
    let other = TestDb::migrated().await;
    stage(&other, &fixture_messages(), SENT).await;
    // The other environment reads the key from stdin.
    let mut child = other
        .cli()
        .command(&["keys", "install"])
        .env_remove("LOADER_MASK_KEY")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), format!("{key_hex}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    // Nothing was transformed there yet: the rotation copies nothing and the transform after
    // its swap masks all of it with the installed key.
    assert!(String::from_utf8_lossy(&out.stdout).contains("transform: loaded 99, rejected 1"));
    let a = masks(&db).await;
    let b = masks(&other).await;
    for (id, (ip, dev, _)) in &b {
        assert_eq!((ip, dev), (&a[id].0, &a[id].1), "{id}: same key, same masks across databases");
    }
}

async fn masks(db: &TestDb) -> HashMap<String, (String, String, i32)> {
    sqlx::query_as::<_, (String, String, String, i32)>(
        "select message_id, masked_ip, masked_device_id, mask_key_id from public.user_logins",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
    .into_iter()
    .map(|(id, ip, dev, key)| (id, (ip, dev, key)))
    .collect()
}

#[tokio::test]
async fn two_concurrent_transforms_load_a_50k_backlog_exactly_once() {
    let db = TestDb::migrated().await;
    let backlog: Vec<(String, String)> = loader::send::generate(50_000, 3)
        .into_iter()
        .enumerate()
        .map(|(i, b)| (format!("m-{i}"), b))
        .collect();
    stage(&db, &backlog, SENT).await;

    let (a, b) = tokio::join!(call_transform(&db.pool), call_transform(&db.pool));
    assert_eq!(a.0 + b.0 + a.1 + b.1, 50_000, "{a:?} + {b:?}");
    assert_eq!(db.loaded().await, 50_000);
    assert_eq!(db.count("select count(distinct message_id) from public.user_logins").await, 50_000);
    assert_eq!(db.pending().await, 0);
}

#[tokio::test]
async fn transform_while_ingest_commits_skips_no_row() {
    let db = TestDb::migrated().await;
    let messages: Vec<(String, String)> = loader::send::generate(20_000, 5)
        .into_iter()
        .enumerate()
        .map(|(i, b)| (format!("c-{i}"), b))
        .collect();

    // Four writers stage 500-row batches while a transformer keeps running small batches.
    let writers: Vec<_> = messages
        .chunks(5_000)
        .map(|part| {
            let part = part.to_vec();
            let pool = db.pool.clone();
            tokio::spawn(async move {
                for batch in part.chunks(500) {
                    crate::support::stage_with(&pool, batch, SENT).await;
                }
            })
        })
        .collect();
    let transformer = {
        let pool = db.pool.clone();
        tokio::spawn(async move {
            let mut total = 0;
            for _ in 0..200 {
                let (l, r, _): (i64, i64, i64) =
                    sqlx::query_as("select * from loader.transform_batch(700)")
                        .fetch_one(&pool)
                        .await
                        .unwrap();
                total += l + r;
                tokio::task::yield_now().await;
            }
            total
        })
    };
    for w in writers {
        w.await.unwrap();
    }
    let during = transformer.await.unwrap();
    let after = call_transform(&db.pool).await;
    assert!(during > 0, "the transform ran while ingest was committing");
    assert_eq!(during + after.0 + after.1, 20_000);
    assert_eq!(db.count("select count(distinct message_id) from public.user_logins").await, 20_000);
}

#[tokio::test]
async fn analysts_cannot_read_pii_keys_or_hash_chosen_text() {
    let db = TestDb::migrated().await;
    stage(&db, &fixture_messages(), SENT).await;
    let analyst = TestRole::new(&db, "loader_analyst").await;
    let ingest = TestRole::new(&db, "loader_ingest").await;

    assert_eq!(call_transform(&analyst.pool).await, (99, 1, 0));
    let denied = |sql: &'static str, pool: sqlx::PgPool| async move {
        let err = sqlx::query(sql).execute(&pool).await.expect_err(sql);
        let code = err.as_database_error().and_then(|e| e.code()).map(|c| c.into_owned());
        assert_eq!(code.as_deref(), Some("42501"), "{sql}: {err}");
    };
    denied("select * from loader.raw_logins", analyst.pool.clone()).await;
    denied("select body from loader.raw_logins", ingest.pool.clone()).await;
    denied("select * from loader.mask_keys", analyst.pool.clone()).await;
    denied("select * from loader.mask_keys", ingest.pool.clone()).await;
    denied("select loader._mask('dev-1', 'k'::bytea)", analyst.pool.clone()).await;
    denied("select * from loader.rebuild_start(null, true)", analyst.pool.clone()).await;
    denied("select * from loader.rebuild_start(null, true)", ingest.pool.clone()).await;
    denied("call loader.purge_staged('0 days')", analyst.pool.clone()).await;
    denied("call loader.purge_staged('0 days')", ingest.pool.clone()).await;
    denied("select loader.purge_staged_batch(now())", analyst.pool.clone()).await;
    denied("call loader.expire_masked(1)", analyst.pool.clone()).await;
    denied("select loader.expire_masked_batch('2000-01-01')", analyst.pool.clone()).await;
    denied("select loader.expire_masked_batch('2000-01-01')", ingest.pool.clone()).await;
    // The online rebuild: neither starts one (with a key of its choosing), copies, swaps nor
    // abandons one.
    denied("select * from loader.rebuild_start()", analyst.pool.clone()).await;
    denied("select loader.rebuild_copy_range()", analyst.pool.clone()).await;
    denied("select * from loader.rebuild_swap()", analyst.pool.clone()).await;
    denied("select loader.rebuild_abandon()", ingest.pool.clone()).await;
    denied("select * from loader.rebuilds", analyst.pool.clone()).await;
    denied("call loader.transform()", ingest.pool.clone()).await;

    // The analyst's executable functions in schema loader: the transform, nothing else.
    let callable: Vec<String> = sqlx::query_scalar(
        "select p.oid::regprocedure::text from pg_proc p
          where p.pronamespace = 'loader'::regnamespace
            and has_function_privilege(current_user, p.oid, 'execute')
          order by 1",
    )
    .fetch_all(&analyst.pool)
    .await
    .unwrap();
    assert_eq!(
        callable,
        [
            "loader.transform(bigint,bigint,bigint,integer,jsonb)",
            "loader.transform_batch(integer,boolean)"
        ]
    );

    let readable: i64 = sqlx::query_scalar("select count(*) from public.user_logins")
        .fetch_one(&analyst.pool)
        .await
        .unwrap();
    assert_eq!(readable, 99);
}

#[tokio::test]
async fn no_transform_or_key_path_logs_pii_or_keys() {
    let db = TestDb::migrated().await;
    let fixture = fixture_messages();
    stage(&db, &fixture, SENT).await;
    let mut logs = String::new();
    for args in
        [&["transform"][..], &["transform", "--rebuild"], &["keys", "rotate"], &["keys", "list"]]
    {
        let out = db.cli().command(args).env("RUST_LOG", "trace").output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        logs.push_str(&String::from_utf8_lossy(&out.stdout));
        logs.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    let keys: Vec<String> = sqlx::query_scalar("select encode(key, 'hex') from loader.mask_keys")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    for (_, body) in &fixture {
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        for field in ["ip", "device_id"] {
            if let Some(value) = v.get(field).and_then(|x| x.as_str()) {
                assert!(!logs.contains(value), "{field} value leaked into the logs");
            }
        }
    }
    for key in keys {
        assert!(!logs.contains(&key), "a key leaked into the logs");
    }
}

#[tokio::test]
async fn watch_mode_transforms_new_rows_until_sigterm() {
    let db = TestDb::migrated().await;
    let child = db.cli().spawn(&["transform", "--watch", "--interval", "0.2"]);
    stage(&db, &fixture_messages(), SENT).await;
    let done = crate::support::wait_for_count(
        &db,
        "select (select count(*) from public.user_logins) + (select count(*) from loader.login_rejects)",
        100,
    )
    .await;
    assert_eq!(done, 100);
    let stdout = crate::support::terminate_ok(child);
    assert!(stdout.contains("transform: loaded 99, rejected 1"), "{stdout}");
}

/// The SQL side explains itself in psql (`\dn+`, `\d+`, `\df+`): every function, table and
/// view of schema loader, every column of those and of public.user_logins, has a comment.
#[tokio::test]
async fn every_object_an_analyst_may_meet_has_a_comment() {
    let db = TestDb::migrated().await;
    let missing: Vec<String> = sqlx::query_scalar(
        "select 'function ' || p.oid::regprocedure from pg_proc p
          where p.pronamespace = 'loader'::regnamespace and obj_description(p.oid, 'pg_proc') is null
         union all
         select 'relation ' || c.oid::regclass from pg_class c
          where c.relnamespace = 'loader'::regnamespace and c.relkind in ('r', 'v', 'm', 'p')
            and obj_description(c.oid, 'pg_class') is null
         union all
         select 'column ' || c.oid::regclass || '.' || a.attname
           from pg_class c join pg_attribute a on a.attrelid = c.oid
          where a.attnum > 0 and not a.attisdropped
            and (c.oid = 'public.user_logins'::regclass
                 or c.relnamespace = 'loader'::regnamespace and c.relkind in ('r', 'v', 'm', 'p'))
            and col_description(c.oid, a.attnum) is null
         union all
         select 'schema loader' where obj_description('loader'::regnamespace, 'pg_namespace') is null
         order by 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(missing, Vec::<String>::new(), "objects without a comment");
    let schema: String =
        sqlx::query_scalar("select obj_description('loader'::regnamespace, 'pg_namespace')")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(
        schema.contains("call loader.transform()"),
        "the schema comment lists the entry points"
    );
}

/// The golden outputs of the transform: every column it writes, for the fixture and the hostile
/// bodies of `tests/fixtures/golden-hostile.sql`, under a fixed key, byte for byte as the file
/// `tests/fixtures/golden-outcomes.txt` has them. A faster transform must not change one byte;
/// a deliberate change rewrites the file with LOADER_BLESS=1 and shows up in review.
#[tokio::test]
async fn outcomes_match_the_golden_file_byte_for_byte() {
    let db = TestDb::migrated().await;
    crate::support::stage_golden_inputs(&db).await;
    let (loaded, rejected, pending) = call_transform(&db.pool).await;
    assert_eq!(pending, 0);
    let rows = crate::support::outcome_rows(&db).await;
    assert_eq!(rows.len() as i64, loaded + rejected);
    if std::env::var_os("LOADER_BLESS").is_some() {
        std::fs::write(crate::support::GOLDEN, crate::support::golden_text(&rows)).unwrap();
    }
    crate::support::assert_golden(&rows);
}

#[tokio::test]
async fn parallel_workers_split_a_backlog_and_load_each_row_once() {
    let db = TestDb::migrated().await;
    let bodies = loader::send::generate(20_000, 41);
    let messages: Vec<(String, String)> =
        bodies.into_iter().enumerate().map(|(i, b)| (format!("w-{i}"), b)).collect();
    stage(&db, &messages, SENT).await;
    let out = db
        .cli()
        .command(&["transform", "--workers", "4", "--batch-size", "500"])
        .env("RUST_LOG", "loader=debug")
        .output()
        .unwrap();
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    // One JSON log line per worker, with what it loaded.
    let sessions: Vec<i64> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["fields"]["message"] == "transform session finished")
        .map(|l| l["fields"]["loaded"].as_i64().unwrap())
        .collect();
    assert_eq!(sessions.len(), 4, "one line per worker: {stderr}");
    let busy = sessions.iter().filter(|&&loaded| loaded > 0).count();
    assert!(busy >= 2, "the work is split between sessions: {sessions:?}");

    // Every row has exactly one outcome, and the report adds the sessions up.
    assert_eq!(db.loaded().await + db.rejected().await, 20_000);
    assert_eq!(db.pending().await, 0);
    let summary =
        format!("loaded {}, rejected {}, pending 0", db.loaded().await, db.rejected().await);
    assert!(stdout.contains(&summary), "{stdout}");
    db.cli().ok(&["reconcile", "--skip-queue"]);
}

/// `loader transform` ran `call loader.transform()` and had no signal handler: stopped, the
/// client exited 143 (or 130, or, started without job control, ignored SIGINT) while its server
/// session went on loading, and the summary it had printed was short of what loaded. Now it
/// loops committed batches itself: a signal ends it after the batch in hand, its session with
/// it, with a summary that matches the database and exit 4; the same command then finishes.
/// A rebuild or rotation stopped so keeps the ranges it copied, and continues.
#[tokio::test]
async fn a_transform_or_rebuild_stopped_by_a_signal_ends_its_work_and_continues() {
    let db = TestDb::migrated().await;
    let bodies: Vec<(String, String)> = loader::send::generate(120_000, 3)
        .into_iter()
        .enumerate()
        .map(|(i, b)| (format!("m-{i}"), b))
        .collect();
    stage(&db, &bodies, SENT).await;
    let running = db.cli().spawn(&["transform", "--batch-size", "500", "--workers", "1"]);
    crate::support::wait_for_count(&db, "select count(*) from public.user_logins", 2_000).await;
    let out = crate::support::signal(running, "INT");
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("run it again to continue"), "{stderr}");
    // No session of the stopped command goes on working, and what it printed is what loaded.
    let working = db
        .count(
            "select count(*) from pg_stat_activity
              where datname = current_database() and state = 'active'
                and query like '%transform_batch%' and pid <> pg_backend_pid()",
        )
        .await;
    assert_eq!(working, 0, "a server session still transforms");
    let (loaded, rejected) = (db.loaded().await, db.rejected().await);
    assert!(loaded + rejected < 120_000, "stopped early: {loaded}");
    let summary = format!("transform: loaded {loaded}, rejected {rejected}, pending ");
    assert!(stdout.contains(&summary), "{stdout} vs {summary}");
    assert_eq!(db.pending().await, 120_000 - loaded - rejected);
    db.cli().ok(&["transform"]);
    assert_eq!(db.pending().await, 0);

    // The rebuild: ranges of 50,000 ids, one worker; stopped once it has started copying.
    let running = db.cli().spawn(&["transform", "--rebuild", "--workers", "1"]);
    crate::support::wait_for_count(
        &db,
        "select count(*) from loader.rebuilds where state = 'copying'",
        1,
    )
    .await;
    let out = crate::support::terminate(running);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("run it again to continue"), "{stderr}");
    let copying = db.count("select count(*) from loader.rebuilds where state = 'copying'").await;
    assert_eq!(copying, 1, "the copies are kept for the next run");
    let resumed = db.cli().ok(&["transform", "--rebuild", "--workers", "1"]);
    assert!(resumed.contains("key 1 active"), "{resumed}");
    assert_eq!(db.count("select count(*) from loader.rebuilds where state = 'swapped'").await, 1);
    assert_eq!(db.loaded().await + db.rejected().await, 120_000);
}
