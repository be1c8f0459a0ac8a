//! `loader migrate` on new and pre-existing databases, and the one-line errors (exit 1) for a
//! wrong database, an unreachable endpoint or a missing queue.

use std::process::Command;

use crate::support::{TestDb, TestEnv};

#[tokio::test]
async fn migrate_twice_is_a_no_op() {
    let db = TestDb::empty().await;
    let first = db.cli().ok(&["migrate"]);
    assert!(first.contains("migrations: applied V1__foundation"), "{first}");
    let second = db.cli().ok(&["migrate"]);
    assert!(second.contains("migrations: up to date"), "{second}");
    let migration_files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .unwrap()
        .filter(|f| f.as_ref().unwrap().path().extension().is_some_and(|e| e == "sql"))
        .count();
    assert_eq!(
        db.count("select count(*) from loader.refinery_schema_history").await,
        migration_files as i64
    );
    for role in ["loader_ingest", "loader_analyst"] {
        let can_login: bool =
            sqlx::query_scalar("select rolcanlogin from pg_roles where rolname = $1")
                .bind(role)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert!(!can_login, "{role} is NOLOGIN");
    }
}

#[tokio::test]
async fn migrate_adopts_a_user_logins_table_with_the_original_columns() {
    let db = TestDb::empty().await;
    crate::support::adopted_user_logins(&db, "('u', 'ios', 'm', 'd', 'FR', 20300, '2020-01-01')")
        .await;

    db.cli().ok(&["migrate"]);
    assert_eq!(db.count("select count(*) from public.user_logins where user_id = 'u'").await, 1);
    let columns: Vec<String> = sqlx::query_scalar(
        "select column_name::text from information_schema.columns
          where table_schema = 'public' and table_name = 'user_logins' order by ordinal_position",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    for c in
        ["user_id", "create_date", "message_id", "ip_network", "app_version_text", "mask_key_id"]
    {
        assert!(columns.iter().any(|x| x == c), "{c} missing from {columns:?}");
    }
}

#[tokio::test]
async fn migrate_refuses_a_user_logins_table_that_breaks_the_contract() {
    let db = TestDb::empty().await;
    sqlx::raw_sql("create table public.user_logins (user_id text, app_version text)")
        .execute(&db.pool)
        .await
        .unwrap();
    let out = db.cli().run(&["migrate"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("columns differ from the contract"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one clear line: {stderr}");
}

/// Runs `loader` with the given environment overrides; returns (exit code, stderr).
fn run_with(env: &[(&str, &str)], args: &[&str]) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loader"));
    cmd.args(args).env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test]
async fn configuration_errors_exit_1_with_one_line() {
    let db = TestDb::migrated().await;
    let endpoint = crate::support::aws_settings().endpoint_url.unwrap();
    let db_ok = ("DATABASE_URL", db.url.as_str());
    let sqs_ok = ("AWS_ENDPOINT_URL", endpoint.as_str());
    type Env<'a> = &'a [(&'a str, &'a str)];
    let cases: [(Env, &[&str], &str); 4] = [
        (
            &[db_ok, sqs_ok, ("SQS_QUEUE", "no-such-queue-here")],
            &["ingest"],
            "queue 'no-such-queue-here' does not exist",
        ),
        (
            &[db_ok, ("AWS_ENDPOINT_URL", "http://127.0.0.1:9")],
            &["ingest"],
            "cannot reach the SQS endpoint",
        ),
        (
            &[("DATABASE_URL", "postgres://postgres@127.0.0.1:9/x"), sqs_ok],
            &["ingest"],
            "connecting to PostgreSQL",
        ),
        (&[("DATABASE_URL", ""), sqs_ok], &["migrate"], "set DATABASE_URL"),
    ];
    for (env, args, expected) in cases {
        let (code, err) = run_with(env, args);
        assert_eq!(code, Some(1), "{expected}: {err}");
        assert!(err.contains(expected), "expected {expected:?} in {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line, no retry stack: {err}");
    }

    let (code, _) = run_with(&[db_ok, sqs_ok], &["ingest", "--wait-seconds", "99"]);
    assert_eq!(code, Some(2), "usage errors exit 2");

    // No AWS credentials anywhere: one line that says so (the SDK's own text lists every
    // provider it tried, a line each, and blamed the endpoint).
    let home = std::env::temp_dir().join(crate::support::unique_name("loader-nohome"));
    let out = Command::new(env!("CARGO_BIN_EXE_loader"))
        .args(["ingest"])
        .env_remove("RUST_LOG")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_CONFIG_FILE")
        .env_remove("AWS_SHARED_CREDENTIALS_FILE")
        // No endpoint either: with one, loader uses LocalStack's test credentials. The SDK
        // looks for credentials before it sends anything, so nothing leaves this machine.
        .env_remove("AWS_ENDPOINT_URL")
        .env("HOME", &home)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_REGION", "us-east-1")
        .env("DATABASE_URL", &db.url)
        .env("SQS_QUEUE", "any-queue")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no AWS credentials") && !err.contains("cannot reach"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

#[tokio::test]
async fn a_dotenv_file_configures_the_command() {
    let db = TestDb::empty().await;
    let dir = std::env::temp_dir().join(crate::support::unique_name("loader-dotenv"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(".env"), format!("DATABASE_URL={}\n", db.url)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_loader"))
        .arg("migrate")
        .current_dir(&dir)
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(db.count("select count(*) from loader.mask_keys").await, 1);
}

#[tokio::test]
async fn without_a_region_us_east_1_is_used() {
    let env = TestEnv::new(30).await;
    let (db, q) = (&env.db, &env.queue);
    let out = Command::new(env!("CARGO_BIN_EXE_loader"))
        .args(["ingest", "--wait-seconds", "0", "--queue", &q.name])
        .env("DATABASE_URL", &db.url)
        .env("AWS_ENDPOINT_URL", crate::support::aws_settings().endpoint_url.unwrap())
        .env_remove("AWS_REGION")
        .env_remove("AWS_DEFAULT_REGION")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("HOME", std::env::temp_dir())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("received 0"));
}

#[tokio::test]
async fn bench_commands_measure_what_they_say() {
    let db = TestDb::migrated().await;
    let out = db.cli().ok(&["bench", "staging", "--rows", "1200", "--flush-messages", "500"]);
    assert!(out.starts_with("staging (no queue): 1200 messages in "), "{out}");
    assert_eq!(db.staged().await, 1200);
    let out = db.cli().ok(&[
        "bench",
        "staging",
        "--rows",
        "700",
        "--flush-messages",
        "500",
        "--method",
        "copy",
    ]);
    assert!(out.starts_with("staging by COPY (no queue): 700 messages in "), "{out}");
    assert_eq!(db.staged().await, 1900);
    assert_eq!(
        db.count(
            "select count(*) from loader.raw_logins where body_is_json and sent_at is not null"
        )
        .await,
        1900,
        "COPY carries bodies and timestamps intact"
    );

    let q = crate::support::TestQueue::new(30).await;
    q.send(&loader::send::generate(60, 1)).await;
    let out =
        crate::support::Cli::new(&db.url, &q.name).ok(&["bench", "ceiling", "--receivers", "2"]);
    assert!(out.starts_with("receive+delete (no database): 60 messages in "), "{out}");
    assert_eq!(q.depth().await, (0, 0, 0));
    assert_eq!(db.staged().await, 1900, "no database work");
}

/// A login granted only `loader_ingest` (the security guide's snippet) running `loader run
/// --once` staged, then failed with "(has 'loader migrate' run?) ... permission denied"; status
/// said the same. Now an error names its cause: the role a login lacks, or a database never
/// migrated; never the one for the other.
#[tokio::test]
async fn errors_name_the_role_a_login_lacks_or_the_migrate_it_needs() {
    let env = TestEnv::new(30).await;
    env.queue.send(&loader::send::generate(5, 3)).await;
    let stderr = |out: std::process::Output| {
        assert_eq!(out.status.code(), Some(1));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let ingest_only = crate::support::TestRole::new(&env.db, "loader_ingest").await;
    let cli = crate::support::Cli::new(&ingest_only.url, &env.queue.name);
    let err = stderr(cli.run(&["run", "--once", "--wait-seconds", "1"]));
    assert!(err.contains("it needs loader_transformer") && !err.contains("migrate"), "{err}");
    let err = stderr(cli.run(&["status"]));
    assert!(err.contains("it needs loader_analyst") && !err.contains("migrate"), "{err}");
    assert_eq!(env.db.staged().await, 5, "what it staged stays staged");

    let empty = TestDb::empty().await;
    let err = stderr(empty.cli().run(&["status"]));
    assert!(err.contains("run `loader migrate` as the owner role"), "{err}");
}

/// `loader doctor --json | head` once panicked with a backtrace when head closed the pipe. A
/// reader that goes away ends loader quietly, with 141 (128 + SIGPIPE), whether the output is
/// printed with println! (`status --json`, as doctor) or written at once (completions, man).
#[tokio::test]
async fn a_reader_that_goes_away_ends_loader_quietly() {
    let db = crate::support::TestDb::migrated().await;
    for args in
        [&["status", "--json"][..], &["completions", "bash"][..], &["man"][..], &["--help"][..]]
    {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = db
            .cli()
            .command(args)
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        if args[0] != "--help" {
            assert_eq!(out.status.code(), Some(141), "{args:?}: {stderr}");
            assert!(stderr.is_empty(), "{args:?}: {stderr}");
        }
    }
}

/// A login the server (or a pooler in front of it) refuses says so and what to check, in one
/// line: through PgBouncer, a role missing from its auth_file read as "trust authentication
/// failed" with nothing to go on.
#[tokio::test]
async fn a_refused_login_names_what_to_check() {
    let db = crate::support::TestDb::migrated().await;
    let url = crate::support::url_as(&db.url, "loader_test_no_such_login");
    let out = crate::support::Cli::new(&url, "unused").run(&["status"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("the login was refused") && stderr.contains("auth_file"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}
