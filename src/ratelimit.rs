//! A rate limiter for log lines that a peer can provoke: a flood of bad clients must not turn
//! into a flood of log lines (the log may live in RAM, e.g. under `/run`).
//!
//! [`RateLimiter::check`] lets through at most `burst` events per interval and counts the ones
//! it holds back; the next event let through carries that count, so the log still says how
//! much happened.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Lets through at most `burst` events per `interval`, counting the rest.
///
/// Shareable between threads and tasks (`&self` methods), and usable in a `static`:
///
/// ```
/// use std::time::Duration;
/// use vhost_pump::ratelimit::RateLimiter;
///
/// static BAD_REQUESTS: RateLimiter = RateLimiter::new(1, Duration::from_secs(10));
///
/// fn on_bad_request(e: &str) {
///     if let Some(suppressed) = BAD_REQUESTS.check() {
///         tracing::warn!(error = e, suppressed, "bad request");
///     }
/// }
/// # on_bad_request("x");
/// ```
#[derive(Debug)]
pub struct RateLimiter {
    burst: u32,
    interval: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// Start of the current interval; none before the first event.
    window: Option<Instant>,
    /// Events let through in the current interval.
    used: u32,
    /// Events held back since the last one let through.
    suppressed: u64,
}

impl RateLimiter {
    /// A limiter letting `burst` events through per `interval` (none at all if `burst` is 0).
    pub const fn new(burst: u32, interval: Duration) -> Self {
        RateLimiter {
            burst,
            interval,
            state: Mutex::new(State {
                window: None,
                used: 0,
                suppressed: 0,
            }),
        }
    }

    /// Records an event. `Some(n)` when it may be logged, `n` being the number of events held
    /// back since the previous one that was let through; `None` when it is held back.
    pub fn check(&self) -> Option<u64> {
        self.check_at(Instant::now())
    }

    /// [`RateLimiter::check`] at time `now` (for tests and callers that have the time already).
    pub fn check_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let expired = s
            .window
            .is_none_or(|start| now.saturating_duration_since(start) >= self.interval);
        if expired {
            s.window = Some(now);
            s.used = 0;
        }
        if s.used < self.burst {
            s.used += 1;
            Some(std::mem::take(&mut s.suppressed))
        } else {
            s.suppressed = s.suppressed.saturating_add(1);
            None
        }
    }

    /// Events held back since the last one let through.
    pub fn suppressed(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .suppressed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lets_burst_through_per_interval_and_reports_the_rest() {
        let l = RateLimiter::new(2, Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(l.check_at(t0), Some(0));
        assert_eq!(l.check_at(t0 + Duration::from_secs(1)), Some(0));
        for i in 0..5 {
            assert_eq!(l.check_at(t0 + Duration::from_secs(2 + i)), None);
        }
        assert_eq!(l.suppressed(), 5);
        // A new interval: the first line carries the count, the second starts from zero.
        assert_eq!(l.check_at(t0 + Duration::from_secs(10)), Some(5));
        assert_eq!(l.check_at(t0 + Duration::from_secs(11)), Some(0));
        assert_eq!(l.check_at(t0 + Duration::from_secs(12)), None);
        // The interval restarts at the first event after a quiet spell, not on a fixed grid.
        assert_eq!(l.check_at(t0 + Duration::from_secs(100)), Some(1));
        assert_eq!(l.check_at(t0 + Duration::from_secs(109)), Some(0));
        assert_eq!(l.check_at(t0 + Duration::from_secs(109)), None);
    }

    #[test]
    fn zero_burst_holds_everything_back_and_time_going_backwards_is_harmless() {
        let l = RateLimiter::new(0, Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(l.check_at(t0), None);
        assert_eq!(l.check_at(t0 + Duration::from_secs(5)), None);
        assert_eq!(l.suppressed(), 2);

        let l = RateLimiter::new(1, Duration::from_secs(1));
        let later = t0 + Duration::from_secs(5);
        assert_eq!(l.check_at(later), Some(0));
        assert_eq!(l.check_at(t0), None);
    }

    #[test]
    fn shared_between_threads() {
        static L: RateLimiter = RateLimiter::new(1, Duration::from_secs(3600));
        let passed: u64 = (0..4)
            .map(|_| std::thread::spawn(|| (0..100).filter(|_| L.check().is_some()).count() as u64))
            .map(|t| t.join().unwrap())
            .sum();
        assert_eq!(passed, 1);
        assert_eq!(L.suppressed(), 399);
    }
}
