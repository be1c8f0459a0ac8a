//! The privacy boundary, as an attacker below the owner would probe it: each test logs in as a
//! real LOGIN role granted only `loader_analyst` or `loader_ingest` (or nothing but CONNECT)
//! and tries one of the ways in. README "Security model" maps every claim to a test here.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::support::{TestDb, TestRole, fixture_messages, stage};
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

/// Finding 1: the key reached an analyst as a constant in a plan dump. Whatever an analyst
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

/// Finding 2: between the commit that created a security-definer function and the one that
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
                "select loader._activate_key(decode(repeat('41', 32), 'hex'), 'installed')"
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

/// Finding 3: a role with nothing but CONNECT took the advisory lock every transform, rebuild,
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
    finishes("rebuild", sqlx::raw_sql("select * from loader.rebuild()").execute(&db.pool))
        .await
        .unwrap();
    finishes("rotation", sqlx::raw_sql("select * from loader.rotate_key()").execute(&db.pool))
        .await
        .unwrap();
    finishes("purge", sqlx::raw_sql("call loader.purge_staged('1 day')").execute(&db.pool))
        .await
        .unwrap();
    finishes("migrate", loader::db::migrate(&db.pool)).await.unwrap();

    // The idle batch masked with the key the rotation retired: its COMMIT is refused, and its
    // rows go back to the work list.
    let err = sqlx::raw_sql("commit").execute(&mut *held).await.unwrap_err();
    assert_eq!(sqlstate(&err), "40001", "{err}");
    // The server reports a failed COMMIT before it has released the batch's row locks; the
    // next statement on that session waits for the release. The early analyst's transaction
    // (aborted by its refused SET CONSTRAINTS) ends too: a pooled connection dropped
    // mid-transaction is rolled back only later, in the background. Until both let go, a
    // transform skips their rows (SKIP LOCKED).
    sqlx::raw_sql("select 1").execute(&mut *held).await.unwrap();
    sqlx::raw_sql("rollback").execute(&mut *early).await.unwrap();
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

/// The SQLSTATE of a database error.
fn sqlstate(e: &sqlx::Error) -> String {
    e.as_database_error().and_then(|d| d.code()).map(|c| c.into_owned()).unwrap_or_default()
}

/// Asserts that `sql`, run as `pool`'s role, is refused for lack of privilege (42501).
async fn denied(pool: &sqlx::PgPool, sql: &str) {
    let err = sqlx::raw_sql(sql).execute(pool).await.expect_err(sql);
    assert_eq!(sqlstate(&err), "42501", "{sql}: {err}");
}

/// Finding 4: the ingest role could insert server-owned columns (purged_at, staged_at, ids with
/// OVERRIDING SYSTEM VALUE) and update any run's counters. Now its only write path is the
/// staging functions, for a run it registered itself.
#[tokio::test]
async fn the_ingest_role_stages_into_its_own_run_and_nothing_else() {
    let db = TestDb::migrated().await;
    let ingest = TestRole::new(&db, "loader_ingest").await;
    let other = loader::staging::Run::register(&db.pool, "other-queue", "drain").await.unwrap();

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
    let mine = loader::staging::Run::register(&ingest.pool, "login-queue", "drain").await.unwrap();
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
    let outcome = loader::staging::stage(&mut conn, &mine, &messages).await.unwrap();
    assert_eq!(outcome.staged, 100);
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
        format!(
            "select loader.record_refusals({id}, '{my_token}', array['f1'], array['23514'], array[null])"
        ),
        format!("select loader.finish_run({id}, '{my_token}')"),
        format!(
            "select loader.stage({id}, '{my_token}', array['f4'], array['{{}}'], array[true],
                                 array[now()], array[1], 1)"
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
    mine.finish(&ingest.pool).await.unwrap();
    let err = loader::staging::stage(&mut conn, &mine, &messages[..1]).await.unwrap_err();
    assert!(format!("{err:#}").contains("is not open"), "{err:#}");
}

/// What each role may do in schemas `loader` and `public`, as `has_*_privilege` reports it,
/// one line per privilege: `execute f(args)`, `select t`, `select t(col, ...)` when only some
/// columns. Extension functions (pgcrypto's, executable by PUBLIC and harmless without the
/// key) are left out.
async fn privileges_of(db: &TestDb, role: &str) -> Vec<String> {
    loader::doctor::privileges_of(&db.pool, role).await.unwrap()
}

/// The inventory: exactly the privileges README "Roles" lists, for PUBLIC (so any role that
/// can connect), loader_ingest and loader_analyst. A grant added by mistake fails here.
#[tokio::test]
async fn each_role_has_exactly_the_documented_privileges() {
    let db = TestDb::migrated().await;
    // The list `loader doctor` checks too (README "Roles" in prose).
    for (role, documented) in loader::doctor::DOCUMENTED_PRIVILEGES {
        assert_eq!(privileges_of(&db, role).await, *documented, "{role}");
    }
    assert_eq!(
        loader::doctor::DOCUMENTED_PRIVILEGES.iter().map(|(r, _)| *r).collect::<Vec<_>>(),
        ["public", "loader_ingest", "loader_analyst"]
    );
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

/// Finding 5: `keys install` bound the key as a statement parameter, which the server writes to
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
    let out = crate::support::loader_command(&db.url, "unused", &["keys", "install"])
        .env("LOADER_MASK_KEY", &key_hex)
        .output()
        .unwrap();
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
