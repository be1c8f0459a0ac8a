//! The documentation holds the code's facts without copying them by hand: docs/cli.md, the
//! privileges in docs/security.md and the metrics table in docs/operating.md are generated from
//! the code, and these tests fail when a copy is stale. `LOADER_BLESS=1 cargo test docs::`
//! rewrites them. Every relative link in the README and the guides resolves, anchors included.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn blessing() -> bool {
    std::env::var_os("LOADER_BLESS").is_some()
}

/// `file` (relative to the repository) must hold `expected` between the markers of block
/// `name`; with LOADER_BLESS set, it is rewritten to.
fn generated_block(file: &str, name: &str, expected: &str) {
    let path = root().join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    let begin = format!("<!-- generated: {name} (tests/it/docs.rs) -->\n");
    let end = format!("<!-- end of {name} -->");
    let start =
        text.find(&begin).unwrap_or_else(|| panic!("{file} lacks the line {begin}")) + begin.len();
    let stop = start + text[start..].find(&end).unwrap_or_else(|| panic!("{file} lacks {end}"));
    if blessing() {
        std::fs::write(&path, format!("{}{expected}{}", &text[..start], &text[stop..])).unwrap();
        return;
    }
    assert_eq!(
        &text[start..stop],
        expected,
        "{file}'s {name} is stale: LOADER_BLESS=1 cargo test docs:: rewrites it"
    );
}

fn loader_output(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_loader")).args(args).output().unwrap();
    assert!(out.status.success(), "loader {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_cli_reference_is_generated_from_the_clap_definition() {
    let expected = loader_output(&["man", "--format", "markdown"]);
    let path = root().join("docs/cli.md");
    if blessing() {
        std::fs::write(&path, &expected).unwrap();
    }
    let actual = std::fs::read_to_string(&path).unwrap();
    assert!(
        actual == expected,
        "docs/cli.md is stale: LOADER_BLESS=1 cargo test docs:: rewrites it"
    );
    // It documents every subcommand, and every variable the binary reads.
    for name in ["migrate", "ingest", "transform", "run", "reconcile", "forget", "reveal", "man"] {
        assert!(actual.contains(&format!("## `loader {name}`")), "{name} missing");
    }
    for env in ["DATABASE_URL", "LOADER_MEMORY_BUDGET_MB", "LOADER_TRANSFORM_BATCH"] {
        assert!(actual.contains(&format!("`{env}`")), "{env} missing");
    }
}

#[test]
fn the_privileges_in_the_security_guide_are_the_ones_doctor_and_the_inventory_test_check() {
    let mut block = String::new();
    for (role, privileges) in loader::privileges::DOCUMENTED {
        let list = if privileges.is_empty() {
            "nothing".to_owned()
        } else {
            privileges.iter().map(|p| format!("`{p}`")).collect::<Vec<_>>().join(", ")
        };
        block.push_str(&format!("- **{role}**: {list}\n"));
    }
    generated_block("docs/security.md", "privileges", &block);
}

#[test]
fn the_metrics_table_lists_every_family_by_its_full_name() {
    let mut block =
        String::from("| metric | type | unit | what it says |\n| --- | --- | --- | --- |\n");
    for f in loader::metrics::FAMILIES {
        let labels =
            if f.labels.is_empty() { String::new() } else { format!("{{{}}}", f.labels.join(",")) };
        let unit = f.unit.map_or("", |u| u.as_canonical_label());
        block.push_str(&format!(
            "| `{}{labels}` | {} | {unit} | {} |\n",
            f.name,
            f.kind.as_str(),
            f.help
        ));
    }
    let process: Vec<String> =
        loader::metrics::PROCESS_FAMILIES.iter().map(|n| format!("`{n}`")).collect();
    block.push_str(&format!(
        "| {} | | | the process, sampled every 5 s ([metrics-process](https://docs.rs/metrics-process), named as the Go client names them) |\n",
        process.join(", ")
    ));
    generated_block("docs/operating.md", "metrics", &block);
}

#[test]
fn completions_and_man_pages_come_from_the_same_definition() {
    let bash = loader_output(&["completions", "bash"]);
    let dir = tempdir("man");
    let check = Command::new("bash").arg("-n").arg(write(&dir, "loader.bash", &bash)).status();
    assert!(check.unwrap().success(), "bash -n refused the completion script");
    for word in ["forget", "reveal", "--memory-budget-mb", "--evict-after"] {
        assert!(bash.contains(word), "the bash completion lacks {word}");
    }
    assert!(loader_output(&["completions", "zsh"]).starts_with("#compdef loader"));
    assert!(loader_output(&["completions", "fish"]).contains("complete -c loader"));

    let page = loader_output(&["man"]);
    assert!(page.starts_with(".ie \\n(.g .ds Aq") || page.contains(".TH loader 1"), "{page}");
    loader_output(&["man", "--out-dir", dir.to_str().unwrap()]);
    for file in ["loader.1", "loader-ingest.1", "loader-keys-rotate.1", "loader-schedule-install.1"]
    {
        let path = dir.join(file);
        assert!(path.exists(), "{file} not written");
        // groff renders it, warnings as errors.
        let out = Command::new("groff").args(["-man", "-Tutf8", "-ww", "-z"]).arg(&path).output();
        let out = out.expect("groff (man-db's dependency)");
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let ingest = std::fs::read_to_string(dir.join("loader-ingest.1")).unwrap();
    assert!(ingest.contains("LOADER_MEMORY_BUDGET_MB"), "the ingest page lacks its variables");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn tempdir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("loader-docs-{what}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut fenced = false;
    let mut out = BTreeSet::new();
    for line in markdown.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
        } else if !fenced && line.starts_with('#') {
            out.insert(anchor(line.trim_start_matches('#')));
        }
    }
    out
}

/// The targets of the inline links `[text](target)` outside code.
fn links(markdown: &str) -> Vec<String> {
    let mut fenced = false;
    let mut out = Vec::new();
    for line in markdown.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let mut rest = line;
        while let Some(i) = rest.find("](") {
            let after = &rest[i + 2..];
            let Some(end) = after.find(')') else { break };
            out.push(after[..end].to_owned());
            rest = &after[end..];
        }
    }
    out
}

/// docs/architecture.md's data flow names every source file of the library, the binaries and
/// `sql/`, so a new module cannot go unmapped.
#[test]
fn the_architecture_guide_names_every_source_file() {
    let doc = std::fs::read_to_string(root().join("docs/architecture.md")).unwrap();
    let mut missing = Vec::new();
    let mut pending = vec![root().join("src"), root().join("sql")];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            let relative = path.strip_prefix(root()).unwrap().to_str().unwrap().to_owned();
            if !doc.contains(&format!("`{relative}`")) {
                missing.push(relative);
            }
        }
    }
    missing.sort();
    assert!(missing.is_empty(), "docs/architecture.md does not name {missing:?}");
}

#[test]
fn every_relative_link_in_the_readme_and_the_guides_resolves() {
    let mut files = vec![root().join("README.md"), root().join("migrations/README.md")];
    for entry in std::fs::read_dir(root().join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            files.push(path);
        }
    }
    let mut checked = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for link in links(&text) {
            if link.contains("://") || link.starts_with("mailto:") {
                continue;
            }
            let (target, fragment) = link.split_once('#').unwrap_or((&link, ""));
            let path =
                if target.is_empty() { file.clone() } else { file.parent().unwrap().join(target) };
            assert!(path.exists(), "{}: link {link} points at nothing", file.display());
            if !fragment.is_empty() {
                let heads = anchors(&std::fs::read_to_string(&path).unwrap());
                assert!(
                    heads.contains(fragment),
                    "{}: no heading #{fragment} in {target}",
                    file.display()
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 30, "only {checked} links checked");
}

/// docs/security.md's table of `loader.settings` names every setting a fresh migrate creates,
/// with the default it gets.
#[tokio::test]
async fn the_settings_table_in_the_security_guide_is_the_migrated_defaults() {
    let db = crate::support::TestDb::migrated().await;
    let migrated: Vec<(String, String)> =
        sqlx::query_as("select name, value from loader.settings order by name")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let guide = std::fs::read_to_string(root().join("docs/security.md")).unwrap();
    let table = &guide[guide.find("<!-- checked: settings").expect("the settings table")..];
    let rows: Vec<Vec<String>> = table
        .lines()
        .skip(3)
        .take_while(|l| l.starts_with("| `"))
        .map(|l| l.split('|').map(|c| c.trim().trim_matches('`').to_owned()).collect())
        .collect();
    let documented: Vec<(String, String)> =
        rows.iter().map(|cells| (cells[1].clone(), cells[2].clone())).collect();
    assert_eq!(documented, migrated);

    // Each documented range is the one the server enforces; anything else is refused.
    let set = async |name: &str, value: &str| {
        sqlx::query("update loader.settings set value = $2 where name = $1")
            .bind(name)
            .bind(value)
            .execute(&db.pool)
            .await
            .is_ok()
    };
    for cells in &rows {
        let (name, range) = (&cells[1], cells[3].split_whitespace().next().unwrap());
        let (lo, hi) = range.split_once('-').unwrap();
        let (lo, hi): (i64, i64) = (lo.parse().unwrap(), hi.parse().unwrap());
        assert!(set(name, &lo.to_string()).await && set(name, &hi.to_string()).await, "{name}");
        for refused in [(lo - 1).to_string(), (hi + 1).to_string(), "abc".into(), "10 s".into()] {
            assert!(!set(name, &refused).await, "{name} = {refused} must be refused");
        }
        assert!(set(name, &cells[2]).await);
    }
    let unknown = sqlx::query("insert into loader.settings values ('evict_after_secs', '5')")
        .execute(&db.pool)
        .await;
    assert!(unknown.is_err(), "a setting the code does not read is refused");
}

/// The SDK's snake_case operation as the CamelCase action IAM names.
fn action(operation: &str) -> String {
    operation.split('_').map(|w| w[..1].to_uppercase() + &w[1..]).collect()
}

/// docs/deploying.md's table of SQS calls per command names exactly the operations the code
/// calls (every `client.<operation>()` in src/), no more and no fewer: an IAM policy written from
/// it neither misses one nor grants one loader never makes.
#[test]
fn the_sqs_calls_the_deploying_guide_lists_are_the_ones_the_code_makes() {
    let operations = [
        "receive_message",
        "delete_message",
        "delete_message_batch",
        "change_message_visibility",
        "change_message_visibility_batch",
        "get_queue_attributes",
        "set_queue_attributes",
        "get_queue_url",
        "send_message",
        "send_message_batch",
        "create_queue",
        "delete_queue",
        "purge_queue",
        "list_queues",
        "list_dead_letter_source_queues",
        "start_message_move_task",
        "list_message_move_tasks",
        "cancel_message_move_task",
    ];
    let mut sources = String::new();
    let mut dirs = vec![root().join("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                sources.push_str(&std::fs::read_to_string(path).unwrap());
            }
        }
    }
    let called: BTreeSet<String> = operations
        .iter()
        .filter(|op| sources.contains(&format!(".{op}()")))
        .map(|op| action(op))
        .collect();
    let guide = std::fs::read_to_string(root().join("docs/deploying.md")).unwrap();
    let table = &guide[guide.find("<!-- checked: sqs calls").expect("the SQS calls table")..];
    let table = &table[..table.find("\n\n").unwrap()];
    let listed: BTreeSet<String> = table
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|w| w.chars().next().is_some_and(|c| c.is_ascii_uppercase()))
        .map(str::to_owned)
        .collect();
    assert_eq!(listed, called);
    // And the container serves metrics where the guide says.
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    assert!(
        dockerfile.contains("EXPOSE 9464") && guide.contains("LOADER_METRICS_ADDR=0.0.0.0:9464")
    );
}

/// docs/operating.md's invariant table is reconcile's own list of checks, each with the
/// sentence `loader reconcile` prints (an earlier table left out the erased and
/// stopped-on-error exemptions the code makes).
#[test]
fn the_invariant_table_is_reconciles_checks() {
    let mut table = String::from("| check | what it proves |\n| --- | --- |\n");
    for (name, what, _) in loader::reconcile::CHECKS {
        table.push_str(&format!("| `{name}` | {what} |\n"));
    }
    generated_block("docs/operating.md", "invariants", &table);
}

/// The reject reasons in docs/analysts.md's table are the transform's, in its order (the list
/// `loader_rows_rejected_total{reason}` and the comment on `login_rejects.reason` are held to).
#[test]
fn the_reject_reason_table_is_the_transforms_list() {
    let guide = std::fs::read_to_string(root().join("docs/analysts.md")).unwrap();
    let table = &guide[guide.find("| reason | when |").expect("the reject table")..];
    let table = &table[..table.find("\n\n").unwrap()];
    let documented: Vec<String> = table
        .lines()
        .skip(2)
        .flat_map(|row| {
            let first = row.split('|').nth(1).unwrap_or_default().to_owned();
            first.split('`').skip(1).step_by(2).map(str::to_owned).collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(documented, loader::metrics::REJECT_REASONS);
}

/// Numbers the guides state about the code, each held to the constant it comes from:
/// connections per command, SQS's attempts, the Lambda pool, the NOLOGIN roles.
#[test]
fn the_guides_numbers_are_the_codes() {
    let read = |file: &str| std::fs::read_to_string(root().join(file)).unwrap();
    let flat = |text: String| text.split_whitespace().collect::<Vec<_>>().join(" ");
    let deploying = flat(read("docs/deploying.md"));
    for fact in [
        format!(
            "`loader ingest` holds at most {} connections, `loader run` {} plus one per transform worker",
            loader::ingest::CONNECTIONS,
            loader::pipeline::CONNECTIONS_BESIDES_WORKERS
        ),
        format!("each Lambda environment {}", loader::lambda::POOL_SIZE),
        format!("The pool ({} connections)", loader::lambda::POOL_SIZE),
        format!(
            "by default this machine's cores, at least {} and at most {}",
            loader::transform::Plan::MIN_DEFAULT_WORKERS,
            loader::transform::Plan::MAX_DEFAULT_WORKERS
        ),
    ] {
        assert!(deploying.contains(&fact), "docs/deploying.md lacks: {fact}");
    }
    let configuration = flat(read("docs/configuration.md"));
    let attempts = loader::sqs::MAX_ATTEMPTS;
    let fact = format!("are tried at most {attempts} times ({} retries)", words(attempts - 1));
    assert!(configuration.contains(&fact), "docs/configuration.md lacks: {fact}");
    let roles = loader::privileges::DOCUMENTED.iter().filter(|(r, _)| *r != "public").count();
    let security = flat(read("docs/security.md"));
    let fact = format!("Migrations create {} NOLOGIN roles", words(roles as u32));
    assert!(security.contains(&fact), "docs/security.md lacks: {fact}");
}

fn words(n: u32) -> &'static str {
    ["none", "one", "two", "three", "four", "five", "six"][n as usize]
}

/// docs/sql-api.md: one entry for each routine a role below the owner may call, from the
/// privilege list (`privileges::DOCUMENTED`, which the inventory test holds the
/// database to) and the database itself: signature, result, who may call it, its comment.
#[tokio::test]
async fn the_sql_api_reference_lists_every_routine_a_lesser_role_may_call() {
    let db = crate::support::TestDb::migrated().await;
    let mut callers: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for (role, privileges) in loader::privileges::DOCUMENTED {
        for p in privileges.iter().filter_map(|p| p.strip_prefix("execute ")) {
            callers.entry(p).or_default().push(role);
        }
    }
    let mut page = String::new();
    for (routine, roles) in &callers {
        let (name, arguments, result, kind, comment): (String, String, String, String, String) =
            sqlx::query_as(
                "select p.proname::text, pg_get_function_arguments(p.oid),
                        coalesce(pg_get_function_result(p.oid), ''),
                        case p.prokind when 'p' then 'procedure' else 'function' end,
                        coalesce(obj_description(p.oid, 'pg_proc'), '')
                   from pg_proc p where p.oid = $1::regprocedure",
            )
            .bind(routine)
            .fetch_one(&db.pool)
            .await
            .unwrap_or_else(|e| panic!("{routine}: {e}"));
        let called = if kind == "procedure" { "call" } else { "select * from" };
        page.push_str(&format!("### `loader.{name}`\n\n"));
        page.push_str(&format!("```text\n{called} loader.{name}({arguments})\n"));
        if !result.is_empty() {
            page.push_str(&format!("  returns {result}\n"));
        }
        page.push_str("```\n\n");
        let roles: Vec<String> = roles.iter().map(|r| format!("`{r}`")).collect();
        page.push_str(&format!("A {kind}, for {}. {comment}\n\n", roles.join(", ")));
        if let Some((role, example)) = sql_api_example(&name) {
            page.push_str(&format!(
                "<!-- example: psql as {role} -->\n```sql\n{}\n```\n\n",
                example.trim()
            ));
        }
    }
    generated_block("docs/sql-api.md", "routines", &page);
}

/// The example docs/sql-api.md gives for a routine, and the role it runs as (tests/it/examples.rs
/// runs each, in order, against the demo's data). The ingest role's routines are one session.
fn sql_api_example(routine: &str) -> Option<(&'static str, &'static str)> {
    Some(match routine {
        "register_run" => (
            "loader_ingest",
            "-- One ingest run: register, stage a batch, record its deletes, call in, finish.
select run_id, run_token from loader.register_run('login-queue', 'drain', '0.1.0') \\gset
select * from loader.stage(:run_id, :'run_token', array['sql-api-1'],
                           array['{\"user_id\": \"u-1\", \"ip\": \"10.0.0.1\"}'],
                           array[true], array[now()], array[1], array[1]);
select loader.record_deletes(:run_id, :'run_token', 1, 0);
select loader.heartbeat(:run_id, :'run_token');
select loader.finish_run(:run_id, :'run_token');",
        ),
        "transform" => ("loader_analyst", "call loader.transform();"),
        "transform_batch" => ("loader_analyst", "select * from loader.transform_batch(1000);"),
        "reveal" => (
            "loader_pii_reader",
            "-- Outside a transaction block (it commits its record before reading).
call loader.reveal(array['fixture-0'], 'ticket SEC-123: user asked what we hold');",
        ),
        _ => return None,
    })
}
