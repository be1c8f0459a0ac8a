//! Every message received and not yet staged stays invisible on the queue: the batches waiting
//! in the writer's channel as well as the flush being staged. During a long database outage
//! the channel can hold hundreds of messages (more with more receivers); without extensions
//! SQS would hand them to another consumer after the visibility timeout, and this one would
//! then stage stale copies whose deletes fail.
//!
//! Receivers [`Held::hold`] a batch before handing it over; the writer [`Held::release`]s a
//! flush once its staging has committed (a redelivery after that is a counted duplicate, not a
//! loss). One keeper task ([`Held::keep_invisible`]) extends, every tick, each held message
//! whose half-timeout is due. The bookkeeping is plain data, unit-tested with explicit instants.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::retry::Streak;
use crate::sqs::{Queue, Received};

/// Received messages not yet staged, by receipt handle, with when each is next due for an
/// extension.
#[derive(Clone, Default)]
pub(super) struct Held {
    due: Arc<Mutex<HashMap<String, Instant>>>,
}

impl Held {
    /// Holds `batch`, received about `now`: due half a `visibility` later. A message already
    /// held keeps its schedule.
    pub fn hold(&self, batch: &[Received], now: Instant, visibility: Duration) {
        let mut due = self.due.lock().expect("held lock");
        for m in batch {
            due.entry(m.receipt_handle.clone()).or_insert(now + visibility / 2);
        }
    }

    /// Stops holding `batch` (staged: no longer ours to keep).
    pub fn release(&self, batch: &[Received]) {
        let mut due = self.due.lock().expect("held lock");
        for m in batch {
            due.remove(&m.receipt_handle);
        }
    }

    /// How many messages are held.
    pub fn len(&self) -> usize {
        self.due.lock().expect("held lock").len()
    }

    /// Receipt handles due for an extension at `now`.
    fn due_at(&self, now: Instant) -> Vec<String> {
        let due = self.due.lock().expect("held lock");
        due.iter().filter(|(_, at)| **at <= now).map(|(r, _)| r.clone()).collect()
    }

    /// Records that `receipts` were extended at `now` by `visibility`: next due half of it
    /// later. Those released meanwhile stay released.
    fn extended(&self, receipts: &[String], now: Instant, visibility: Duration) {
        let mut due = self.due.lock().expect("held lock");
        for r in receipts {
            if let Some(at) = due.get_mut(r) {
                *at = now + visibility / 2;
            }
        }
    }

    /// Extends every held message whose half-timeout is due, forever (the caller drops it when
    /// the run ends). `in_flight` says how many ChangeMessageVisibilityBatch calls may run at
    /// once: as many as receives can be, so extensions keep up with what receivers bring in. A
    /// queue without a visibility timeout has nothing to keep.
    pub async fn keep_invisible(
        &self,
        queue: &Queue,
        visibility: Duration,
        in_flight: usize,
    ) -> Infallible {
        if visibility < Duration::from_secs(1) {
            return std::future::pending().await;
        }
        let tick = (visibility / 8).clamp(Duration::from_millis(100), Duration::from_secs(5));
        let mut streak = Streak::new(
            "visibility extension",
            "failed; messages may be redelivered",
            "works again",
        );
        loop {
            tokio::time::sleep(tick).await;
            let now = Instant::now();
            let receipts = self.due_at(now);
            if receipts.is_empty() {
                continue;
            }
            match queue.extend_visibility(&receipts, visibility, in_flight).await {
                Ok(refused) => {
                    self.extended(&receipts, now, visibility);
                    streak.ok();
                    match refused {
                        0 => tracing::debug!(
                            messages = receipts.len(),
                            held = self.len(),
                            "visibility extended"
                        ),
                        _ => tracing::warn!(
                            refused,
                            "visibility not extended for some messages; they may be redelivered"
                        ),
                    }
                }
                // Tried again next tick.
                Err(e) => streak.failed(&e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(handles: &[&str]) -> Vec<Received> {
        handles
            .iter()
            .map(|h| Received {
                message_id: format!("id-{h}"),
                receipt_handle: (*h).to_owned(),
                body: String::new(),
                sent_at: None,
                receive_count: None,
            })
            .collect()
    }

    #[test]
    fn held_messages_fall_due_at_half_the_timeout_and_again_after_each_extension() {
        let held = Held::default();
        let visibility = Duration::from_secs(30);
        let t0 = Instant::now();
        held.hold(&batch(&["a", "b"]), t0, visibility);
        held.hold(&batch(&["c"]), t0 + Duration::from_secs(10), visibility);
        assert!(held.due_at(t0 + Duration::from_secs(14)).is_empty());

        let mut due = held.due_at(t0 + Duration::from_secs(15));
        due.sort();
        assert_eq!(due, ["a", "b"], "the first two, not the later one");
        held.extended(&due, t0 + Duration::from_secs(15), visibility);
        assert_eq!(held.due_at(t0 + Duration::from_secs(25)), ["c"]);
        assert_eq!(held.due_at(t0 + Duration::from_secs(30)).len(), 3, "a, b due again");
    }

    #[test]
    fn released_messages_are_never_extended_again() {
        let held = Held::default();
        let visibility = Duration::from_secs(2);
        let t0 = Instant::now();
        held.hold(&batch(&["a", "b", "c"]), t0, visibility);
        held.hold(&batch(&["a"]), t0 + Duration::from_secs(5), visibility);
        assert_eq!(held.len(), 3, "holding twice keeps one entry and its schedule");

        held.release(&batch(&["a", "b"]));
        let due = held.due_at(t0 + Duration::from_secs(1));
        assert_eq!(due, ["c"]);
        held.extended(&["a".to_owned(), "c".to_owned()], t0, visibility);
        assert_eq!(held.len(), 1, "an extension that raced a release does not bring it back");
    }
}
