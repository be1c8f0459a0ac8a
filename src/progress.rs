//! A progress line on a terminal while a long job runs (draining a backlog, purging): how many
//! done, the rate, and how many are left when the caller knows (a queue's depth is read every
//! [`DEPTH_REFRESH`]). Nothing at all when stderr is not a terminal.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often the queue's own depth is re-read (the count in between is an estimate).
pub const DEPTH_REFRESH: Duration = Duration::from_secs(2);

pub struct Progress {
    bar: ProgressBar,
    /// What is counted, e.g. "messages staged and deleted".
    what: &'static str,
    started: Instant,
    depth_read_at: Mutex<Instant>,
}

impl Progress {
    /// A progress line on stderr counting `what`, or `None` when stderr is not a terminal.
    pub fn on_terminal(what: &'static str) -> Option<Self> {
        std::io::stderr().is_terminal().then(|| Self::new(what))
    }

    fn new(what: &'static str) -> Self {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(ProgressStyle::with_template("{spinner} {msg}").expect("a valid template"));
        bar.enable_steady_tick(Duration::from_millis(200));
        Self {
            bar,
            what,
            started: Instant::now(),
            depth_read_at: Mutex::new(Instant::now() - DEPTH_REFRESH),
        }
    }

    /// True once every [`DEPTH_REFRESH`]: time to read the queue's depth for [`advance`].
    ///
    /// [`advance`]: Progress::advance
    pub fn depth_due(&self) -> bool {
        let mut at = self.depth_read_at.lock().expect("progress lock");
        let due = at.elapsed() >= DEPTH_REFRESH;
        if due {
            *at = Instant::now();
        }
        due
    }

    /// Records `n` more done, and `left` (on the queue, or to do) when it was just read.
    pub fn advance(&self, n: u64, left: Option<u64>) {
        self.bar.inc(n);
        if let Some(left) = left {
            self.bar.set_length(self.bar.position() + left);
        }
        let done = self.bar.position();
        let rate = done as f64 / self.started.elapsed().as_secs_f64().max(0.001);
        let left = self
            .bar
            .length()
            .map_or_else(String::new, |len| format!(", ~{} left", len.saturating_sub(done)));
        self.bar.set_message(format!("{done} {}, {rate:.0}/s{left}", self.what));
    }

    /// Removes the line (the summary line follows on stdout).
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
