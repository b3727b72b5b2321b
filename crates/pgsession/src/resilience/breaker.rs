//! The circuit breaker: closed, open, half-open with one probe.
//!
//! It opens after `threshold` transient failures in a row, so that requests
//! stop waiting for timeouts and use the fallback instead. After a
//! cool-down (doubling after each failed probe, up to a ceiling) one probe
//! may go through; the store closes the breaker once the probe succeeded
//! and the journal is written back.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The breaker's position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Operations go to the database.
    Closed,
    /// One probe is allowed; operations still use the fallback.
    HalfOpen,
    /// The database is considered away; operations use the fallback.
    Open,
}

impl BreakerState {
    /// The value of the `pgsession_breaker_state` gauge: 0, 1 or 2.
    pub fn gauge(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 1.0,
            BreakerState::Open => 2.0,
        }
    }

    /// `closed`, `half_open` or `open`.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::HalfOpen => "half_open",
            BreakerState::Open => "open",
        }
    }
}

/// Thresholds of the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BreakerSettings {
    pub(crate) threshold: u32,
    pub(crate) cool_down: Duration,
    pub(crate) max_cool_down: Duration,
}

#[derive(Debug)]
pub(crate) struct Breaker {
    settings: BreakerSettings,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: BreakerState,
    failures: u32,
    opened_at: Instant,
    cool_down: Duration,
}

/// A change of state, for logs, metrics and the dashboard's events.
pub(crate) type Transition = Option<(BreakerState, BreakerState)>;

impl Breaker {
    pub(crate) fn new(settings: BreakerSettings) -> Breaker {
        Breaker {
            settings,
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                failures: 0,
                opened_at: Instant::now(),
                cool_down: settings.cool_down,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every update is a few field writes; a panic cannot leave it torn.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn state(&self) -> BreakerState {
        self.lock().state
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.state() == BreakerState::Closed
    }

    /// An operation reached the database.
    pub(crate) fn record_success(&self) {
        let mut inner = self.lock();
        if inner.state == BreakerState::Closed {
            inner.failures = 0;
        }
    }

    /// An operation failed with a transient error. Opens the breaker at the
    /// threshold.
    pub(crate) fn record_failure(&self, now: Instant) -> Transition {
        let mut inner = self.lock();
        match inner.state {
            BreakerState::Closed => {
                inner.failures += 1;
                if inner.failures >= self.settings.threshold {
                    inner.state = BreakerState::Open;
                    inner.opened_at = now;
                    inner.cool_down = self.settings.cool_down;
                    return Some((BreakerState::Closed, BreakerState::Open));
                }
                None
            }
            // Failures of the fallback period itself change nothing.
            BreakerState::Open | BreakerState::HalfOpen => None,
        }
    }

    /// Whether the cool-down has passed; if so the breaker becomes half-open
    /// and the caller holds the one probe.
    pub(crate) fn try_probe(&self, now: Instant) -> Transition {
        let mut inner = self.lock();
        if inner.state == BreakerState::Open && now >= inner.opened_at + inner.cool_down {
            inner.state = BreakerState::HalfOpen;
            return Some((BreakerState::Open, BreakerState::HalfOpen));
        }
        None
    }

    /// The probe (or the write-back after it) failed: open again, with a
    /// longer cool-down.
    pub(crate) fn probe_failed(&self, now: Instant) -> Transition {
        let mut inner = self.lock();
        if inner.state != BreakerState::HalfOpen {
            return None;
        }
        inner.state = BreakerState::Open;
        inner.opened_at = now;
        inner.cool_down = (inner.cool_down * 2).min(self.settings.max_cool_down);
        Some((BreakerState::HalfOpen, BreakerState::Open))
    }

    /// The probe succeeded and nothing is left to write back: close.
    pub(crate) fn close(&self) -> Transition {
        let mut inner = self.lock();
        if inner.state == BreakerState::Closed {
            return None;
        }
        let from = inner.state;
        inner.state = BreakerState::Closed;
        inner.failures = 0;
        inner.cool_down = self.settings.cool_down;
        Some((from, BreakerState::Closed))
    }

    /// Opens at once (tests start from an open breaker this way).
    #[cfg(test)]
    pub(crate) fn trip(&self, now: Instant) -> Transition {
        let mut inner = self.lock();
        if inner.state != BreakerState::Closed {
            return None;
        }
        inner.state = BreakerState::Open;
        inner.opened_at = now;
        inner.cool_down = self.settings.cool_down;
        Some((BreakerState::Closed, BreakerState::Open))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(BreakerSettings {
            threshold: 3,
            cool_down: Duration::from_secs(1),
            max_cool_down: Duration::from_secs(4),
        })
    }

    #[test]
    fn opens_after_the_threshold_of_failures_in_a_row() {
        let b = breaker();
        let t = Instant::now();
        assert_eq!(b.record_failure(t), None);
        assert_eq!(b.record_failure(t), None);
        b.record_success(); // the run is broken
        assert_eq!(b.record_failure(t), None);
        assert_eq!(b.record_failure(t), None);
        assert_eq!(
            b.record_failure(t),
            Some((BreakerState::Closed, BreakerState::Open))
        );
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn one_probe_after_the_cool_down_which_grows_with_each_failure() {
        let b = breaker();
        let t0 = Instant::now();
        b.trip(t0);
        assert_eq!(b.try_probe(t0 + Duration::from_millis(999)), None);
        assert_eq!(
            b.try_probe(t0 + Duration::from_secs(1)),
            Some((BreakerState::Open, BreakerState::HalfOpen))
        );
        assert_eq!(
            b.try_probe(t0 + Duration::from_secs(1)),
            None,
            "only one probe at a time"
        );

        let t1 = t0 + Duration::from_secs(1);
        assert!(b.probe_failed(t1).is_some());
        assert_eq!(
            b.try_probe(t1 + Duration::from_millis(1999)),
            None,
            "cool-down doubled to 2 s"
        );
        assert!(b.try_probe(t1 + Duration::from_secs(2)).is_some());

        let t2 = t1 + Duration::from_secs(2);
        b.probe_failed(t2);
        b.try_probe(t2 + Duration::from_secs(4));
        let t3 = t2 + Duration::from_secs(4);
        b.probe_failed(t3);
        assert!(
            b.try_probe(t3 + Duration::from_secs(4)).is_some(),
            "capped at the ceiling of 4 s"
        );
    }

    #[test]
    fn a_successful_probe_closes_and_resets() {
        let b = breaker();
        let t = Instant::now();
        b.trip(t);
        b.try_probe(t + Duration::from_secs(1));
        assert_eq!(
            b.close(),
            Some((BreakerState::HalfOpen, BreakerState::Closed))
        );
        assert!(b.is_closed());
        // The failure count starts again from zero.
        assert_eq!(b.record_failure(t), None);
        assert_eq!(b.record_failure(t), None);
        assert!(b.record_failure(t).is_some());
    }

    #[test]
    fn failures_while_open_change_nothing() {
        let b = breaker();
        let t = Instant::now();
        b.trip(t);
        assert_eq!(b.record_failure(t), None);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.probe_failed(t), None, "no probe was out");
    }
}
