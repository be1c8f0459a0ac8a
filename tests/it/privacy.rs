//! The privacy boundary, as an attacker below the owner would probe it: each test logs in as a
//! real LOGIN role granted only `loader_analyst` or `loader_ingest` (or nothing but CONNECT)
//! and tries one of the ways in. docs/security.md maps every claim to a test here.

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

/// The key reached an analyst as a constant in a plan dump. Whatever an analyst
/// sets, no message it receives holds the key: with and without pending rows, through the
/// batch function, the procedure, EXPLAIN and errors.
#[tokio::test]
async fn the_key_never_reaches_an_analyst_session_whatever_it_sets() {
    let db = TestDb::migrated().await;
    let key = active_key(&db).await;
    let analyst = TestRole::new(&db, "loader_analyst").await;

    let empty = psql_as(
        &analyst,
        &format!(
            "{PRYING_SETTINGS} select * from loader.transform_batch(0); call loader.transform();"
        ),
    );
    assert!(empty.contains("LOG:"), "the settings took effect (plans are printed):\n{empty}");
    assert_no_key(&empty, &key, "no pending rows");

    stage(&db, &fixture_messages(), SENT).await;
    let loading = psql_as(
        &analyst,
        &format!(
            "{PRYING_SETTINGS}
             explain (verbose, costs off) select * from loader.transform_batch(10);
             select * from loader.transform_batch(10);
             select * from loader.transform_batch(10);
             call loader.transform();
             select * from loader.transform_batch(-1);"
        ),
    );
    assert!(loading.contains("loaded"), "the batches ran:\n{loading}");
    assert_no_key(&loading, &key, "pending rows");
    let loaded = db.loaded().await;
    assert_eq!(loaded, 99, "the analyst's batches loaded the fixture");
}

/// Between the commit that created a security-definer function and the one that
/// revoked PUBLIC's EXECUTE, any role could call it (install its own key) or wire it into a
/// trigger of its own. Hammered from two analyst sessions while a fresh migrate runs, no
/// private function is ever callable.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_private_function_is_callable_while_a_fresh_migrate_runs() {
    let db = TestDb::empty().await;
    let attacker = TestRole::new(&db, "loader_analyst").await;
    // A schema of its own, so it can create a table to hang a trigger on.
    sqlx::raw_sql(&format!("create schema {0} authorization {0}", attacker.name))
        .execute(&db.admin)
        .await
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let tries = Arc::new(AtomicU64::new(0));
    let mut hammers = Vec::new();
    for worker in 0..2 {
        let (pool, schema) = (attacker.pool.clone(), attacker.name.clone());
        let (stop, tries) = (stop.clone(), tries.clone());
        hammers.push(tokio::spawn(async move {
            let attempts = [
                "select * from loader.rebuild_start(decode(repeat('41', 32), 'hex'), true)"
                    .to_owned(),
                "select loader._mask('dev-1', decode(repeat('41', 32), 'hex'))".to_owned(),
                format!(
                    "create table if not exists {schema}.t{worker} (x int);
                     create trigger hijack after insert on {schema}.t{worker}
                        referencing new table as staged
                        for each statement execute function loader._queue_staged_rows()"
                ),
            ];
            let mut got_through = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                for sql in &attempts {
                    tries.fetch_add(1, Ordering::Relaxed);
                    if sqlx::raw_sql(sql).execute(&pool).await.is_ok() {
                        got_through.push(sql.clone());
                    }
                }
            }
            got_through
        }));
    }
    // Let the hammers get going, migrate, and keep hammering a little after the commit.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    loader::db::migrate(&db.pool).await.expect("migrating");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let mut got_through = Vec::new();
    for h in hammers {
        got_through.extend(h.await.unwrap());
    }
    assert!(tries.load(Ordering::Relaxed) > 100, "the hammers ran");
    assert!(got_through.is_empty(), "callable during migrate: {got_through:#?}");
    let installed =
        db.count("select count(*) from loader.mask_keys where source = 'installed'").await;
    assert_eq!(installed, 0, "no key was installed by the attacker");
}

/// Runs `work` and fails the test if it has not finished after 20 s: a liveness check (the
/// operations here take well under a second when nothing stalls them).
async fn finishes<T>(what: &str, work: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(std::time::Duration::from_secs(20), work)
        .await
        .unwrap_or_else(|_| panic!("{what} was stalled by a lesser role"))
}

/// A role with nothing but CONNECT took the advisory lock every transform, rebuild,
/// rotation and purge shared; an analyst idling in a transaction that had run one batch blocked
/// every other batch (one hot row) and every rebuild, rotation and purge. Now all of them
/// finish while such sessions sit there, and the idle batch, committed after a rotation, is
/// refused rather than adding rows masked with the retired key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_analysts_and_strangers_stall_nothing() {
    let db = TestDb::migrated().await;
    let fixture = fixture_messages();
    stage(&db, &fixture[..60], SENT).await;
    let stranger = TestRole::new(&db, "").await;
    let analyst = TestRole::new(&db, "loader_analyst").await;

    // The stranger holds the advisory keys loader used to share, the analyst a batch of 10.
    let mut strange = stranger.pool.acquire().await.unwrap();
    sqlx::raw_sql(
        "select pg_advisory_lock(7813570962337693698), pg_advisory_lock(7813570962337693697)",
    )
    .execute(&mut *strange)
    .await
    .unwrap();
    let mut held = analyst.pool.acquire().await.unwrap();
    let hold = "begin; select * from loader.transform_batch(10);
                lock table public.user_logins in access share mode";
    finishes("an analyst's batch", sqlx::raw_sql(hold).execute(&mut *held)).await.unwrap();
    // A second analyst forces the COMMIT-time key check early, to hold the key row while it
    // idles: refused on the spot.
    let mut early = analyst.pool.acquire().await.unwrap();
    finishes(
        "a second analyst's batch",
        sqlx::raw_sql("begin; select * from loader.transform_batch(10)").execute(&mut *early),
    )
    .await
    .unwrap();
    let err =
        sqlx::raw_sql("set constraints all immediate").execute(&mut *early).await.unwrap_err();
    assert_eq!(sqlstate(&err), "55000", "{err}");

    let other_batch: (i64, i64, i64) = finishes("another analyst's batch", async {
        let other = TestRole::new(&db, "loader_analyst").await;
        sqlx::query_as("select * from loader.transform_batch(5)")
            .fetch_one(&other.pool)
            .await
            .unwrap()
    })
    .await;
    assert_eq!(other_batch.0 + other_batch.1, 5, "the batch took rows the idle one had not");
    finishes("call loader.transform()", sqlx::raw_sql("call loader.transform()").execute(&db.pool))
        .await
        .unwrap();
    assert_eq!(db.pending().await, 10, "only the held rows wait");
    finishes("staging", stage(&db, &fixture[60..], SENT)).await;
    // The rebuild and the rotation end the sessions that hold their swap up past the bound
    // (2 s here) rather than wait for them.
    for args in [
        ["--evict-after", "2s", "transform", "--rebuild"],
        ["--evict-after", "2s", "keys", "rotate"],
    ] {
        let cli = db.cli();
        finishes(&args.join(" "), tokio::task::spawn_blocking(move || cli.ok(&args)))
            .await
            .unwrap();
    }
    finishes("purge", sqlx::raw_sql("call loader.purge_staged('1 day')").execute(&db.pool))
        .await
        .unwrap();
    finishes("migrate", loader::db::migrate(&db.pool)).await.unwrap();

    // The idle batch masked with the key the rotation retired: its COMMIT is refused (or its
    // session was ended for holding the swap up), and its rows go back to the work list.
    let err = sqlx::raw_sql("commit").execute(&mut *held).await.unwrap_err();
    assert!(
        matches!(
            err.as_database_error().and_then(|e| e.code()).as_deref(),
            Some("40001") | Some("57P01") | None
        ),
        "{err}"
    );
    // The server reports a failed COMMIT before it has released the batch's row locks; the
    // next statement on that session waits for the release. The early analyst's transaction
    // (aborted by its refused SET CONSTRAINTS) ends too: a pooled connection dropped
    // mid-transaction is rolled back only later, in the background. Until both let go, a
    // transform skips their rows (SKIP LOCKED).
    sqlx::raw_sql("select 1").execute(&mut *held).await.ok();
    sqlx::raw_sql("rollback").execute(&mut *early).await.ok();
    drop((held, early, strange));
    sqlx::raw_sql("call loader.transform()").execute(&db.pool).await.unwrap();
    let outcomes = db
        .count("select (select count(*) from public.user_logins) + (select count(*) from loader.login_rejects)")
        .await;
    let pending = db.pending().await;
    let claimed_by: Vec<String> = sqlx::query_scalar(
        "select format('%s %s %s', a.pid, a.state, left(a.query, 60)) from pg_stat_activity a
          where a.datname = current_database() and a.pid <> pg_backend_pid()",
    )
    .fetch_all(&db.admin)
    .await
    .unwrap();
    assert_eq!(
        outcomes, 100,
        "every staged message has its outcome; pending {pending}, sessions {claimed_by:#?}"
    );
    let stale = db
        .count(
            "select count(*) from public.user_logins
              where mask_key_id <> (select id from loader.mask_keys where retired_at is null)",
        )
        .await;
    assert_eq!(stale, 0, "every row is masked with the active key");
}

/// Asserts that `sql`, run as `pool`'s role, is refused for lack of privilege (42501).
async fn denied(pool: &sqlx::PgPool, sql: &str) {
    let err = sqlx::raw_sql(sql).execute(pool).await.expect_err(sql);
    assert_eq!(sqlstate(&err), "42501", "{sql}: {err}");
}

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

/// What each role may do in schemas `loader` and `public`, as `has_*_privilege` reports it,
/// one line per privilege: `execute f(args)`, `select t`, `select t(col, ...)` when only some
/// columns. Extension functions (pgcrypto's, executable by PUBLIC and harmless without the
/// key) are left out.
async fn privileges_of(db: &TestDb, role: &str) -> Vec<String> {
    loader::privileges::of(&db.pool, role).await.unwrap()
}

/// The inventory: exactly the privileges docs/security.md "Roles" lists, for PUBLIC (so any role that
/// can connect) and each loader role. A grant added by mistake fails here.
#[tokio::test]
async fn each_role_has_exactly_the_documented_privileges() {
    let db = TestDb::migrated().await;
    // The list `loader doctor` checks too (docs/security.md "Roles" in prose).
    for (role, documented) in loader::privileges::DOCUMENTED {
        assert_eq!(privileges_of(&db, role).await, *documented, "{role}");
    }
    assert_eq!(
        loader::privileges::DOCUMENTED.iter().map(|(r, _)| *r).collect::<Vec<_>>(),
        ["public", "loader_ingest", "loader_analyst", "loader_transformer", "loader_pii_reader"]
    );
    // The transformer reads nothing the transform produces.
    assert!(privileges_of(&db, "loader_transformer").await.iter().all(
        |p| !p.contains("user_logins") && !p.contains("login_rejects") && !p.contains("raw_logins")
    ));
    assert!(privileges_of(&db, "loader_analyst").await.iter().all(|p| !p.contains("raw_logins")));

    // Every security-definer function pins the settings a caller could use to look inside.
    let unpinned: Vec<String> = sqlx::query_scalar(
        "select p.oid::regprocedure::text from pg_proc p
          where p.pronamespace = 'loader'::regnamespace and p.prosecdef
            and not (p.proconfig @> array['search_path=pg_catalog, pg_temp',
                     'debug_print_parse=off', 'debug_print_rewritten=off', 'debug_print_plan=off',
                     'client_min_messages=warning', 'log_parameter_max_length_on_error=0'])",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(unpinned, Vec::<String>::new(), "definer functions without pinned settings");
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

/// `keys install` bound the key as a statement parameter, which the server writes to
/// its log with `log_min_duration_statement` (parameters up to `log_parameter_max_length`).
/// With both set as a DBA might, the log shows the install statement, never the key.
#[tokio::test]
async fn the_key_is_never_a_statement_parameter() {
    let db = TestDb::migrated().await;
    let Some(log) = server_log(&db).await else {
        eprintln!("SKIPPED: the server log is not readable from here");
        return;
    };
    sqlx::raw_sql(&format!(
        "alter database {0} set log_min_duration_statement = 0;
         alter database {0} set log_parameter_max_length = -1;",
        db.name
    ))
    .execute(&db.admin)
    .await
    .unwrap();
    let start = std::fs::metadata(&log).unwrap().len();
    let key_hex = "5a".repeat(16) + &"c3".repeat(16);
    let out =
        db.cli().command(&["keys", "install"]).env("LOADER_MASK_KEY", &key_hex).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let installed = db.count("select count(*) from loader.mask_keys where source = 'installed'");
    assert_eq!(installed.await, 1);

    let bytes = std::fs::read(&log).unwrap();
    let written = String::from_utf8_lossy(&bytes[start as usize..]).to_lowercase();
    assert!(
        written.contains("loader.rebuild_start"),
        "the install statement was logged:\n{written}"
    );
    assert!(!written.contains("5a5a5a5a5a5a5a5a"), "the key reached the server log:\n{written}");
    assert!(!written.contains("c3c3c3c3c3c3c3c3"), "the key reached the server log:\n{written}");
}

// Round two: the boundary under parse-changing settings, temporary objects, open transactions
// and the ingest role's claims. Each test below is one way through that was reproduced against
// an earlier version, as the real role.

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

/// With standard_conforming_strings off, '\.' in the plain-IPv4 pattern
/// meant "any character", so "192 168 1 77" reached a cast outside any exception block and an
/// analyst's transform failed with an error quoting it (in the server log too). Whatever an
/// analyst sets, the transform it runs gives the golden outcomes byte for byte, and no value of
/// a body reaches its session or the server log.
#[tokio::test]
async fn a_callers_settings_change_no_outcome_and_no_value_reaches_it_or_the_log() {
    let db = TestDb::migrated().await;
    let analyst = TestRole::new(&db, "loader_analyst").await;
    crate::support::stage_golden_inputs(&db).await;
    let log = server_log(&db).await;
    let log_start = log.as_ref().map(|p| std::fs::metadata(p).unwrap().len());

    // The issue's own reproduction, then every setting changed at once.
    let sco_off = psql_as(
        &analyst,
        "set standard_conforming_strings = off; select * from loader.transform_batch(100);",
    );
    let sets = every_setting_changed(&analyst).await;
    assert!(
        sets.contains("standard_conforming_strings = off") && sets.contains("DateStyle"),
        "{sets}"
    );
    let everything = psql_as(
        &analyst,
        &format!(
            "{sets}
             select loaded + rejected > 0 as batch_ran from loader.transform_batch(150);
             call loader.transform();
             select pending from loader.transform_batch(0);"
        ),
    );
    for (what, out) in [("sco off", &sco_off), ("every setting", &everything)] {
        assert!(
            !out.contains("ERROR:") && !out.contains("FATAL:"),
            "{what}: an error reached the analyst:\n{out}"
        );
        for ip in HOSTILE_IPS {
            assert!(!out.contains(ip), "{what}: {ip} reached the analyst:\n{out}");
        }
    }
    assert!(everything.contains("batch_ran") && everything.contains(" t"), "{everything}");
    assert_eq!(db.pending().await, 0, "every row has its outcome");
    crate::support::assert_golden(&crate::support::outcome_rows(&db).await);

    if let (Some(log), Some(start)) = (log, log_start) {
        let bytes = std::fs::read(&log).unwrap();
        let written = String::from_utf8_lossy(&bytes[start as usize..]);
        for ip in HOSTILE_IPS {
            assert!(!written.contains(ip), "{ip} reached the server log:\n{written}");
        }
    } else {
        eprintln!("the server log is not readable from here: its part of the check is skipped");
    }
}

/// Every setting a session below the
/// owner may change is classified by `loader._settings_policy` (a new PostgreSQL or extension
/// setting fails here until someone decides), every definer function pins every pin, no
/// setting of the superuser context is granted to a lesser role, and no function of schema
/// loader holds a backslash (whose meaning a caller's settings would decide).
#[tokio::test]
async fn every_user_settable_setting_is_pinned_or_classified_and_no_body_has_a_backslash() {
    let db = TestDb::migrated().await;
    let analyst = TestRole::new(&db, "loader_analyst").await;
    // As the analyst sees them, after PL/pgSQL is loaded (its settings appear then).
    sqlx::raw_sql("do $$ begin end $$").execute(&analyst.pool).await.unwrap();
    let unclassified: Vec<String> = sqlx::query_scalar(
        "select s.name from pg_settings s
          where (s.context = 'user'
                 or has_parameter_privilege('loader_analyst', s.name, 'set')
                 or has_parameter_privilege('loader_ingest', s.name, 'set'))
            and not exists (select from loader._settings_policy() p
                             where lower(s.name) like lower(p.name))
          order by 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(unclassified, Vec::<String>::new(), "user-settable settings without a decision");

    let unpinned: Vec<String> = sqlx::query_scalar(
        "select p.oid::regprocedure::text || ' lacks ' || pin.name
           from pg_proc p cross join loader._settings_policy() pin
          where p.pronamespace = 'loader'::regnamespace and p.prosecdef and pin.pin is not null
            and exists (select from pg_settings s where lower(s.name) = lower(pin.name))
            and not exists (select from unnest(p.proconfig) c
                             where lower(split_part(c, '=', 1)) = lower(pin.name))
          order by 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(unpinned, Vec::<String>::new());

    let backslashes: Vec<String> = sqlx::query_scalar(
        "select p.oid::regprocedure::text from pg_proc p
          where p.pronamespace = 'loader'::regnamespace and strpos(p.prosrc, chr(92)) > 0",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(backslashes, Vec::<String>::new(), "functions whose meaning a caller could change");
}

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
    db.count(
        "select count(*) from public.user_logins
          where mask_key_id is distinct from (select id from loader.mask_keys where retired_at is null)",
    )
    .await
        == 0
}

/// Round two, findings 2 and 3: a role with nothing but CONNECT made a temporary table with a
/// column of user_logins' row type, so the swap could not drop the old table; the rotation
/// stayed copying and, while it did, every purge was refused. An analyst's temporary view on
/// user_logins made rotations refuse to start, and a temporary table of the copy's row type
/// made rebuild_abandon fail. Now temporary objects stop nothing: the rotation and the rebuild
/// start and finish, the purge runs even while one copies, the copies cannot be named by
/// anyone else, and the sessions that kept their temporary objects on the old tables are ended
/// (their objects go with them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_objects_of_lesser_roles_stop_no_rotation_rebuild_or_purge() {
    let db = TestDb::migrated().await;
    loaded(&db, 500).await;
    let stranger = TestRole::new(&db, "").await;
    let analyst = TestRole::new(&db, "loader_analyst").await;
    // Idle, outside a transaction: only the objects hold on.
    let mut _column = session(&stranger, "create temp table t (x public.user_logins)").await;
    let _view = session(&analyst, "create temp view v as select * from public.user_logins").await;
    // In a transaction that used its temporary table: the drop must wait for it, then end it.
    let _holding =
        session(&analyst, "create temp table t3 (x public.user_logins); begin; select * from t3")
            .await;

    let out = loader_within(&db, &["--evict-after", "2s", "keys", "rotate"], "the rotation").await;
    assert!(out.contains("active"), "{out}");
    assert!(all_on_the_active_key(&db).await, "every row on the new key");
    assert!(out.contains("terminated session") && out.contains(&analyst.name), "{out}");
    let retired = db.count("select count(*) from pg_class where relname ~ '_retired_r[0-9]+$'");
    assert_eq!(retired.await, 0, "the retired tables are gone, with the objects on them");
    loader_within(&db, &["--evict-after", "2s", "transform", "--rebuild"], "a rebuild").await;

    // During a copy: the copies cannot be named by a lesser role, abandoning works, and the
    // purge purges what the copy no longer needs.
    let ranges: i64 = sqlx::query_scalar(
        "select ranges from loader.rebuild_start(rotate => true, range_rows => 100)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(ranges, 5);
    sqlx::query_scalar::<_, Option<i64>>("select loader.rebuild_copy_range()")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    for sql in [
        "create temp table t2 (x loader_rebuild.user_logins_next)",
        "create temp view v2 as select * from loader_rebuild.user_logins_next",
    ] {
        let err = sqlx::raw_sql(sql).execute(&analyst.pool).await.expect_err(sql);
        assert_eq!(sqlstate(&err), "42501", "{sql}: {err}");
    }
    let (purged,): (i64,) = finishes("the purge while a copy runs", async {
        sqlx::query_as("call loader.purge_staged('0')").fetch_one(&db.pool).await.unwrap()
    })
    .await;
    assert_eq!(purged, 100, "the copied range is purged, the four left to copy are not");
    let abandoned: Option<i64> =
        sqlx::query_scalar("select loader.rebuild_abandon()").fetch_one(&db.pool).await.unwrap();
    assert!(abandoned.is_some());
    finishes("the purge after", sqlx::raw_sql("call loader.purge_staged('0')").execute(&db.pool))
        .await
        .unwrap();
    assert_eq!(db.count("select count(*) from loader.raw_logins where purged_at is null").await, 0);
    // The CONNECT-only role idled outside a transaction: its session stays, its column went.
    assert!(has_session(&db, &stranger).await, "the stranger's session was not ended");
    let columns: i64 = sqlx::query_scalar(
        "select count(*) from pg_attribute where attrelid = 'pg_temp.t'::regclass and attnum > 0 and not attisdropped",
    )
    .fetch_one(&mut _column)
    .await
    .unwrap();
    assert_eq!(columns, 0, "its column of the old table's row type was dropped with that table");
}

/// An analyst idling in a transaction that read
/// loader.pipeline_status (with its own idle timeout turned off) made `loader migrate` fail
/// after 60 s waiting to replace the view, and the transform queue behind it. A routine
/// migrate now replaces nothing (so waits on no reader), and one that must replace the view
/// ends that session after the grace period; the transform meanwhile finishes in seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_reader_delays_no_migrate_beyond_the_grace_period() {
    let db = TestDb::migrated().await;
    let analyst = TestRole::new(&db, "loader_analyst").await;
    let mut idle = session(
        &analyst,
        "set idle_in_transaction_session_timeout = 0; begin; select pending from loader.pipeline_status",
    )
    .await;

    let routine =
        loader_within(&db, &["--evict-after", "60s", "migrate"], "a routine migrate").await;
    assert!(routine.contains("sql functions: up to date"), "{routine}");

    // As if this loader's views were new: the migrate must replace them.
    sqlx::raw_sql("update loader.sql_files set md5 = 'changed' where name = '50_views.sql'")
        .execute(&db.pool)
        .await
        .unwrap();
    let migrate = db.cli().spawn(&["--evict-after", "2s", "migrate"]);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    stage(&db, &fixture_messages(), SENT).await;
    let started = std::time::Instant::now();
    loader_within(&db, &["transform"], "the transform during the migrate").await;
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_secs(15), "the transform waited {took:?}");
    let out = crate::support::wait_ok(migrate);
    assert!(out.contains("50_views.sql") && out.contains(&analyst.name), "{out}");
    let err = sqlx::raw_sql("select 1").execute(&mut idle).await.unwrap_err();
    assert!(!err.to_string().is_empty(), "the idle session was ended");
    assert_eq!(db.pending().await, 0);
}

/// An analyst's own deferred constraint trigger, queued to fire after the
/// batch's COMMIT-time key check and sleeping there, held the active key's row: `loader keys
/// rotate` waited at it while holding the maintenance lock, and the purge behind it. The
/// rotation now ends that session after the grace period, and the purge runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_held_open_by_an_analysts_trigger_delays_rotation_only_briefly() {
    let db = TestDb::migrated().await;
    stage(&db, &fixture_messages(), SENT).await;
    let analyst = TestRole::new(&db, "loader_analyst").await;
    let mut sleeper = session(
        &analyst,
        "create temp table slow (x int);
         create function pg_temp.again() returns trigger language plpgsql as $$
         begin
             if new.x < 4 then insert into pg_temp.slow values (new.x + 1);
             else perform pg_sleep(120); end if;
             return null;
         end $$;
         create constraint trigger later after insert on pg_temp.slow
             deferrable initially deferred for each row execute function pg_temp.again();",
    )
    .await;
    let commit = sqlx::raw_sql(
        "begin; insert into pg_temp.slow values (0);
         select * from loader.transform_batch(10); commit",
    )
    .execute(&mut sleeper);
    let rotate = async {
        // Until its COMMIT sleeps in the trigger, after the key check.
        for _ in 0..100 {
            let sleeping: bool = sqlx::query_scalar(
                "select exists (select from pg_stat_activity where usename = $1 and wait_event = 'PgSleep')",
            )
            .bind(&analyst.name)
            .fetch_one(&db.admin)
            .await
            .unwrap();
            if sleeping {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        loader_within(&db, &["--evict-after", "2s", "keys", "rotate"], "the rotation").await
    };
    let (commit, out) = tokio::join!(commit, rotate);
    assert!(out.contains(&analyst.name), "the rotation ended the analyst's session: {out}");
    assert!(commit.is_err(), "the held COMMIT did not go through");
    finishes("the purge", sqlx::raw_sql("call loader.purge_staged('0')").execute(&db.pool))
        .await
        .unwrap();
    sqlx::query("call loader.transform()").execute(&db.pool).await.unwrap();
    assert!(all_on_the_active_key(&db).await);
    assert_eq!(db.loaded().await + db.rejected().await, 100);
}

/// The incremental read docs/analysts.md gives ("Copying user_logins downstream"), as written
/// there: the query its `prepare downstream(xid8) as` names.
fn downstream_read() -> String {
    let doc = include_str!("../../docs/analysts.md");
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

/// `loaded_at` is the transaction's start, so a batch that commits after
/// another that began later has the earlier loaded_at, and a copy that reads "after the latest
/// loaded_at it saw" misses its rows. The loaded_xid cursor never misses or repeats a row,
/// whatever order batches commit in.
#[tokio::test]
async fn a_downstream_copy_by_loaded_xid_misses_no_row_when_batches_commit_out_of_order() {
    let db = TestDb::migrated().await;
    let analyst = TestRole::new(&db, "loader_analyst").await;
    stage(&db, &fixture_messages()[..40], SENT).await;

    // Batch A begins first and commits last.
    let mut slow = db.pool.acquire().await.unwrap();
    sqlx::raw_sql("begin; select * from loader.transform_batch(20)")
        .execute(&mut *slow)
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let (b_loaded,): (i64,) = sqlx::query_as("select loaded from loader.transform_batch(20)")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(b_loaded > 0);

    // A downstream copy reading now gets nothing: B committed, but A, older, is still open,
    // and A's rows will land below anything B's would have moved the cursor to.
    let (first, cursor) = read_downstream(&analyst.pool, "0").await;
    assert_eq!(first, Vec::<String>::new(), "nothing past an open older transaction");
    // What a copy by loaded_at would have taken as its mark: B's, the latest visible.
    let seen_loaded_at: time::OffsetDateTime =
        sqlx::query_scalar("select max(loaded_at) from public.user_logins")
            .fetch_one(&analyst.pool)
            .await
            .unwrap();
    sqlx::raw_sql("commit").execute(&mut *slow).await.unwrap();

    // Polls until every row is read (other tests' transactions on this cluster hold the
    // snapshot's xmin back for a while: rows wait, none is lost); never a row twice.
    let (mut read, mut cursor) = (Vec::new(), cursor);
    for _ in 0..300 {
        let (rows, next) = read_downstream(&analyst.pool, &cursor).await;
        read.extend(rows);
        cursor = next;
        if read.len() as i64 >= db.loaded().await {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (again, _) = read_downstream(&analyst.pool, &cursor).await;
    assert_eq!(again, Vec::<String>::new(), "nothing is read twice");
    let mut distinct = read.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), read.len(), "no row read twice");
    assert_eq!(read.len() as i64, db.loaded().await, "every loaded row read once");

    // The loaded_at mark: A's rows began earlier than B's, so "loaded_at > mark" misses them.
    let by_loaded_at: i64 =
        sqlx::query_scalar("select count(*) from public.user_logins where loaded_at > $1")
            .bind(seen_loaded_at)
            .fetch_one(&analyst.pool)
            .await
            .unwrap();
    assert_eq!(
        by_loaded_at,
        0,
        "a copy by loaded_at would miss A's {} rows",
        db.loaded().await - b_loaded
    );
}

/// docs/security.md names, for every claim, the test that proves it: each name is a test here.
#[test]
fn every_test_the_security_model_names_exists() {
    let doc = include_str!("../../docs/security.md");
    let sources = [
        include_str!("privacy.rs"),
        include_str!("transform.rs"),
        include_str!("erasure.rs"),
        include_str!("boundary.rs"),
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

/// Eight analysts idling in a transaction after `transform_batch(0)` held
/// every progress slot, so `transform_state` stopped moving while the owner's batches ran.
/// Progress is a row per batch now: however many sessions idle, the owner's batch moves it.
#[tokio::test]
async fn idle_analysts_cannot_freeze_the_transforms_progress() {
    let db = TestDb::migrated().await;
    let analyst = TestRole::new(&db, "loader_analyst").await;
    let mut idle = Vec::new();
    for _ in 0..9 {
        idle.push(session(&analyst, "begin; select * from loader.transform_batch(0)").await);
    }
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let before: time::OffsetDateTime =
        sqlx::query_scalar("select now()").fetch_one(&db.pool).await.unwrap();
    stage(&db, &fixture_messages(), SENT).await;
    sqlx::query("call loader.transform()").execute(&db.pool).await.unwrap();
    let drained: Option<time::OffsetDateTime> =
        sqlx::query_scalar("select last_drained_at from loader.transform_state")
            .fetch_one(&analyst.pool)
            .await
            .unwrap();
    assert!(drained.is_some_and(|d| d >= before), "last_drained_at moved: {drained:?} vs {before}");
    let batches: i64 = db.count("select batches from loader.transform_state").await;
    assert!(batches >= 2, "{batches}");
    drop(idle);
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

/// Round two, "what must hold afterwards": with every hostile session above open at once (a
/// stranger's temporary table of the row type, an analyst's temporary view, an analyst idling
/// after reading pipeline_status with its idle timeout off, eight idling after
/// transform_batch(0), one holding a batch, one whose COMMIT sleeps in its own deferred trigger
/// after the key check), the transform of new rows finishes in seconds, a rotation and a
/// rebuild start and finish, the purge runs, a migrate that must replace the views succeeds,
/// and transform_state moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hostile_session_at_once_stops_nothing() {
    let db = TestDb::migrated().await;
    loaded(&db, 300).await;
    let stranger = TestRole::new(&db, "").await;
    let analyst = TestRole::new(&db, "loader_analyst").await;
    let mut hostile = vec![
        session(&stranger, "create temp table t (x public.user_logins)").await,
        session(&analyst, "create temp view v as select * from public.user_logins").await,
        session(
            &analyst,
            "set idle_in_transaction_session_timeout = 0; begin; select pending from loader.pipeline_status",
        )
        .await,
    ];
    for _ in 0..8 {
        hostile.push(session(&analyst, "begin; select * from loader.transform_batch(0)").await);
    }
    let new: Vec<(String, String)> =
        fixture_messages().into_iter().map(|(id, body)| (format!("new-{id}"), body)).collect();
    stage(&db, &new[..20], SENT).await;
    hostile.push(session(&analyst, "begin; select * from loader.transform_batch(10)").await);
    let sleeper = Command::new("psql")
        .args([analyst.url.as_str(), "-X", "-q"])
        .arg("-c")
        .arg(
            "create temp table slow (x int);
             create function pg_temp.again() returns trigger language plpgsql as $$
             begin
                 if new.x < 4 then insert into pg_temp.slow values (new.x + 1);
                 else perform pg_sleep(120); end if;
                 return null;
             end $$;
             create constraint trigger later after insert on pg_temp.slow
                 deferrable initially deferred for each row execute function pg_temp.again();
             begin; insert into pg_temp.slow values (0); select * from loader.transform_batch(5); commit;",
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..100 {
        let sleeping: bool = sqlx::query_scalar(
            "select exists (select from pg_stat_activity where usename = $1 and wait_event = 'PgSleep')",
        )
        .bind(&analyst.name)
        .fetch_one(&db.admin)
        .await
        .unwrap();
        if sleeping {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    // New logins: the transform loads every row, in seconds: the sessions that hold claimed
    // rows (or a write on the work list) past evict_after_seconds (here 2) are ended first.
    sqlx::raw_sql("update loader.settings set value = '2' where name = 'evict_after_seconds'")
        .execute(&db.pool)
        .await
        .unwrap();
    let before: time::OffsetDateTime =
        sqlx::query_scalar("select now()").fetch_one(&db.pool).await.unwrap();
    stage(&db, &new[20..], SENT).await;
    let started = std::time::Instant::now();
    loader_within(&db, &["transform"], "the transform").await;
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_secs(10), "the transform took {took:?}");
    assert_eq!(db.pending().await, 0, "no row waits for a held batch");
    let drained: Option<time::OffsetDateTime> =
        sqlx::query_scalar("select last_drained_at from loader.transform_state")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(drained.is_some_and(|d| d >= before), "transform_state moved: {drained:?}");

    let evict = ["--evict-after", "2s"];
    loader_within(&db, &[&evict[..], &["keys", "rotate"]].concat(), "the rotation").await;
    loader_within(&db, &[&evict[..], &["transform", "--rebuild"]].concat(), "the rebuild").await;
    loader_within(&db, &["purge", "--older-than-days", "0"], "the purge").await;
    sqlx::raw_sql("update loader.sql_files set md5 = 'changed' where name = '50_views.sql'")
        .execute(&db.pool)
        .await
        .unwrap();
    loader_within(&db, &[&evict[..], &["migrate"]].concat(), "the migrate").await;

    // The sessions that held anything were ended; what they held is loaded now.
    let _ = sleeper.wait_with_output();
    drop(hostile);
    loader_within(&db, &["transform"], "the last transform").await;
    assert_eq!(db.pending().await, 0);
    assert!(all_on_the_active_key(&db).await, "every row on the rotation's key");
    assert_eq!(db.loaded().await + db.rejected().await, 400);
    loader_within(&db, &["reconcile", "--skip-queue"], "reconcile").await;
}

// Recovery: raw values only through loader.reveal, for loader_pii_reader, every call recorded
// (committed) before anything is read.

/// The reader's access log as the owner reads it: (role, purpose, message ids, values).
async fn access_log(db: &TestDb) -> Vec<(String, String, Vec<String>, i32)> {
    sqlx::query_as(
        "select role, purpose, message_ids, values_returned from loader.pii_access_log order by id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

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
