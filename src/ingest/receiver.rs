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

impl Receiver {
    /// Receives until told to stop, or (draining) until a long poll comes back empty.
    pub(super) async fn run(self) -> Result<()> {
        let Self {
            index,
            concurrency,
            queue,
            wait_seconds,
            mode,
            writer,
            held,
            visibility,
            mut shutdown,
            sqs_health,
            postgres_health,
            budget,
        } = self;
        let mut last_cost = None;
        while !shutdown.has_begun() {
            // Out of the controller's target: wait for room, or for the drain to end.
            if index >= concurrency.target() {
                tokio::select! {
                    room = concurrency.wait_for_room(index) => if room { continue } else { return Ok(()) },
                    _ = shutdown.begun() => return Ok(()),
                }
            }
            if postgres_health.lock().expect("health lock").is_failing() {
                tokio::select! {
                    _ = tokio::time::sleep(PAUSE_CHECK) => continue,
                    _ = shutdown.begun() => return Ok(()),
                }
            }
            // Room in the budget for what this receive is expected to bring.
            let expected = budget::estimate(last_cost);
            tokio::select! {
                () = budget.take(expected) => {}
                _ = shutdown.begun() => return Ok(()),
            }
            let receive = queue.receive(wait_seconds);
            tokio::pin!(receive);
            let (received, last) = tokio::select! {
                batch = &mut receive => (batch, false),
                _ = shutdown.begun() => match tokio::time::timeout(SHUTDOWN_GRACE, &mut receive).await {
                    Ok(batch) => (batch, true),
                    Err(_) => {
                        budget.give(expected);
                        return Ok(());
                    }
                },
            };
            let batch = match after_receive(received, last) {
                After::Batch(batch) => {
                    sqs_health.lock().expect("health lock").ok();
                    // Settle the reservation on what came (what the writer gives back once
                    // it has staged the batch); a batch larger than expected waits for room.
                    let cost = budget::batch_cost(&batch);
                    if cost > expected {
                        budget.take(cost - expected).await;
                    } else {
                        budget.give(expected - cost);
                    }
                    if !batch.is_empty() {
                        last_cost = Some(cost);
                    }
                    batch
                }
                // SQS unreachable or throttling: fewer receivers, wait (or stop), poll again.
                After::Backoff(e) => {
                    budget.give(expected);
                    concurrency.observe(Signal::Throttled);
                    let wait = sqs_health.lock().expect("health lock").failed(&e);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => continue,
                        _ = shutdown.begun() => return Ok(()),
                    }
                }
                After::Stop => {
                    budget.give(expected);
                    return Ok(());
                }
                After::Fail(e) => return Err(e),
            };
            if batch.is_empty() {
                concurrency.observe(Signal::Empty);
                if mode == Mode::Drain || last {
                    concurrency.drained();
                    return Ok(());
                }
                continue;
            }
            // A full channel means staging is the bottleneck: no more receivers, fewer.
            concurrency.observe(if writer.capacity() == 0 {
                Signal::WriterBehind
            } else if batch.len() >= MAX_BATCH {
                Signal::Full
            } else {
                Signal::Partial
            });
            held.hold(&batch, tokio::time::Instant::now(), visibility);
            if writer.send(batch).await.is_err() || last {
                return Ok(());
            }
        }
        Ok(())
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
