//! The privacy boundary, as an attacker below the owner would probe it, one file per actor as
//! docs/security.md "What holds" is organised: each test logs in as a real LOGIN role granted
//! only the role it attacks from (or nothing but CONNECT) and tries one of the ways in.
//! docs/security.md maps every claim to a test here (or in the file it names). The helpers
//! they share are below.

mod analyst;
mod everyone;
mod ingest;
mod operators;
mod reader;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::support::{TestDb, TestRole, fixture_messages, sqlstate, stage};
use time::macros::datetime;

const SENT: time::OffsetDateTime = datetime!(2024-05-01 12:00 UTC);

/// The active key's 32 bytes, read as the owner.
async fn active_key(db: &TestDb) -> Vec<u8> {
    sqlx::query_scalar("select key from loader.mask_keys where retired_at is null")
        .fetch_one(&db.pool)
        .await
        .expect("reading the active key as the owner")
}

/// Runs `sql` in psql logged in as `role`, and returns everything the server sent back
/// (results, NOTICEs, LOG and DEBUG messages, errors), stdout and stderr together.
/// Statements go one by one, as typed at the prompt (each in its own transaction unless the
/// script says `begin`).
fn psql_as(role: &TestRole, sql: &str) -> String {
    use std::io::Write;
    let mut child = Command::new("psql")
        .args([role.url.as_str(), "-X", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running psql");
    child.stdin.take().unwrap().write_all(sql.as_bytes()).unwrap();
    let out = child.wait_with_output().expect("psql output");
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Panics when `text` holds any 8 consecutive bytes of `key` in a representation a client
/// could decode: hex (either case), base64, or a list of byte values (signed, as a plan dump
/// prints a `bytea` constant, or unsigned).
fn assert_no_key(text: &str, key: &[u8], context: &str) {
    use std::fmt::Write;
    let hex = |bytes: &[u8]| {
        bytes.iter().fold(String::new(), |mut s, b| {
            write!(s, "{b:02x}").unwrap();
            s
        })
    };
    let lower = text.to_lowercase();
    for window in key.windows(8) {
        assert!(!lower.contains(&hex(window)), "{context}: key bytes in hex:\n{text}");
    }
    for start in 0..3 {
        let b64 = base64(&key[start..]);
        assert!(!text.contains(&b64[..12]), "{context}: key bytes in base64:\n{text}");
    }
    let numbers: Vec<i64> = text
        .split(|c: char| !(c.is_ascii_digit() || c == '-'))
        .filter_map(|t| t.parse().ok())
        .collect();
    let signed: Vec<i64> = key.iter().map(|&b| b as i8 as i64).collect();
    let unsigned: Vec<i64> = key.iter().map(|&b| b as i64).collect();
    for bytes in [signed, unsigned] {
        for window in bytes.windows(8) {
            assert!(
                !numbers.windows(8).any(|w| w == window),
                "{context}: key bytes as a list of numbers:\n{text}"
            );
        }
    }
}

/// Standard base64 (the test needs no crate for it).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    bytes
        .chunks(3)
        .flat_map(|c| {
            let n = (c[0] as u32) << 16
                | (*c.get(1).unwrap_or(&0) as u32) << 8
                | *c.get(2).unwrap_or(&0) as u32;
            (0..=c.len()).map(move |i| ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char)
        })
        .collect()
}

/// Every setting a session below the owner may change to look inside a statement.
const PRYING_SETTINGS: &str = "
    set debug_print_parse = on; set debug_print_rewritten = on; set debug_print_plan = on;
    set debug_pretty_print = off; set client_min_messages = debug5;
    set plan_cache_mode = force_custom_plan; set log_parameter_max_length_on_error = -1;
    set plpgsql.print_strict_params = on;";

/// Runs `work` and fails the test if it has not finished after 20 s: a liveness check (the
/// operations here take well under a second when nothing stalls them).
async fn finishes<T>(what: &str, work: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(std::time::Duration::from_secs(20), work)
        .await
        .unwrap_or_else(|_| panic!("{what} was stalled by a lesser role"))
}

/// Asserts that `sql`, run as `pool`'s role, is refused for lack of privilege (42501).
async fn denied(pool: &sqlx::PgPool, sql: &str) {
    let err = sqlx::raw_sql(sql).execute(pool).await.expect_err(sql);
    assert_eq!(sqlstate(&err), "42501", "{sql}: {err}");
}

/// What each role may do in schemas `loader` and `public`, as `has_*_privilege` reports it,
/// one line per privilege: `execute f(args)`, `select t`, `select t(col, ...)` when only some
/// columns. Extension functions (pgcrypto's, executable by PUBLIC and harmless without the
/// key) are left out.
async fn privileges_of(db: &TestDb, role: &str) -> Vec<String> {
    loader::privileges::of(&db.pool, role).await.unwrap()
}

/// The server's log file, as its stderr (the Debian cluster and the scripts' private cluster
/// both write there), or None when this process cannot see it (a server in a container).
async fn server_log(db: &TestDb) -> Option<std::path::PathBuf> {
    let pid: i32 = sqlx::query_scalar("select pg_backend_pid()").fetch_one(&db.admin).await.ok()?;
    let path = std::fs::read_link(format!("/proc/{pid}/fd/2")).ok()?;
    std::fs::metadata(&path).ok().filter(|m| m.is_file())?;
    std::fs::File::open(&path).ok()?;
    Some(path)
}

/// The `set` statements that give every setting a session below the owner may change (context
/// `user`, as `pg_settings` lists them to `role`) a value other than its own: booleans flipped,
/// enums moved to another value, and the settings that change how text parses or prints given
/// hostile values. Left alone: timeouts and read-only transactions (they only cut the caller's
/// own call short) and the settings that read files or name objects that may not exist here.
async fn every_setting_changed(role: &TestRole) -> String {
    let settings: Vec<(String, String, String, Option<Vec<String>>)> = sqlx::query_as(
        "select name, vartype, setting, enumvals from pg_settings where context = 'user' order by name",
    )
    .fetch_all(&role.pool)
    .await
    .unwrap();
    let hostile = |name: &str| {
        Some(match name {
            "DateStyle" => "'SQL, DMY'",
            "TimeZone" => "'Asia/Kathmandu'",
            "timezone_abbreviations" => "'India'",
            "search_path" => "pg_temp, public",
            "default_text_search_config" => "'pg_catalog.english'",
            "extra_float_digits" => "-15",
            "work_mem" => "'64kB'",
            "geqo_threshold" => "2",
            "from_collapse_limit" | "join_collapse_limit" => "1",
            "gin_fuzzy_search_limit" => "1",
            "jit_above_cost" | "jit_inline_above_cost" | "jit_optimize_above_cost" => "0",
            "plpgsql.extra_errors" | "plpgsql.extra_warnings" => "'all'",
            "application_name" => "'attacker'",
            _ => return None,
        })
    };
    let untouched = [
        "statement_timeout",
        "lock_timeout",
        "idle_in_transaction_session_timeout",
        "idle_session_timeout",
        "transaction_read_only",
        "default_transaction_read_only",
        "transaction_isolation",
        "transaction_deferrable",
        "client_encoding",
    ];
    let mut sets = String::new();
    for (name, vartype, setting, enumvals) in settings {
        if untouched.contains(&name.as_str()) {
            continue;
        }
        let value = match (hostile(&name), vartype.as_str()) {
            (Some(v), _) => v.to_owned(),
            (None, "bool") => if setting == "on" { "off" } else { "on" }.to_owned(),
            (None, "enum") => match enumvals
                .unwrap_or_default()
                .into_iter()
                .find(|v| !v.eq_ignore_ascii_case(&setting))
            {
                Some(v) => format!("'{v}'"),
                None => continue,
            },
            _ => continue,
        };
        sets.push_str(&format!("set {name} = {value};\n"));
    }
    sets
}

/// The values of the hostile bodies (golden-hostile.sql) a transform with a caller's broken
/// parsing turned into an error quoting them.
const HOSTILE_IPS: [&str; 3] = ["192 168 1 77", "1:2:3:4", "1a2b3c4d"];

/// A session of `role` left open on a connection of its own (not from the role's pool), for
/// the availability tests: `sql` has run in it (perhaps leaving a transaction open).
async fn session(role: &TestRole, sql: &str) -> sqlx::PgConnection {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&role.url).await.unwrap();
    sqlx::raw_sql(sql).execute(&mut conn).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    conn
}

/// Runs `loader ARGS` against `db`, asserts it exits 0 within 30 s (a liveness check: these
/// take a few seconds when nothing stalls them), and returns its stdout and stderr.
async fn loader_within(db: &TestDb, args: &[&str], what: &str) -> String {
    let running = db.cli().spawn(args);
    crate::support::wait_ok_within(running, std::time::Duration::from_secs(30), what).await
}

/// Whether the server still has a session of `role` (as the superuser sees it).
async fn has_session(db: &TestDb, role: &TestRole) -> bool {
    sqlx::query_scalar("select exists (select from pg_stat_activity where usename = $1)")
        .bind(&role.name)
        .fetch_one(&db.admin)
        .await
        .unwrap()
}

/// `rows` staged and transformed logins, sent long ago (so a purge of 0 days takes them all).
async fn loaded(db: &TestDb, rows: i64) {
    let messages: Vec<(String, String)> = (0..rows)
        .map(|i| {
            (
                format!("m-{i}"),
                format!(
                    r#"{{"user_id": "u{i}", "ip": "10.0.{}.{}", "device_id": "d{i}"}}"#,
                    i % 250,
                    i % 200
                ),
            )
        })
        .collect();
    stage(db, &messages, SENT).await;
    sqlx::query("call loader.transform()").execute(&db.pool).await.unwrap();
}

/// Every loaded row is on the active key.
async fn all_on_the_active_key(db: &TestDb) -> bool {
    db.off_the_active_key().await == 0
}

/// The incremental read docs/analysts.md gives ("Copying user_logins downstream"), as written
/// there: the query its `prepare downstream(xid8) as` names.
fn downstream_read() -> String {
    let doc = include_str!("../../../docs/analysts.md");
    let after =
        &doc[doc.find("prepare downstream(xid8) as\n").expect("the query in docs/analysts.md")..];
    let query = &after[after.find('\n').unwrap() + 1..];
    query[..query.find(';').expect("the end of the query")].trim().to_owned()
}

/// One downstream poll from `cursor`: the message ids read and the next cursor.
async fn read_downstream(pool: &sqlx::PgPool, cursor: &str) -> (Vec<String>, String) {
    let read = downstream_read().replace("$1", "$1::text::xid8");
    let rows: Vec<(String, String)> =
        sqlx::query_as(&format!("select r.message_id, r.next_cursor::text from ({read}) r"))
            .bind(cursor)
            .fetch_all(pool)
            .await
            .unwrap();
    let next = rows.first().map_or_else(|| cursor.to_owned(), |(_, next)| next.clone());
    (rows.into_iter().map(|(id, _)| id).collect(), next)
}

/// docs/security.md names, for every claim, the test that proves it: each name is a test here.
#[test]
fn every_test_the_security_model_names_exists() {
    let doc = include_str!("../../../docs/security.md");
    let sources = [
        include_str!("everyone.rs"),
        include_str!("analyst.rs"),
        include_str!("ingest.rs"),
        include_str!("reader.rs"),
        include_str!("operators.rs"),
        include_str!("../transform.rs"),
        include_str!("../erasure.rs"),
        include_str!("../boundary.rs"),
        include_str!("../partitions.rs"),
        include_str!("../months.rs"),
    ]
    .concat();
    let table = &doc[doc.find("| actor |").unwrap()..doc.find("## How it holds").unwrap()];
    let mut named = 0;
    for row in table.lines().skip(2) {
        let proved_by = row.rsplit('|').nth(1).unwrap_or_default();
        for name in proved_by.split('`').skip(1).step_by(2) {
            named += 1;
            assert!(
                sources.contains(&format!("fn {name}(")),
                "docs/security.md names {name}, which is no test"
            );
        }
    }
    assert!(named > 15, "{named} names read from the table");
}

/// The reader's access log as the owner reads it: (role, purpose, message ids, values).
async fn access_log(db: &TestDb) -> Vec<(String, String, Vec<String>, i32)> {
    sqlx::query_as(
        "select role, purpose, message_ids, values_returned from loader.pii_access_log order by id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
}
