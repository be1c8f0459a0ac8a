//! How the reports of reconcile, `dlq list` and `schedule` read on a terminal: the one place
//! besides `commands.rs` that formats for people (the library returns data; `--json` prints it
//! as it is).

use std::fmt;
use std::fmt::Write as _;

use loader::counts::RunCounts;
use loader::display::timestamp;
use loader::dlq::Listed;
use loader::reconcile::{self, Check, QueueCounts, RefusalAccount, Report, StageCounts};
use loader::schedule::Job;

/// `loader reconcile`'s report: the counts at every stage, the queue, the runs, the
/// refusals, then each check.
pub fn reconcile(report: &Report) -> String {
    let mut out = String::new();
    let _ = write_report(&mut out, report);
    out
}

fn write_report(out: &mut impl fmt::Write, report: &Report) -> fmt::Result {
    write_stages(out, &report.stages)?;
    if let Some(q) = &report.queue {
        write_queue(out, q)?;
    }
    write_runs(out, &report.stages, &report.recent_runs)?;
    write_refusals(out, &report.refusals)?;
    write_checks(out, &report.checks)
}

fn write_stages(out: &mut impl fmt::Write, s: &StageCounts) -> fmt::Result {
    let when = timestamp;
    match s.window_start {
        Some(start) => {
            writeln!(out, "stages (staged, loaded, rejected or run since {})", when(Some(start)))?
        }
        None => writeln!(out, "stages")?,
    }
    writeln!(out, "  staged (loader.raw_logins)      {:>10}", s.staged)?;
    if s.purged > 0 {
        writeln!(out, "    of which bodies purged        {:>10}", s.purged)?;
    }
    if s.erased > 0 {
        writeln!(out, "    of which erased (no outcome)  {:>10}", s.erased)?;
    }
    if s.expired > 0 {
        writeln!(out, "    of which masks expired        {:>10}", s.expired)?;
    }
    if s.dropped > 0 {
        writeln!(out, "    of which in dropped days      {:>10}", s.dropped)?;
    }
    writeln!(out, "  loaded (public.user_logins)     {:>10}", s.loaded)?;
    writeln!(out, "  rejected (loader.login_rejects) {:>10}", s.rejected)?;
    writeln!(out, "  pending (loader.transform_queue){:>10}", s.pending)?;
    writeln!(out, "  last drained transform          {}", when(s.last_drained_at))
}

fn write_queue(out: &mut impl fmt::Write, q: &QueueCounts) -> fmt::Result {
    writeln!(
        out,
        "queue {}: {} visible, {} in flight, {} delayed",
        q.name, q.visible, q.in_flight, q.delayed
    )?;
    match &q.dead_letter {
        Some(d) => writeln!(out, "dead-letter queue {}: {} visible", d.name, d.visible),
        None => writeln!(out, "dead-letter queue: none (no redrive policy)"),
    }
}

fn write_runs(out: &mut impl fmt::Write, s: &StageCounts, runs: &[RunCounts]) -> fmt::Result {
    writeln!(
        out,
        "ingest runs: {} ({} running; {} ended without finishing, silent for {} s: \
         killed or crashed, or a Lambda environment AWS retired; {} stopped on an error)",
        s.runs,
        s.unfinished_runs - s.silent_runs,
        s.silent_runs,
        reconcile::SILENT_AFTER.as_secs(),
        s.stopped_runs
    )?;
    if runs.is_empty() {
        return Ok(());
    }
    writeln!(
        out,
        "  {:>6}  {:<6}  {:>9}  {:>9}  {:>10}  {:>9}  {:>11}  {:>7}  finished",
        "run", "mode", "received", "staged", "duplicates", "deleted", "del. failed", "refused"
    )?;
    for r in runs {
        writeln!(
            out,
            "  {:>6}  {:<6}  {:>9}  {:>9}  {:>10}  {:>9}  {:>11}  {:>7}  {}",
            r.id,
            r.mode,
            r.received,
            r.staged,
            r.duplicates,
            r.deleted,
            r.delete_failures,
            r.refused,
            timestamp(r.finished_at)
        )?;
    }
    Ok(())
}

fn write_refusals(out: &mut impl fmt::Write, r: &RefusalAccount) -> fmt::Result {
    if r.refused_messages == 0 {
        return Ok(());
    }
    writeln!(
        out,
        "refused by PostgreSQL (loader.refusals): {} messages, {} staged later",
        r.refused_messages, r.staged_later
    )?;
    if r.dead_letter_queue_listed {
        writeln!(out, "  in the dead-letter queue: [{}]", r.in_dead_letter_queue.join(", "))?;
        writeln!(out, "  still on the queue (being retried): [{}]", r.on_queue.join(", "))?;
    } else if !r.on_queue.is_empty() {
        writeln!(
            out,
            "  not staged (on the queue or in its DLQ; run without --skip-queue to tell): [{}]",
            r.on_queue.join(", ")
        )?;
    }
    Ok(())
}

fn write_checks(out: &mut impl fmt::Write, checks: &[Check]) -> fmt::Result {
    writeln!(out, "checks")?;
    for c in checks {
        let mark = if c.ok { "ok  " } else { "FAIL" };
        writeln!(out, "  {mark}  {}", c.description)?;
        if !c.ok {
            let more = if c.violations > c.offenders.len() as i64 { ", ..." } else { "" };
            let ids = c.offenders.join(", ");
            writeln!(out, "        {} [{}]: {ids}{more}", c.violations, c.name)?;
        }
    }
    Ok(())
}

/// `loader dlq list`: a count, then one line per message with its latest recorded refusal.
pub fn dead_letters(dlq: &str, listed: &[Listed]) -> String {
    let mut out = format!("dead-letter queue {dlq}: {} messages\n", listed.len());
    if listed.is_empty() {
        return out;
    }
    let _ = writeln!(
        out,
        "{:<38}  {:<20}  {:>8}  {:<8}  {:<28}  refused at",
        "message id", "sent", "receives", "SQLSTATE", "constraint"
    );
    for l in listed {
        let (state, constraint, at) = match &l.refusal {
            Some(r) => (
                r.sqlstate.as_str(),
                r.constraint_name.as_deref().unwrap_or("-"),
                format!(
                    "{} (run {}, {}x)",
                    timestamp(Some(r.refused_at)),
                    r.ingest_run_id,
                    r.times
                ),
            ),
            None => ("-", "-", "no refusal recorded".to_owned()),
        };
        let _ = writeln!(
            out,
            "{:<38}  {:<20}  {:>8}  {:<8}  {:<28}  {at}",
            l.message_id,
            timestamp(l.sent_at),
            l.receive_count.map_or_else(|| "?".to_owned(), |n| n.to_string()),
            state,
            constraint,
        );
    }
    out
}

/// `loader schedule install|list`: one line per job and how its last run went.
pub fn schedule(jobs: &[Job]) -> String {
    let mut out = String::new();
    for j in jobs {
        let last = match (&j.last_status, j.last_start) {
            (Some(status), start) => format!("{status} at {}", timestamp(start)),
            _ => "not run yet".to_owned(),
        };
        let active = if j.active { "" } else { " (inactive)" };
        let _ = writeln!(
            out,
            "{}{active}: '{}' as {}: {}; last run: {last}",
            j.name, j.schedule, j.username, j.command
        );
    }
    if jobs.is_empty() {
        out.push_str("no loader jobs in pg_cron\n");
    }
    out
}
