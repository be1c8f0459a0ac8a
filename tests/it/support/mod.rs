//! Test fixtures, against the real PostgreSQL and LocalStack that `scripts/test.sh` starts:
//! a database ([`db`]) and a queue ([`queue`]) of each test's own, both removed when dropped;
//! the `loader` binary as a child process ([`process`]); an outage proxy ([`proxy`]); and
//! [`TestEnv`], which puts them together. Every test runs the binary through one [`Cli`].

mod cron;
mod db;
/// The benchmarks' latency proxy, the same source as `examples/latency-proxy`.
#[path = "../../../examples/latency-proxy/delay.rs"]
pub mod delay;
mod process;
mod proxy;
mod queue;

use std::sync::atomic::{AtomicU32, Ordering};

pub use cron::*;
pub use db::*;
pub use process::*;
pub use proxy::*;
pub use queue::*;
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

/// A migrated database and a queue of this test's own, and the `loader` binary pointed at
/// both: one method per action.
pub struct TestEnv {
    pub db: TestDb,
    pub queue: TestQueue,
}

impl TestEnv {
    /// A migrated database and a queue with this visibility timeout (seconds).
    pub async fn new(visibility_timeout: u32) -> Self {
        Self { db: TestDb::migrated().await, queue: TestQueue::new(visibility_timeout).await }
    }

    /// The `loader` binary pointed at this database and queue.
    pub fn cli(&self) -> Cli {
        Cli::new(&self.db.url, &self.queue.name)
    }
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
/// Makes 32 bytes of `byte` the active key, as `loader keys install` does (a rotation: start,
/// copy, swap), so masks come out the same in every run.
pub async fn install_key(db: &TestDb, byte: u8) {
    sqlx::raw_sql(&format!(
        "select * from loader.rebuild_start(decode(repeat('{byte:02x}', 32), 'hex'), true)"
    ))
    .execute(&db.pool)
    .await
    .expect("installing a key");
    copy_every_range(db).await;
    sqlx::raw_sql("select * from loader.rebuild_swap(); select loader.rebuild_drop_retired();")
        .execute(&db.pool)
        .await
        .expect("installing a key");
}

/// Copies every range the copying online rebuild has left, in one session.
pub async fn copy_every_range(db: &TestDb) {
    sqlx::raw_sql(
        "do $$ begin while loader.rebuild_copy_range() is not null loop end loop; end $$",
    )
    .execute(&db.pool)
    .await
    .expect("copying the rebuild's ranges");
}

pub async fn stage(db: &TestDb, messages: &[(String, String)], sent_at: time::OffsetDateTime) {
    stage_with(&db.pool, messages, sent_at).await;
}

/// [`stage`] over any pool, e.g. one of several concurrent writers.
pub async fn stage_with(
    pool: &PgPool,
    messages: &[(String, String)],
    sent_at: time::OffsetDateTime,
) {
    let run = loader::staging::IngestRun::register(pool, "direct", "drain").await.unwrap();
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

/// The golden outputs of the transform (`tests/fixtures/golden-outcomes.txt`) for the inputs of
/// [`stage_golden_inputs`].
pub const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/golden-outcomes.txt");

/// Stages the golden test's inputs: the fixture (sent on 2020-02-29, 23:59:59 UTC) and the
/// hostile bodies of `tests/fixtures/golden-hostile.sql`, under a fixed key (32 bytes of 0xab),
/// as the owner.
pub async fn stage_golden_inputs(db: &TestDb) {
    let sent_at = time::macros::datetime!(2020-02-29 23:59:59 UTC);
    install_key(db, 0xab).await;
    stage(db, &fixture_messages(), sent_at).await;
    sqlx::raw_sql(include_str!("../../fixtures/golden-hostile.sql"))
        .execute(&db.pool)
        .await
        .unwrap();
}

/// Every outcome the transform wrote, one row each (every column it writes), sorted: the rows
/// of the golden file (a value may hold a newline, so a row is not always one line).
pub async fn outcome_rows(db: &TestDb) -> Vec<String> {
    sqlx::query_scalar(
        // quote_nullable: NULL and '' stay apart.
        "select concat_ws(' | ', 'L', message_id, quote_nullable(user_id),
                          quote_nullable(device_type), quote_nullable(masked_ip),
                          quote_nullable(masked_device_id), quote_nullable(locale),
                          quote_nullable(app_version), quote_nullable(create_date),
                          quote_nullable(ip_network), quote_nullable(app_version_text),
                          quote_nullable(mask_key_id))
           from public.user_logins
         union all
         select concat_ws(' | ', 'R', message_id, quote_nullable(reason), quote_nullable(detail))
           from loader.login_rejects
         order by 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

/// The golden file's text for these rows.
pub fn golden_text(rows: &[String]) -> String {
    rows.join("\n") + "\n"
}

/// Panics, naming the first differing line, when `rows` are not the golden file's.
pub fn assert_golden(rows: &[String]) {
    let got = golden_text(rows);
    let golden = std::fs::read_to_string(GOLDEN).expect("tests/fixtures/golden-outcomes.txt");
    if got != golden {
        let first = got.lines().zip(golden.lines()).find(|(g, w)| g != w);
        panic!(
            "outcomes differ from the golden file ({} lines vs {}); first difference:\n got: {:?}\nwant: {:?}",
            got.lines().count(),
            golden.lines().count(),
            first.map(|f| f.0),
            first.map(|f| f.1)
        );
    }
}

/// Waits until no session of a `loader` process is left in `db`'s database: the server
/// finishes (and commits) what a killed process had in flight before it notices.
pub async fn wait_for_loader_sessions_to_end(db: &TestDb) {
    for _ in 0..100 {
        let left = db
            .count(
                "select count(*) from pg_stat_activity
                  where datname = current_database() and application_name = 'loader'",
            )
            .await;
        if left == 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
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

/// How often `needle` appears in any row of any table of schemas loader, loader_rebuild and
/// public, read as text (every column, the bodies included).
pub async fn traces(db: &TestDb, needle: &str) -> Vec<String> {
    let tables: Vec<String> = sqlx::query_scalar(
        "select format('%I.%I', n.nspname, c.relname) from pg_class c
           join pg_namespace n on n.oid = c.relnamespace
          where n.nspname in ('loader', 'loader_rebuild', 'public') and c.relkind = 'r'",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let mut found = Vec::new();
    for table in tables {
        let n: i64 = sqlx::query_scalar(&format!(
            "select count(*) from {table} t where strpos(t::text, $1) > 0"
        ))
        .bind(needle)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        if n > 0 {
            found.push(format!("{table}: {n}"));
        }
    }
    found
}

/// Logins are the cluster's, not a database's, and `loader doctor` reports any login that holds
/// a writer and a reader role together: a test that makes one holds this for writing while it
/// exists, and every test that expects all of doctor's checks to pass runs doctor through
/// [`doctor`], which holds it for reading.
pub static CLUSTER_LOGINS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// `loader doctor` with `args`, never while a test holds a login doctor would report.
pub fn doctor(cli: &Cli, args: &[&str]) -> std::process::Output {
    let _shared = loop {
        match CLUSTER_LOGINS.try_read() {
            Ok(guard) => break guard,
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    };
    cli.run(&[&["doctor"], args].concat())
}

/// The SQLSTATE of a database error ("" for any other error).
pub fn sqlstate(e: &sqlx::Error) -> String {
    e.as_database_error().and_then(|d| d.code()).map(|c| c.into_owned()).unwrap_or_default()
}
