//! Every code block of the README and the guides runs here, as the role its section names, or
//! says why it cannot. The line before each block says which, in an HTML comment:
//!
//! - `<!-- example: psql as loader_analyst -->` (or `as the owner`, `as a superuser`): the block
//!   runs in psql, logged in as a LOGIN role granted that role, against a migrated database
//!   holding the demo's data (the fixture plus 200 synthetic logins, under a fixed key). In it,
//!   the `--` lines right after a statement that begin with `--  ` are that statement's output as
//!   psql prints it (`...` stands for any number of lines) and must be what psql prints.
//! - `<!-- example: sh as the owner -->`: the block runs in bash with `loader` on the PATH and
//!   `DATABASE_URL` logging in as that role; every command must succeed.
//! - `... in the pg_cron cluster` after either: the private cluster `scripts/postgres.sh cron`
//!   starts, in loader's database there (one example at a time, as tests/it/schedule.rs).
//! - `<!-- example: not run: why -->`.
//!
//! The section the block is in (from its heading to the next) must name the role. Blocks tagged
//! `text` (diagrams, trees) are not code. Each guide's examples run in order in one database.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use crate::support::{CronDb, TestDb, TestRole, stage};

/// The guides whose blocks run: the README, every guide under docs/, and the other READMEs.
fn guides() -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<String> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".md"))
        .map(|name| format!("docs/{name}"))
        .collect();
    files.sort();
    for other in ["README.md", "CONTRIBUTING.md", "migrations/README.md"] {
        if root.join(other).exists() {
            files.insert(0, other.to_owned());
        }
    }
    files
}

#[derive(Debug, Clone, PartialEq)]
enum Who {
    Owner,
    Superuser,
    /// A LOGIN role granted this NOLOGIN role.
    Granted(String),
}

#[derive(Debug, Clone, PartialEq)]
enum How {
    Psql(Who),
    Sh(Who),
    NotRun(String),
}

#[derive(Debug, Clone)]
struct Example {
    /// `file:line` of the opening fence.
    at: String,
    how: How,
    /// In the private pg_cron cluster rather than a test database of its own.
    cron: bool,
    code: String,
}

fn parse_who(who: &str, at: &str) -> Who {
    match who {
        "the owner" => Who::Owner,
        "a superuser" => Who::Superuser,
        role if role.starts_with("loader_") => Who::Granted(role.to_owned()),
        other => panic!("{at}: unknown role '{other}' in the example marker"),
    }
}

/// The word a section must contain to name `who`.
fn named(who: &Who) -> &str {
    match who {
        Who::Owner => "owner",
        Who::Superuser => "superuser",
        Who::Granted(role) => role,
    }
}

/// The examples of `file`, each checked to have a marker whose role its section names.
fn examples(file: &str) -> Vec<Example> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(file)).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let section_of = |line: usize| {
        let start = (0..=line).rev().find(|&i| lines[i].starts_with('#')).unwrap_or(0);
        let end =
            (line + 1..lines.len()).find(|&i| lines[i].starts_with('#')).unwrap_or(lines.len());
        lines[start..end].join("\n")
    };
    let mut found = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some(lang) = lines[i].strip_prefix("```") else {
            i += 1;
            continue;
        };
        let at = format!("{file}:{}", i + 1);
        let close = (i + 1..lines.len())
            .find(|&j| lines[j].starts_with("```"))
            .unwrap_or_else(|| panic!("{at}: the block never closes"));
        let code = lines[i + 1..close].join("\n");
        if lang != "text" {
            let marker = i
                .checked_sub(1)
                .and_then(|p| lines[p].strip_prefix("<!-- example: "))
                .and_then(|m| m.strip_suffix(" -->"))
                .unwrap_or_else(|| {
                    panic!(
                        "{at}: a ```{lang} block without '<!-- example: ... -->' on the line \
                         before it (tests/it/examples.rs says how to mark it; ```text is not code)"
                    )
                });
            let (marker, cron) = match marker.strip_suffix(" in the pg_cron cluster") {
                Some(m) => (m, true),
                None => (marker, false),
            };
            let how = if let Some(why) = marker.strip_prefix("not run: ") {
                assert!(why.len() > 10, "{at}: say why it is not run");
                How::NotRun(why.to_owned())
            } else if let Some(who) = marker.strip_prefix("psql as ") {
                assert_eq!(lang, "sql", "{at}: a psql example is a ```sql block");
                How::Psql(parse_who(who, &at))
            } else if let Some(who) = marker.strip_prefix("sh as ") {
                assert_eq!(lang, "sh", "{at}: a shell example is a ```sh block");
                How::Sh(parse_who(who, &at))
            } else {
                panic!("{at}: unknown example marker '{marker}'");
            };
            if let How::Psql(who) | How::Sh(who) = &how {
                assert!(
                    section_of(i).contains(named(who)),
                    "{at}: its section does not name the role it runs as ({})",
                    named(who)
                );
            }
            found.push(Example { at, how, cron, code });
        }
        i = close + 1;
    }
    found
}

/// One statement of a psql example and the output written under it (empty: not shown).
#[derive(Debug)]
struct Statement {
    sql: String,
    expected: Vec<String>,
}

/// Splits a psql example into statements (ending in `;` or a psql meta-command line) and the
/// output lines under each.
fn statements(code: &str) -> Vec<Statement> {
    let mut out: Vec<Statement> = Vec::new();
    let mut current = String::new();
    let mut expecting = false;
    for line in code.lines() {
        let trimmed = line.trim();
        if current.is_empty() {
            if let Some(shown) = line.strip_prefix("--") {
                let shown = shown.strip_prefix(' ').unwrap_or(shown);
                let last = out.last_mut().filter(|_| expecting);
                match last {
                    Some(s) if !s.expected.is_empty() || shown.starts_with(' ') => {
                        s.expected.push(shown.trim_end().to_owned());
                    }
                    _ => expecting = false,
                }
                continue;
            }
            expecting = false;
            if trimmed.is_empty() {
                continue;
            }
        }
        current.push_str(line);
        current.push('\n');
        let code_part = line.split(" -- ").next().unwrap().trim_end();
        // A statement ends at `;`, at a meta-command line, or at a `\\g...` (gexec, gset) after it.
        let sent_by_meta =
            code_part.rsplit_once(" \\g").is_some_and(|(_, rest)| !rest.contains(' '));
        if code_part.ends_with(';') || trimmed.starts_with('\\') || sent_by_meta {
            out.push(Statement { sql: std::mem::take(&mut current), expected: Vec::new() });
            expecting = true;
        }
    }
    assert!(current.trim().is_empty(), "a statement without its ';': {current}");
    out
}

/// Whether psql's `actual` lines are the `expected` ones, `...` standing for any lines.
fn matches(expected: &[String], actual: &[String]) -> bool {
    match expected.split_first() {
        None => actual.is_empty(),
        Some((first, rest)) if first.trim() == "..." => {
            (0..=actual.len()).any(|skip| matches(rest, &actual[skip..]))
        }
        Some((first, rest)) => {
            actual.first().is_some_and(|a| a == first) && matches(rest, &actual[1..])
        }
    }
}

/// Runs a psql example as `url`'s login and checks every output it shows.
fn run_psql(example: &Example, url: &str) {
    let statements = statements(&example.code);
    let mut script = String::from("\\set ON_ERROR_STOP 1\n\\pset footer off\n\\pset pager off\n");
    for (n, s) in statements.iter().enumerate() {
        script.push_str(&format!("\\echo '@@ {n}'\n{}", s.sql));
    }
    let out = Command::new("psql")
        .args([url, "-X", "-q", "-f", "-"])
        .env("PGOPTIONS", "-c client_min_messages=warning")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(script.as_bytes())?;
            child.wait_with_output()
        })
        .expect("running psql");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}: psql failed:\n{}\n{stdout}",
        example.at,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut printed: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    let mut current = None;
    for line in stdout.lines() {
        if let Some(n) = line.strip_prefix("@@ ") {
            current = Some(n.parse().unwrap());
            printed.insert(current.unwrap(), Vec::new());
        } else if let Some(n) = current {
            printed.get_mut(&n).unwrap().push(line.trim_end().to_owned());
        }
    }
    for (n, s) in statements.iter().enumerate() {
        if s.expected.is_empty() {
            continue;
        }
        let mut actual = printed.remove(&n).unwrap_or_default();
        while actual.last().is_some_and(String::is_empty) {
            actual.pop();
        }
        assert!(
            matches(&s.expected, &actual),
            "{}: the output shown under\n{}is not what psql prints:\n{}",
            example.at,
            s.sql,
            actual.iter().map(|l| format!("-- {l}\n")).collect::<String>()
        );
    }
}

/// Runs a shell example with `loader` on the PATH, as `url`'s login.
fn run_sh(example: &Example, url: &str) {
    let bin = Path::new(env!("CARGO_BIN_EXE_loader")).parent().unwrap().to_owned();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &example.code])
        .env("PATH", path)
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "warn")
        .output()
        .expect("running bash");
    assert!(
        out.status.success(),
        "{}: the example failed ({}):\n{}{}",
        example.at,
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The analysts' data: the fixture and 200 synthetic logins (`scripts/demo.sh` sends the same),
/// staged under a fixed key so masks come out the same in every run.
async fn with_demo_data(db: &TestDb) {
    crate::support::install_key(db, 0xab).await;
    let sent_at = time::macros::datetime!(2026-12-01 12:00:00 UTC);
    stage(db, &crate::support::fixture_messages(), sent_at).await;
    let synthetic: Vec<(String, String)> = loader::send::generate(200, 7)
        .into_iter()
        .enumerate()
        .map(|(i, body)| (format!("synthetic-{i}"), body))
        .collect();
    stage(db, &synthetic, sent_at).await;
}

/// Runs `file`'s examples in order; returns how many ran.
async fn run_examples(file: &str) -> usize {
    let examples: Vec<Example> =
        examples(file).into_iter().filter(|e| !matches!(e.how, How::NotRun(_))).collect();
    if examples.is_empty() {
        return 0;
    }
    let db = TestDb::migrated().await;
    with_demo_data(&db).await;
    let mut logins: BTreeMap<String, TestRole> = BTreeMap::new();
    for example in &examples {
        let (How::Psql(who) | How::Sh(who)) = &example.how else { unreachable!() };
        let cron;
        let url = if example.cron {
            cron = CronDb::take().await;
            match who {
                Who::Owner => cron.url.clone(),
                Who::Superuser => cron.admin_url.clone(),
                Who::Granted(_) => panic!(
                    "{}: only the owner and a superuser run in the pg_cron cluster",
                    example.at
                ),
            }
        } else {
            match who {
                Who::Owner => db.url.clone(),
                Who::Superuser => {
                    panic!("{}: a superuser's example runs in the pg_cron cluster", example.at)
                }
                Who::Granted(role) => {
                    if !logins.contains_key(role) {
                        logins.insert(role.clone(), TestRole::new(&db, role).await);
                    }
                    logins[role].url.clone()
                }
            }
        };
        match &example.how {
            How::Psql(_) => run_psql(example, &url),
            How::Sh(_) => run_sh(example, &url),
            How::NotRun(_) => unreachable!(),
        }
    }
    examples.len()
}

#[test]
fn every_code_block_is_marked_run_or_not_run_with_its_reason() {
    let mut counts = BTreeMap::new();
    for file in guides() {
        for e in examples(&file) {
            let kind = match e.how {
                How::NotRun(_) => "not run",
                _ => "run",
            };
            *counts.entry(kind).or_insert(0) += 1;
        }
    }
    assert!(counts.get("run").copied().unwrap_or(0) >= 5, "{counts:?}");
}

#[test]
fn the_psql_splitter_finds_statements_and_their_output() {
    let s = statements(
        "-- prose\nselect 1\n  as one;\n--  one\n-- -----\n--    1\n\n-- more prose\n\\dn+ loader\ncreate role x; -- trailing\n-- or: prose\nselect 1 as a \\gset\nselect :a;\n",
    );
    assert_eq!(s.len(), 5);
    assert!(s[3].sql.ends_with("\\gset\n"), "{:?}", s[3].sql);
    assert_eq!(s[0].expected, [" one", "-----", "   1"]);
    assert!(s[1].sql.starts_with("\\dn+") && s[1].expected.is_empty());
    assert!(s[2].expected.is_empty(), "prose after a statement is not output");
    let lines = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert!(matches(&lines(&["a", "...", "d"]), &lines(&["a", "b", "c", "d"])));
    assert!(!matches(&lines(&["a", "d"]), &lines(&["a", "b", "d"])));
}

#[tokio::test]
async fn the_analysts_guide_runs_as_its_readers() {
    assert!(run_examples("docs/analysts.md").await >= 2);
}

#[tokio::test]
async fn the_operating_guide_runs_as_its_readers() {
    assert!(run_examples("docs/operating.md").await >= 2);
}

/// The DBA's setup creates cluster-wide roles and a database: in the pg_cron cluster (no other
/// test uses these names), removed before and after.
#[tokio::test]
async fn the_security_guide_runs_as_its_readers() {
    let remove = || {
        let out = Command::new("psql")
            .args([&crate::support::required_env("LOADER_CRON_DATABASE_URL"), "-Xq"])
            .args(["-c", "drop database if exists logins with (force)"])
            .args(["-c", "drop role if exists ingest_svc, run_svc, alice, bob, loader_owner"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    remove();
    let ran = run_examples("docs/security.md").await;
    remove();
    assert!(ran >= 1);
}

#[tokio::test]
async fn every_other_guide_runs_as_its_readers() {
    for file in guides() {
        if !["docs/analysts.md", "docs/operating.md", "docs/security.md"].contains(&file.as_str()) {
            run_examples(&file).await;
        }
    }
}

/// The schema's comment (`\dn+ loader`) shows each role what to run: every statement under an
/// `As <role>:` line runs as a login granted that role.
#[tokio::test]
async fn the_schema_comment_runs_as_the_roles_it_names() {
    let db = TestDb::migrated().await;
    with_demo_data(&db).await;
    let comment: String = sqlx::query_scalar("select obj_description('loader'::regnamespace)")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let mut by_role: BTreeMap<String, String> = BTreeMap::new();
    let mut role = None;
    for line in comment.lines() {
        if let Some(heading) = line.strip_prefix("As ") {
            role = heading
                .split([':', ' '])
                .next()
                .filter(|r| r.starts_with("loader_"))
                .map(str::to_owned);
        } else if let (Some(r), true) = (&role, line.starts_with("  ")) {
            by_role.entry(r.clone()).or_default().push_str(&format!("{line}\n"));
        }
    }
    let analyst = by_role.get("loader_analyst").expect("statements for analysts");
    assert!(analyst.matches(';').count() >= 5, "{analyst}");
    for (role, code) in &by_role {
        let login = TestRole::new(&db, role).await;
        let example = Example {
            at: format!("the comment on schema loader, as {role}"),
            how: How::Psql(Who::Granted(role.clone())),
            cron: false,
            code: code.clone(),
        };
        run_psql(&example, &login.url);
    }
}
