//! The memory budget of a run: the bytes of message bodies received and not yet staged (in a
//! receiver's hands, in the writer's channel, in the flush being gathered or staged), so a
//! backlog of 1 MiB messages holds no more than a backlog of small ones. Receivers reserve
//! what they expect a receive to bring before they call, settle on what it brought once it
//! is there, and the writer gives a flush's bytes back once its staging has committed (its
//! bodies are dropped then; the deletes need only ids and receipt handles).
//!
//! Counted in KiB per message, rounded up (a 300-byte body counts 1 KiB): a semaphore of KiB,
//! whose permits are taken and given back by count, never held as guards.

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::sqs::{MAX_BATCH, Received};

/// The smallest budget: a whole batch of the largest messages SQS carries (ten of 1 MiB) and
/// as much again, so one receive always fits.
pub const MIN_BYTES: usize = 2 * MAX_BATCH * 1024 * 1024;

/// What a receive is expected to bring before the first one has: ten small messages.
const FIRST_ESTIMATE_KIB: usize = MAX_BATCH;

#[derive(Clone, Debug)]
pub(super) struct Budget {
    kib: Arc<Semaphore>,
}

impl Budget {
    /// A budget of `bytes` (at least [`MIN_BYTES`]).
    pub fn new(bytes: usize) -> Self {
        Self { kib: Arc::new(Semaphore::new(bytes.max(MIN_BYTES) / 1024)) }
    }

    /// Takes `kib` from the budget, waiting while it does not hold that much.
    pub async fn take(&self, kib: usize) {
        if kib == 0 {
            return;
        }
        // A closed semaphore cannot happen: it is never closed.
        if let Ok(permit) = self.kib.acquire_many(kib as u32).await {
            permit.forget();
        }
    }

    /// Gives `kib` back.
    pub fn give(&self, kib: usize) {
        self.kib.add_permits(kib);
    }

    /// KiB left (for tests).
    #[cfg(test)]
    pub fn left(&self) -> usize {
        self.kib.available_permits()
    }
}

/// What a message counts against the budget: its body in KiB, rounded up, at least 1.
pub(super) fn cost(m: &Received) -> usize {
    m.body.len().div_ceil(1024).max(1)
}

/// What a batch counts.
pub(super) fn batch_cost(batch: &[Received]) -> usize {
    batch.iter().map(cost).sum()
}

/// A receiver's guess at its next receive's cost: its last batch's (a queue's message sizes
/// change slowly), at least ten small messages.
pub(super) fn estimate(last: Option<usize>) -> usize {
    last.unwrap_or(FIRST_ESTIMATE_KIB).max(FIRST_ESTIMATE_KIB)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(bytes: usize) -> Received {
        Received {
            message_id: "m".into(),
            receipt_handle: "h".into(),
            body: "x".repeat(bytes),
            sent_at: None,
            receive_count: None,
        }
    }

    #[test]
    fn a_message_costs_its_body_in_kib_rounded_up() {
        assert_eq!(cost(&message(0)), 1);
        assert_eq!(cost(&message(300)), 1);
        assert_eq!(cost(&message(1024)), 1);
        assert_eq!(cost(&message(1025)), 2);
        assert_eq!(batch_cost(&[message(1024 * 1024), message(10)]), 1025);
        assert_eq!(estimate(None), 10);
        assert_eq!(estimate(Some(3)), 10);
        assert_eq!(estimate(Some(10_240)), 10_240);
    }

    #[tokio::test(start_paused = true)]
    async fn taking_waits_until_enough_is_given_back() {
        let budget = Budget::new(0);
        assert_eq!(budget.left(), MIN_BYTES / 1024, "never below the minimum");
        budget.take(MIN_BYTES / 1024).await;
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.take(100).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        assert!(!waiting.is_finished(), "nothing left: the receive waits");
        budget.give(60);
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        assert!(!waiting.is_finished(), "60 of the 100 it needs");
        budget.give(40);
        waiting.await.unwrap();
        assert_eq!(budget.left(), 0);
    }
}
