//! Signals people alert on and watch: Prometheus metrics, JSON logs, the progress line, and
//! logs free of personal data at the most verbose level.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::support::{Proxy, TestEnv};

/// One GET of the metrics endpoint: the exposition text (without the HTTP header).
fn scrape_text(addr: &str) -> Option<String> {
    let mut stream = TcpStream::connect(addr).ok()?;
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned())
}

/// One GET of the metrics endpoint; the metric's value, if present.
fn scrape(addr: &str, metric: &str) -> Option<f64> {
    scrape_text(addr)?
        .lines()
        .find_map(|l| l.strip_prefix(metric).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

/// Scrapes until `metric` equals `expected` (metrics are updated just after the rows commit), or
/// 5 s pass; returns the last value seen.
async fn scrape_until(addr: &str, metric: &str, expected: f64) -> Option<f64> {
    let mut last = None;
    for _ in 0..50 {
        last = scrape(addr, metric);
        if last == Some(expected) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last
}

/// Scrapes until the text holds `needle`, or 10 s pass; returns the last scrape.
async fn scrape_text_until(addr: &str, needle: &str) -> String {
    let mut text = String::new();
    for _ in 0..100 {
        text = scrape_text(addr).unwrap_or_default();
        if text.contains(needle) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    text
}

/// `loader run` with its metrics on a free port of its own; returns it and the address.
fn run_with_metrics(db_url: &str, queue: &str) -> (crate::support::Running, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let child = crate::support::Cli::new(db_url, queue).spawn(&[
        "run",
        "--wait-seconds",
        "1",
        "--metrics-addr",
        &addr,
    ]);
    (child, addr)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test]
async fn metrics_endpoint_shows_counters_moving_during_a_run() {
    let env = TestEnv::new(30).await;
    let (db, q) = (&env.db, &env.queue);
    let (child, addr) = run_with_metrics(&db.url, &q.name);

    // Before any event, every labelled counter whose labels are known reads 0, not "absent".
    let mut first = None;
    for _ in 0..50 {
        first = scrape_text(&addr);
        if first.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first = first.expect("the metrics endpoint answers");
    for kind in loader::metrics::ReceiveError::ALL {
        let line = format!("loader_receive_errors_total{{kind=\"{}\"}} 0", kind.label());
        assert!(first.contains(&line), "{line} missing:\n{first}");
    }
    for reason in loader::metrics::REJECT_REASONS {
        let line = format!("loader_rows_rejected_total{{reason=\"{reason}\"}} 0");
        assert!(first.contains(&line), "{line} missing:\n{first}");
    }

    q.send(&loader::send::generate(40, 1)).await;
    crate::support::wait_for_count(db, "select count(*) from public.user_logins", 40).await;
    assert_eq!(scrape_until(&addr, "loader_messages_staged_total", 40.0).await, Some(40.0));
    assert_eq!(scrape_until(&addr, "loader_rows_loaded_total", 40.0).await, Some(40.0));
    assert_eq!(scrape_until(&addr, "loader_messages_deleted_total", 40.0).await, Some(40.0));
    assert_eq!(scrape_until(&addr, "loader_oldest_pending_age_seconds", 0.0).await, Some(0.0));
    assert!(scrape(&addr, "loader_staging_seconds_count").unwrap_or(0.0) >= 1.0, "one per flush");
    assert!(scrape(&addr, "loader_transform_seconds_count").unwrap_or(0.0) >= 1.0);

    q.send(&loader::send::generate(25, 2)).await;
    crate::support::wait_for_count(db, "select count(*) from public.user_logins", 65).await;
    let moved = scrape_until(&addr, "loader_messages_staged_total", 65.0).await;
    assert_eq!(moved, Some(65.0), "the counter moved with the second burst");
    crate::support::terminate_ok(child);
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_with_run_ids() {
    let env = TestEnv::new(30).await;
    let (db, q) = (&env.db, &env.queue);
    q.send(&loader::send::generate(12, 3)).await;
    let out = crate::support::Cli::new(&db.url, &q.name)
        .command(&["run", "--once", "--wait-seconds", "1", "--log-format", "json"])
        .env("RUST_LOG", "loader=debug")
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "run started" && l["fields"]["run_id"].is_number())
    );
    // Batch spans carry the run id, the batch size and the message ids.
    let batch =
        lines.iter().find(|l| l["span"]["name"] == "batch").expect("a line inside a batch span");
    assert!(batch["span"]["run_id"].is_number() && batch["span"]["size"].is_number(), "{batch}");
    assert!(batch["span"]["message_ids"].as_str().is_some_and(|ids| ids.contains('-')), "{batch}");
}

#[tokio::test]
async fn the_progress_line_shows_on_a_terminal_only() {
    let env = TestEnv::new(30).await;
    let (db, q) = (&env.db, &env.queue);
    q.send(&loader::send::generate(30, 4)).await;

    // Not a terminal: no progress line at all.
    let out = crate::support::Cli::new(&db.url, &q.name)
        .command(&["ingest", "--wait-seconds", "1"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("messages staged") && !stderr.contains('\r'), "{stderr}");

    // A terminal (a pty from `script`): the line shows messages done and the rate.
    q.send(&loader::send::generate(30, 5)).await;
    let cmd = format!("{} ingest --wait-seconds 1", env!("CARGO_BIN_EXE_loader"));
    let log = std::env::temp_dir().join(crate::support::unique_name("pty"));
    let status = std::process::Command::new("script")
        .args(["-qfec", &cmd, log.to_str().unwrap()])
        .envs(
            crate::support::Cli::new(&db.url, &q.name)
                .command(&[])
                .get_envs()
                .filter_map(|(k, v)| Some((k, v?))),
        )
        .stdout(std::process::Stdio::null())
        .status()
        .expect("script(1) from util-linux");
    assert!(status.success());
    let screen = String::from_utf8_lossy(&std::fs::read(&log).unwrap()).into_owned();
    std::fs::remove_file(&log).ok();
    assert!(screen.contains("30 messages staged and deleted"), "{screen}");
    assert!(screen.contains("/s"), "{screen}");
}

#[tokio::test]
async fn a_whole_run_never_logs_bodies_ips_device_ids_or_keys_even_at_trace() {
    let env = TestEnv::new(30).await;
    let (db, q) = (&env.db, &env.queue);
    let fixture = crate::support::fixture_messages();
    q.send(&fixture.iter().map(|(_, b)| b.clone()).collect::<Vec<_>>()).await;

    let out = crate::support::Cli::new(&db.url, &q.name)
        .command(&["run", "--once", "--wait-seconds", "1"])
        .env("RUST_LOG", "trace")
        .output()
        .unwrap();
    assert!(out.status.success());
    let logs =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(logs.lines().count() > 50, "trace logging is on");
    assert!(logs.contains("staged 100 new") && logs.contains("loaded 99"), "the run happened");
    for (_, body) in &fixture {
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        for field in ["ip", "device_id", "user_id"] {
            if let Some(value) = v.get(field).and_then(|x| x.as_str()) {
                assert!(!logs.contains(value), "a {field} leaked into the logs");
            }
        }
    }
    let key: String = sqlx::query_scalar("select encode(key, 'hex') from loader.mask_keys")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(!logs.contains(&key), "the key leaked into the logs");
}

/// Metric names (loader_*, process_*) in a PromQL expression.
fn metric_names(expr: &str) -> Vec<&str> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|t| t.starts_with("loader_") || t.starts_with("process_"))
        .collect()
}

/// Every `expr` in a Grafana dashboard, panels nested in rows included.
fn dashboard_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            if let Some(expr) = map.get("expr").and_then(|e| e.as_str()) {
                out.push(expr.to_owned());
            }
            map.values().for_each(|v| dashboard_exprs(v, out));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

#[tokio::test]
async fn a_scrape_after_every_kind_of_event_passes_promtool_and_has_what_the_dashboard_queries() {
    let env = TestEnv::new(30).await;
    let (db, q) = (&env.db, &env.queue);
    let dlq = q.attach_dead_letter_queue(5).await;
    dlq.send(&loader::send::generate(2, 8)).await;
    // Ingest and transform: 40 logins, one body that is not a login (a reject), and one message
    // PostgreSQL refuses (an operator's constraint), left on the queue.
    let mut bodies = loader::send::generate(40, 9);
    bodies.push(r#"{"not": "a login"}"#.to_owned());
    let poison: serde_json::Value = serde_json::from_str(&bodies[3]).unwrap();
    sqlx::raw_sql(&format!(
        "alter table loader.raw_logins
           add constraint test_refuses_one check (body->>'user_id' <> '{}')",
        poison["user_id"].as_str().unwrap()
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    q.send(&bodies).await;
    // SQS through a proxy, so that receives can fail.
    let sqs = crate::support::aws_settings().endpoint_url.unwrap();
    let proxy = Proxy::start(crate::support::socket_of(&sqs)).await;
    let addr = format!("127.0.0.1:{}", free_port());
    let mut command = crate::support::Cli::new(&db.url, &q.name).command(&[
        "run",
        "--wait-seconds",
        "1",
        "--metrics-addr",
        &addr,
    ]);
    command.env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", proxy.port));
    let child = crate::support::spawn(command);

    crate::support::wait_for_count(db, "select count(*) from public.user_logins", 39).await;
    assert_eq!(scrape_until(&addr, "loader_rows_loaded_total", 39.0).await, Some(39.0));
    // The refused message may come in a later flush than the others: wait for its count too.
    let refused = scrape_until(&addr, "loader_messages_refused_total", 1.0).await;
    assert!(refused.is_some_and(|n| n >= 1.0), "{refused:?}");
    // The queue's gauges are read at start, through the proxy, four calls that take a while on
    // a loaded machine: the outage must not cut the first reading short (the next one is 15 s
    // later).
    let dlq_gauge = format!(
        "loader_dead_letter_messages{{queue=\"{}\",dead_letter_queue=\"{}\"}}",
        q.name, dlq.name
    );
    for _ in 0..300 {
        if scrape(&addr, &dlq_gauge).is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    proxy.outage(Duration::from_secs(4)).await;
    let text = scrape_text_until(&addr, "loader_receive_errors_total{").await;
    crate::support::terminate_ok(child);

    for expected in [
        "loader_receive_errors_total{kind=",
        "loader_rows_rejected_total{reason=\"",
        &format!("loader_queue_messages{{queue=\"{}\",state=\"in_flight\"}}", q.name),
        &format!(
            "loader_dead_letter_messages{{queue=\"{}\",dead_letter_queue=\"{}\"}} 2",
            q.name, dlq.name
        ),
        &format!("loader_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION")),
        "process_resident_memory_bytes ",
        "# HELP loader_messages_staged_total ",
    ] {
        assert!(text.contains(expected), "{expected} missing from the scrape:\n{text}");
    }

    // Every family in the scrape is one docs/operating.md lists (generated from FAMILIES), of
    // the kind it says, and every listed family is in the scrape.
    let helped: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# HELP "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let listed: BTreeSet<&str> = loader::metrics::FAMILIES
        .iter()
        .map(|f| f.name)
        .chain(loader::metrics::PROCESS_FAMILIES.iter().copied())
        .collect();
    assert_eq!(helped, listed, "the scrape's families differ from the documented ones");
    for f in loader::metrics::FAMILIES {
        let kind = format!("# TYPE {} {}\n", f.name, f.kind.as_str());
        assert!(text.contains(&kind), "{kind} missing from the scrape");
    }

    // Prometheus's own linter.
    let promtool = crate::support::required_env("PROMTOOL");
    let mut check = std::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running promtool (scripts/promtool.sh provides it)");
    check.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The dashboard queries only metrics a real scrape has.
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/loader-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("dashboard JSON");
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 15, "{} queries", exprs.len());
    let scraped: std::collections::HashSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    for expr in &exprs {
        for name in metric_names(expr) {
            assert!(scraped.contains(name), "the dashboard queries {name}, not in the scrape");
        }
    }
}

/// `loader::metrics::REJECT_REASONS` is the list the database documents on
/// `loader.login_rejects.reason`, in the same order.
#[tokio::test]
async fn the_reject_reasons_exported_at_zero_are_the_transforms() {
    let db = crate::support::TestDb::migrated().await;
    let comment: String = sqlx::query_scalar(
        "select col_description('loader.login_rejects'::regclass,
                                (select attnum from pg_attribute
                                  where attrelid = 'loader.login_rejects'::regclass and attname = 'reason'))",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    // "a, b, ... or z"
    let list = comment.replace(" or ", ", ");
    let documented: Vec<&str> = list.split(", ").map(str::trim).collect();
    assert_eq!(documented, loader::metrics::REJECT_REASONS);
}

/// The counters without labels appeared only at their first event, so `LoaderQuiet` and
/// `LoaderDeletesStuck` could never fire for an instance stuck since it started. Now the first
/// scrape of an idle `loader run` has every family the alert rules and the dashboard use.
#[tokio::test]
async fn an_idle_run_exports_every_family_the_alerts_and_the_dashboard_use() {
    let env = TestEnv::new(30).await;
    let (db, q) = (&env.db, &env.queue);
    let _dlq = q.attach_dead_letter_queue(5).await;
    let (child, addr) = run_with_metrics(&db.url, &q.name);
    let rules = include_str!("../../deploy/prometheus/loader-rules.yml");
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../../deploy/grafana/loader-dashboard.json")).unwrap();
    let mut exprs = vec![rules.to_owned()];
    dashboard_exprs(&dashboard, &mut exprs);
    let used: BTreeSet<String> = exprs
        .iter()
        .flat_map(|e| metric_names(e))
        .filter(|n| n.starts_with("loader_"))
        .map(str::to_owned)
        .collect();
    assert!(used.len() > 15, "{used:?}");
    // The queue's gauges are read once at start (a few SQS calls): wait for them, no more.
    let text = scrape_text_until(&addr, "loader_dead_letter_messages{").await;
    crate::support::terminate_ok(child);
    let present = |name: &str| text.lines().any(|l| l.starts_with(name) && !l.starts_with('#'));
    let missing: Vec<&String> = used.iter().filter(|n| !present(n)).collect();
    assert!(missing.is_empty(), "missing from an idle run's first scrape: {missing:?}\n{text}");
    for counter in ["loader_messages_received_total ", "loader_messages_deleted_total "] {
        assert!(text.contains(&format!("{counter}0")), "{counter} at 0:\n{text}");
    }
}
