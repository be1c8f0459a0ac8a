//! `loader doctor`: is this deployment set up right? One finding per check, each problem with
//! its fix. Run as the owner role (it reads the migration history and the key table).
//!
//! Doctor changes no message's state: the delete check deletes nothing (it sends a receipt
//! handle that cannot exist and reads whether SQS refused the call or the handle), and the
//! receive check runs only when asked (`probe_receive`): SQS has no way to test the receive
//! permission without receiving, and every receive counts towards a message's
//! `maxReceiveCount`, so running doctor after every change would push the message at the head
//! of the queue into its dead-letter queue.

use std::time::Duration;

use anyhow::Result;
use serde::Serialize;
use sqlx::PgPool;

use crate::config::DatabaseUrl;
use crate::db;
use crate::sqs::Queue;

/// The shortest queue visibility timeout loader is set up for: the keeper extends held
/// messages when half of it has passed, and a flush (linger, staging, commit) must fit well
/// inside that half even when PostgreSQL is slow.
pub const MIN_VISIBILITY: Duration = Duration::from_secs(10);

/// AWS's advice for a queue a Lambda function consumes: a visibility timeout of at least six
/// times the function's timeout.
pub const LAMBDA_VISIBILITY_FACTOR: u32 = 6;

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub check: String,
    pub ok: bool,
    /// Why the check was not run (it passes: nothing was found wrong), None when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// What is wrong (None when ok).
    pub problem: Option<String>,
    /// How to fix it (None when ok).
    pub fix: Option<String>,
}

impl Finding {
    fn ok(check: impl Into<String>) -> Self {
        Self { check: check.into(), ok: true, skipped: None, problem: None, fix: None }
    }

    fn skipped(check: impl Into<String>, why: impl Into<String>) -> Self {
        Self { skipped: Some(why.into()), ..Self::ok(check) }
    }

    fn problem(
        check: impl Into<String>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            check: check.into(),
            ok: false,
            skipped: None,
            problem: Some(problem.into()),
            fix: Some(fix.into()),
        }
    }

    fn from(check: impl Into<String>, problem: Option<(String, String)>) -> Self {
        match problem {
            None => Self::ok(check),
            Some((problem, fix)) => Self::problem(check, problem, fix),
        }
    }
}

/// The check that the database answers, and its fix when it does not.
const DATABASE: &str = "database";
const DATABASE_FIX: &str = "check DATABASE_URL and that PostgreSQL is up";

/// What to check besides the database.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The Lambda function's timeout, when the Lambda handler consumes the queue.
    pub lambda_timeout: Option<Duration>,
    /// Check the receive permission with a real ReceiveMessage (it counts one receive of the
    /// message at the head of the queue).
    pub probe_receive: bool,
}

/// What the receive probe costs, said when it is skipped.
pub const RECEIVE_PROBE_COST: &str = "not probed: --probe-receive checks it with one \
    ReceiveMessage, which counts a receive of the message at the head of the queue (one step \
    nearer its dead-letter queue)";

/// Every database check, connecting with the deployment's URL (one finding when it cannot).
pub async fn database(url: &DatabaseUrl) -> Vec<Finding> {
    match db::connect(url, 1).await {
        Ok(pool) => {
            let wants_tls = ["sslmode=require", "sslmode=verify-ca", "sslmode=verify-full"]
                .iter()
                .any(|mode| url.expose().contains(mode));
            database_checks(&pool, wants_tls).await
        }
        Err(e) => vec![Finding::problem(DATABASE, format!("{e:#}"), DATABASE_FIX)],
    }
}

/// A check's problem and its fix; None when the check passes.
type Problem = Option<(String, String)>;

fn problem(what: impl Into<String>, fix: impl Into<String>) -> Problem {
    Some((what.into(), fix.into()))
}

/// The database checks on a connected pool; `wants_tls` when the URL's sslmode asks for TLS.
/// When the first query fails, that is the only finding.
async fn database_checks(pool: &PgPool, wants_tls: bool) -> Vec<Finding> {
    let mut findings = match connection(pool, wants_tls).await {
        Ok(problem) => vec![Finding::from(DATABASE, problem)],
        Err(e) => return vec![Finding::problem(DATABASE, format!("{e:#}"), DATABASE_FIX)],
    };
    // A database never migrated, or a login that is not the owner: one finding says so, not
    // every check that cannot read what it needs.
    match scalar::<String>(
        pool,
        "select case when n.oid is null then 'unmigrated'
                     when pg_has_role(current_user, n.nspowner, 'usage') then 'owner'
                     else 'other' end
           from (select) x left join pg_namespace n on n.nspname = 'loader'",
    )
    .await
    {
        Ok(who) if who == "unmigrated" => {
            findings.push(Finding::problem(
                "migrations",
                "the database was never migrated",
                "run `loader migrate` as the owner role",
            ));
            return findings;
        }
        Ok(who) if who == "other" => {
            findings.push(Finding::problem(
                "run as the owner",
                "this login is not the owner of schema loader: doctor reads the migration \
                 history, the keys and every role's privileges, which only the owner may",
                "run doctor with DATABASE_URL set to the owner's login (the role that runs \
                 loader migrate)",
            ));
            return findings;
        }
        Ok(_) => findings.push(Finding::ok("run as the owner")),
        Err(e) => return vec![Finding::problem(DATABASE, format!("{e:#}"), DATABASE_FIX)],
    }
    findings.push(Finding::from("migrations", migrations(pool).await));
    findings.push(Finding::from("pgcrypto", pgcrypto(pool).await));
    findings.push(Finding::from("active key", active_key(pool).await));
    for (role, documented) in crate::privileges::DOCUMENTED {
        let check = format!("privileges of {}", if *role == "public" { "PUBLIC" } else { role });
        findings.push(Finding::from(check, privileges(pool, role, documented).await));
    }
    findings.push(Finding::from("owner may end sessions", owner_may_end_sessions(pool).await));
    findings.push(Finding::from("duties separated", duties_separated(pool).await));
    findings.push(Finding::from("pinned settings", pinned_settings(pool).await));
    findings.push(Finding::from("pii access log", pii_access_log(pool).await));
    findings.push(Finding::from("retired tables", retired_tables(pool).await));
    findings.push(Finding::from("staging days", staging_days(pool).await));
    findings.push(Finding::from("masked months", masked_months(pool).await));
    findings
}

/// One value of a query without parameters, in a transaction of its own.
async fn scalar<T>(pool: &PgPool, sql: &'static str) -> Result<T, sqlx::Error>
where
    T: Send + Unpin + for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    crate::db::transaction(pool, async |tx| {
        sqlx::query_scalar(sql).persistent(false).fetch_one(tx).await
    })
    .await
}

/// Every value of a one-column query without parameters.
async fn scalars<T>(pool: &PgPool, sql: &'static str) -> Result<Vec<T>, sqlx::Error>
where
    T: Send + Unpin + for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    crate::db::transaction(pool, async |tx| {
        sqlx::query_scalar(sql).persistent(false).fetch_all(tx).await
    })
    .await
}

/// The database answers, encrypted when the URL asks for it.
async fn connection(pool: &PgPool, wants_tls: bool) -> Result<Problem, sqlx::Error> {
    let tls: bool = scalar(
        pool,
        "select coalesce((select ssl from pg_stat_ssl where pid = pg_backend_pid()), false)",
    )
    .await?;
    Ok(match tls {
        false if wants_tls => problem(
            "the URL asks for TLS (sslmode) but the connection is not encrypted",
            "turn on ssl in postgresql.conf, or fix sslmode in DATABASE_URL",
        ),
        _ => None,
    })
}

/// Migrated with this loader's migrations and `sql/` files.
async fn migrations(pool: &PgPool) -> Problem {
    match db::schema_state(pool).await {
        Err(e) => problem(
            format!("cannot read the migration history: {e:#}"),
            "run doctor as the owner role",
        ),
        Ok(s) if s.applied.is_none() => {
            problem("the database was never migrated", "run `loader migrate`")
        }
        Ok(s) if s.applied != Some(s.latest) => problem(
            format!(
                "migrations applied up to V{}, this loader carries V{}",
                s.applied.unwrap_or(0),
                s.latest
            ),
            "run `loader migrate` with this loader (or deploy the loader that migrated)",
        ),
        Ok(s) if !s.sql_current => problem(
            "the SQL functions in the database are not this loader's sql/ files",
            "run `loader migrate` with this loader",
        ),
        Ok(_) => None,
    }
}

/// pgcrypto installed in schema public, where the SQL functions call it.
async fn pgcrypto(pool: &PgPool) -> Problem {
    let schema: Result<Option<String>, _> = scalar(
        pool,
        "select (select extnamespace::regnamespace::text from pg_extension
                  where extname = 'pgcrypto')",
    )
    .await;
    match schema {
        Ok(Some(schema)) if schema == "public" => None,
        Ok(Some(schema)) => problem(
            format!("pgcrypto is in schema {schema}, loader calls it in public"),
            "alter extension pgcrypto set schema public",
        ),
        Ok(None) => problem(
            "pgcrypto is not installed",
            "create extension pgcrypto with schema public (loader migrate does, as a role that may)",
        ),
        Err(e) => problem(format!("{e:#}"), "check the connection"),
    }
}

/// Exactly one active masking key.
async fn active_key(pool: &PgPool) -> Problem {
    match scalar::<i64>(pool, "select count(*) from loader.mask_keys where retired_at is null")
        .await
    {
        Ok(1) => None,
        Ok(0) => problem(
            "no active masking key: the transform cannot run",
            "run `loader migrate` (it creates one) or `loader keys rotate`",
        ),
        Ok(n) => problem(
            format!("{n} active masking keys"),
            "retire all but one (`loader keys list`, then `loader keys rotate`)",
        ),
        Err(e) => problem(
            format!("cannot read loader.mask_keys: {e:#}"),
            "run doctor as the owner role, after `loader migrate`",
        ),
    }
}

/// `role` has exactly the `documented` privileges.
async fn privileges(pool: &PgPool, role: &str, documented: &[&str]) -> Problem {
    let actual = match crate::privileges::of(pool, role).await {
        Ok(actual) => actual,
        Err(e) => return problem(format!("{e:#}"), "run `loader migrate`"),
    };
    let extra: Vec<&String> = actual.iter().filter(|p| !documented.contains(&p.as_str())).collect();
    let missing: Vec<&&str> =
        documented.iter().filter(|p| !actual.iter().any(|a| a == *p)).collect();
    if extra.is_empty() && missing.is_empty() {
        return None;
    }
    problem(
        format!(
            "{role} differs from docs/security.md \"Roles\": extra {extra:?}, missing {missing:?}"
        ),
        "revoke what was granted by hand, then run `loader migrate` (it re-grants exactly)",
    )
}

/// No login below the owner holds the writer role (`loader_ingest`, which chooses what is
/// staged) and a way to read what the transform made of it (`loader_analyst`,
/// `loader_pii_reader`, PostgreSQL's `pg_read_all_data` or `pg_write_all_data`, or a grant on
/// the outcome tables) together: it could stage a value of its choosing and read its mask or
/// its outcome (docs/security.md "Duties").
async fn duties_separated(pool: &PgPool) -> Problem {
    let both: Result<Vec<String>, _> = scalars(
        pool,
        "select r.rolname::text from pg_roles r
          where r.rolcanlogin and not r.rolsuper
            and r.oid <> (select nspowner from pg_namespace where nspname = 'loader')
            and pg_has_role(r.oid, 'loader_ingest', 'member')
            and (exists (select from unnest(array['loader_analyst', 'loader_pii_reader',
                                                  'pg_read_all_data', 'pg_write_all_data']) d
                          where pg_has_role(r.oid, d, 'member'))
                 or has_table_privilege(r.oid, 'public.user_logins', 'select')
                 or has_table_privilege(r.oid, 'loader.login_rejects', 'select')
                 or has_table_privilege(r.oid, 'loader.raw_logins', 'select'))
          order by 1",
    )
    .await;
    match both {
        Ok(logins) if logins.is_empty() => None,
        Ok(logins) => problem(
            format!(
                "these logins hold loader_ingest and a way to read what the transform made \
                 (loader_analyst, loader_pii_reader, pg_read_all_data, pg_write_all_data, or a \
                 grant on user_logins, login_rejects or raw_logins), so each can stage a value \
                 of its choosing and read what became of it: {}",
                logins.join(", ")
            ),
            "revoke the reading role or grant from them (or from the group role they have it \
             through); a login that stages and transforms needs loader_ingest and \
             loader_transformer only (docs/security.md \"Duties\")",
        ),
        Err(e) => problem(format!("{e:#}"), "check the connection"),
    }
}

/// The owner may end the sessions that hold its work up ([`crate::evict`]), and see how long
/// another login's transaction has been open (the transform ends one whose write transaction is
/// open past `evict_after_seconds`).
async fn owner_may_end_sessions(pool: &PgPool) -> Problem {
    let may: Result<bool, _> = scalar(
        pool,
        "select (pg_has_role(current_user, 'pg_signal_backend', 'member')
                 and pg_has_role(current_user, 'pg_read_all_stats', 'member'))
                or (select rolsuper from pg_roles where rolname = current_user)",
    )
    .await;
    match may {
        Ok(true) => None,
        Ok(false) => problem(
            "the owner role may not end other roles' sessions, or see how long they have been \
             open: one that holds a lock or claimed rows open can hold up migrate, a rotation's \
             swap, the drop of the tables it retired, or the transform of the rows it claimed",
            "grant pg_signal_backend, pg_read_all_stats to the owner role (as a superuser, or \
             rds_superuser on RDS)",
        ),
        Err(e) => problem(format!("{e:#}"), "check the connection"),
    }
}

/// The settings definer functions pin (`loader._settings_policy`): every setting a lesser role
/// may change is decided, and every definer function pins what is pinned.
async fn pinned_settings(pool: &PgPool) -> Problem {
    match settings_gaps(pool).await {
        Ok(gaps) if gaps.is_empty() => None,
        Ok(gaps) => problem(
            format!(
                "security-definer functions and the settings callers may change: {}",
                gaps.join("; ")
            ),
            "a setting of this server that loader does not know: add it to \
             loader._settings_policy (sql/90_privileges.sql) with a pin or a reason, then \
             `loader migrate`; a missing pin: run `loader migrate`",
        ),
        Err(e) => problem(format!("{e:#}"), "run `loader migrate`"),
    }
}

/// What the settings policy leaves open, one line each (none when it holds): a setting a lesser
/// role may change that `loader._settings_policy` does not classify, and a definer function of
/// schema loader that does not pin a setting the policy pins. As the owner.
pub async fn settings_gaps(pool: &PgPool) -> Result<Vec<String>> {
    Ok(scalars(
        pool,
        "select format('%s is not classified', s.name) from pg_settings s
          where (s.context = 'user'
                 or has_parameter_privilege('loader_analyst', s.name, 'set')
                 or has_parameter_privilege('loader_ingest', s.name, 'set'))
            and not exists (select from loader._settings_policy() p
                             where lower(s.name) like lower(p.name))
         union all
         select format('%s does not pin %s', p.oid::regprocedure, pin.name)
           from pg_proc p cross join loader._settings_policy() pin
          where p.pronamespace = 'loader'::regnamespace and p.prosecdef and pin.pin is not null
            and exists (select from pg_settings s where lower(s.name) = lower(pin.name))
            and not exists (select from unnest(p.proconfig) c
                             where lower(split_part(c, '=', 1)) = lower(pin.name))
          order by 1",
    )
    .await?)
}

/// `loader.pii_access_log` is append-only: both its triggers exist and are enabled.
async fn pii_access_log(pool: &PgPool) -> Problem {
    let guarded: Result<i64, _> = scalar(
        pool,
        "select count(*) from pg_trigger
          where tgrelid = to_regclass('loader.pii_access_log') and tgenabled <> 'D'
            and tgname in ('pii_access_log_append_only', 'pii_access_log_no_truncate')",
    )
    .await;
    match guarded {
        Ok(2) => None,
        Ok(_) => problem(
            "loader.pii_access_log is not append-only: its triggers are missing or disabled \
             (someone with the owner role removed them)",
            "run `loader migrate` (it creates and enables them again), and find out who changed \
             the log",
        ),
        Err(e) => problem(format!("{e:#}"), "run `loader migrate`"),
    }
}

/// No table an online rebuild retired is left behind (a held-up drop).
async fn retired_tables(pool: &PgPool) -> Problem {
    let tables: Result<Vec<String>, _> = scalars(
        pool,
        "select c.relname::text from pg_class c
          where c.relnamespace = to_regnamespace('loader_rebuild')
            and c.relname ~ '_retired_r[0-9]+$'
          order by 1",
    )
    .await;
    match tables {
        Ok(tables) if tables.is_empty() => None,
        Ok(tables) => problem(
            format!(
                "tables an online rebuild retired are still there (a drop was held up): {}",
                tables.join(", ")
            ),
            "select loader.rebuild_drop_retired() as the owner (or run the next rotation, which \
             drops them)",
        ),
        Err(e) => problem(format!("{e:#}"), "check the connection"),
    }
}

/// `loader.raw_logins` is partitioned (sql/16_partitions.sql), tomorrow's partition exists, and
/// nothing staged in the last day went to the default partition, the net for a day without one.
async fn staging_days(pool: &PgPool) -> Problem {
    const KEEP_AHEAD: &str = "keep the days ahead: schedule the daily purge (loader schedule \
                              install) or run `select loader.create_staging_days()` as the owner \
                              every day";
    let shape: Result<(bool, bool), _> = scalar(
        pool,
        "select (c.relkind = 'p', to_regclass(format('loader.raw_logins_p%s',
                    to_char((now() at time zone 'UTC')::date + 1, 'YYYYMMDD'))) is not null
                    or (select l.cutover > now() + interval '1 day' from loader.staging_layout l))
           from pg_class c where c.oid = 'loader.raw_logins'::regclass",
    )
    .await;
    match shape {
        Ok((false, _)) => problem(
            "loader.raw_logins is not partitioned by day yet (a migrate stopped before moving it)",
            "run `loader migrate` as the owner: it goes on from where it stopped",
        ),
        Ok((true, false)) => problem("no partition of loader.raw_logins for tomorrow", KEEP_AHEAD),
        // Rows staged there before stay (their bodies purged in batches, like the legacy
        // partition's): only a day missing now is a problem to fix.
        Ok((true, true)) => {
            let recent = "select count(*) from loader.raw_logins_default
                           where staged_at > now() - interval '1 day'";
            match scalar::<i64>(pool, recent).await {
                Ok(0) => None,
                Ok(n) => problem(
                    format!(
                        "{n} rows staged in the last day went to loader.raw_logins_default: no \
                         day partition existed for them"
                    ),
                    KEEP_AHEAD,
                ),
                Err(e) => problem(format!("{e:#}"), "check the connection"),
            }
        }
        Err(e) => problem(format!("{e:#}"), "check the connection"),
    }
}

/// `public.user_logins` is partitioned by month (sql/17_masked_partitions.sql) and this month
/// and next have their partitions, from the cutover on (before it, the legacy partition holds
/// them): after an upgrade, a row of a month without one is refused by the legacy partition's
/// constraint, which stops the transform; on a database new at the move it stays in the legacy
/// partition for good.
async fn masked_months(pool: &PgPool) -> Problem {
    let shape: Result<(bool, Option<String>), _> = scalar(
        pool,
        "select (c.relkind = 'p',
                 (select string_agg(to_char(m, 'YYYY-MM'), ', ' order by m)
                    from (select (date_trunc('month', now() at time zone 'UTC') + make_interval(months => k))::date as m
                            from generate_series(0, 1) k) x
                   where m >= coalesce((select l.cutover from loader.masked_layout l), '-infinity')
                     and to_regclass(format('loader.user_logins_m%s', to_char(m, 'YYYYMM'))) is null))
           from pg_class c where c.oid = 'public.user_logins'::regclass",
    )
    .await;
    match shape {
        Ok((true, None)) => None,
        Ok((false, _)) => problem(
            "public.user_logins is not partitioned by month yet (a migrate stopped before moving \
             it, an online rebuild was copying, or a view on it stopped the move)",
            "run `loader migrate` as the owner (after the rebuild's swap; it names an object that \
             stops the move): it goes on from where it stopped",
        ),
        Ok((true, Some(months))) => problem(
            format!("no partition of public.user_logins for {months}"),
            "keep the months ahead: schedule the daily purge (loader schedule install) or run \
             `select loader.create_masked_months()` as the owner; a month whose rows already \
             went to loader.user_logins_legacy gets none",
        ),
        Err(e) => problem(format!("{e:#}"), "check the connection"),
    }
}

/// The queue checks: it exists, has a DLQ by redrive policy, a long enough visibility timeout,
/// and the credentials may receive and delete.
pub async fn queue(queue: Result<Queue>, options: &Options) -> Vec<Finding> {
    let queue = match queue {
        Ok(q) => q,
        Err(e) => {
            return vec![Finding::problem(
                "queue",
                format!("{e:#}"),
                "create the queue (deploy/template.yaml does), or fix SQS_QUEUE, the region and the endpoint",
            )];
        }
    };
    let mut findings = vec![Finding::ok("queue")];
    findings.push(Finding::from("dead-letter queue", match queue.dead_letter_queue().await {
        // SQS requires a FIFO queue's DLQ to be FIFO too, and a standard queue's standard.
        Ok(Some(dlq)) if dlq.is_fifo() != queue.is_fifo() => Some((
            format!(
                "'{}' is {} but its dead-letter queue '{}' is {}",
                queue.name(),
                if queue.is_fifo() { "a FIFO queue" } else { "a standard queue" },
                dlq.name(),
                if dlq.is_fifo() { "FIFO" } else { "standard" }
            ),
            "point the redrive policy at a dead-letter queue of the same kind (a FIFO queue's ends in .fifo)".into(),
        )),
        Ok(Some(_)) => None,
        Ok(None) => Some((
            format!("'{}' has no redrive policy: a message PostgreSQL refuses is retried forever", queue.name()),
            "set a RedrivePolicy with a deadLetterTargetArn and maxReceiveCount (deploy/template.yaml has one)".into(),
        )),
        Err(e) => Some((
            format!("{e:#}"),
            "point the redrive policy at a dead-letter queue that exists, or create the one it names".into(),
        )),
    }));
    let needed = match options.lambda_timeout {
        Some(t) => (t * LAMBDA_VISIBILITY_FACTOR).max(MIN_VISIBILITY),
        None => MIN_VISIBILITY,
    };
    findings.push(Finding::from(
        "visibility timeout",
        match queue.visibility_timeout().await {
            Ok(v) if v >= needed => None,
            Ok(v) => Some((
                format!(
                    "VisibilityTimeout is {} s; loader needs at least {} s{}",
                    v.as_secs(),
                    needed.as_secs(),
                    if options.lambda_timeout.is_some() { " (6x the Lambda timeout)" } else { "" }
                ),
                format!("set the queue's VisibilityTimeout to {} s or more", needed.as_secs()),
            )),
            Err(e) => Some((format!("{e:#}"), "allow sqs:GetQueueAttributes".into())),
        },
    ));
    findings.push(if options.probe_receive {
        Finding::from(
            "receive permission",
            queue
                .can_receive()
                .await
                .err()
                .map(|e| (format!("{e:#}"), "allow sqs:ReceiveMessage on the queue".to_owned())),
        )
    } else {
        Finding::skipped("receive permission", RECEIVE_PROBE_COST)
    });
    findings.push(Finding::from(
        "delete permission",
        queue
            .can_delete()
            .await
            .err()
            .map(|e| (format!("{e:#}"), "allow sqs:DeleteMessage on the queue".to_owned())),
    ));
    findings
}
