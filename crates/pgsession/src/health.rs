//! What the store knows about its own health: the last health check,
//! recent events (breaker moves, slow checks, resizes), and the summary
//! behind `/health`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
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
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct JournalHealth {
    /// Sessions with writes waiting to be written back.
    pub entries: usize,
    /// Bytes those writes take on disk.
    pub bytes: u64,
    /// The limit (`journal_max_bytes`); past it, writes answer 503.
    pub max_bytes: u64,
    /// Whether the fallback serves during outages (`fallback`).
    pub fallback: bool,
    /// The journal directory (`journal_dir`), when the fallback is on.
    pub dir: Option<String>,
    /// Why the journal takes no more writes (a failed write or fsync),
    /// if it does not.
    pub broken: Option<String>,
    /// Write-back conflicts since start (each kept as a dead letter).
    pub conflicts: u64,
    /// Dead letters waiting in the journal directory (`pgsession journal`).
    pub dead_letters: u64,
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
    /// A configuration error the database reported (a certificate that
    /// fails verification, a server refusing TLS, a wrong password or
    /// user, a missing database): the setting to change, then the error.
    /// Cleared when an operation or a health check succeeds; the status is
    /// `degraded` meanwhile.
    pub config_error: Option<String>,
    /// The journal.
    pub journal: JournalHealth,
}

/// The configuration error the database reported last, kept until an
/// operation or a health check succeeds. Every request meets the same
/// error while it lasts: the log says it once, at ERROR with the setting
/// to change, and again only when it changes or comes back after clearing.
#[derive(Debug, Default)]
pub(crate) struct ConfigProblem {
    /// Whether one is set, so that every success need not take the lock.
    set: AtomicBool,
    text: Mutex<Option<String>>,
}

impl ConfigProblem {
    /// Records `error` if it is a configuration error; returns its text
    /// when it is new (not the one already recorded).
    pub(crate) fn report(&self, error: &crate::Error) -> Option<String> {
        let hint = error.config_hint()?;
        let text = if error.kind() == crate::ErrorKind::Config {
            hint.clone()
        } else {
            format!("{hint} ({error})")
        };
        let mut current = self.text.lock().unwrap_or_else(|p| p.into_inner());
        if current.as_deref() == Some(text.as_str()) {
            return None;
        }
        tracing::error!(
            target: "session_store",
            error = %error,
            "configuration error, not an outage (not retried, nothing journaled): {hint}"
        );
        *current = Some(text.clone());
        self.set.store(true, Ordering::Release);
        Some(text)
    }

    /// Forgets the error: an operation reached the database.
    pub(crate) fn clear(&self) {
        if !self.set.load(Ordering::Acquire) {
            return;
        }
        let mut current = self.text.lock().unwrap_or_else(|p| p.into_inner());
        self.set.store(false, Ordering::Release);
        if let Some(text) = current.take() {
            tracing::info!(target: "session_store", "the configuration error is gone: {text}");
        }
    }

    pub(crate) fn get(&self) -> Option<String> {
        if !self.set.load(Ordering::Acquire) {
            return None;
        }
        self.text.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Something an operator would want to see on the dashboard.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Event {
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Short kind: `breaker`, `slow_check`, `check_failed`, `pool_resized`,
    /// `pool_limit`, `config_error`, `journal`, `conflict`, `dead_letter`.
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
