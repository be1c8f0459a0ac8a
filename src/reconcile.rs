//! `loader reconcile`: counts at every stage and the invariants that prove nothing was lost or
//! doubled. Offenders are named by message id (or run id), never by content.

use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;
use sqlx::PgPool;
use time::OffsetDateTime;

use crate::counts::RunCounts;
use crate::sqs::Queue;

/// An unfinished run not heard of for this long ended without finishing (three missed
/// [`crate::ingest::HEARTBEAT`]s).
pub const SILENT_AFTER: Duration = Duration::from_secs(3 * crate::ingest::HEARTBEAT.as_secs());

/// How many offending ids a check lists (the count is always complete).
const MAX_IDS: i64 = 100;

/// Row counts per stage in the database (of the window, when scoped; pending is always all).
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct StageCounts {
    pub staged: i64,
    /// Staged rows whose body retention has purged (`loader purge`).
    pub purged: i64,
    pub loaded: i64,
    pub rejected: i64,
    pub pending: i64,
    pub runs: i64,
    pub unfinished_runs: i64,
    /// Unfinished runs whose process has not called in for [`SILENT_AFTER`] (three missed
    /// heartbeats): it was killed or crashed (or, for a Lambda run, AWS retired its execution
    /// environment). What they staged is accounted for like any other run's.
    pub silent_runs: i64,
    /// Staged messages erased (`loader forget`): no outcome, by design.
    pub erased: i64,
    /// Staged messages whose masked row retention ended (`loader purge
    /// --masked-older-than-months`): no outcome any more, by design.
    pub expired: i64,
    /// Runs that stopped on an error (their deleted counter may be short; not held to
    /// `run_deletes_match`).
    pub stopped_runs: i64,
    /// Staged rows (counted in `staged`, and in `purged`, `erased` and `expired` as they were)
    /// of the days retention dropped (`loader.staged_days`).
    pub dropped: i64,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_drained_at: Option<OffsetDateTime>,
    /// With `--since`: the start of the window the counts and checks cover (None: everything).
    #[serde(with = "time::serde::rfc3339::option")]
    pub window_start: Option<OffsetDateTime>,
}

/// Approximate queue depth, and the dead-letter queue's when a redrive policy names one.
#[derive(Debug, Clone, Serialize)]
pub struct QueueCounts {
    pub name: String,
    pub visible: u64,
    pub in_flight: u64,
    pub delayed: u64,
    pub dead_letter: Option<DeadLetterCounts>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeadLetterCounts {
    pub name: String,
    pub visible: u64,
}

/// One invariant and what breaks it.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub description: &'static str,
    pub ok: bool,
    /// How many rows (or runs) break it.
    pub violations: i64,
    /// Up to 100 offending message ids, or run ids for the run checks.
    pub offenders: Vec<String>,
}

/// Everything `loader reconcile` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub stages: StageCounts,
    pub recent_runs: Vec<RunCounts>,
    pub queue: Option<QueueCounts>,
    pub refusals: RefusalAccount,
    pub checks: Vec<Check>,
}

/// Where every message PostgreSQL refused (`loader.refusals`, in the window) is now.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RefusalAccount {
    /// Distinct message ids refused.
    pub refused_messages: i64,
    /// Of those, staged since (a fix, or a redrive and ingest).
    pub staged_later: i64,
    /// Refused, not staged, and in the dead-letter queue (listed only with the queue, and only
    /// when some refused message is not staged). Up to 100 ids.
    pub in_dead_letter_queue: Vec<String>,
    /// Refused, not staged, and not in the dead-letter queue (or it was not listed): still on
    /// the queue, being retried. Up to 100 ids.
    pub on_queue: Vec<String>,
    /// True when the dead-letter queue was listed to tell the two apart.
    pub dead_letter_queue_listed: bool,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }
}

/// The parameters of every statement below, as a CTE: the grace period in seconds for the
/// pending check (`$1`), and `since`, the start of the window: `$2` seconds before now, or the
/// beginning of time when `$2` is NULL (the full audit). Each table is read by its time
/// column, with the BRIN indexes of `migrations/V10__time_indexes.sql`.
const PARAMS: &str = "params as (
    select $1::float8 as grace_seconds,
           coalesce(now() - make_interval(secs => $2::float8), '-infinity') as since)";

/// The invariants, each as its name, what it proves (printed by `loader reconcile` and
/// generated into docs/operating.md's table), and SQL returning the offending ids (text),
/// reading [`PARAMS`] as `{grace}` and `{since}`. Scoped, each looks at the rows
/// of the window: messages staged in it, outcomes written in it, runs started in it (every
/// row of a run is staged after the run started). The work list is small and always read
/// whole.
pub const CHECKS: &[(&str, &str, &str)] = &[
    (
        "single_outcome",
        "no message is both loaded and rejected",
        "select j.message_id from loader.login_rejects j
           join public.user_logins u on u.message_id = j.message_id
          where j.rejected_at >= {since}
         union
         select u.message_id from public.user_logins u
           join loader.login_rejects j on j.message_id = u.message_id
          where u.loaded_at >= {since}",
    ),
    (
        "outcome_has_staged_message",
        "every user_logins row with a message_id, and every reject, has its staged message, or the day it was staged on was dropped by retention after its count was kept (loader.staged_days)",
        "select o.message_id
           from (select message_id, staged_on from public.user_logins
                  where message_id is not null and loaded_at >= {since}
                 union all
                 select message_id, staged_on from loader.login_rejects
                  where rejected_at >= {since}) o
          where not exists (select from loader.raw_logins r where r.message_id = o.message_id)
            and not exists (select from loader.staged_days d where d.day = o.staged_on)",
    ),
    (
        "message_staged_once",
        "no message id is staged twice (raw_logins' partitions share no unique index: loader.staged_ids keeps ids apart)",
        "select r.message_id from loader.raw_logins r
          where r.staged_at >= {since}
          group by r.message_id having count(*) > 1",
    ),
    (
        "staged_message_accounted_for",
        "every staged message is loaded, rejected, pending in loader.transform_queue, was erased on request, or its masked row reached the end of its retention period",
        "select r.message_id from loader.raw_logins r
          where r.staged_at >= {since} and r.erased_at is null and r.expired_at is null
            and not exists (select from public.user_logins u where u.message_id = r.message_id)
            and not exists (select from loader.login_rejects j where j.message_id = r.message_id)
            and not exists (select from loader.transform_queue q where q.raw_id = r.id)",
    ),
    (
        "nothing_pending_before_last_transform",
        "no row staged before the last drained transform batch (one that found less work than it could take and saw nothing else waiting), minus a grace period (--grace-seconds) for ingest transactions that committed after it, is still pending",
        "select r.message_id from loader.transform_queue q
           join loader.raw_logins r on r.id = q.raw_id
          where r.staged_at < (select last_drained_at from loader.transform_state)
                              - make_interval(secs => {grace})",
    ),
    (
        "run_deletes_match",
        "per ingest run: received = staged + duplicates; and per finished run that did not stop on an error: deleted + delete failures = staged + duplicates",
        // A run that stopped on an error may have deleted a flush it could not record (V15):
        // held, like an unfinished one, only to received = staged + duplicates.
        "select id::text from loader.ingest_runs
          where started_at >= {since}
            and (finished_at is not null and not stopped_on_error
                 and deleted + delete_failures <> staged + duplicates
                 or received <> staged + duplicates)",
    ),
    (
        "run_staged_matches_rows",
        "per ingest run: its staged counter equals the rows in raw_logins that name the run, with those of the days retention dropped (loader.staged_day_runs)",
        // One pass over the window's rows, grouped by run (not a count per run).
        "select i.id::text from loader.ingest_runs i
           left join (select r.ingest_run_id, count(*) as n from loader.raw_logins r
                       where r.staged_at >= {since} group by r.ingest_run_id) c
             on c.ingest_run_id = i.id
           left join (select d.ingest_run_id, sum(d.staged) as n from loader.staged_day_runs d
                       group by d.ingest_run_id) k
             on k.ingest_run_id = i.id
          where i.started_at >= {since} and i.staged <> coalesce(c.n, 0) + coalesce(k.n, 0)",
    ),
];

/// Gathers the counts and runs every check, over everything or (with `since`) the rows of the
/// last `since`. `queue`, when given, adds queue and DLQ depths.
pub async fn reconcile(
    pool: &PgPool,
    queue: Option<&Queue>,
    grace_seconds: f64,
    since: Option<Duration>,
) -> Result<Report> {
    let since_seconds = since.map(|d| d.as_secs_f64());
    let stages_sql = with_params(&
        ", dropped as (select coalesce(sum(d.staged), 0)::bigint as staged,
                              coalesce(sum(d.erased), 0)::bigint as erased,
                              coalesce(sum(d.expired), 0)::bigint as expired
                         from loader.staged_days d
                        where (d.day + 1)::timestamp at time zone 'UTC' > {since})
         select (select count(*) from loader.raw_logins where staged_at >= {since})
                    + (select staged from dropped) as staged,
                (select count(*) from loader.raw_logins
                  where purged_at is not null and staged_at >= {since})
                    + (select staged from dropped) as purged,
                (select count(*) from public.user_logins
                  where message_id is not null and loaded_at >= {since}) as loaded,
                (select count(*) from loader.login_rejects where rejected_at >= {since}) as rejected,
                (select count(*) from loader.transform_queue) as pending,
                (select count(*) from loader.ingest_runs where started_at >= {since}) as runs,
                (select count(*) from loader.ingest_runs
                  where finished_at is null and started_at >= {since}) as unfinished_runs,
                (select count(*) from loader.ingest_runs
                  where finished_at is null and started_at >= {since}
                    and last_seen_at < now() - make_interval(secs => {silent})) as silent_runs,
                (select count(*) from loader.ingest_runs
                  where stopped_on_error and started_at >= {since}) as stopped_runs,
                (select count(*) from loader.raw_logins
                  where erased_at is not null and staged_at >= {since})
                    + (select erased from dropped) as erased,
                (select count(*) from loader.raw_logins
                  where expired_at is not null and staged_at >= {since})
                    + (select expired from dropped) as expired,
                (select staged from dropped) as dropped,
                (select last_drained_at from loader.transform_state) as last_drained_at,
                (select nullif(since, '-infinity') from params) as window_start"
            .replace("{silent}", &SILENT_AFTER.as_secs().to_string()),
    );
    let stages = crate::db::transaction(pool, async |tx| {
        sqlx::query_as(&stages_sql)
            .bind(grace_seconds)
            .bind(since_seconds)
            .persistent(false)
            .fetch_one(tx)
            .await
    })
    .await;
    let stages: StageCounts = crate::db::explained(stages, "counting stages", "the owner role")?;

    let recent_runs = crate::staging::latest_runs(pool, 10).await?;

    let mut checks = Vec::with_capacity(CHECKS.len());
    for (name, description, sql) in CHECKS {
        let counted = with_params(&format!(
            ", offenders as ({sql})
             select (select count(*) from offenders),
                    coalesce((select array_agg(o) from (select * from offenders limit {MAX_IDS}) o(o)),
                             '{{}}')"
        ));
        let (violations, offenders) = crate::db::transaction(pool, async |tx| {
            sqlx::query_as::<_, (i64, Vec<String>)>(&counted)
                .bind(grace_seconds)
                .bind(since_seconds)
                .persistent(false)
                .fetch_one(tx)
                .await
        })
        .await
        .with_context(|| format!("checking {name}"))?;
        checks.push(Check { name, description, ok: violations == 0, violations, offenders });
    }

    // The dead-letter queue, resolved once for the refusals' account and the queue counts.
    let dlq = match queue {
        Some(q) => q.dead_letter_queue().await?,
        None => None,
    };
    let refusals = refusal_account(pool, dlq.as_ref(), since_seconds).await?;
    let queue = match queue {
        Some(q) => Some(queue_counts(q, dlq.as_ref()).await?),
        None => None,
    };
    Ok(Report { stages, recent_runs, queue, refusals, checks })
}

/// [`RefusalAccount`]: staged later, in the dead-letter queue (`dlq`, when the queue has one
/// and reconcile reads the queue), or still on the queue, by id.
async fn refusal_account(
    pool: &PgPool,
    dlq: Option<&Queue>,
    since_seconds: Option<f64>,
) -> Result<RefusalAccount> {
    let (refused_messages, staged_later, not_staged): (i64, i64, Vec<String>) =
        crate::db::transaction(pool, async |tx| sqlx::query_as(&with_params(
            ", refused as (select distinct message_id from loader.refusals
                             where refused_at >= {since})
             select (select count(*) from refused),
                    (select count(*) from refused f
                      where exists (select from loader.raw_logins r where r.message_id = f.message_id)
                         or exists (select from loader.staged_ids i where i.message_id = f.message_id)),
                    coalesce((select array_agg(f.message_id order by f.message_id) from refused f
                               where not exists (select from loader.raw_logins r
                                                  where r.message_id = f.message_id)
                                 and not exists (select from loader.staged_ids i
                                                  where i.message_id = f.message_id)), '{}')",
        ))
        .bind(0.0)
        .bind(since_seconds)
        .persistent(false).fetch_one(tx).await)
        .await
        .context("accounting for refused messages")?;
    let mut account = RefusalAccount { refused_messages, staged_later, ..Default::default() };
    let in_dlq: std::collections::HashSet<String> = match dlq {
        Some(dlq) if !not_staged.is_empty() => {
            account.dead_letter_queue_listed = true;
            crate::dlq::list(dlq, pool).await?.into_iter().map(|l| l.message_id).collect()
        }
        _ => Default::default(),
    };
    let (dead, alive): (Vec<String>, Vec<String>) =
        not_staged.into_iter().partition(|id| in_dlq.contains(id));
    account.in_dead_letter_queue = dead.into_iter().take(MAX_IDS as usize).collect();
    account.on_queue = alive.into_iter().take(MAX_IDS as usize).collect();
    Ok(account)
}

/// A statement with [`PARAMS`] as its first CTE: `rest` is what follows it (more CTEs after a
/// comma, then the select), with `{since}` and `{grace}` read from it.
fn with_params(rest: &str) -> String {
    let rest = rest
        .replace("{since}", "(select since from params)")
        .replace("{grace}", "(select grace_seconds from params)");
    format!("with {PARAMS}{rest}")
}

async fn queue_counts(queue: &Queue, dlq: Option<&Queue>) -> Result<QueueCounts> {
    let depth = queue.depth().await?;
    let dead_letter = match dlq {
        Some(dlq) => Some(DeadLetterCounts {
            name: dlq.name().to_owned(),
            visible: dlq.depth().await?.visible,
        }),
        None => None,
    };
    Ok(QueueCounts {
        name: queue.name().to_owned(),
        visible: depth.visible,
        in_flight: depth.in_flight,
        delayed: depth.delayed,
        dead_letter,
    })
}
