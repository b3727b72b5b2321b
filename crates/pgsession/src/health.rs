//! What the store knows about its own health: the latest evidence about
//! the database (every contact counts: health checks, the breaker's probes,
//! operations), recent events and the incident timeline they fold into
//! (breaker moves, slow checks, resizes, write-backs, conflicts), and the
//! summary behind `/health`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use time::OffsetDateTime;

use crate::pool::PoolStatus;
use crate::resilience::breaker::BreakerState;

/// The latest evidence about the database: the last contact with it, be
/// it a health check, a probe of the circuit breaker or an operation.
///
/// A success is `ok`; a failure (or a health check or probe slower than
/// the slow-check threshold) is not, and says since when the database has
/// been failing. Contacts that have had no answer for longer than the
/// slow-check threshold are evidence too (`source` `pending`, `error`
/// `no_answer`): an old success never stands while the database is silent.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct CheckResult {
    /// When it was seen.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// How long the contact took (or has waited), in milliseconds.
    pub latency_ms: f64,
    /// Whether it succeeded within the threshold's bounds.
    pub ok: bool,
    /// What the evidence is.
    pub source: CheckSource,
    /// Why it is not ok: the error's kind (`connect`, `timeout`, `closed`,
    /// `database`, `config`...), `slow`, or `no_answer`; `None` when ok.
    pub error: Option<&'static str>,
    /// When the database started failing: the first failing evidence since
    /// the last good one; `None` when ok.
    #[serde(with = "time::serde::rfc3339::option")]
    pub failing_since: Option<OffsetDateTime>,
    /// Failing evidence in a row (0 when ok).
    pub failures: u32,
}

/// Where a piece of health evidence comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckSource {
    /// The health check run every health-check interval.
    Check,
    /// The circuit breaker's probe, while it is open.
    Probe,
    /// A store operation (or the journal's write-back) that reached the
    /// database.
    Operation,
    /// Contacts under way with no answer yet.
    Pending,
}

impl CheckSource {
    fn from_u8(n: u8) -> CheckSource {
        match n {
            0 => CheckSource::Check,
            1 => CheckSource::Probe,
            2 => CheckSource::Operation,
            _ => CheckSource::Pending,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            CheckSource::Check => 0,
            CheckSource::Probe => 1,
            CheckSource::Operation => 2,
            CheckSource::Pending => 3,
        }
    }
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
    /// The latest evidence about the database (a health check, a probe or
    /// an operation), if there is any yet.
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

/// One entry of the incident timeline: events folded into the story an
/// operator reads. An outage is one entry (the breaker open until it
/// closes), the breaker's probes another ("6 failed probes"), a write-back
/// of the journal one with its progress; repeated events of one kind
/// within a minute are one entry with their count.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TimelineEntry {
    /// `outage`, `probing`, `write_back`, or the kind of the events folded
    /// (`conflict`, `dead_letter`, `check_failed`, `slow_check`,
    /// `pool_resized`, `pool_limit`, `config_error`, `journal`, `breaker`).
    pub kind: &'static str,
    /// What happened, folded, for a person.
    pub title: String,
    /// The latest event folded in, as it was logged.
    pub detail: String,
    /// The first event.
    #[serde(with = "time::serde::rfc3339")]
    pub start: OffsetDateTime,
    /// The latest event folded in.
    #[serde(with = "time::serde::rfc3339")]
    pub last: OffsetDateTime,
    /// When it ended: an outage when the breaker closed, a write-back when
    /// the journal was empty, other entries at their latest event. `None`
    /// while it goes on.
    #[serde(with = "time::serde::rfc3339::option")]
    pub end: Option<OffsetDateTime>,
    /// `end - start` in seconds, once ended.
    pub duration_s: Option<f64>,
    /// Events folded in (for `probing`: failed probes).
    pub count: u64,
    /// The command that says more, e.g. `pgsession journal list` for a
    /// conflict or a dead letter.
    pub hint: Option<&'static str>,
    /// How far a write-back is.
    pub progress: Option<WriteBackProgress>,
}

/// A write-back's progress, summed over its passes.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct WriteBackProgress {
    /// Journal entries handled (written back or set aside) so far.
    pub written: u64,
    /// Entries still in the journal.
    pub left: u64,
    /// Entries per second while writing back, once measurable (a pass
    /// under a tenth of a second says none).
    pub rate: Option<f64>,
    /// Seconds to go at that rate, while entries are left.
    pub eta_s: Option<f64>,
}

/// What `pgsession journal list` shows: where conflicts and dead letters
/// are explained.
const JOURNAL_HINT: &str = "pgsession journal list";

/// Recent events, newest last, at most [`Events::CAPACITY`]; the timeline
/// they fold into, at most [`Timeline::CAPACITY`] entries; and the latest
/// evidence about the database.
#[derive(Debug, Default)]
pub(crate) struct Events {
    events: Mutex<VecDeque<Event>>,
    timeline: Mutex<Timeline>,
    evidence: Evidence,
}

impl Events {
    pub(crate) const CAPACITY: usize = 100;

    pub(crate) fn push(&self, kind: &'static str, message: String) {
        self.push_folded(kind, message, |timeline, message, at| {
            timeline.fold(kind, message, at)
        });
    }

    /// A move of the circuit breaker: folded into the outage it opens or
    /// closes, from the states themselves (not from the message's text).
    pub(crate) fn breaker_moved(&self, from: BreakerState, to: BreakerState, message: String) {
        self.push_folded("breaker", message, |timeline, message, at| {
            timeline.breaker(from.as_str(), to.as_str(), message, at)
        });
    }

    /// One pass (or part of one) of the journal's write-back: summed into
    /// the write-back's entry.
    pub(crate) fn write_back(&self, pass: WriteBackPass, message: String) {
        self.push_folded("journal", message, |timeline, message, at| {
            timeline.write_back(pass, message, at)
        });
    }

    fn push_folded(
        &self,
        kind: &'static str,
        message: String,
        fold: impl FnOnce(&mut Timeline, &str, OffsetDateTime),
    ) {
        let at = OffsetDateTime::now_utc();
        fold(
            &mut self.timeline.lock().unwrap_or_else(|p| p.into_inner()),
            &message,
            at,
        );
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if events.len() == Self::CAPACITY {
            events.pop_front();
        }
        events.push_back(Event { at, kind, message });
    }

    pub(crate) fn recent(&self) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// The incident timeline, oldest first.
    pub(crate) fn timeline(&self) -> Vec<TimelineEntry> {
        self.timeline
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entries
            .iter()
            .map(|(_, entry)| entry.clone())
            .collect()
    }

    /// The latest evidence about the database (see [`CheckResult`]).
    pub(crate) fn last_check(&self) -> Option<CheckResult> {
        self.evidence.latest(OffsetDateTime::now_utc())
    }

    /// An operation `op` begins: a contact (see [`Events::contact`]),
    /// except the health check's own follow-up statements (`op` `health`),
    /// which the check's result speaks for.
    pub(crate) fn operation(&self, op: &'static str, slow_after: Duration) -> Operation<'_> {
        Operation((op != "health").then(|| self.contact(CheckSource::Operation, slow_after)))
    }

    /// A contact with the database begins: its outcome is evidence, and
    /// while it waits for an answer it counts as pending. `slow_after`: a
    /// check or probe slower than this is not ok, and contacts unanswered
    /// for longer are evidence that the database is silent.
    pub(crate) fn contact(&self, source: CheckSource, slow_after: Duration) -> Contact<'_> {
        let evidence = &self.evidence;
        let slow_ms = slow_after.as_millis().min(i64::MAX as u128) as i64;
        if evidence.silent_after_ms.load(Ordering::Relaxed) != slow_ms {
            evidence.silent_after_ms.store(slow_ms, Ordering::Relaxed);
        }
        if evidence.in_flight.fetch_add(1, Ordering::AcqRel) == 0 {
            evidence
                .busy_since_ms
                .store(unix_ms(OffsetDateTime::now_utc()), Ordering::Relaxed);
        }
        Contact {
            evidence,
            source,
            started: Instant::now(),
            slow_after,
        }
    }
}

/// An operation's contact with the database (see [`Events::operation`]).
#[derive(Debug)]
pub(crate) struct Operation<'a>(Option<Contact<'a>>);

impl Operation<'_> {
    /// The database answered.
    pub(crate) fn ok(&self) {
        if let Some(contact) = &self.0 {
            contact.ok();
        }
    }

    /// An attempt failed (see [`Contact::failed`]).
    pub(crate) fn failed(&self, error: &crate::Error) {
        if let Some(contact) = &self.0 {
            contact.failed(error);
        }
    }
}

/// One contact with the database under way (see [`Events::contact`]).
#[derive(Debug)]
pub(crate) struct Contact<'a> {
    evidence: &'a Evidence,
    source: CheckSource,
    started: Instant,
    slow_after: Duration,
}

impl Contact<'_> {
    /// The database answered.
    pub(crate) fn ok(&self) {
        self.evidence.record_ok(
            self.source,
            self.started.elapsed(),
            OffsetDateTime::now_utc(),
        );
    }

    /// An attempt of an operation failed. Only a failure that says
    /// something of the database counts: it was away or silent
    /// ([`crate::Error::is_outage`], a timeout), or refused the
    /// configuration. A refusal by the open breaker, a saturated pool or a
    /// closed store never reached it; an error the server answered with
    /// shows it up, and counts as an answer only.
    pub(crate) fn failed(&self, error: &crate::Error) {
        // By the kinds' labels (as in `pgsession_errors_total`).
        let kind = error.kind().as_str();
        let now = OffsetDateTime::now_utc();
        match kind {
            "unavailable" | "acquire" | "store_closed" | "too_large" | "journal" => {}
            _ if matches!(kind, "timeout" | "connect" | "closed" | "config")
                || error.is_outage()
                || error.config_hint().is_some() =>
            {
                self.evidence
                    .record_failure(self.source, self.started.elapsed(), kind, now);
            }
            _ => {
                self.evidence
                    .answered_ms
                    .fetch_max(unix_ms(now), Ordering::Relaxed);
            }
        }
    }

    /// A health check or probe ended with `error` (or none): any failure
    /// counts, and so does a success slower than the slow-check threshold.
    pub(crate) fn finish(self, error: Option<&crate::Error>) -> CheckResult {
        let latency = self.started.elapsed();
        let now = OffsetDateTime::now_utc();
        match error {
            Some(e) => self
                .evidence
                .record_failure(self.source, latency, e.kind().as_str(), now),
            None if latency > self.slow_after => {
                self.evidence
                    .record_failure(self.source, latency, "slow", now)
            }
            None => self.evidence.record_ok(self.source, latency, now),
        }
    }
}

impl Drop for Contact<'_> {
    fn drop(&mut self) {
        self.evidence.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The evidence behind [`Events::last_check`]. A success costs a few
/// atomic operations (operations report every one); the lock is taken for
/// failures, and for the first success after them.
#[derive(Debug, Default)]
struct Evidence {
    /// The latest success: Unix ms (0: none), latency in µs, source.
    ok_at_ms: AtomicI64,
    ok_latency_us: AtomicU64,
    ok_source: AtomicU8,
    /// Whether failures were recorded since the latest success.
    failing: AtomicBool,
    failed: Mutex<Failing>,
    /// Contacts under way.
    in_flight: AtomicUsize,
    /// When `in_flight` last left 0 (Unix ms).
    busy_since_ms: AtomicI64,
    /// The latest answer of the database, good or bad (Unix ms).
    answered_ms: AtomicI64,
    /// How long contacts may wait for an answer before that silence is
    /// evidence (the slow-check threshold, in ms).
    silent_after_ms: AtomicI64,
}

#[derive(Debug, Default)]
struct Failing {
    last: Option<CheckResult>,
    since: Option<OffsetDateTime>,
    count: u32,
}

impl Evidence {
    fn record_ok(&self, source: CheckSource, latency: Duration, at: OffsetDateTime) -> CheckResult {
        let ms = unix_ms(at);
        self.answered_ms.fetch_max(ms, Ordering::Relaxed);
        // Under load many operations end within the same millisecond: one
        // of them writes.
        if self.ok_at_ms.load(Ordering::Relaxed) < ms {
            self.ok_at_ms.store(ms, Ordering::Relaxed);
            self.ok_latency_us
                .store(latency.as_micros() as u64, Ordering::Relaxed);
            self.ok_source.store(source.as_u8(), Ordering::Relaxed);
        }
        if self.failing.load(Ordering::Acquire) {
            let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
            if failed.last.is_none_or(|last| last.at <= at) {
                *failed = Failing::default();
                self.failing.store(false, Ordering::Release);
            }
        }
        CheckResult {
            at,
            latency_ms: latency.as_secs_f64() * 1000.0,
            ok: true,
            source,
            error: None,
            failing_since: None,
            failures: 0,
        }
    }

    fn record_failure(
        &self,
        source: CheckSource,
        latency: Duration,
        error: &'static str,
        at: OffsetDateTime,
    ) -> CheckResult {
        self.answered_ms.fetch_max(unix_ms(at), Ordering::Relaxed);
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        let since = *failed.since.get_or_insert(at);
        failed.count = failed.count.saturating_add(1);
        let result = CheckResult {
            at,
            latency_ms: latency.as_secs_f64() * 1000.0,
            ok: false,
            source,
            error: Some(error),
            failing_since: Some(since),
            failures: failed.count,
        };
        failed.last = Some(result);
        self.failing.store(true, Ordering::Release);
        result
    }

    /// The latest of the latest success and the latest failure; a success
    /// gives way to silence: contacts waiting longer than the threshold
    /// with no answer meanwhile.
    fn latest(&self, now: OffsetDateTime) -> Option<CheckResult> {
        let ok_ms = self.ok_at_ms.load(Ordering::Relaxed);
        let ok = (ok_ms > 0).then(|| CheckResult {
            at: from_unix_ms(ok_ms),
            latency_ms: self.ok_latency_us.load(Ordering::Relaxed) as f64 / 1000.0,
            ok: true,
            source: CheckSource::from_u8(self.ok_source.load(Ordering::Relaxed)),
            error: None,
            failing_since: None,
            failures: 0,
        });
        let failed = if self.failing.load(Ordering::Acquire) {
            self.failed.lock().unwrap_or_else(|p| p.into_inner()).last
        } else {
            None
        };
        let latest = match (ok, failed) {
            (Some(ok), Some(failed)) if ok.at > failed.at => Some(ok),
            (ok, failed) => failed.or(ok),
        };
        if latest.is_some_and(|c| !c.ok) || self.in_flight.load(Ordering::Acquire) == 0 {
            return latest;
        }
        let waiting_since = self
            .busy_since_ms
            .load(Ordering::Relaxed)
            .max(self.answered_ms.load(Ordering::Relaxed));
        let silent = unix_ms(now) - waiting_since;
        if silent <= self.silent_after_ms.load(Ordering::Relaxed) {
            return latest;
        }
        Some(CheckResult {
            at: now,
            latency_ms: silent as f64,
            ok: false,
            source: CheckSource::Pending,
            error: Some("no_answer"),
            failing_since: Some(from_unix_ms(waiting_since)),
            failures: 0,
        })
    }
}

fn unix_ms(at: OffsetDateTime) -> i64 {
    (at.unix_timestamp_nanos() / 1_000_000) as i64
}

fn from_unix_ms(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

// ---------------------------------------------------------------------------
// The incident timeline
// ---------------------------------------------------------------------------

/// Events folded into incident entries as they come.
#[derive(Debug, Default)]
struct Timeline {
    /// Each entry with its number, oldest first.
    entries: VecDeque<(u64, TimelineEntry)>,
    next: u64,
    /// The outage under way, and the probing within it.
    outage: Option<u64>,
    probing: Option<u64>,
    /// The latest write-back, and its sums.
    write_back: Option<(u64, WriteBackSums)>,
}

#[derive(Debug, Default, Clone, Copy)]
struct WriteBackSums {
    written: u64,
    passes: u64,
    /// Seconds spent writing back, summed over the passes.
    busy_s: f64,
}

/// Repeated events of one kind within this long of each other are folded.
const FOLD_GAP: time::Duration = time::Duration::seconds(60);

impl Timeline {
    /// Entries kept: at most this many, the oldest dropped first. Each
    /// holds two messages (a few hundred bytes), so the whole is bounded by
    /// some tens of KiB.
    const CAPACITY: usize = 100;

    fn get(&mut self, id: Option<u64>) -> Option<&mut TimelineEntry> {
        let id = id?;
        self.entries
            .iter_mut()
            .rev()
            .find(|(n, _)| *n == id)
            .map(|(_, entry)| entry)
    }

    fn add(&mut self, entry: TimelineEntry) -> u64 {
        if self.entries.len() == Self::CAPACITY {
            self.entries.pop_front();
        }
        let id = self.next;
        self.next += 1;
        self.entries.push_back((id, entry));
        id
    }

    /// Any other event: folded with the same kind's repeats.
    fn fold(&mut self, kind: &'static str, message: &str, at: OffsetDateTime) {
        self.repeated(kind, message, at);
    }

    fn breaker(&mut self, from: &str, to: &str, message: &str, at: OffsetDateTime) {
        match (from, to) {
            (_, "open") | (_, "half_open") if self.get(self.outage).is_none() => {
                let id = self.add(TimelineEntry {
                    title: "outage: the database is away; the breaker is open and the fallback \
                            serves"
                        .to_owned(),
                    end: None,
                    hint: None,
                    ..single("outage", message, at)
                });
                self.outage = Some(id);
                self.probing = None;
                if to == "half_open" {
                    self.breaker(from, to, message, at);
                }
            }
            ("open", "half_open") => {
                if let Some(probing) = self.get(self.probing) {
                    probing.last = at;
                    probing.detail = message.to_owned();
                } else {
                    let id = self.add(TimelineEntry {
                        title: "breaker probing: 0 failed probes".to_owned(),
                        count: 0,
                        end: None,
                        ..single("probing", message, at)
                    });
                    self.probing = Some(id);
                }
                if let Some(outage) = self.get(self.outage) {
                    outage.last = at;
                    outage.count += 1;
                }
            }
            ("half_open", "open") => {
                if let Some(probing) = self.get(self.probing) {
                    probing.count += 1;
                    probing.last = at;
                    probing.detail = message.to_owned();
                    probing.title = format!("breaker probing: {}", probes(probing.count));
                }
                if let Some(outage) = self.get(self.outage) {
                    outage.last = at;
                    outage.count += 1;
                }
            }
            (_, "closed") => {
                if let Some(probing) = self.get(self.probing) {
                    probing.last = at;
                    probing.detail = message.to_owned();
                    end(probing, at);
                    probing.title = format!(
                        "breaker probing: {}, then the database answered",
                        probes(probing.count)
                    );
                }
                if let Some(outage) = self.get(self.outage) {
                    outage.last = at;
                    outage.count += 1;
                    outage.detail = message.to_owned();
                    end(outage, at);
                    outage.title = format!(
                        "outage: the database was away for {} (breaker open, the fallback served)",
                        human_secs(outage.duration_s.unwrap_or(0.0))
                    );
                }
                self.outage = None;
                self.probing = None;
            }
            _ => self.repeated("breaker", message, at),
        }
    }

    fn write_back(&mut self, pass: WriteBackPass, message: &str, at: OffsetDateTime) {
        let outage_start = self.get(self.outage).map(|o| o.start);
        let current = self.write_back.filter(|(id, _)| {
            self.entries.iter().rev().any(|(n, e)| {
                *n == *id
                    && (e.end.is_none() || at - e.last <= FOLD_GAP)
                    && outage_start.is_none_or(|s| s <= e.start)
            })
        });
        let (id, mut sums) = match current {
            Some(found) => found,
            None => {
                let id = self.add(TimelineEntry {
                    end: None,
                    count: 0,
                    ..single("write_back", message, at)
                });
                (id, WriteBackSums::default())
            }
        };
        sums.written += pass.done;
        sums.passes += 1;
        sums.busy_s += pass.secs;
        self.write_back = Some((id, sums));
        let Some(entry) = self.get(Some(id)) else {
            return;
        };
        entry.count = sums.passes;
        entry.last = at;
        entry.detail = message.to_owned();
        let rate = if sums.busy_s >= 0.1 {
            Some(sums.written as f64 / sums.busy_s)
        } else {
            pass.rate
        }
        .filter(|r| *r > 0.0);
        let left = pass.left;
        let eta_s = rate.filter(|_| left > 0).map(|rate| left as f64 / rate);
        entry.progress = Some(WriteBackProgress {
            written: sums.written,
            left,
            rate,
            eta_s,
        });
        let passes = match sums.passes {
            1 => "1 pass".to_owned(),
            n => format!("{n} passes"),
        };
        let speed = match rate {
            Some(rate) => format!("{rate:.0}/s"),
            None => "in under 0.1 s".to_owned(),
        };
        if left == 0 {
            end(entry, at);
            entry.title = format!(
                "journal written back: {} in {passes}, {speed}; the journal is empty",
                entries(sums.written),
            );
        } else {
            entry.end = None;
            entry.duration_s = None;
            let to_go = match eta_s {
                Some(eta) => format!("about {} to go", human_secs(eta)),
                None => "no rate yet".to_owned(),
            };
            entry.title = format!(
                "journal write-back: {} written back, {left} left, {speed}, {to_go}",
                entries(sums.written),
            );
        }
    }

    /// Folds an event into the latest entry of its kind if that one is
    /// recent, else starts one.
    fn repeated(&mut self, kind: &'static str, message: &str, at: OffsetDateTime) {
        let recent = self
            .entries
            .iter_mut()
            .rev()
            .map(|(_, e)| e)
            .find(|e| e.kind == kind)
            .filter(|e| at - e.last <= FOLD_GAP);
        match recent {
            Some(entry) => {
                entry.count += 1;
                entry.last = at;
                entry.detail = message.to_owned();
                end(entry, at);
                entry.title = folded_title(kind, entry.count, message);
            }
            None => {
                self.add(single(kind, message, at));
            }
        }
    }
}

/// An entry for one event.
fn single(kind: &'static str, message: &str, at: OffsetDateTime) -> TimelineEntry {
    TimelineEntry {
        kind,
        title: folded_title(kind, 1, message),
        detail: message.to_owned(),
        start: at,
        last: at,
        end: Some(at),
        duration_s: Some(0.0),
        count: 1,
        hint: matches!(kind, "conflict" | "dead_letter").then_some(JOURNAL_HINT),
        progress: None,
    }
}

fn end(entry: &mut TimelineEntry, at: OffsetDateTime) {
    entry.end = Some(at);
    entry.duration_s = Some((at - entry.start).as_seconds_f64().max(0.0));
}

fn folded_title(kind: &str, count: u64, message: &str) -> String {
    // The hint says it on its own line.
    let message = message
        .strip_suffix(" (see `pgsession journal list`)")
        .unwrap_or(message);
    if count <= 1 {
        return message.to_owned();
    }
    let latest = |prefix: &str| message.strip_prefix(prefix).unwrap_or(message).to_owned();
    match kind {
        "check_failed" => format!(
            "{count} failed health checks; latest: {}",
            latest("health check failed: ")
        ),
        "slow_check" => format!(
            "{count} slow health checks; latest: {}",
            latest("health check ")
        ),
        "pool_resized" => format!("pool resized {count} times; latest: {message}"),
        "conflict" => format!("{count} write-back conflicts; latest: {message}"),
        "dead_letter" => format!("{count} dead letters kept aside; latest: {message}"),
        _ => format!("{message} ({count} times)"),
    }
}

fn probes(n: u64) -> String {
    match n {
        1 => "1 failed probe".to_owned(),
        n => format!("{n} failed probes"),
    }
}

fn entries(n: u64) -> String {
    match n {
        1 => "1 entry".to_owned(),
        n => format!("{n} entries"),
    }
}

/// `12 s`, `3 min 5 s`, `1 h 2 min`.
fn human_secs(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 if s.is_multiple_of(60) => format!("{} min", s / 60),
        60..=3599 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

/// `circuit breaker closed -> open` as `("closed", "open")` (tests write
/// their breaker moves this way).
#[cfg(test)]
fn breaker_move(message: &str) -> Option<(&str, &str)> {
    let moved = message.strip_prefix("circuit breaker ")?;
    let (from, to) = moved.split_once(" -> ")?;
    let to = to
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .next()?;
    Some((from.trim(), to))
}

/// One pass of the write-back (or the part of a long one since its last
/// report): entries handled, entries left, how fast, how long.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct WriteBackPass {
    pub(crate) done: u64,
    pub(crate) left: u64,
    pub(crate) rate: Option<f64>,
    pub(crate) secs: f64,
}

#[cfg(test)]
impl WriteBackPass {
    /// A pass as its event says it (the tests write passes this way):
    /// `journal write-back: 256 of 4000 entries, 812/s, 3744 left, about 5 s to go`
    /// or `journal written back: 4 of 4 entries in 0.3 s`.
    fn parse(message: &str) -> Option<WriteBackPass> {
        let number = |s: &str| -> Option<f64> {
            s.trim()
                .trim_end_matches("/s")
                .replace(',', "")
                .parse()
                .ok()
        };
        if let Some(rest) = message.strip_prefix("journal written back: ") {
            let (done, rest) = rest.split_once(" of ")?;
            let (_, secs) = rest.split_once(" entries in ")?;
            let done = number(done)? as u64;
            let secs = number(secs.trim_end_matches(" s"))?;
            return Some(WriteBackPass {
                done,
                left: 0,
                rate: (secs > 0.0).then(|| done as f64 / secs),
                secs,
            });
        }
        let rest = message.strip_prefix("journal write-back: ")?;
        let mut parts = rest.split(", ");
        let done = number(parts.next()?.split_once(" of ")?.0)? as u64;
        let rate = number(parts.next()?)?;
        let left = number(parts.next()?.strip_suffix(" left")?)? as u64;
        Some(WriteBackPass {
            done,
            left,
            rate: Some(rate),
            secs: if rate > 0.0 { done as f64 / rate } else { 0.0 },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Timeline {
        /// An event as the store pushes it, dispatched by its text.
        fn fold_text(&mut self, kind: &'static str, message: &str, at: OffsetDateTime) {
            if let Some((from, to)) = breaker_move(message).filter(|_| kind == "breaker") {
                return self.breaker(from, to, message, at);
            }
            if let Some(pass) = WriteBackPass::parse(message).filter(|_| kind == "journal") {
                return self.write_back(pass, message, at);
            }
            self.fold(kind, message, at);
        }
    }

    fn t(s: i64) -> OffsetDateTime {
        OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(1_700_000_000 + s)
    }

    #[test]
    fn an_outage_with_its_probes_is_two_entries() {
        let mut timeline = Timeline::default();
        timeline.fold_text("breaker", "circuit breaker closed -> open", t(0));
        for i in 0..6 {
            timeline.fold_text("breaker", "circuit breaker open -> half_open", t(6 + 2 * i));
            timeline.fold_text("breaker", "circuit breaker half_open -> open", t(6 + 2 * i));
        }
        timeline.fold_text("breaker", "circuit breaker open -> half_open", t(20));
        timeline.fold_text("breaker", "circuit breaker half_open -> closed", t(24));
        let entries: Vec<_> = timeline.entries.iter().map(|(_, e)| e.clone()).collect();
        assert_eq!(entries.len(), 2, "{entries:#?}");
        let outage = &entries[0];
        assert_eq!(outage.kind, "outage");
        assert_eq!((outage.start, outage.end), (t(0), Some(t(24))));
        assert_eq!(outage.duration_s, Some(24.0));
        assert!(outage.title.contains("away for 24 s"), "{}", outage.title);
        let probing = &entries[1];
        assert_eq!(probing.kind, "probing");
        assert_eq!(probing.count, 6);
        assert_eq!((probing.start, probing.end), (t(6), Some(t(24))));
        assert!(
            probing
                .title
                .starts_with("breaker probing: 6 failed probes"),
            "{}",
            probing.title
        );

        // The next outage is an entry of its own.
        timeline.fold_text("breaker", "circuit breaker closed -> open", t(100));
        let last = &timeline.entries.back().unwrap().1;
        assert_eq!((last.kind, last.end), ("outage", None));
        assert_eq!(timeline.entries.len(), 3);
    }

    #[test]
    fn write_back_passes_fold_into_one_entry_with_progress() {
        let mut timeline = Timeline::default();
        timeline.fold_text(
            "journal",
            "journal write-back: 256 of 1000 entries, 128/s, 744 left, about 6 s to go",
            t(0),
        );
        let entry = &timeline.entries.back().unwrap().1;
        assert_eq!(entry.kind, "write_back");
        assert_eq!(entry.end, None);
        let progress = entry.progress.unwrap();
        assert_eq!((progress.written, progress.left), (256, 744));
        assert_eq!(progress.rate, Some(128.0));
        assert_eq!(progress.eta_s, Some(744.0 / 128.0));
        assert!(
            entry.title.contains("744 left") && entry.title.contains("to go"),
            "{}",
            entry.title
        );
        // A dozen short passes for a few sessions: still one entry.
        for i in 1..=12 {
            timeline.fold_text(
                "journal",
                "journal written back: 1 of 1 entries in 0.0 s",
                t(i),
            );
        }
        timeline.fold_text(
            "journal",
            "journal written back: 744 of 744 entries in 2.0 s",
            t(13),
        );
        assert_eq!(timeline.entries.len(), 1, "{:#?}", timeline.entries);
        let entry = &timeline.entries.back().unwrap().1;
        let progress = entry.progress.unwrap();
        assert_eq!(
            (progress.written, progress.left, progress.eta_s),
            (1012, 0, None)
        );
        assert_eq!(entry.end, Some(t(13)));
        assert_eq!(entry.count, 14);
        assert!(
            entry
                .title
                .starts_with("journal written back: 1012 entries in 14 passes"),
            "{}",
            entry.title
        );
        // A quick pass alone gives no rate, and does not invent one.
        let mut quick = Timeline::default();
        quick.fold_text(
            "journal",
            "journal written back: 5 of 5 entries in 0.0 s",
            t(0),
        );
        let entry = &quick.entries.back().unwrap().1;
        assert_eq!(entry.progress.unwrap().rate, None);
        assert_eq!(
            entry.title,
            "journal written back: 5 entries in 1 pass, in under 0.1 s; the journal is empty"
        );
        // Other journal events are their own.
        timeline.fold_text(
            "journal",
            "3 journaled writes adopted from /j/x (a process that stopped)",
            t(14),
        );
        assert_eq!(timeline.entries.back().unwrap().1.kind, "journal");
    }

    #[test]
    fn repeated_events_fold_within_a_minute_and_keep_their_hint() {
        let mut timeline = Timeline::default();
        for i in 0..3 {
            timeline.fold_text(
                "conflict",
                "write-back conflict (changed): a journaled save found x",
                t(i),
            );
            timeline.fold_text(
                "dead_letter",
                "write-back conflict (changed): ...; see `pgsession journal list`",
                t(i),
            );
        }
        timeline.fold_text(
            "check_failed",
            "health check failed: connection refused",
            t(5),
        );
        timeline.fold_text(
            "check_failed",
            "health check failed: connection refused",
            t(200),
        );
        let entries: Vec<_> = timeline.entries.iter().map(|(_, e)| e.clone()).collect();
        assert_eq!(entries.len(), 4, "{entries:#?}");
        assert_eq!((entries[0].kind, entries[0].count), ("conflict", 3));
        assert_eq!((entries[1].kind, entries[1].count), ("dead_letter", 3));
        assert_eq!(entries[0].hint, Some("pgsession journal list"));
        assert_eq!(entries[1].hint, Some("pgsession journal list"));
        assert!(
            entries[0].title.starts_with("3 write-back conflicts"),
            "{}",
            entries[0].title
        );
        assert_eq!((entries[0].start, entries[0].end), (t(0), Some(t(2))));
        // More than a minute apart: two entries.
        assert_eq!(
            (entries[2].kind, entries[3].kind),
            ("check_failed", "check_failed")
        );
    }

    #[test]
    fn the_timeline_is_bounded() {
        let mut timeline = Timeline::default();
        for i in 0..(Timeline::CAPACITY as i64 * 3) {
            timeline.fold_text("pool_resized", "pool grown from 5 to 6", t(i * 120));
        }
        assert_eq!(timeline.entries.len(), Timeline::CAPACITY);
    }

    fn refused() -> crate::Error {
        crate::Error::ConnectTimeout(Duration::from_secs(2))
    }

    #[test]
    fn the_latest_evidence_wins_and_says_since_when_it_fails() {
        let events = Events::default();
        assert_eq!(events.last_check(), None);
        events
            .contact(CheckSource::Check, Duration::from_secs(1))
            .finish(None);
        let ok = events.last_check().unwrap();
        assert!(
            ok.ok && ok.source == CheckSource::Check && ok.failing_since.is_none(),
            "{ok:?}"
        );

        // Failed probes: failing, since the first, counted.
        let first = events
            .contact(CheckSource::Probe, Duration::from_secs(1))
            .finish(Some(&refused()));
        std::thread::sleep(Duration::from_millis(5));
        events
            .contact(CheckSource::Probe, Duration::from_secs(1))
            .finish(Some(&refused()));
        let failing = events.last_check().unwrap();
        assert!(!failing.ok, "{failing:?}");
        assert_eq!(failing.source, CheckSource::Probe);
        assert_eq!(failing.error, Some("connect"));
        assert_eq!(failing.failing_since, Some(first.at));
        assert_eq!(failing.failures, 2);

        // An operation refused by the open breaker says nothing.
        events
            .contact(CheckSource::Operation, Duration::from_secs(1))
            .failed(&crate::Error::Unavailable);
        assert_eq!(events.last_check().unwrap().failures, 2);

        // An operation that reached the database ends it.
        std::thread::sleep(Duration::from_millis(5));
        events
            .contact(CheckSource::Operation, Duration::from_secs(1))
            .ok();
        let back = events.last_check().unwrap();
        assert!(back.ok && back.source == CheckSource::Operation, "{back:?}");
        assert_eq!((back.failing_since, back.failures), (None, 0));

        // A slow check is not ok.
        let slow = events.contact(CheckSource::Check, Duration::ZERO);
        std::thread::sleep(Duration::from_millis(2));
        let slow = slow.finish(None);
        assert_eq!((slow.ok, slow.error), (false, Some("slow")));
    }

    #[test]
    fn silence_replaces_an_old_success() {
        let events = Events::default();
        events
            .contact(CheckSource::Operation, Duration::from_millis(20))
            .ok();
        let waiting = events.contact(CheckSource::Operation, Duration::from_millis(20));
        assert!(events.last_check().unwrap().ok);
        std::thread::sleep(Duration::from_millis(60));
        let silent = events.last_check().unwrap();
        assert!(!silent.ok, "{silent:?}");
        assert_eq!(
            (silent.source, silent.error),
            (CheckSource::Pending, Some("no_answer"))
        );
        assert!(silent.failing_since.is_some());
        drop(waiting);
        assert!(events.last_check().unwrap().ok, "nothing waits any more");
    }
}
