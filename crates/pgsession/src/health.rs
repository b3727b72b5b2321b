//! What the store knows about its own health: the last health check,
//! recent events (breaker moves, slow checks, resizes), and the summary
//! behind `/health`.

use std::collections::VecDeque;
use std::sync::Mutex;

use time::OffsetDateTime;

use crate::pool::PoolStatus;
use crate::resilience::breaker::BreakerState;

/// The result of one health check (a timed `SELECT 1` through the pool).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct CheckResult {
    /// When it ran.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// How long it took, in milliseconds.
    pub latency_ms: f64,
    /// Whether it succeeded within the threshold's bounds.
    pub ok: bool,
}

/// Overall state, as `/health` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    /// Ready, breaker closed, last check fine.
    Ok,
    /// Serving, but from the fallback, or not yet ready, or checks fail.
    Degraded,
    /// Closed.
    Down,
}

/// The journal's part of the health report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct JournalHealth {
    /// Sessions with writes waiting to be written back.
    pub entries: usize,
}

/// Everything `/health` shows.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StoreHealth {
    /// Summary.
    pub status: HealthStatus,
    /// Whether the table is known to exist.
    pub ready: bool,
    /// The circuit breaker.
    pub breaker: BreakerState,
    /// The pool.
    pub pool: PoolStatus,
    /// The last health check, if one ran.
    pub last_check: Option<CheckResult>,
    /// The journal.
    pub journal: JournalHealth,
}

/// Something an operator would want to see on the dashboard.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Event {
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Short kind: `breaker`, `slow_check`, `check_failed`, `pool_resized`, `spool`.
    pub kind: &'static str,
    /// What happened, for a person.
    pub message: String,
}

/// Recent events, newest last, at most [`Events::CAPACITY`].
#[derive(Debug, Default)]
pub(crate) struct Events {
    events: Mutex<VecDeque<Event>>,
    last_check: Mutex<Option<CheckResult>>,
}

impl Events {
    pub(crate) const CAPACITY: usize = 100;

    pub(crate) fn push(&self, kind: &'static str, message: String) {
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if events.len() == Self::CAPACITY {
            events.pop_front();
        }
        events.push_back(Event {
            at: OffsetDateTime::now_utc(),
            kind,
            message,
        });
    }

    pub(crate) fn recent(&self) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    pub(crate) fn set_check(&self, check: CheckResult) {
        *self.last_check.lock().unwrap_or_else(|p| p.into_inner()) = Some(check);
    }

    pub(crate) fn last_check(&self) -> Option<CheckResult> {
        *self.last_check.lock().unwrap_or_else(|p| p.into_inner())
    }
}
