//! One function per subcommand: resolve settings, call the library, print the result.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use loader::bench::StagingMethod;
use loader::config::Settings;
use loader::display::timestamp;
use loader::ingest::{Ingestor, Mode};
use loader::progress::Progress;
use loader::sqs::Queue;
use loader::{
    bench, db, ingest, keys, metrics, pipeline, rebuild, reconcile, retention, send, sqs, transform,
};

use crate::cli::{
    BenchCommand, Cli, Command, DlqCommand, DoctorArgs, ForgetArgs, IngestArgs, KeysCommand,
    PurgeArgs, ReconcileArgs, RevealArgs, RunArgs, ScheduleCommand, SendArgs, StatusArgs,
    TransformArgs,
};
use crate::render;

/// Exit codes users and schedulers can branch on.
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// Any error (configuration, connection, database, queue).
    pub const ERROR: u8 = 1;
    /// Bad command line (clap's own code).
    #[expect(dead_code, reason = "clap exits with it itself; named for the table of codes")]
    pub const USAGE: u8 = 2;
    /// `loader reconcile` found a broken invariant, or `loader doctor` a problem.
    pub const PROBLEMS: u8 = 3;
    /// A command that ends by itself (`purge`, a drain: `ingest`, `run --once`, `transform`, a
    /// rebuild or rotation) was stopped by SIGINT/SIGTERM before it finished; what it had in
    /// hand is finished, and running it again continues.
    pub const INTERRUPTED: u8 = 4;
    /// Standard output was closed by its reader (`loader ... | head`): 128 + SIGPIPE, what a
    /// Unix tool killed by SIGPIPE exits with; nothing on stderr.
    pub const READER_GONE: u8 = 141;
}

/// Runs the parsed command line.
pub async fn dispatch(cli: Cli) -> Result<ExitCode> {
    let settings = cli.global.settings();
    // How often `ingest` and `run` publish the queue's counts; None: no metrics.
    let queue_metrics =
        cli.global.metrics_addr.map(|_| Duration::from_secs(cli.global.queue_metrics_interval));
    if let Some(addr) = cli.global.metrics_addr {
        metrics::install(addr)?;
    }
    let evict_after = Duration::from(cli.global.evict_after);
    match cli.command {
        Command::Migrate => migrate(&settings, evict_after).await,
        Command::Ingest(args) => ingest(&settings, &args, queue_metrics).await,
        Command::Send(args) => send(&settings, &args).await,
        Command::Transform(args) => transform(&settings, &args, evict_after).await,
        Command::Keys(command) => keys(&settings, &command, evict_after).await,
        Command::Run(args) => run_pipeline(&settings, &args, queue_metrics).await,
        Command::Reconcile(args) => reconcile(&settings, &args).await,
        Command::Status(args) => status(&settings, &args).await,
        Command::Purge(args) => purge(&settings, &args, evict_after).await,
        Command::Forget(args) => forget(&settings, &args, evict_after).await,
        Command::Reveal(args) => reveal(&settings, &args).await,
        Command::Dlq(command) => dlq(&settings, &command).await,
        Command::Schedule(command) => schedule(&settings, &command).await,
        Command::Doctor(args) => doctor(&settings, &args).await,
        Command::Bench(command) => bench(&settings, &command).await,
        Command::Completions { shell } => {
            crate::manual::completions(shell)?;
            Ok(ExitCode::from(exit::OK))
        }
        Command::Man { format, out_dir } => {
            crate::manual::man(format, out_dir.as_deref())?;
            Ok(ExitCode::from(exit::OK))
        }
    }
}

async fn migrate(settings: &Settings, evict_after: Duration) -> Result<ExitCode> {
    let pool = db::connect(settings.database_url()?, 1).await?;
    let report = db::migrate_evicting(&pool, evict_after).await?;
    if report.applied.is_empty() {
        println!("migrations: up to date");
    } else {
        println!("migrations: applied {}", report.applied.join(", "));
    }
    if report.sql_files.is_empty() {
        println!("sql functions: up to date");
    } else {
        println!("sql functions: applied {}", report.sql_files.join(", "));
    }
    if report.partitioned.contains(&"loader.raw_logins") {
        println!(
            "staging: loader.raw_logins is now partitioned by day; the rows staged before stay \
             in loader.raw_logins_legacy"
        );
    }
    if report.partitioned.contains(&"public.user_logins") {
        println!(
            "masked: public.user_logins is now partitioned by month of create_date; the rows \
             written before stay in loader.user_logins_legacy"
        );
    }
    if report.not_yet_partitioned.contains(&"public.user_logins") {
        println!(
            "masked: public.user_logins stays unpartitioned while an online rebuild copies it; \
             run loader migrate again once it is swapped (or abandoned)"
        );
    }
    print_evicted(&report.evicted);
    Ok(ExitCode::from(exit::OK))
}

async fn forget(settings: &Settings, args: &ForgetArgs, evict_after: Duration) -> Result<ExitCode> {
    let mut ids = args.user_id.clone();
    if let Some(path) = &args.from_file {
        ids.extend(loader::forget::ids_from_file(path)?);
    }
    let pool = db::connect(settings.database_url()?, 2).await?;
    if args.dry_run {
        let counts = loader::forget::preview(&pool, &ids).await?;
        let counts: Vec<String> = counts.iter().map(|(t, n)| format!("{t} {n}")).collect();
        println!(
            "dry run: erasing {} user ids would erase {}; nothing changed",
            ids.len(),
            counts.join(", ")
        );
        return Ok(ExitCode::from(exit::OK));
    }
    let reference = args.reference.as_deref().unwrap_or_default();
    let options =
        loader::forget::Options { batch: args.batch_size, vacuum: !args.no_vacuum, evict_after };
    let progress = Progress::on_terminal("messages erased");
    let erased =
        loader::forget::forget(&pool, &ids, reference, &options, progress.as_ref()).await?;
    if let Some(p) = &progress {
        p.finish();
    }
    let counts: Vec<String> = erased.counts.iter().map(|(t, n)| format!("{t} {n}")).collect();
    println!(
        "erasure {} ({} user ids, reference {:?}): {}{}",
        erased.erasure_id,
        ids.len(),
        reference,
        counts.join(", "),
        if erased.vacuumed { "; vacuumed" } else { "" }
    );
    Ok(ExitCode::from(exit::OK))
}

async fn reveal(settings: &Settings, args: &RevealArgs) -> Result<ExitCode> {
    let pool = db::connect(settings.database_url()?, 1).await?;
    let revealed = loader::reveal::reveal(&pool, &args.message_id, &args.purpose).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&revealed)?);
    } else {
        println!("{:<40}  {:<10}  {:<39}  device_id", "message_id", "status", "ip");
        for r in &revealed {
            println!(
                "{:<40}  {:<10}  {:<39}  {}",
                r.message_id,
                r.status,
                r.ip.as_deref().unwrap_or("-"),
                r.device_id.as_deref().unwrap_or("-")
            );
        }
    }
    Ok(ExitCode::from(exit::OK))
}

/// One line per session owner work ended (the log has the details).
fn print_evicted(evicted: &[loader::evict::Evicted]) {
    for e in evicted {
        let how = if e.terminated { "terminated" } else { "cancelled" };
        println!("{how} session {} of role {}: it held up the work", e.pid, e.role);
    }
}

async fn ingest(
    settings: &Settings,
    args: &IngestArgs,
    queue_metrics: Option<Duration>,
) -> Result<ExitCode> {
    let mode = if args.follow { Mode::Follow } else { Mode::Drain };
    let wait = args.wait_seconds.unwrap_or(mode.default_wait_seconds());
    let pool = db::connect(settings.database_url()?, ingest::CONNECTIONS).await?;
    let queue = Queue::open(sqs::client(&settings.aws).await, &settings.queue).await?;
    if let Some(period) = queue_metrics {
        tokio::spawn(ingest::publish_queue_counts(queue.clone(), period));
    }
    let progress = if mode == Mode::Drain {
        Progress::on_terminal("messages staged and deleted")
    } else {
        None
    };
    let ingestor = Ingestor::start(queue, pool, mode, wait)
        .await?
        .with_progress(progress)
        .with_flow(args.flow.flow());
    tracing::info!(run_id = ingestor.run_id(), mode = ?mode, "ingest started");
    // A drain stops by itself when the queue is empty; a signal stops it early, gracefully
    // (what is staged is deleted, the run is finished), with exit 4.
    let stop = stop_on_signal();
    let totals = ingestor.ingest(stop.begun()).await?;
    println!("ingest run {}: {totals}", ingestor.run_id());
    Ok(ExitCode::from(stopped_code(mode == Mode::Drain && stop.has_begun())))
}

async fn send(settings: &Settings, args: &SendArgs) -> Result<ExitCode> {
    let bodies = match (&args.file, args.generate) {
        (Some(path), _) => send::bodies_from_file(path)?,
        (None, Some(n)) => send::generate(n, args.seed),
        (None, None) => unreachable!("clap requires a file or --generate"),
    };
    let queue = Queue::open_or_create(sqs::client(&settings.aws).await, &settings.queue).await?;
    let progress = Progress::on_terminal("messages sent");
    let sent = send::send_all_showing(&queue, bodies, progress.as_ref()).await?;
    println!("sent {sent} message{} to {}", if sent == 1 { "" } else { "s" }, queue.name());
    Ok(ExitCode::from(exit::OK))
}

async fn transform(
    settings: &Settings,
    args: &TransformArgs,
    evict_after: Duration,
) -> Result<ExitCode> {
    let plan = args.plan.plan();
    let pool = db::connect(settings.database_url()?, plan.workers as u32).await?;
    if args.rebuild {
        return rebuild(&pool, &rebuild::Kind::Rebuild, plan, evict_after).await;
    } else if args.watch {
        transform::watch(&pool, plan, args.interval.0, &stop_on_signal(), |r| {
            if r.loaded + r.rejected > 0 {
                println!("transform: {r}");
            }
        })
        .await?;
    } else {
        let stop = stop_on_signal();
        let report = transform::drain(&pool, plan, transform::HELD_WAIT, &stop).await?;
        println!("transform: {report}");
        if stop.has_begun() {
            return Ok(ExitCode::from(stopped_code(true)));
        }
        if report.pending > 0 {
            println!(
                "{} rows are claimed by another session's open transaction: a later transform \
                 loads them once it commits, or once loader ends it (evict_after_seconds)",
                report.pending
            );
        }
    }
    Ok(ExitCode::from(exit::OK))
}

async fn keys(
    settings: &Settings,
    command: &KeysCommand,
    evict_after: Duration,
) -> Result<ExitCode> {
    match command {
        KeysCommand::List => {
            let pool = db::connect(settings.database_url()?, 1).await?;
            println!("{:>4}  {:<6}  {:<9}  {:<25}  retired", "id", "active", "source", "created");
            for k in keys::list(&pool).await? {
                let retired = k.retired_at.map_or_else(|| "-".to_owned(), |t| timestamp(Some(t)));
                let active = if k.active { "yes" } else { "no" };
                println!(
                    "{:>4}  {active:<6}  {:<9}  {:<25}  {retired}",
                    k.id,
                    k.source,
                    timestamp(Some(k.created_at))
                );
            }
        }
        KeysCommand::Rotate(args) | KeysCommand::Install(args) => {
            let given = match command {
                KeysCommand::Install(_) => Some(keys::read_key_from_env_or_stdin()?),
                _ => None,
            };
            let pool = db::connect(settings.database_url()?, args.plan().workers as u32).await?;
            return rebuild(&pool, &rebuild::Kind::Rotate(given), args.plan(), evict_after).await;
        }
    }
    Ok(ExitCode::from(exit::OK))
}

/// An online rebuild or rotation, saying up front what it will do and the disk it needs; a
/// signal stops it after the ranges in hand (exit 4: the same command continues it).
async fn rebuild(
    pool: &sqlx::PgPool,
    kind: &rebuild::Kind,
    plan: transform::Plan,
    evict_after: Duration,
) -> Result<ExitCode> {
    let stop = stop_on_signal();
    let finished = rebuild::rebuild(pool, kind, plan, evict_after, &stop, |s| {
        let what = if s.rotation { "rotation to key" } else { "rebuild with key" };
        let resumed = if s.resumed { ", resumed" } else { "" };
        eprintln!(
            "rebuild {} ({what} {}{resumed}): {} of {} ranges to copy with {} workers; needs about {} MB of free disk (a copy of login_rejects and of the user_logins months it recomputes), freed at the swap",
            s.rebuild_id,
            s.key_id,
            s.ranges - s.ranges_done,
            s.ranges,
            plan.workers,
            s.copy_bytes / 1_000_000
        );
    })
    .await?;
    match finished {
        Some(f) => {
            println!(
                "rebuild {}: key {} active; copied {} rows; swap waited {:.1} s; transform: {}",
                f.started.rebuild_id,
                f.started.key_id,
                f.copied,
                f.swap_waited.as_secs_f64(),
                f.transform
            );
            if f.kept_as_is > 0 {
                println!(
                    "kept {} masked rows as they were: their bodies are past retention, so they \
                     could not be recomputed{}",
                    f.kept_as_is,
                    if f.started.rotation {
                        " (they keep their older key: masks under two keys do not match)"
                    } else {
                        ""
                    }
                );
            }
            if let Some((day, partitions)) = f.left_before.filter(|(_, n)| *n > 0) {
                println!(
                    "left the {partitions} month partitions before {day} as they were, not \
                     copied: the bodies of their rows are past retention{} (a row there whose \
                     body is kept was recomputed in place)",
                    if f.started.rotation { ", so they keep their older key" } else { "" }
                );
            }
            if f.carried > 0 {
                println!(
                    "carried {} outcomes as they were: their staged message is gone (deleted \
                     by hand, not by retention), so they could not be recomputed (they keep \
                     their key id)",
                    f.carried
                );
            }
            print_evicted(&f.evicted);
        }
        None if stop.has_begun() => return Ok(ExitCode::from(stopped_code(true))),
        None => println!("that key is already active; nothing to rebuild"),
    }
    Ok(ExitCode::from(exit::OK))
}

async fn run_pipeline(
    settings: &Settings,
    args: &RunArgs,
    queue_metrics: Option<Duration>,
) -> Result<ExitCode> {
    let cadence = pipeline::Cadence {
        interval: args.transform_interval.0,
        transform: args.transform.plan(),
        ..pipeline::Cadence::default()
    };
    let mode = if args.once { Mode::Drain } else { Mode::Follow };
    let wait = args.wait_seconds.unwrap_or(mode.default_wait_seconds());
    // Staging, deleting's bookkeeping, and the transform's sessions.
    let pool = db::connect(
        settings.database_url()?,
        pipeline::CONNECTIONS_BESIDES_WORKERS + cadence.transform.workers as u32,
    )
    .await?;
    let queue = Queue::open(sqs::client(&settings.aws).await, &settings.queue).await?;
    if let Some(period) = queue_metrics {
        tokio::spawn(ingest::publish_queue_counts(queue.clone(), period));
    }
    let progress =
        if args.once { Progress::on_terminal("messages staged and deleted") } else { None };
    let ingestor = Ingestor::start(queue, pool.clone(), mode, wait)
        .await?
        .with_progress(progress)
        .with_flow(args.flow.flow());
    let run_id = ingestor.run_id();
    tracing::info!(run_id, once = args.once, "run started");
    let stop = stop_on_signal();
    let totals = if args.once {
        pipeline::once(ingestor, &pool, cadence, stop.begun()).await?
    } else {
        pipeline::until_stopped(ingestor, &pool, cadence, stop.begun()).await?
    };
    println!("run {run_id}: {}; transform: {}", totals.ingest, totals.transform);
    Ok(ExitCode::from(stopped_code(args.once && stop.has_begun())))
}

async fn reconcile(settings: &Settings, args: &ReconcileArgs) -> Result<ExitCode> {
    let pool = db::connect(settings.database_url()?, 1).await?;
    let queue = if args.skip_queue {
        None
    } else {
        Some(Queue::open(sqs::client(&settings.aws).await, &settings.queue).await?)
    };
    let report =
        reconcile::reconcile(&pool, queue.as_ref(), args.grace_seconds, args.since).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render::reconcile(&report));
    }
    Ok(ExitCode::from(if report.ok() { exit::OK } else { exit::PROBLEMS }))
}

async fn status(settings: &Settings, args: &StatusArgs) -> Result<ExitCode> {
    let pool = db::connect(settings.database_url()?, 1).await?;
    let depth = match Queue::open(sqs::client(&settings.aws).await, &settings.queue).await {
        Ok(q) => q.depth().await,
        Err(e) => Err(e),
    };
    let status = loader::status::read(&pool).await?;
    if args.json {
        let queue = match &depth {
            Ok(d) => serde_json::json!({
                "name": settings.queue, "visible": d.visible, "in_flight": d.in_flight,
                "delayed": d.delayed
            }),
            Err(e) => {
                serde_json::json!({"name": settings.queue, "error": loader::display::error_line(e)})
            }
        };
        let mut report = serde_json::to_value(&status)?;
        report["queue"] = queue;
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::from(exit::OK));
    }
    let queue = match depth {
        Ok(d) => format!("{} visible, {} in flight, {} delayed", d.visible, d.in_flight, d.delayed),
        Err(e) => format!("unavailable ({})", loader::display::error_line(&e)),
    };
    let when = timestamp;
    println!("queue {}: {queue}", settings.queue);
    let oldest = status
        .oldest_pending
        .map(|t| format!(" (oldest staged {})", when(Some(t))))
        .unwrap_or_default();
    println!("pending transform: {}{oldest}", status.pending);
    println!("last drained transform: {}", when(status.last_drained_at));
    match status.last_run {
        Some(r) => println!(
            "last ingest run: {} ({}), started {}, {}: received {}, staged {}, duplicates {}, deleted {}, delete failures {}, refused {}",
            r.id,
            r.mode,
            when(Some(r.started_at)),
            r.finished_at.map_or_else(
                || "not finished".to_owned(),
                |t| format!("finished {}", when(Some(t)))
            ),
            r.received,
            r.staged,
            r.duplicates,
            r.deleted,
            r.delete_failures,
            r.refused
        ),
        None => println!("last ingest run: none"),
    }
    let key = status.active_key_id.map_or_else(|| "none".to_owned(), |k| k.to_string());
    println!("active key: {key}");
    println!(
        "oldest body kept: {} (as the last purge or expiry found it, {})",
        status
            .oldest_body_staged_at
            .map_or_else(|| "none".to_owned(), |t| format!("staged {}", when(Some(t)))),
        when(status.oldest_body_measured_at)
    );
    let last_cutoff = status
        .last_masked_cutoff
        .map(|d| format!(" (retention last ended the rows created before {d})"))
        .unwrap_or_default();
    println!(
        "oldest masked row: {}{last_cutoff}",
        status
            .oldest_masked_create_date
            .map_or_else(|| "none".to_owned(), |d| format!("created {d}"))
    );
    Ok(ExitCode::from(exit::OK))
}

/// Retention (`sql/40_retention.sql`): old raw bodies with an outcome become JSON null, and
/// masked rows past their period end. Bodies first: both are owner-only, and either may be
/// asked for alone.
async fn purge(settings: &Settings, args: &PurgeArgs, evict_after: Duration) -> Result<ExitCode> {
    let pool = db::connect(settings.database_url()?, 1).await?;
    let days = args
        .older_than_days
        .map(|days| i32::try_from(days).context("--older-than-days is too large"))
        .transpose()?;
    if args.dry_run {
        if let Some(days) = days {
            let day_states = retention::preview_days(&pool, days).await?;
            let droppable: Vec<_> =
                day_states.iter().filter(|(_, s)| s == "droppable").map(|(d, _)| *d).collect();
            if let (Some(first), Some(last)) = (droppable.first(), droppable.last()) {
                println!(
                    "dry run: would drop {} staged days ({first} to {last}), keeping their counts",
                    droppable.len()
                );
            }
            for (day, why) in day_states.iter().filter(|(_, s)| s != "droppable") {
                println!("dry run: would keep staged day {day}: {}", day_kept_because(why));
            }
            let (bodies, pending) = retention::preview(&pool, days).await?;
            println!(
                "dry run: would purge {bodies} staged bodies older than {days} days (those of \
                 the days dropped go with them); {pending} pending rows among them are kept until \
                 transformed"
            );
        }
        if let Some(months) = args.masked_older_than_months {
            let p = retention::preview_masked(&pool, months).await?;
            println!(
                "dry run: would end {} masked rows ({} of them from before loader) created before \
                 {} (older than {months} months), with their staged bodies and those of rejects \
                 staged before it; rows without a create_date, kept: {}",
                p.rows, p.before_loader, p.cutoff, p.undated
            );
        }
        println!("nothing changed");
        return Ok(ExitCode::from(exit::OK));
    }
    let stop = stop_on_signal();
    if let Some(days) = days {
        let progress = Progress::on_terminal("bodies purged");
        let purged =
            retention::purge(&pool, days, args.batch_size, progress.as_ref(), &stop, evict_after)
                .await?;
        if let Some(progress) = progress {
            progress.finish();
        }
        if !purged.days_dropped.is_empty() {
            let (first, last) =
                (purged.days_dropped[0], purged.days_dropped[purged.days_dropped.len() - 1]);
            println!(
                "dropped {} staged days ({first} to {last}), their counts kept in loader.staged_days",
                purged.days_dropped.len()
            );
        }
        for (day, why) in &purged.days_kept {
            println!("kept staged day {day}: {}", day_kept_because(why));
        }
        print_evicted(&purged.evicted);
        let bodies = purged.bodies;
        if !purged.finished {
            let expiry = match args.masked_older_than_months {
                Some(_) => " (the masked rows' expiry has not started)",
                None => "",
            };
            println!(
                "stopped after purging {bodies} staged bodies older than {days} days{expiry}; \
                 run again to continue"
            );
            return Ok(ExitCode::from(exit::INTERRUPTED));
        }
        println!("purged {bodies} staged bodies older than {days} days");
    }
    if let Some(months) = args.masked_older_than_months {
        let progress = Progress::on_terminal("masked rows ended");
        let expired =
            retention::expire_masked(&pool, months, args.batch_size, progress.as_ref(), &stop)
                .await?;
        if let Some(progress) = progress {
            progress.finish();
        }
        let (rows, cutoff) = (expired.rows, expired.cutoff);
        let bodies = match expired.bodies {
            0 => String::new(),
            n => format!(", and purged {n} staged bodies with no masked row (rejects)"),
        };
        if !expired.finished {
            println!(
                "stopped after ending {rows} masked rows created before {cutoff}{bodies}; run \
                 again to continue"
            );
            return Ok(ExitCode::from(exit::INTERRUPTED));
        }
        println!(
            "ended {rows} masked rows created before {cutoff} (older than {months} months){bodies}"
        );
    }
    Ok(ExitCode::from(exit::OK))
}

/// Why `loader purge` kept a day due for dropping, for its reader.
fn day_kept_because(why: &str) -> &'static str {
    match why {
        "pending" => "a row waits for the transform (it is dropped once transformed)",
        "unaccounted" => {
            "a row has no outcome, or two, or an outcome of the day has lost its staged row \
             (`loader reconcile` names it)"
        }
        "copying" => "an online rebuild is copying (its rows, or the outcomes it carries, not yet)",
        "depended" => {
            "an object outside loader depends on it or its row type (drop that object; \
             `select loader._permanent_dependents('loader.raw_logins_pYYYYMMDD')` names it)"
        }
        "busy" => "a lock was held too long (the next purge drops it)",
        _ => "not droppable",
    }
}

async fn doctor(settings: &Settings, args: &DoctorArgs) -> Result<ExitCode> {
    use loader::doctor;
    let options = doctor::Options {
        lambda_timeout: args.lambda_timeout.map(Duration::from_secs),
        probe_receive: args.probe_receive,
    };
    let mut findings = doctor::database(settings.database_url()?).await;
    let queue = Queue::open(sqs::client(&settings.aws).await, &settings.queue).await;
    findings.extend(doctor::queue(queue, &options).await);
    let problems = findings.iter().filter(|f| !f.ok).count();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&findings)?);
    } else {
        for f in &findings {
            match (&f.problem, &f.fix, &f.skipped) {
                (Some(problem), Some(fix), _) => {
                    println!("FAIL  {}: {problem}. Fix: {fix}", f.check);
                }
                (_, _, Some(why)) => println!("skip  {}: {why}", f.check),
                _ => println!("ok    {}", f.check),
            }
        }
        println!("{problems} problem(s)");
    }
    Ok(ExitCode::from(if problems == 0 { exit::OK } else { exit::PROBLEMS }))
}

async fn schedule(settings: &Settings, command: &ScheduleCommand) -> Result<ExitCode> {
    use loader::schedule;
    let pool = db::connect(settings.database_url()?, 1).await?;
    match command {
        ScheduleCommand::Install {
            transform_every,
            purge_older_than_days,
            masked_older_than_months,
            purge_at,
            keep_history_days,
        } => {
            let plan = schedule::Timetable {
                transform_every: transform_every.clone(),
                purge: purge_older_than_days.map(|days| (purge_at.clone(), days)),
                expire_masked: masked_older_than_months.map(|months| (purge_at.clone(), months)),
                keep_history_days: *keep_history_days,
            };
            print!("{}", render::schedule(&schedule::install(&pool, &plan).await?));
        }
        ScheduleCommand::List { json } => {
            let jobs = schedule::list(&pool).await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&jobs)?);
            } else {
                print!("{}", render::schedule(&jobs));
            }
        }
        ScheduleCommand::Remove => {
            println!("removed {} loader jobs from pg_cron", schedule::remove(&pool).await?);
        }
    }
    Ok(ExitCode::from(exit::OK))
}

async fn dlq(settings: &Settings, command: &DlqCommand) -> Result<ExitCode> {
    let queue = Queue::open(sqs::client(&settings.aws).await, &settings.queue).await?;
    match command {
        DlqCommand::List { dlq, json } => {
            let pool = db::connect(settings.database_url()?, 1).await?;
            let dlq = loader::dlq::resolve(&queue, dlq.dlq.as_deref()).await?;
            let listed = loader::dlq::list(&dlq, &pool).await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&listed)?);
            } else {
                print!("{}", render::dead_letters(dlq.name(), &listed));
            }
        }
        DlqCommand::Redrive { dlq, no_wait } => {
            let dlq = loader::dlq::resolve(&queue, dlq.dlq.as_deref()).await?;
            let poll = Duration::from_secs(1);
            let task =
                loader::dlq::redrive(&queue, &dlq, !no_wait, poll, |t| eprintln!("{t}")).await?;
            println!("moving {} back to {}: {task}", dlq.name(), queue.name());
        }
    }
    Ok(ExitCode::from(exit::OK))
}

async fn bench(settings: &Settings, command: &BenchCommand) -> Result<ExitCode> {
    let (what, (n, took)) = match command {
        BenchCommand::Ceiling { receivers, wait_seconds } => {
            let queue = Queue::open(sqs::client(&settings.aws).await, &settings.queue).await?;
            (
                "receive+delete (no database)",
                bench::queue_ceiling(&queue, usize::from(*receivers), *wait_seconds).await?,
            )
        }
        BenchCommand::Staging { rows, flush_messages, method } => {
            let pool = db::connect(settings.database_url()?, 1).await?;
            let what = match method {
                StagingMethod::Unnest => "staging (no queue)",
                StagingMethod::Copy => "staging by COPY (no queue)",
            };
            (what, bench::staging(&pool, *rows, *flush_messages, *method).await?)
        }
    };
    let rate = n as f64 / took.as_secs_f64().max(1e-9);
    println!("{what}: {n} messages in {:.2} s, {rate:.0} messages/s", took.as_secs_f64());
    Ok(ExitCode::from(exit::OK))
}

/// A [`Shutdown`](loader::shutdown::Shutdown) begun by the first SIGINT or SIGTERM: work
/// stops at its next boundary (a batch, a range, a flush), and `has_begun` says afterwards
/// whether the signal came (a command that ends by itself then exits [`exit::INTERRUPTED`]).
fn stop_on_signal() -> loader::shutdown::Shutdown {
    let stop = loader::shutdown::Shutdown::default();
    // The handlers are installed here, before any work starts (see shutdown_signal).
    let signal = shutdown_signal();
    let begin = stop.clone();
    tokio::spawn(async move {
        signal.await;
        begin.begin();
    });
    stop
}

/// The exit code of a command that ends by itself: [`exit::INTERRUPTED`] when a signal stopped
/// it first.
fn stopped_code(stopped_early: bool) -> u8 {
    if stopped_early {
        eprintln!("stopped by a signal before it was done; run it again to continue");
        exit::INTERRUPTED
    } else {
        exit::OK
    }
}

/// Resolves on the first SIGINT or SIGTERM.
///
/// The handlers are installed when this is called, not when the future is first polled: a
/// SIGTERM arriving before that (say during a long first transform) would otherwise meet the
/// default action and end the process mid-batch.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing the SIGINT handler");
    async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutdown requested; finishing the batch in hand");
    }
}
