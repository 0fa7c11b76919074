//! Rate-limited logging for per-frame events, so a hostile guest cannot flood the log.

use std::time::{Duration, Instant};

use crate::stats::DropReason;

/// At most one line per `INTERVAL`; suppressed lines are counted and reported with the next one.
const INTERVAL: Duration = Duration::from_secs(1);

/// A per-worker log limiter.
#[derive(Default)]
pub struct Limiter {
    next: Option<Instant>,
    suppressed: u64,
}

impl Limiter {
    fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.next.is_some_and(|n| now < n) {
            self.suppressed += 1;
            return None;
        }
        self.next = Some(now + INTERVAL);
        Some(std::mem::take(&mut self.suppressed))
    }

    /// Logs a dropped frame.
    pub fn drop(&mut self, dir: &str, reason: DropReason) {
        if let Some(suppressed) = self.allow() {
            tracing::warn!(dir, reason = reason.name(), suppressed, "dropped frame");
        }
    }

    /// Logs a host port error.
    pub fn warn(&mut self, dir: &str, err: &std::io::Error) {
        if let Some(suppressed) = self.allow() {
            tracing::warn!(dir, error = %err, suppressed, "host port error");
        }
    }
}
