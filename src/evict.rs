//! Owner work that no lesser role can hold up for long. While an owner operation runs on one
//! session (`loader migrate`, the start and swap of an online rebuild, dropping the tables a
//! swap retired), a [`Watch`] looks from a second session at `pg_blocking_pids` of it. A
//! session whose login has blocked it for the grace period (`--evict-after`), with that session
//! or with others before it (many short overlapping transactions, each on a new connection,
//! hold the work up as well as one long one; the working login's own other sessions count one
//! by one), is cancelled (`pg_cancel_backend`: ends a
//! statement, say a trigger sleeping at COMMIT), and terminated (`pg_terminate_backend`: ends a
//! transaction left idle, and the temporary objects of its session) when it still blocks a
//! second later. Each is logged with its pid, role and how long its login blocked, never its
//! query.
//!
//! Sessions doing the owner's own maintenance (they hold `loader.migrate_lock` or
//! `loader.maintenance_lock`, tables only the owner may lock) are waited for, never ended. Ending
//! another role's session needs the owner to have `pg_signal_backend`; a superuser's session
//! cannot be ended at all: without either, the wait is bounded by the work's own
//! `lock_timeout`, and the log says what to grant. This is how pg_repack and pg-osc's
//! `--kill-backends` treat sessions that hold a table they must swap.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::{Connection, Executor, FromRow, PgConnection, PgPool, Row};
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How long a session may block owner work before loader ends it.
pub const DEFAULT_AFTER: Duration = Duration::from_secs(10);

/// How often the watcher looks at the blocked session.
const POLL: Duration = Duration::from_millis(200);

/// How long after a cancel a session that still blocks is terminated.
const TERMINATE_AFTER_CANCEL: Duration = Duration::from_secs(1);

/// A blocker (a session, or every session of a login) not seen for this long is forgotten (the
/// swap retries with pauses between).
const FORGET_AFTER: Duration = Duration::from_secs(5);

/// A session the watcher ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evicted {
    pub pid: i32,
    pub role: String,
    /// Terminated (its whole session ended), else only its statement was cancelled.
    pub terminated: bool,
}

/// Watches the session doing owner work; ends what blocks it. Stops when dropped.
pub struct Watch {
    target: Option<watch::Sender<Option<i32>>>,
    task: Option<JoinHandle<Vec<Evicted>>>,
}

impl Watch {
    /// Starts watching (no session yet: see [`Watch::follow`]) on a connection of its own, made
    /// with `pool`'s options; `work` names the work in log lines. A watcher that cannot connect
    /// logs it and watches nothing: the work goes on, bounded by its own `lock_timeout`.
    pub fn start(pool: &PgPool, work: &'static str, after: Duration) -> Self {
        let (target, rx) = watch::channel(None);
        let options = pool.connect_options();
        let task = tokio::spawn(async move {
            match PgConnection::connect_with(&options).await {
                Ok(conn) => watching(conn, rx, work, after).await,
                Err(e) => {
                    tracing::warn!(work, error = %e, "cannot watch for sessions blocking owner work");
                    Vec::new()
                }
            }
        });
        Self { target: Some(target), task: Some(task) }
    }

    /// The session (backend pid) doing the work from now on.
    pub fn follow(&self, pid: i32) {
        if let Some(target) = &self.target {
            target.send_replace(Some(pid));
        }
    }

    /// Stops watching; returns the sessions it ended.
    pub async fn stop(mut self) -> Vec<Evicted> {
        drop(self.target.take());
        match self.task.take() {
            Some(task) => task.await.unwrap_or_default(),
            None => Vec::new(),
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The backend pid of `conn`'s session (inside the work's transaction: behind a pooler in
/// transaction mode a session is the server's only for that long).
pub async fn backend_pid(conn: &mut PgConnection) -> sqlx::Result<i32> {
    sqlx::query_scalar("select pg_backend_pid()").persistent(false).fetch_one(conn).await
}

/// What the watcher remembers of one blocker.
struct Blocker {
    first_seen: Instant,
    last_seen: Instant,
    cancelled: Option<Instant>,
    terminated: bool,
    /// Ending it was refused (no pg_signal_backend, or a superuser): said once.
    refused: bool,
}

impl Blocker {
    fn new(now: Instant) -> Self {
        Self { first_seen: now, last_seen: now, cancelled: None, terminated: false, refused: false }
    }

    /// The signal due now, if any: cancel once it (or its login, since `login_since`) has
    /// blocked for `after`, terminate when a cancel did not end it within
    /// [`TERMINATE_AFTER_CANCEL`]. Some(true) means terminate.
    fn due(&self, now: Instant, after: Duration, login_since: Instant) -> Option<bool> {
        if self.terminated || self.refused || now - self.first_seen.min(login_since) < after {
            return None;
        }
        match self.cancelled {
            None => Some(false),
            Some(at) if now - at >= TERMINATE_AFTER_CANCEL => Some(true),
            Some(_) => None,
        }
    }
}

#[derive(sqlx::FromRow)]
struct Seen {
    pid: i32,
    role: String,
    backend_start: Option<OffsetDateTime>,
    owner_work: bool,
    /// The login doing the work (the owner's): its other sessions are counted one by one.
    same_login: bool,
}

async fn watching(
    mut conn: PgConnection,
    mut rx: watch::Receiver<Option<i32>>,
    work: &'static str,
    after: Duration,
) -> Vec<Evicted> {
    let mut blockers: HashMap<(i32, Option<OffsetDateTime>), Blocker> = HashMap::new();
    // Per login: since when its sessions have blocked, and when one last did.
    let mut logins: HashMap<String, (Instant, Instant)> = HashMap::new();
    let mut evicted = Vec::new();
    loop {
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return evicted },
            () = tokio::time::sleep(POLL) => {}
        }
        let Some(pid) = *rx.borrow_and_update() else { continue };
        let seen = match blocking(&mut conn, pid).await {
            Ok(seen) => seen,
            Err(e) => {
                tracing::debug!(work, error = %e, "reading the sessions blocking owner work");
                continue;
            }
        };
        let now = Instant::now();
        for s in seen {
            let login_since = if s.same_login {
                now
            } else {
                let login = logins.entry(s.role.clone()).or_insert((now, now));
                login.1 = now;
                login.0
            };
            let b = blockers.entry((s.pid, s.backend_start)).or_insert_with(|| Blocker::new(now));
            b.last_seen = now;
            let Some(terminate) = b.due(now, after, login_since).filter(|_| !s.owner_work) else {
                continue;
            };
            if let Some(e) = end(&mut conn, b, s, terminate, (now, login_since), work).await {
                evicted.push(e);
            }
        }
        blockers.retain(|_, b| now - b.last_seen < FORGET_AFTER);
        logins.retain(|_, (_, last)| now - *last < FORGET_AFTER);
    }
}

/// The sessions of other roles that block backend `pid`, and whether each holds one of
/// loader's own locks (owner work, never ended).
async fn blocking(conn: &mut PgConnection, pid: i32) -> sqlx::Result<Vec<Seen>> {
    // The simple query protocol, the pid written in: one exchange, so a pooler in
    // transaction mode cannot split it (crate::db::transaction).
    let sql = format!(
        "select a.pid, coalesce(a.usename::text, '?') as role, a.backend_start,
                exists (select from pg_catalog.pg_locks l
                         where l.pid = a.pid and l.granted and l.locktype = 'relation'
                           and l.relation in (to_regclass('loader.migrate_lock'),
                                              to_regclass('loader.maintenance_lock')))
                    as owner_work,
                a.usename is not distinct from
                    (select w.usename from pg_catalog.pg_stat_activity w where w.pid = {pid})
                    as same_login
           from pg_catalog.pg_stat_activity a
          where a.pid = any (pg_catalog.pg_blocking_pids({pid})) and a.pid <> pg_backend_pid()"
    );
    let rows = conn.fetch_all(sql.as_str()).await?;
    rows.iter().map(Seen::from_row).collect()
}

/// Cancels (or, with `terminate`, terminates) session `s`, whose login has blocked the work
/// since `login_since`, and records it in `b`; what was ended, when the server says it was.
async fn end(
    conn: &mut PgConnection,
    b: &mut Blocker,
    s: Seen,
    terminate: bool,
    (now, login_since): (Instant, Instant),
    work: &'static str,
) -> Option<Evicted> {
    let call = if terminate { "pg_terminate_backend" } else { "pg_cancel_backend" };
    let sql = format!("select {call}({}) as signalled", s.pid);
    let signal =
        conn.fetch_one(sql.as_str()).await.and_then(|row| row.try_get::<bool, _>("signalled"));
    match signal {
        Ok(signalled) => {
            if terminate {
                b.terminated = true;
            } else {
                b.cancelled = Some(now);
            }
            if !signalled {
                return None;
            }
            tracing::warn!(
                work,
                pid = s.pid,
                role = %s.role,
                blocked_for_s = (now - b.first_seen.min(login_since)).as_secs_f64(),
                action = if terminate { "terminated" } else { "cancelled" },
                "ended a session that held up owner work"
            );
            Some(Evicted { pid: s.pid, role: s.role, terminated: terminate })
        }
        Err(e) => {
            b.refused = true;
            tracing::warn!(
                work,
                pid = s.pid,
                role = %s.role,
                error = %e,
                "a session holds up owner work and cannot be ended: grant pg_signal_backend to \
                 the owner role (a superuser's session can never be ended)"
            );
            None
        }
    }
}

/// Runs `run` on `conn` while a [`Watch`] ends what blocks it. The pid is read first, in the
/// transaction `conn` is in (the caller begins one), so a pooler cannot move the work to
/// another server session under the watch.
pub async fn watched<T>(
    pool: &PgPool,
    conn: &mut PgConnection,
    work: &'static str,
    after: Duration,
    run: impl AsyncFnOnce(&mut PgConnection) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let watch = Watch::start(pool, work, after);
    watch.follow(backend_pid(conn).await?);
    let result = run(conn).await;
    watch.stop().await;
    result
}

/// Runs one piece of owner maintenance that takes brief strong locks (creating or dropping a
/// partition, switching a generation): `sql` returns one text value and takes `day` as `$1`
/// when given. Each attempt is a transaction of its own that waits at most the lock_timeout its
/// function pins (2 s), so no stager or reader queues behind it for longer; between attempts a
/// [`Watch`] keeps counting how long a session has blocked it, and ends it once that passes
/// `after`. Returns `Ok(None)` when the lock was still refused after `after` and five more
/// seconds (a superuser's session, or no `pg_signal_backend`): the next run tries again.
pub async fn retrying(
    pool: &PgPool,
    after: Duration,
    work: &'static str,
    sql: &str,
    day: Option<time::Date>,
) -> anyhow::Result<(Option<String>, Vec<Evicted>)> {
    let watch = Watch::start(pool, work, after);
    let outcome = retrying_under(&watch, pool, after, work, sql, day).await;
    let evicted = watch.stop().await;
    outcome.map(|value| (value, evicted))
}

/// [`retrying`] under a [`Watch`] the caller started (one for many pieces of work, so each
/// does not open a connection of its own to watch from).
pub async fn retrying_under(
    watch: &Watch,
    pool: &PgPool,
    after: Duration,
    work: &'static str,
    sql: &str,
    day: Option<time::Date>,
) -> anyhow::Result<Option<String>> {
    let deadline = Instant::now() + after + Duration::from_secs(5);
    loop {
        let attempt = async {
            let mut tx = pool.begin().await?;
            watch.follow(backend_pid(&mut tx).await?);
            let mut query = sqlx::query_scalar::<_, String>(sql).persistent(false);
            if let Some(day) = day {
                query = query.bind(day);
            }
            let value = query.fetch_one(&mut *tx).await?;
            tx.commit().await?;
            sqlx::Result::Ok(value)
        }
        .await;
        match attempt {
            Ok(value) => return Ok(Some(value)),
            // A lock refused, or a deadlock PostgreSQL broke by aborting this side.
            Err(e) if matches!(crate::retry::sqlstate(&e).as_deref(), Some("55P03" | "40P01")) => {
                if Instant::now() >= deadline {
                    return Ok(None);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(anyhow::Error::new(e).context(work)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_ended_once_it_or_its_login_has_blocked_for_the_grace_period() {
        let after = Duration::from_secs(10);
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        // A session alone: cancelled at 10 s, terminated a second after the cancel.
        let mut b = Blocker::new(at(0));
        assert_eq!(b.due(at(9), after, at(9)), None);
        assert_eq!(b.due(at(10), after, at(10)), Some(false));
        b.cancelled = Some(at(10));
        assert_eq!(b.due(at(10), after, at(10)), None);
        assert_eq!(b.due(at(11), after, at(11)), Some(true));
        // A session new at 12 s of a login that has blocked since 0 s: cancelled at once.
        let fresh = Blocker::new(at(12));
        assert_eq!(fresh.due(at(12), after, at(0)), Some(false));
        // Ending it refused (a superuser's session): nothing more is due.
        let mut refused = Blocker::new(at(0));
        refused.refused = true;
        assert_eq!(refused.due(at(20), after, at(0)), None);
    }
}
