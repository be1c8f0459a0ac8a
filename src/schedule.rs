//! The SQL side on pg_cron (`loader schedule`): where PostgreSQL can schedule its own work (RDS,
//! most managed PostgreSQL, Debian's `postgresql-15-cron`), the incremental transform, the
//! daily purge, the end of masked rows past their retention period and the pruning of pg_cron's
//! own history run as pg_cron jobs, with no loader process. Ingest still needs a process (or
//! the Lambda handler): SQS does not push into PostgreSQL.
//!
//! The jobs run in this database as the role that installs them (the owner: the purge is
//! owner-only), through pg_cron's libpq connection to `cron.host`, so that role must be able to
//! log in there (a `.pgpass`, or `cron.use_background_workers = on`). pg_cron keeps its jobs in
//! the one database named by `cron.database_name`; this command must run there. It needs no
//! superuser: pg_cron lets any role with `usage on schema cron` schedule jobs that run as
//! itself (`cron.schedule`), and the jobs are read through `cron.job`, whose row security
//! shows each role its own.

use anyhow::{Context, Result, bail};
use serde::Serialize;
use sqlx::PgPool;
use time::OffsetDateTime;

/// Every job this command installs is named with this prefix.
pub const PREFIX: &str = "loader-";

/// What to schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timetable {
    /// pg_cron schedule of `call loader.transform()`: cron syntax (`* * * * *`, every minute)
    /// or, on pg_cron 1.5 and later, `N seconds`.
    pub transform_every: String,
    /// `(schedule, days)`: `call loader.purge_staged('days days')` on that schedule.
    pub purge: Option<(String, u32)>,
    /// `(schedule, months)`: `call loader.expire_masked(months)` on that schedule.
    pub expire_masked: Option<(String, u32)>,
    /// pg_cron's run history (`cron.job_run_details`) older than this many days is deleted
    /// daily.
    pub keep_history_days: u32,
}

/// One scheduled job, with its latest run.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Job {
    pub name: String,
    pub schedule: String,
    pub command: String,
    pub username: String,
    pub active: bool,
    pub last_status: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_start: Option<OffsetDateTime>,
}

/// Fails with the setup to do when pg_cron is not usable from this database.
async fn require_pg_cron(pool: &PgPool) -> Result<()> {
    // pg_settings, not current_setting(): cron.database_name is readable only with
    // pg_read_all_settings, which the owner need not have (then the hint goes without it).
    let (installed, cron_database, here): (bool, Option<String>, String) =
        crate::db::transaction(pool, async |tx| {
            sqlx::query_as(
                "select exists (select from pg_extension where extname = 'pg_cron'),
                        (select setting from pg_settings where name = 'cron.database_name'),
                        current_database()",
            )
            .persistent(false)
            .fetch_one(tx)
            .await
        })
        .await
        .context("checking for pg_cron")?;
    if !installed {
        bail!(
            "pg_cron is not installed in database {here}: add pg_cron to shared_preload_libraries, \
             set cron.database_name = '{here}', restart, then `create extension pg_cron` \
             (docs/operating.md \"The SQL side on pg_cron\"){}",
            cron_database.map_or_else(String::new, |d| format!("; pg_cron keeps its jobs in {d}"))
        );
    }
    Ok(())
}

/// Installs (or replaces) loader's jobs; returns them.
pub async fn install(pool: &PgPool, timetable: &Timetable) -> Result<Vec<Job>> {
    require_pg_cron(pool).await?;
    let version: String = crate::db::transaction(pool, async |tx| {
        sqlx::query_scalar("select extversion from pg_extension where extname = 'pg_cron'")
            .persistent(false)
            .fetch_one(tx)
            .await
    })
    .await
    .context("reading pg_cron's version")?;
    for schedule in std::iter::once(&timetable.transform_every)
        .chain(timetable.purge.as_ref().map(|(schedule, _)| schedule))
        .chain(timetable.expire_masked.as_ref().map(|(schedule, _)| schedule))
    {
        if schedule.trim().ends_with("seconds") && !seconds_supported(&version) {
            anyhow::bail!(
                "pg_cron {version} refuses the schedule '{schedule}': schedules in seconds need \
                 pg_cron 1.5 or later; use cron syntax ('* * * * *' is every minute) or upgrade \
                 pg_cron"
            );
        }
    }
    let mut jobs = vec![(
        format!("{PREFIX}transform"),
        timetable.transform_every.clone(),
        "call loader.transform()".to_owned(),
    )];
    if let Some((schedule, days)) = &timetable.purge {
        jobs.push((
            format!("{PREFIX}purge"),
            schedule.clone(),
            format!("call loader.purge_staged(interval '{days} days')"),
        ));
    }
    if let Some((schedule, months)) = &timetable.expire_masked {
        jobs.push((
            format!("{PREFIX}expire-masked"),
            schedule.clone(),
            format!("call loader.expire_masked({months})"),
        ));
    }
    jobs.push((
        format!("{PREFIX}prune-cron-history"),
        "0 4 * * *".to_owned(),
        format!(
            "delete from cron.job_run_details where end_time < now() - interval '{} days'",
            timetable.keep_history_days
        ),
    ));
    let mut tx = pool.begin().await?;
    remove_in(&mut tx).await?;
    for (name, schedule, command) in &jobs {
        sqlx::query(
            // cron.schedule: as the caller, in cron.database_name, which is this database (pg_cron
            // is installed only there). Not schedule_in_database, which pg_cron 1.4 leaves to
            // the DBA to grant, and which needs a superuser to name a user.
            "select cron.schedule($1, $2, $3)",
        )
        .bind(name)
        .bind(schedule)
        .bind(command)
        .persistent(false)
        .execute(&mut *tx)
        .await
        .with_context(|| format!("scheduling {name} ('{schedule}')"))?;
    }
    tx.commit().await?;
    list(pool).await
}

/// Whether a pg_cron version (`extversion`, e.g. `1.4-1`, `1.6`) takes `N seconds` schedules.
fn seconds_supported(version: &str) -> bool {
    let mut parts =
        version.split(|c: char| !c.is_ascii_digit()).map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (1, 5)
}

/// loader's jobs and their latest runs.
pub async fn list(pool: &PgPool) -> Result<Vec<Job>> {
    require_pg_cron(pool).await?;
    crate::db::transaction(pool, async |tx| {
        sqlx::query_as(
            "select j.jobname as name, j.schedule, j.command, j.username, j.active,
                d.status as last_status, d.start_time as last_start
           from cron.job j
           left join lateral (select r.status, r.start_time from cron.job_run_details r
                               where r.jobid = j.jobid order by r.start_time desc limit 1) d on true
          where j.jobname like $1 || '%'
          order by j.jobname",
        )
        .bind(PREFIX)
        .persistent(false)
        .fetch_all(tx)
        .await
    })
    .await
    .context("reading cron.job")
}

/// Removes loader's jobs; returns how many there were.
pub async fn remove(pool: &PgPool) -> Result<u64> {
    require_pg_cron(pool).await?;
    let mut tx = pool.begin().await?;
    let n = remove_in(&mut tx).await?;
    tx.commit().await?;
    Ok(n)
}

async fn remove_in(tx: &mut sqlx::PgConnection) -> Result<u64> {
    let removed: Vec<bool> = sqlx::query_scalar(
        "select cron.unschedule(jobid) from cron.job where jobname like $1 || '%'",
    )
    .bind(PREFIX)
    .persistent(false)
    .fetch_all(&mut *tx)
    .await
    .context("removing loader's pg_cron jobs")?;
    Ok(removed.len() as u64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn schedules_in_seconds_need_pg_cron_1_5() {
        for (version, ok) in
            [("1.4-1", false), ("1.4", false), ("1.5", true), ("1.6.4", true), ("2.0", true)]
        {
            assert_eq!(super::seconds_supported(version), ok, "{version}");
        }
    }
}
