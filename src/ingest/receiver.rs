//! One receiver: long-polls SQS and hands non-empty batches to the writer. Several run at once
//! (`Flow::receivers`); each pauses while PostgreSQL is failing and backs off while SQS is.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use tokio::sync::mpsc;

use super::budget::{self, Budget};
use super::concurrency::{Shared, Signal};
use super::invisible::Held;
use super::{Mode, SHUTDOWN_GRACE};
use crate::retry::{self, Health};
use crate::shutdown::Listener;
use crate::sqs::{MAX_BATCH, Queue, Received};

/// How often a paused receiver looks again whether PostgreSQL is back.
const PAUSE_CHECK: Duration = Duration::from_millis(200);

/// One receiver: long-polls and hands non-empty batches to the writer until told to stop, or
/// (draining) until a long poll comes back empty. While the writer cannot reach PostgreSQL it
/// receives nothing: messages stay on the queue rather than wait in memory, where their
/// visibility timeout could run out.
pub(super) struct Receiver {
    /// Its slot: it receives only while `index` is below the controller's target.
    pub index: usize,
    /// The run's receive concurrency, told what each call returned.
    pub concurrency: Shared,
    pub queue: Queue,
    /// Long-poll wait per ReceiveMessage call, in seconds.
    pub wait_seconds: i32,
    /// Drain: stop at the first empty long poll. Follow: until shutdown.
    pub mode: Mode,
    /// Where non-empty batches go: the writer's channel.
    pub writer: mpsc::Sender<Vec<Received>>,
    /// Where each batch is held (kept invisible) from receipt until the writer has staged it.
    pub held: Held,
    /// The queue's visibility timeout.
    pub visibility: Duration,
    /// Resolves when shutdown begins.
    pub shutdown: Listener,
    /// SQS's health, shared by the receivers: backoff and state-change logging on transient
    /// errors.
    pub sqs_health: Arc<Mutex<Health>>,
    /// PostgreSQL's health, as the writer sees it: while it is failing, nothing is received.
    pub postgres_health: Arc<Mutex<Health>>,
    /// The run's memory budget: a receive waits until what it may bring fits.
    pub budget: Budget,
}

/// What a receiver's loop does next.
enum Next {
    /// Go round the loop again.
    Again,
    /// Stop, cleanly.
    Stop,
}

impl Receiver {
    /// Receives until told to stop, or (draining) until a long poll comes back empty.
    pub(super) async fn poll(mut self) -> Result<()> {
        let mut last_cost = None;
        while !self.shutdown.has_begun() {
            match self.wait_turn().await {
                Some(Next::Again) => continue,
                Some(Next::Stop) => return Ok(()),
                None => {}
            }
            // Room in the budget for what this receive is expected to bring.
            let expected = budget::estimate(last_cost);
            tokio::select! {
                () = self.budget.take(expected) => {}
                _ = self.shutdown.begun() => return Ok(()),
            }
            let started = std::time::Instant::now();
            let Some((received, last)) = self.receive().await else {
                self.budget.give(expected);
                return Ok(());
            };
            let batch = match after_receive(received, last) {
                After::Batch(batch) => {
                    self.sqs_health.lock().expect("health lock").ok(started);
                    let cost = self.settle(&batch, expected).await;
                    if !batch.is_empty() {
                        last_cost = Some(cost);
                    }
                    batch
                }
                // SQS unreachable or throttling: fewer receivers, wait (or stop), poll again.
                After::Backoff(e) => {
                    self.budget.give(expected);
                    self.concurrency.observe(Signal::Throttled);
                    let wait = self.sqs_health.lock().expect("health lock").failed(&e);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => continue,
                        _ = self.shutdown.begun() => return Ok(()),
                    }
                }
                After::Stop => {
                    self.budget.give(expected);
                    return Ok(());
                }
                After::Fail(e) => return Err(e),
            };
            if let Next::Stop = self.hand_over(batch, last).await {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Waits while this receiver is outside the controller's target or PostgreSQL is failing;
    /// None when it may receive now.
    async fn wait_turn(&mut self) -> Option<Next> {
        if self.index >= self.concurrency.target() {
            return Some(tokio::select! {
                room = self.concurrency.wait_for_room(self.index) => {
                    if room { Next::Again } else { Next::Stop }
                }
                _ = self.shutdown.begun() => Next::Stop,
            });
        }
        if self.postgres_health.lock().expect("health lock").is_failing() {
            return Some(tokio::select! {
                _ = tokio::time::sleep(PAUSE_CHECK) => Next::Again,
                _ = self.shutdown.begun() => Next::Stop,
            });
        }
        None
    }

    /// One ReceiveMessage call, and whether it was in flight as shutdown began (it gets
    /// [`SHUTDOWN_GRACE`] to finish); None when it did not finish in that time.
    async fn receive(&mut self) -> Option<(Result<Vec<Received>>, bool)> {
        let receive = self.queue.receive(self.wait_seconds);
        tokio::pin!(receive);
        tokio::select! {
            batch = &mut receive => Some((batch, false)),
            _ = self.shutdown.begun() => {
                tokio::time::timeout(SHUTDOWN_GRACE, &mut receive).await.ok().map(|b| (b, true))
            }
        }
    }

    /// Settles the budget's reservation on what came (what the writer gives back once it has
    /// staged the batch): a batch larger than expected waits for room. Returns its cost.
    async fn settle(&self, batch: &[Received], expected: usize) -> usize {
        let cost = budget::batch_cost(batch);
        if cost > expected {
            self.budget.take(cost - expected).await;
        } else {
            self.budget.give(expected - cost);
        }
        cost
    }

    /// Tells the controller what the receive returned and hands a non-empty batch to the
    /// writer, held invisible until it is staged.
    async fn hand_over(&self, batch: Vec<Received>, last: bool) -> Next {
        if batch.is_empty() {
            self.concurrency.observe(Signal::Empty);
            if self.mode == Mode::Drain || last {
                self.concurrency.drained();
                return Next::Stop;
            }
            return Next::Again;
        }
        // A full channel means staging is the bottleneck: no more receivers, fewer.
        self.concurrency.observe(if self.writer.capacity() == 0 {
            Signal::WriterBehind
        } else if batch.len() >= MAX_BATCH {
            Signal::Full
        } else {
            Signal::Partial
        });
        self.held.hold(&batch, tokio::time::Instant::now(), self.visibility);
        if self.writer.send(batch).await.is_err() || last { Next::Stop } else { Next::Again }
    }
}

/// What a receiver does after a ReceiveMessage call returned.
#[derive(Debug)]
enum After {
    Batch(Vec<Received>),
    /// A transient failure: back off and poll again.
    Backoff(anyhow::Error),
    /// Stop receiving, cleanly.
    Stop,
    /// A permanent failure: the run stops with it.
    Fail(anyhow::Error),
}

/// Decides [`After`]; `last` when the call was in flight as shutdown began. Such a call that
/// failed on an outage received nothing, so nothing is lost and the run stops cleanly (it used
/// to fail the run, exit 1 on SIGTERM, when an SQS outage overlapped the shutdown).
fn after_receive(received: Result<Vec<Received>>, last: bool) -> After {
    match received {
        Ok(batch) => After::Batch(batch),
        Err(e) if retry::is_transient(&e) && last => After::Stop,
        Err(e) if retry::is_transient(&e) => After::Backoff(e),
        Err(e) => After::Fail(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_at_shutdown_stops_the_receiver_cleanly() {
        let outage = || Err(anyhow::Error::new(retry::Transient("connection refused".into())));
        assert!(matches!(after_receive(outage(), true), After::Stop));
        assert!(matches!(after_receive(outage(), false), After::Backoff(_)));
        let permanent = || Err(anyhow::anyhow!("the queue does not exist"));
        assert!(matches!(after_receive(permanent(), true), After::Fail(_)));
        assert!(matches!(after_receive(permanent(), false), After::Fail(_)));
        assert!(matches!(after_receive(Ok(vec![]), true), After::Batch(b) if b.is_empty()));
    }
}
