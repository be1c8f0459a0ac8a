//! Riding out outages: which errors are worth retrying, capped exponential backoff with full
//! jitter, and logging once per state change (not once per attempt).
//!
//! Transient: the database or SQS unreachable, restarting, or throttling. Permanent (exit 1 with
//! one line): bad credentials, a missing queue or database, a missing schema, anything else.

use std::time::Duration;

/// An error worth retrying, as a marker in an `anyhow` chain (SDK errors lose their type once
/// described, so the SQS adapter marks the transient ones).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Transient(pub String);

/// True when waiting and trying again may succeed.
pub fn is_transient(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause.is::<Transient>() || cause.downcast_ref::<sqlx::Error>().is_some_and(sqlx_transient)
    })
}

/// The SQLSTATE of an error the server sent (None for I/O, pool or decoding errors).
pub fn sqlstate(e: &sqlx::Error) -> Option<std::borrow::Cow<'_, str>> {
    e.as_database_error()?.code()
}

fn sqlx_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => true,
        sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(_) => sqlstate(e).is_some_and(|code| {
            // 08: connection exception; 57P01-57P03: shutting down or starting up;
            // 40001, 40P01: serialization failure, deadlock; 53: out of resources.
            code.starts_with("08")
                || code.starts_with("53")
                || ["57P01", "57P02", "57P03", "40001", "40P01"].contains(&code.as_ref())
        }),
        _ => false,
    }
}

/// Capped exponential backoff with full jitter: attempt n waits a random time in
/// `[0, min(cap, base * 2^n)]`.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
    rng: fastrand::Rng,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(10))
    }
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self { base, cap, attempt: 0, rng: fastrand::Rng::new() }
    }

    /// The upper bound of the next wait.
    pub fn ceiling(&self) -> Duration {
        self.base.saturating_mul(1u32 << self.attempt.min(20)).min(self.cap)
    }

    /// The next wait; each call doubles the ceiling until the cap.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(self.rng.f64())
    }

    /// After a success: start again from the base.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A run of failures of something retried, logged once: its first failure (warn) and its
/// recovery (info), never each attempt. "`what` `failed`", "`what` `recovered`".
#[derive(Debug)]
pub struct Streak {
    what: &'static str,
    failed: &'static str,
    recovered: &'static str,
    failing_since: Option<std::time::Instant>,
}

impl Streak {
    pub const fn new(what: &'static str, failed: &'static str, recovered: &'static str) -> Self {
        Self { what, failed, recovered, failing_since: None }
    }

    /// Records a failure; logs it when it starts a streak.
    pub fn failed(&mut self, error: &anyhow::Error) {
        if self.failing_since.is_none() {
            tracing::warn!(error = format!("{error:#}"), "{} {}", self.what, self.failed);
            self.failing_since = Some(std::time::Instant::now());
        }
    }

    /// True between a failure and the next success.
    pub fn is_failing(&self) -> bool {
        self.failing_since.is_some()
    }

    /// Records a success; logs the recovery when it ends a streak.
    pub fn ok(&mut self) {
        if let Some(since) = self.failing_since.take() {
            let down_for_ms = since.elapsed().as_millis() as u64;
            tracing::info!(down_for_ms, "{} {}", self.what, self.recovered);
        }
    }

    /// Records a success of a call that began at `started`, where several callers share the
    /// streak: a call that began before the streak's first failure (a response already on its
    /// way when the outage began) proves nothing about recovery, and is not counted. Returns
    /// whether it was.
    pub fn ok_since(&mut self, started: std::time::Instant) -> bool {
        if self.failing_since.is_some_and(|since| started < since) {
            return false;
        }
        self.ok();
        true
    }
}

/// A dependency's outages: a [`Streak`] logged once, and the backoff between attempts.
#[derive(Debug)]
pub struct Health {
    streak: Streak,
    backoff: Backoff,
}

impl Health {
    pub fn new(what: &'static str) -> Self {
        let streak = Streak::new(what, "unavailable; retrying with backoff", "available again");
        Self { streak, backoff: Backoff::default() }
    }

    /// Records a transient failure and returns how long to wait before trying again.
    pub fn failed(&mut self, error: &anyhow::Error) -> Duration {
        self.streak.failed(error);
        self.backoff.next_delay()
    }

    /// True between a failure and the next success.
    pub fn is_failing(&self) -> bool {
        self.streak.is_failing()
    }

    /// Records a success of a call that began at `started` (see [`Streak::ok_since`]: the
    /// callers of one dependency run concurrently).
    pub fn ok(&mut self, started: std::time::Instant) {
        if self.streak.ok_since(started) {
            self.backoff.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_double_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let mut ceilings = Vec::new();
        for _ in 0..6 {
            ceilings.push(b.ceiling().as_millis());
            b.next_delay();
        }
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn delays_are_jittered_within_the_ceiling() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        for _ in 0..30 {
            b.next_delay();
        }
        let delays: Vec<Duration> = (0..200).map(|_| b.next_delay()).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(10)));
        let distinct: std::collections::HashSet<_> = delays.iter().collect();
        assert!(distinct.len() > 150, "full jitter spreads retries out");
        assert!(delays.iter().any(|d| *d < Duration::from_secs(5)));
        assert!(delays.iter().any(|d| *d > Duration::from_secs(5)));
    }

    #[test]
    fn a_success_that_began_before_the_outage_does_not_end_it() {
        let mut health = Health::new("SQS");
        let before = std::time::Instant::now();
        health.failed(&anyhow::anyhow!("connection closed"));
        health.ok(before);
        assert!(health.is_failing(), "a response already on its way proves nothing");
        health.ok(std::time::Instant::now());
        assert!(!health.is_failing());
    }

    #[test]
    fn transient_errors_are_told_apart_from_permanent_ones() {
        let io = sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "x"));
        assert!(is_transient(&anyhow::Error::from(io).context("staging")));
        assert!(is_transient(
            &anyhow::Error::new(Transient("throttled".into())).context("receiving")
        ));
        assert!(!is_transient(&anyhow::anyhow!("queue 'x' does not exist")));
        assert!(!is_transient(&anyhow::Error::from(sqlx::Error::RowNotFound)));
    }
}
