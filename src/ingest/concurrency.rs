//! How many ReceiveMessage calls are in flight: adaptive by default, so a backlog drains at the
//! rate the queue's latency allows and an idle queue costs one long poll at a time.
//!
//! At real-SQS latency (10-30 ms a call) a consumer drains about
//! `calls in flight × 10 messages / latency`: four receivers cap it near 2,000 messages/s at
//! 20 ms. The [`Controller`] grows the receivers in flight by one for every full batch (the
//! queue has more), shrinks by one for every empty poll (an idle queue falls back to one
//! receiver within one poll per receiver) and by one when the writer's channel is full (the
//! database is the bottleneck, not the queue), and halves on throttling. A pure state machine:
//! the receivers report what each call returned, and it answers with the new target.

use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// What one receive call told us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// A full batch (10 messages): more are waiting.
    Full,
    /// Some messages, fewer than a batch: about the right number of receivers.
    Partial,
    /// Nothing (the long poll ran out).
    Empty,
    /// SQS throttled the call (or answered 5xx).
    Throttled,
    /// The writer's channel was full when a batch was handed over: staging is the bottleneck.
    WriterBehind,
}

/// The number of receive calls that should be in flight.
#[derive(Debug, Clone)]
pub struct Controller {
    target: usize,
    min: usize,
    max: usize,
}

impl Controller {
    /// Adaptive between 1 and `max`, starting at `start` (clamped).
    pub fn adaptive(start: usize, max: usize) -> Self {
        let max = max.max(1);
        Self { target: start.clamp(1, max), min: 1, max }
    }

    /// As `flow` asks: adaptive from `flow.receivers` up to `flow.max_receivers`, or fixed.
    pub fn from_flow(flow: &super::Flow) -> Self {
        match flow.adaptive {
            true => Self::adaptive(flow.receivers, flow.max_receivers),
            false => Self::fixed(flow.receivers),
        }
    }

    /// Always `n` (`--receivers N`).
    pub fn fixed(n: usize) -> Self {
        let n = n.max(1);
        Self { target: n, min: n, max: n }
    }

    /// The most receivers it will ever ask for.
    pub fn max(&self) -> usize {
        self.max
    }

    /// The current target.
    pub fn target(&self) -> usize {
        self.target
    }

    /// Takes one signal; returns the new target when it changed.
    pub fn observe(&mut self, signal: Signal) -> Option<usize> {
        let next = match signal {
            Signal::Full => self.target + 1,
            Signal::Partial => self.target,
            Signal::Empty | Signal::WriterBehind => self.target.saturating_sub(1),
            Signal::Throttled => self.target / 2,
        }
        .clamp(self.min, self.max);
        (next != self.target).then(|| {
            self.target = next;
            next
        })
    }
}

/// The controller, shared by the receivers of one run, and the target they wait on.
#[derive(Clone)]
pub struct Shared {
    controller: Arc<Mutex<Controller>>,
    /// The controller's bound, which never changes.
    max: usize,
    target: Arc<watch::Sender<usize>>,
    /// Set by the first empty poll of a drain: receivers that are not in flight then stop
    /// instead of waiting for more room.
    drained: Arc<watch::Sender<bool>>,
}

impl Shared {
    pub fn new(controller: Controller) -> Self {
        let target = Arc::new(watch::Sender::new(controller.target()));
        crate::metrics::receives_in_flight(controller.target());
        Self {
            max: controller.max(),
            controller: Arc::new(Mutex::new(controller)),
            target,
            drained: Arc::new(watch::Sender::new(false)),
        }
    }

    /// Receivers to start: one per slot the target may ever reach.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Receive calls that should be in flight now.
    pub fn target(&self) -> usize {
        *self.target.borrow()
    }

    /// Reports what a receive call returned.
    pub fn observe(&self, signal: Signal) {
        let changed = self.controller.lock().expect("controller lock").observe(signal);
        if let Some(target) = changed {
            tracing::debug!(receivers = target, ?signal, "receive concurrency changed");
            crate::metrics::receives_in_flight(target);
            self.target.send_replace(target);
        }
    }

    /// A drain found the queue empty.
    pub fn drained(&self) {
        self.drained.send_replace(true);
    }

    /// Waits until receiver `index` may receive (returns true), or the drain has ended
    /// (returns false).
    pub async fn wait_for_room(&self, index: usize) -> bool {
        let mut target = self.target.subscribe();
        let mut drained = self.drained.subscribe();
        tokio::select! {
            _ = target.wait_for(|t| index < *t) => true,
            _ = drained.wait_for(|d| *d) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backlog_grows_receivers_one_per_full_batch_up_to_the_bound() {
        let mut c = Controller::adaptive(4, 8);
        let grown: Vec<_> = (0..6).filter_map(|_| c.observe(Signal::Full)).collect();
        assert_eq!(grown, [5, 6, 7, 8], "one per full batch, never past max");
        assert_eq!(c.observe(Signal::Partial), None, "a partial batch holds");
        assert_eq!(c.target(), 8);
    }

    #[test]
    fn an_idle_queue_falls_back_to_one_receiver() {
        let mut c = Controller::adaptive(4, 32);
        for _ in 0..3 {
            c.observe(Signal::Full);
        }
        let empties = (0..10).take_while(|_| c.observe(Signal::Empty).is_some()).count();
        assert_eq!(empties, 6, "7 receivers: six empty polls bring it to one");
        assert_eq!(c.target(), 1);
        assert_eq!(c.observe(Signal::Empty), None, "never below one");
    }

    #[test]
    fn throttling_halves_and_a_full_channel_backs_off() {
        let mut c = Controller::adaptive(16, 32);
        assert_eq!(c.observe(Signal::Throttled), Some(8));
        assert_eq!(c.observe(Signal::WriterBehind), Some(7));
        let mut one = Controller::adaptive(1, 32);
        assert_eq!(one.observe(Signal::Throttled), None, "never below one");
    }

    #[test]
    fn a_fixed_count_never_moves() {
        let mut c = Controller::fixed(4);
        for s in [Signal::Full, Signal::Empty, Signal::Throttled, Signal::WriterBehind] {
            assert_eq!(c.observe(s), None);
        }
        assert_eq!((c.target(), c.max()), (4, 4));
    }
}
