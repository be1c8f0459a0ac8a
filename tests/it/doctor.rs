//! `loader doctor`: a deployment set up as documented passes; each thing broken on purpose is
//! reported by its own check, with a fix, and exit 3.

use std::collections::{BTreeMap, BTreeSet};

use aws_sdk_sqs::types::QueueAttributeName;
use serde_json::Value;

use crate::support::TestEnv;

/// The checks that fail, by name (and the exit code).
fn failing(url: &str, queue: &str, extra: &[&str]) -> (Option<i32>, BTreeSet<String>) {
    let (code, failed) = problems(url, queue, extra);
    (code, failed.into_keys().collect())
}

/// The checks that fail, each with its fix (and the exit code).
pub(crate) fn problems(
    url: &str,
    queue: &str,
    extra: &[&str],
) -> (Option<i32>, BTreeMap<String, String>) {
    let mut args = vec!["--json"];
    args.extend_from_slice(extra);
    let out = crate::support::doctor(&crate::support::Cli::new(url, queue), &args);
    let findings: Vec<Value> = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    let failed = findings
        .iter()
        .filter(|f| f["ok"] == false)
        .map(|f| {
            let fix = f["fix"].as_str().filter(|s| !s.is_empty());
            (f["check"].as_str().unwrap().to_owned(), fix.expect("a fix").to_owned())
        })
        .collect();
    (out.status.code(), failed)
}

async fn sql(pool: &sqlx::PgPool, sql: &str) {
    sqlx::raw_sql(sql).execute(pool).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn set_queue_attribute(env: &TestEnv, name: QueueAttributeName, value: &str) {
    let q = &env.queue.queue;
    q.client()
        .set_queue_attributes()
        .queue_url(q.url())
        .attributes(name, value)
        .send()
        .await
        .unwrap();
}

#[tokio::test]
async fn doctor_passes_a_documented_setup_and_names_each_thing_broken_on_purpose() {
    let env = TestEnv::new(30).await;
    let _dlq = env.queue.attach_dead_letter_queue(5).await;
    let (db, queue) = (&env.db, env.queue.name.as_str());
    let healthy = (Some(0), BTreeSet::new());
    let expect = |check: &str| (Some(3), BTreeSet::from([check.to_owned()]));
    assert_eq!(failing(&db.url, queue, &[]), healthy);

    // Every check a real run reports is in docs/operating.md's table, by its name.
    let out = crate::support::doctor(&crate::support::Cli::new(&db.url, queue), &["--json"]);
    let findings: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let guide = include_str!("../../docs/operating.md");
    let table = &guide[guide.find("| check | passes when |").unwrap()..];
    let table = &table[..table.find("\n\n").unwrap()];
    assert!(findings.len() >= 15, "{} checks", findings.len());
    for f in &findings {
        let check = f["check"].as_str().unwrap();
        assert!(table.contains(&format!("`{check}`")), "docs/operating.md lacks doctor's {check}");
    }

    // A definer function that lost its pinned settings; any migrate pins them again.
    sql(&db.pool, "alter function loader.transform_batch(integer, boolean) reset all").await;
    assert_eq!(failing(&db.url, queue, &[]), expect("pinned settings"));
    crate::support::Cli::new(&db.url, queue).ok(&["migrate"]);
    assert_eq!(failing(&db.url, queue, &[]), healthy);

    // A row staged on a day no partition was made for (the daily job stopped for weeks), then
    // a tomorrow that does not exist.
    sql(
        &db.pool,
        "insert into loader.raw_logins (message_id, body, body_is_json, queue, staged_at)
         values ('no-day', 'null', true, 'direct', now() + interval '60 days')",
    )
    .await;
    assert_eq!(failing(&db.url, queue, &[]), expect("staging days"));
    sql(
        &db.pool,
        "delete from loader.transform_queue q using loader.raw_logins r
          where r.id = q.raw_id and r.message_id = 'no-day';
         delete from loader.raw_logins where message_id = 'no-day'",
    )
    .await;
    assert_eq!(failing(&db.url, queue, &[]), healthy);
    sql(
        &db.pool,
        "do $$ begin
             execute format('drop table loader.raw_logins_p%s',
                            to_char((now() at time zone 'UTC')::date + 1, 'YYYYMMDD'));
         end $$",
    )
    .await;
    assert_eq!(failing(&db.url, queue, &[]), expect("staging days"));
    sql(&db.pool, "select loader.create_staging_days()").await;
    assert_eq!(failing(&db.url, queue, &[]), healthy);
    sql(
        &db.pool,
        "do $$ begin
             execute format('drop table loader.user_logins_m%s',
                            to_char(date_trunc('month', now() at time zone 'UTC') + interval '1 month', 'YYYYMM'));
         end $$",
    )
    .await;
    assert_eq!(failing(&db.url, queue, &[]), expect("masked months"));
    sql(&db.pool, "select loader.create_masked_months()").await;
    assert_eq!(failing(&db.url, queue, &[]), healthy);

    // The access log's guard disabled, then dropped: the fix doctor names (migrate) works.
    sql(&db.pool, "alter table loader.pii_access_log disable trigger pii_access_log_append_only")
        .await;
    assert_eq!(failing(&db.url, queue, &[]), expect("pii access log"));
    crate::support::Cli::new(&db.url, queue).ok(&["migrate"]);
    assert_eq!(failing(&db.url, queue, &[]), healthy);
    sql(&db.pool, "drop trigger pii_access_log_no_truncate on loader.pii_access_log").await;
    assert_eq!(failing(&db.url, queue, &[]), expect("pii access log"));
    crate::support::Cli::new(&db.url, queue).ok(&["migrate"]);
    assert_eq!(failing(&db.url, queue, &[]), healthy);

    // A table a swap retired, left behind.
    sql(&db.pool, "create table loader_rebuild.user_logins_retired_r99 ()").await;
    assert_eq!(failing(&db.url, queue, &[]), expect("retired tables"));
    sql(&db.pool, "select loader.rebuild_drop_retired()").await;
    assert_eq!(failing(&db.url, queue, &[]), healthy);

    // A grant beyond the documented ones.
    sql(&db.pool, "grant select on loader.raw_logins to loader_analyst").await;
    assert_eq!(failing(&db.url, queue, &[]), expect("privileges of loader_analyst"));
    sql(&db.pool, "revoke select on loader.raw_logins from loader_analyst").await;

    // No active key.
    sql(&db.pool, "update loader.mask_keys set retired_at = now() where retired_at is null").await;
    assert_eq!(failing(&db.url, queue, &[]), expect("active key"));
    sql(&db.pool, "update loader.mask_keys set retired_at = null where id = (select max(id) from loader.mask_keys)").await;

    // Functions that are not this binary's, then a migration missing.
    sql(
        &db.pool,
        "update loader.sql_files set md5 = 'edited by hand' where name = '30_transform.sql'",
    )
    .await;
    assert_eq!(failing(&db.url, queue, &[]), expect("migrations"));
    crate::support::Cli::new(&db.url, queue).ok(&["migrate"]);
    sql(&db.pool, "create table saved as select * from loader.refinery_schema_history
                    where version = (select max(version) from loader.refinery_schema_history);
                   delete from loader.refinery_schema_history where version = (select version from saved)").await;
    assert_eq!(failing(&db.url, queue, &[]), expect("migrations"));
    sql(
        &db.pool,
        "insert into loader.refinery_schema_history select * from saved; drop table saved",
    )
    .await;

    // pgcrypto moved out of public.
    sql(&db.admin, "create schema moved; alter extension pgcrypto set schema moved").await;
    assert_eq!(failing(&db.url, queue, &[]), expect("pgcrypto"));
    sql(&db.admin, "alter extension pgcrypto set schema public; drop schema moved").await;
    assert_eq!(failing(&db.url, queue, &[]), healthy);

    // The queue: a visibility timeout too short (for loader, then for a 60 s Lambda), no DLQ,
    // or no queue at all.
    set_queue_attribute(&env, QueueAttributeName::VisibilityTimeout, "5").await;
    assert_eq!(failing(&db.url, queue, &[]), expect("visibility timeout"));
    set_queue_attribute(&env, QueueAttributeName::VisibilityTimeout, "300").await;
    assert_eq!(failing(&db.url, queue, &["--lambda-timeout", "60"]), expect("visibility timeout"));
    assert_eq!(failing(&db.url, queue, &["--lambda-timeout", "50"]), healthy);
    set_queue_attribute(&env, QueueAttributeName::RedrivePolicy, "").await;
    assert_eq!(failing(&db.url, queue, &[]), expect("dead-letter queue"));
    assert_eq!(failing(&db.url, "no-such-queue", &[]), expect("queue"));

    // TLS asked for, from a server without it (the private pg_cron cluster runs without
    // ssl): the database check says so, the queue checks still run.
    let plain = crate::support::required_env("LOADER_CRON_DATABASE_URL");
    let (code, failed) = failing(&format!("{plain}?sslmode=require"), queue, &[]);
    assert_eq!(code, Some(3));
    assert!(failed.contains("database") && failed.contains("dead-letter queue"), "{failed:?}");
}

/// The queue checks' fixes, applied as doctor words them, from a queue that does not exist to
/// a healthy one: create it, give it the visibility timeout the fix names, a redrive policy, and
/// a dead-letter queue that exists once the one named is gone.
#[tokio::test]
async fn doctors_queue_fixes_applied_as_worded_make_each_check_pass() {
    let env = TestEnv::new(30).await;
    let (db, client) = (&env.db, env.queue.queue.client());
    let name = crate::support::unique_name("loader-test-doctor").replace('_', "-");
    let lambda = ["--lambda-timeout", "60"];
    let fix = |check: &str| {
        let (code, failed) = problems(&db.url, &name, &lambda);
        assert_eq!(code, Some(3));
        // Only the queue's own checks fail; the database is as documented.
        let queue_checks = ["queue", "visibility timeout", "dead-letter queue"];
        assert!(failed.keys().all(|k| queue_checks.contains(&k.as_str())), "{failed:?}");
        failed.get(check).unwrap_or_else(|| panic!("{check} passes: {failed:?}")).clone()
    };

    assert!(fix("queue").starts_with("create the queue"));
    client.create_queue().queue_name(&name).send().await.unwrap();
    let queue = crate::support::TestQueue {
        queue: loader::sqs::Queue::open(client.clone(), &name).await.unwrap(),
        name: name.clone(),
    };

    // "set the queue's VisibilityTimeout to 360 s or more": the number is read from the fix.
    let wording = fix("visibility timeout");
    let seconds = wording
        .strip_prefix("set the queue's VisibilityTimeout to ")
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_else(|| panic!("{wording}"));
    assert_eq!(seconds, "360", "6x the 60 s Lambda timeout");
    client
        .set_queue_attributes()
        .queue_url(queue.queue.url())
        .attributes(QueueAttributeName::VisibilityTimeout, seconds)
        .send()
        .await
        .unwrap();

    assert!(fix("dead-letter queue").starts_with("set a RedrivePolicy"));
    let dlq = queue.attach_dead_letter_queue(5).await;
    assert_eq!(problems(&db.url, &name, &lambda), (Some(0), BTreeMap::new()));

    // The dead-letter queue deleted: the fix points the policy at one that exists.
    client.delete_queue().queue_url(dlq.queue.url()).send().await.unwrap();
    assert!(fix("dead-letter queue").starts_with("point the redrive policy at"));
    let _dlq = queue.attach_dead_letter_queue(5).await;
    assert_eq!(problems(&db.url, &name, &lambda), (Some(0), BTreeMap::new()));
}

/// A database never migrated, or a login that is not the owner, is one finding with its fix,
/// not every check that cannot read what it needs (an earlier doctor printed 11 failures, one
/// of them blaming someone for removing the access log's triggers).
#[tokio::test]
async fn an_unmigrated_database_or_another_login_is_one_finding() {
    let env = TestEnv::new(30).await;
    let _dlq = env.queue.attach_dead_letter_queue(5).await;
    let empty = crate::support::TestDb::empty().await;
    let expect = |check: &str| (Some(3), BTreeSet::from([check.to_owned()]));
    assert_eq!(failing(&empty.url, &env.queue.name, &[]), expect("migrations"));
    crate::support::Cli::new(&empty.url, &env.queue.name).ok(&["migrate"]);
    assert_eq!(failing(&empty.url, &env.queue.name, &[]), (Some(0), BTreeSet::new()));
    let analyst = crate::support::TestRole::new(&env.db, "loader_analyst").await;
    assert_eq!(failing(&analyst.url, &env.queue.name, &[]), expect("run as the owner"));
}

/// The owner needs `pg_signal_backend` to end sessions that hold its work up; an owner without
/// it is named.
#[tokio::test]
async fn doctor_names_an_owner_that_cannot_end_sessions() {
    let owner = "loader_test_owner_unsignalled";
    let admin = sqlx::PgPool::connect(&crate::support::required_env("DATABASE_URL")).await.unwrap();
    sql(
        &admin,
        &format!(
            "do $$ begin
                 if not exists (select from pg_roles where rolname = '{owner}') then
                     create role {owner} login nosuperuser nocreaterole nocreatedb; end if;
             exception when duplicate_object then null; end $$"
        ),
    )
    .await;
    let db = crate::support::TestDb::empty_owned_by(owner).await;
    loader::db::migrate(&db.pool).await.unwrap();
    let (_, failed) = failing(&db.url, "no-such-queue", &[]);
    assert!(failed.contains("owner may end sessions"), "{failed:?}");
    // The fix, as doctor words it, then the check passes (and the role is as it was after).
    sql(&admin, &format!("grant pg_signal_backend, pg_read_all_stats to {owner}")).await;
    let (_, failed) = failing(&db.url, "no-such-queue", &[]);
    sql(&admin, &format!("revoke pg_signal_backend, pg_read_all_stats from {owner}")).await;
    assert!(!failed.contains("owner may end sessions"), "{failed:?}");
}

/// An earlier doctor's receive check counted a receive each run: six runs moved a queue's only
/// message to its dead-letter queue (maxReceiveCount 5). Now doctor touches no message unless
/// asked (`--probe-receive`): many runs leave the message where it was, its receive count
/// unchanged.
#[tokio::test]
async fn doctor_run_many_times_touches_no_message() {
    let env = TestEnv::new(30).await;
    let dlq = env.queue.attach_dead_letter_queue(2).await;
    env.queue.send(&[r#"{"user_id": "u1"}"#.to_owned()]).await;
    let cli = crate::support::Cli::new(&env.db.url, &env.queue.name);
    for _ in 0..8 {
        let out = crate::support::doctor(&cli, &["--json"]);
        let findings: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
        let receive = findings.iter().find(|f| f["check"] == "receive permission").unwrap();
        assert!(receive["ok"] == true && receive["skipped"].is_string(), "{receive}");
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    }
    assert_eq!(dlq.depth().await, (0, 0, 0), "nothing moved to the DLQ");
    let got = env
        .queue
        .queue
        .client()
        .receive_message()
        .queue_url(env.queue.queue.url())
        .message_system_attribute_names(
            aws_sdk_sqs::types::MessageSystemAttributeName::ApproximateReceiveCount,
        )
        .wait_time_seconds(1)
        .send()
        .await
        .unwrap();
    let message = &got.messages()[0];
    let count = &message.attributes().unwrap()
        [&aws_sdk_sqs::types::MessageSystemAttributeName::ApproximateReceiveCount];
    assert_eq!(count, "1", "this receive is the message's first");

    // Asked for, the probe runs (and says nothing was skipped).
    let out = crate::support::doctor(&cli, &["--json", "--probe-receive"]);
    let findings: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let receive = findings.iter().find(|f| f["check"] == "receive permission").unwrap();
    assert!(receive["ok"] == true && receive.get("skipped").is_none(), "{receive}");
}
