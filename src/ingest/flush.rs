//! The writer's flush policy: how received batches are gathered into one staging statement,
//! and which copy of a message a flush deletes. Pure functions, unit-tested with a paused
//! clock.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::sqs::Received;

/// How ingest overlaps receiving and staging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    /// ReceiveMessage calls in flight at once: the start when `adaptive`, else fixed.
    pub receivers: usize,
    /// Let the [`Controller`](super::concurrency::Controller) move the receivers in flight
    /// between 1 and `max_receivers` (the default); false for a fixed `--receivers N`.
    pub adaptive: bool,
    /// The most receivers in flight when adaptive.
    pub max_receivers: usize,
    /// Stage once this many messages are buffered...
    pub flush_messages: usize,
    /// ...or this long after the first of them arrived, whichever comes first.
    pub linger: Duration,
    /// Bytes of message bodies a run may hold received and not yet staged
    /// ([`super::budget`]); a flush also closes once it holds an eighth of it.
    pub memory_budget: usize,
}

impl Flow {
    /// A flush closes once its bodies add up to this many bytes.
    pub fn flush_bytes(&self) -> usize {
        self.memory_budget.max(super::budget::MIN_BYTES) / 8
    }
}

/// The default memory budget: 64 MiB of bodies (about 64 messages of 1 MiB, or 200,000 of
/// 300 bytes), flushes of 8 MiB at most.
pub const DEFAULT_MEMORY_BUDGET: usize = 64 * 1024 * 1024;

impl Flow {
    /// The defaults, which `--help` shows: adaptive from four receivers up to 32 (at 20 ms a
    /// call, 32 receivers can hand out about 16,000 messages/s); 500 messages make one cheap
    /// statement; 50 ms bounds the added latency of a quiet queue.
    pub const DEFAULT: Flow = Flow {
        receivers: 4,
        adaptive: true,
        max_receivers: 32,
        flush_messages: 500,
        linger: Duration::from_millis(50),
        memory_budget: DEFAULT_MEMORY_BUDGET,
    };
}

impl Default for Flow {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Adds batches from `inbox` to `flush` until it holds `flow.flush_messages` messages or
/// [`Flow::flush_bytes`] (each message weighing `bytes`), `flow.linger` has passed since this
/// call, or every sender is gone (shutdown or the end of a drain: what was gathered is
/// flushed, never dropped).
pub(super) async fn gather<T>(
    mut flush: Vec<T>,
    inbox: &mut mpsc::Receiver<Vec<T>>,
    flow: &Flow,
    bytes: impl Fn(&T) -> usize,
) -> Vec<T> {
    let deadline = tokio::time::Instant::now() + flow.linger;
    let mut held: usize = flush.iter().map(&bytes).sum();
    while flush.len() < flow.flush_messages && held < flow.flush_bytes() {
        tokio::select! {
            batch = inbox.recv() => match batch {
                Some(batch) => {
                    held += batch.iter().map(&bytes).sum::<usize>();
                    flush.extend(batch);
                }
                None => break,
            },
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    flush
}

/// One entry per message id, the last received copy (its receipt handle is the current one),
/// and how many copies each id had.
pub(super) fn latest_copies(batch: &[Received]) -> (Vec<Received>, HashMap<String, u64>) {
    let mut copies: HashMap<String, u64> = HashMap::with_capacity(batch.len());
    let mut latest: Vec<Received> = Vec::with_capacity(batch.len());
    let mut position: HashMap<&str, usize> = HashMap::with_capacity(batch.len());
    for m in batch {
        *copies.entry(m.message_id.clone()).or_default() += 1;
        match position.get(m.message_id.as_str()) {
            Some(&i) => latest[i] = m.clone(),
            None => {
                position.insert(&m.message_id, latest.len());
                latest.push(m.clone());
            }
        }
    }
    (latest, copies)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_of_a_message_are_deleted_once_with_the_latest_handle() {
        let m = |id: &str, handle: &str| Received {
            message_id: id.into(),
            receipt_handle: handle.into(),
            body: String::new(),
            sent_at: None,
            receive_count: None,
        };
        let (latest, copies) = latest_copies(&[m("a", "h1"), m("b", "h2"), m("a", "h3")]);
        let handles: Vec<_> =
            latest.iter().map(|m| (m.message_id.as_str(), m.receipt_handle.as_str())).collect();
        assert_eq!(handles, [("a", "h3"), ("b", "h2")]);
        assert_eq!((copies["a"], copies["b"]), (2, 1));
    }

    fn flow(flush_messages: usize) -> Flow {
        Flow { flush_messages, linger: Duration::from_millis(50), ..Flow::default() }
    }

    /// A sender holding `batches` of `size` messages each, already sent.
    fn inbox(batches: usize, size: usize) -> (mpsc::Sender<Vec<u32>>, mpsc::Receiver<Vec<u32>>) {
        let (tx, rx) = mpsc::channel(batches.max(1));
        for b in 0..batches {
            tx.try_send((0..size as u32).map(|i| b as u32 * 100 + i).collect()).unwrap();
        }
        (tx, rx)
    }

    #[tokio::test(start_paused = true)]
    async fn a_flush_closes_as_soon_as_it_reaches_its_size() {
        let (_tx, mut rx) = inbox(4, 10);
        let started = tokio::time::Instant::now();
        let flush = gather(vec![], &mut rx, &flow(25), |_| 1).await;
        assert_eq!(flush.len(), 30, "three batches of ten reach 25");
        assert_eq!(started.elapsed(), Duration::ZERO, "no linger once full");
        assert_eq!(rx.try_recv().unwrap().len(), 10, "the fourth batch waits for the next flush");
    }

    #[tokio::test(start_paused = true)]
    async fn a_flush_closes_as_soon_as_its_bytes_reach_an_eighth_of_the_budget() {
        let (_tx, mut rx) = inbox(4, 10);
        let flow = Flow { memory_budget: super::super::budget::MIN_BYTES, ..flow(500) };
        // Each message weighs 100 KiB: 20 MiB / 8 = 2.5 MiB, reached by the third batch.
        let flush = gather(vec![], &mut rx, &flow, |_| 100 * 1024).await;
        assert_eq!(flush.len(), 30, "2.5 MiB in batches of 1000 KiB: three");
        assert_eq!(rx.try_recv().unwrap().len(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn a_partial_flush_waits_for_the_linger_then_goes() {
        let (tx, mut rx) = inbox(1, 10);
        let started = tokio::time::Instant::now();
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            tx.send(vec![7; 5]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            tx.send(vec![8; 5]).await.unwrap();
        });
        let flush = gather(vec![], &mut rx, &flow(500), |_| 1).await;
        assert_eq!(flush.len(), 15, "the batch within the linger joins; the later one does not");
        assert_eq!(started.elapsed(), Duration::from_millis(50));
        late.await.unwrap();
        assert_eq!(rx.recv().await.unwrap(), vec![8; 5]);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_flushes_what_was_gathered_at_once() {
        let (tx, mut rx) = inbox(2, 10);
        drop(tx);
        let started = tokio::time::Instant::now();
        let flush = gather(vec![1, 2], &mut rx, &flow(500), |_| 1).await;
        assert_eq!(flush.len(), 22, "the first batch and both buffered ones, nothing dropped");
        assert_eq!(started.elapsed(), Duration::ZERO, "no linger once every sender is gone");
    }
}
