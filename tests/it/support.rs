//! Test fixtures: a database and a queue of one's own, against the real PostgreSQL and
//! LocalStack that `scripts/test.sh` starts. Both are removed when dropped.

#![allow(dead_code)] // parts serve only the `lambda` module, built with that feature

use std::collections::HashMap;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use aws_sdk_sqs::types::QueueAttributeName;
use loader::config::{AwsSettings, DatabaseUrl};
use loader::sqs::{self, Queue};
use sqlx::PgPool;

pub const FIXTURE: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/login-queue-sample.json");

pub fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests with scripts/test.sh, which starts the services")
    })
}

/// A unique, lowercase name for this test's database or queue.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}_{}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        fastrand::u32(..)
    )
}

/// The role that owns every test database and runs `loader migrate` in it: a LOGIN role that
/// is not a superuser and may not create roles (the two loader roles are created beforehand,
/// as a DBA would), as README "Security model" recommends for production.
pub const OWNER: &str = "loader_test_owner";

/// A database of this test's own, owned by [`OWNER`]; dropped (with its connections) when the
/// value is dropped.
pub struct TestDb {
    pub name: String,
    /// Logs in as [`OWNER`]: what `loader` is given as `DATABASE_URL`.
    pub url: String,
    /// Connected as [`OWNER`].
    pub pool: PgPool,
    /// `DATABASE_URL`'s superuser, connected to this database: for what only a DBA may do
    /// (creating login roles, schemas for other roles).
    pub admin: PgPool,
    admin_url: String,
}

impl TestDb {
    /// A new, empty database.
    pub async fn empty() -> Self {
        let server_admin_url = required_env("DATABASE_URL");
        let name = unique_name("loader_test");
        let admin = PgPool::connect(&server_admin_url).await.expect("connecting with DATABASE_URL");
        create_loader_roles(&admin).await;
        sqlx::raw_sql(&format!("create database {name} owner {OWNER}"))
            .execute(&admin)
            .await
            .expect("creating the test database");
        admin.close().await;
        let admin_url = match server_admin_url.rsplit_once('/') {
            Some((server, _db)) => format!("{server}/{name}"),
            None => panic!("DATABASE_URL has no database path"),
        };
        let url = url_as(&admin_url, OWNER);
        let pool =
            PgPool::connect(&url).await.expect("connecting to the test database as its owner");
        let admin = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect_lazy(&admin_url)
            .expect("admin URL");
        Self { name, url, pool, admin, admin_url }
    }

    /// A new database with `loader migrate` applied (by the owner).
    pub async fn migrated() -> Self {
        let db = Self::empty().await;
        loader::db::migrate(&db.pool).await.expect("migrating the test database");
        db
    }

    pub fn database_url(&self) -> DatabaseUrl {
        DatabaseUrl::from(self.url.clone())
    }

    pub async fn count(&self, sql: &'static str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(&self.pool).await.expect(sql)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let server_admin_url = required_env("DATABASE_URL");
        let _ = Command::new("psql")
            .args([
                &server_admin_url,
                "-Xqc",
                &format!("drop database if exists {} with (force)", self.name),
            ])
            .output();
    }
}

pub fn aws_settings() -> AwsSettings {
    AwsSettings {
        endpoint_url: Some(required_env("AWS_ENDPOINT_URL")),
        region: Some(std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into())),
    }
}

/// A queue of this test's own, deleted when dropped.
pub struct TestQueue {
    pub name: String,
    pub queue: Queue,
}

impl TestQueue {
    /// A standard queue with the given visibility timeout (seconds): short ones let tests see
    /// redelivery quickly. LocalStack's timers tick in whole seconds.
    pub async fn new(visibility_timeout: u32) -> Self {
        let name = unique_name("loader-test").replace('_', "-");
        let client = sqs::client(&aws_settings()).await;
        client
            .create_queue()
            .queue_name(&name)
            .set_attributes(Some(HashMap::from([(
                QueueAttributeName::VisibilityTimeout,
                visibility_timeout.to_string(),
            )])))
            .send()
            .await
            .expect("creating the test queue");
        let queue = Queue::open(client, &name).await.expect("opening the test queue");
        Self { name, queue }
    }

    /// `(visible, in flight, delayed)`.
    pub async fn depth(&self) -> (u64, u64, u64) {
        self.queue.depth().await.expect("reading queue depth")
    }

    pub async fn send(&self, bodies: &[String]) {
        loader::send::send_all(&self.queue, bodies.to_vec()).await.expect("sending");
    }
}

impl Drop for TestQueue {
    fn drop(&mut self) {
        let url = self.queue.url().to_owned();
        // Drop cannot await; a short-lived runtime on its own thread deletes the queue, with a
        // client of its own (the test's client is bound to the test's runtime, blocked here).
        let _ = std::thread::spawn(move || {
            tokio::runtime::Runtime::new().expect("runtime").block_on(async {
                let client = sqs::client(&aws_settings()).await;
                client.delete_queue().queue_url(url).send().await.ok()
            })
        })
        .join();
    }
}

/// The `loader` binary set up for a database and a queue.
pub fn loader_command(db_url: &str, queue: &str, args: &[&str]) -> Command {
    let aws = aws_settings();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loader"));
    cmd.args(args)
        .env("DATABASE_URL", db_url)
        .env("SQS_QUEUE", queue)
        .env("AWS_ENDPOINT_URL", aws.endpoint_url.unwrap())
        .env("AWS_REGION", aws.region.unwrap())
        .env("RUST_LOG", "warn,loader=debug");
    cmd
}

/// Runs the `loader` binary against a database and queue.
pub fn loader(db_url: &str, queue: &str, args: &[&str]) -> Output {
    loader_command(db_url, queue, args).output().expect("running the loader binary")
}

/// Runs `loader` and asserts it exited 0; returns stdout.
pub fn loader_ok(db_url: &str, queue: &str, args: &[&str]) -> String {
    let out = loader(db_url, queue, args);
    assert!(
        out.status.success(),
        "loader {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// Waits until the queue's in-flight messages are visible again (visibility timeout passed).
pub async fn wait_until_visible(q: &TestQueue, expected: u64) {
    for _ in 0..100 {
        let (visible, in_flight, _) = q.depth().await;
        if visible >= expected && in_flight == 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    panic!("queue never showed {expected} visible messages: {:?}", q.depth().await);
}

/// Stages `(message_id, body)` pairs straight into `loader.raw_logins` (no queue involved), all
/// sent at `sent_at`, through the same staging code `loader ingest` uses.
pub async fn stage(db: &TestDb, messages: &[(String, String)], sent_at: time::OffsetDateTime) {
    stage_with(&db.pool, messages, sent_at).await;
}

/// [`stage`] over any pool, e.g. one of several concurrent writers.
pub async fn stage_with(
    pool: &PgPool,
    messages: &[(String, String)],
    sent_at: time::OffsetDateTime,
) {
    let run = loader::staging::Run::register(pool, "direct", "drain").await.unwrap();
    let raw: Vec<loader::staging::RawMessage> = messages
        .iter()
        .map(|(id, body)| loader::staging::RawMessage {
            message_id: id.clone(),
            body: body.clone(),
            sent_at: Some(sent_at),
            receive_count: Some(1),
        })
        .collect();
    let mut conn = pool.acquire().await.unwrap();
    for chunk in raw.chunks(5_000) {
        loader::staging::stage(&mut conn, &run, chunk).await.expect("staging");
    }
}

/// The fixture's bodies, as `loader send` would publish them, with ids `fixture-N`.
pub fn fixture_messages() -> Vec<(String, String)> {
    loader::send::bodies_from_file(std::path::Path::new(FIXTURE))
        .unwrap()
        .into_iter()
        .enumerate()
        .map(|(i, body)| (format!("fixture-{i}"), body))
        .collect()
}

/// `url` (`scheme://user[:password]@host...`) logging in as `role` instead (trust auth).
pub fn url_as(url: &str, role: &str) -> String {
    let (scheme_user, rest) = url.split_once('@').expect("DATABASE_URL with a user@host");
    let scheme = scheme_user.split("://").next().unwrap();
    format!("{scheme}://{role}@{rest}")
}

/// Creates the two NOLOGIN roles and the [`OWNER`] login when missing, as a DBA would before
/// the first migrate (roles are cluster-wide; tests running at once may race to create them).
pub async fn create_loader_roles(admin: &PgPool) {
    let sql = "do $$ begin
        if not exists (select from pg_roles where rolname = 'loader_ingest') then
            create role loader_ingest nologin; end if;
        if not exists (select from pg_roles where rolname = 'loader_analyst') then
            create role loader_analyst nologin; end if;
        if not exists (select from pg_roles where rolname = 'loader_test_owner') then
            create role loader_test_owner login nosuperuser nocreaterole nocreatedb; end if;
    exception when unique_violation or duplicate_object then null; end $$";
    sqlx::raw_sql(sql).execute(admin).await.expect("creating the loader roles");
}

/// A LOGIN role granted `grant` (e.g. loader_analyst; "" for none: it can only connect), with a
/// pool connected as it. The role is
/// dropped with the database's objects when the value is dropped.
pub struct TestRole {
    pub name: String,
    /// The database URL that logs in as this role (for psql).
    pub url: String,
    pub pool: PgPool,
    admin_url: String,
}

impl TestRole {
    pub async fn new(db: &TestDb, grant: &str) -> Self {
        let name = unique_name("login");
        let grant =
            if grant.is_empty() { String::new() } else { format!("grant {grant} to {name};") };
        sqlx::raw_sql(&format!("create role {name} login; {grant}"))
            .execute(&db.admin)
            .await
            .unwrap();
        let url = url_as(&db.url, &name);
        let pool = PgPool::connect(&url).await.expect("login as test role");
        Self { name, url, pool, admin_url: db.admin_url.clone() }
    }
}

impl Drop for TestRole {
    fn drop(&mut self) {
        // Synchronous on purpose: Drop cannot await, and the pool's connections belong to the
        // test's runtime, which is blocked here. Open sessions do not prevent dropping a role.
        let sql = format!("drop owned by {0}; drop role if exists {0}", self.name);
        let _ = Command::new("psql").args([&self.admin_url, "-Xqc", &sql]).output();
    }
}

/// A `loader` process running in the background. Its output is drained as it comes (a full
/// pipe would block the process), and returned by [`terminate`].
pub struct Running {
    child: std::process::Child,
    stdout: std::thread::JoinHandle<Vec<u8>>,
    stderr: std::thread::JoinHandle<Vec<u8>>,
}

/// Starts `loader` in the background against a database and queue.
pub fn spawn_loader(db_url: &str, queue: &str, args: &[&str]) -> Running {
    let mut child = loader_command(db_url, queue, args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting the loader binary");
    let drain = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    Running { child, stdout, stderr }
}

/// Kills the process with SIGKILL (no chance to clean up) and reaps it.
pub fn kill_9(running: Running) {
    let Running { mut child, stdout, stderr } = running;
    child.kill().expect("SIGKILL");
    child.wait().unwrap();
    let _ = (stdout.join(), stderr.join());
}

/// Sends SIGTERM and waits for the process; returns its output.
pub fn terminate(running: Running) -> Output {
    let Running { mut child, stdout, stderr } = running;
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let status = child.wait().unwrap();
    Output { status, stdout: stdout.join().unwrap(), stderr: stderr.join().unwrap() }
}

/// Sends SIGTERM, asserts a clean exit (0), and returns stdout.
pub fn terminate_ok(running: Running) -> String {
    let out = terminate(running);
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `sql` (a count) until it reaches `expected` or 30 s pass; returns the last value.
pub async fn wait_for_count(db: &TestDb, sql: &'static str, expected: i64) -> i64 {
    let mut last = -1;
    for _ in 0..150 {
        last = db.count(sql).await;
        if last >= expected {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    last
}

/// A TCP proxy in front of a real service, for outages that touch no other test: during
/// [`Proxy::outage`] it refuses connections and cuts the open ones, then serves again on the
/// same port. (Stopping the shared PostgreSQL or LocalStack would break parallel tests, and
/// LocalStack keeps no state across a restart.)
pub struct Proxy {
    pub port: u16,
    up: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (up, mut up_rx) = tokio::sync::watch::channel(true);
        let task = tokio::spawn(async move {
            let mut listener = Some(listener);
            let mut connections = tokio::task::JoinSet::new();
            loop {
                if *up_rx.borrow() {
                    let l = match &listener {
                        Some(l) => l,
                        None => {
                            listener =
                                tokio::net::TcpListener::bind(("127.0.0.1", port)).await.ok();
                            continue;
                        }
                    };
                    tokio::select! {
                        accepted = l.accept() => if let Ok((mut client, _)) = accepted {
                            connections.spawn(async move {
                                if let Ok(mut server) = tokio::net::TcpStream::connect(target).await {
                                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                                }
                            });
                        },
                        changed = up_rx.changed() => if changed.is_err() { return },
                    }
                } else {
                    // Down: no listener (connections are refused) and no open connection.
                    listener = None;
                    connections.abort_all();
                    if up_rx.changed().await.is_err() {
                        return;
                    }
                }
            }
        });
        Self { port, up, task }
    }

    /// A proxy in front of the test database, and the database URL that goes through it.
    pub async fn for_database(db: &TestDb) -> (Self, String) {
        let target = socket_of(&db.url);
        let proxy = Self::start(target).await;
        let url = db.url.replacen(&target.port().to_string(), &proxy.port.to_string(), 1);
        (proxy, url)
    }

    /// Refuses and cuts every connection for `duration`, then serves again.
    pub async fn outage(&self, duration: std::time::Duration) {
        self.up.send(false).unwrap();
        tokio::time::sleep(duration).await;
        self.up.send(true).unwrap();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `host:port` of a URL's authority (`scheme://[user@]host:port/...`), resolved.
pub fn socket_of(url: &str) -> std::net::SocketAddr {
    let authority = url.split("://").nth(1).unwrap().split('/').next().unwrap();
    let host_port = authority.rsplit('@').next().unwrap();
    std::net::ToSocketAddrs::to_socket_addrs(host_port).unwrap().next().unwrap()
}
