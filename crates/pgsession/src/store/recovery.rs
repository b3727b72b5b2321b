//! The store's side that acts when the database is away: the circuit
//! breaker, the fallback (cache and fsynced journal), the moment of the
//! latest unanswered write, and the conflict and dead-letter counts; and
//! the recovery task that probes the database while the breaker is open,
//! has the journal written back (`writeback.rs`), closes the breaker, and
//! adopts the journal files of stores that died.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Store;
use crate::config::Config;
use crate::error::Error;
use crate::resilience::breaker::{Breaker, BreakerSettings, BreakerState, Transition};
use crate::resilience::dead_letter::{self, Conflict};
use crate::resilience::fallback::{Fallback, FallbackSettings, Refused};
use crate::resilience::journal::{unix_ms_now, Entry, Found, Journal, Opened};

/// How often the recovery looks at the breaker and the journal.
const RECOVERY_TICK: Duration = Duration::from_millis(100);

/// How often the journal directory is searched for the files of stores
/// that died while this one runs (each search is one directory listing).
const ADOPT_EVERY: Duration = Duration::from_secs(5);

/// The recovery side of the store.
#[derive(Debug)]
pub(super) struct Recovery {
    pub(super) breaker: Breaker,
    pub(super) fallback: Fallback,
    /// The latest moment (Unix ms) a write statement went unanswered: it
    /// may still commit, so the write-back first waits it out.
    in_doubt_since: Mutex<Option<i64>>,
    /// Write-back conflicts since start.
    conflicts: AtomicU64,
    /// Dead letters in the journal directory (read at start, then counted).
    dead_letters: AtomicU64,
}

/// What opening the journal directory found: entries of stores that died,
/// and what became of their files.
pub(super) type Adopted = (Vec<(String, Entry)>, Vec<Found>);

impl Recovery {
    /// The breaker and the fallback, with the journal of `table` opened in
    /// the configured directory (unless the fallback is off).
    pub(super) fn new(config: &Config, table: &str) -> Result<(Recovery, Adopted), Error> {
        let (journal, adopted) = match open_journal(config, table)? {
            Some(opened) => (Some(opened.journal), (opened.adopted, opened.found)),
            None => (None, (Vec::new(), Vec::new())),
        };
        let breaker = Breaker::new(BreakerSettings {
            threshold: config.breaker_threshold(),
            cool_down: config.breaker_cool_down(),
            max_cool_down: config.breaker_max_cool_down(),
        });
        let fallback = Fallback::new(
            FallbackSettings {
                max_entries: config.cache_max_entries(),
                max_bytes: config.cache_max_bytes(),
            },
            journal,
        );
        let recovery = Recovery {
            breaker,
            fallback,
            in_doubt_since: Mutex::new(None),
            conflicts: AtomicU64::new(0),
            dead_letters: AtomicU64::new(0),
        };
        recovery.count_dead_letters();
        Ok((recovery, adopted))
    }

    /// Notes that a write statement went unanswered now.
    pub(super) fn mark_in_doubt(&self) {
        let now = unix_ms_now();
        let mut since = self.in_doubt();
        *since = Some(since.map_or(now, |t| t.max(now)));
    }

    /// The latest moment a write went unanswered: noted here, or carried
    /// by a journal entry (adopted ones included).
    pub(super) fn latest_in_doubt(&self) -> Option<i64> {
        let since = *self.in_doubt();
        match (since, self.fallback.latest_doubt()) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// Statements up to `latest` are settled: forgets the moment unless a
    /// later one was noted meanwhile.
    pub(super) fn settled_up_to(&self, latest: i64) {
        let mut since = self.in_doubt();
        if since.is_some_and(|t| t <= latest) {
            *since = None;
        }
    }

    fn in_doubt(&self) -> std::sync::MutexGuard<'_, Option<i64>> {
        self.in_doubt_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn count_conflict(&self) {
        self.conflicts.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn count_dead_letter(&self) {
        self.dead_letters.fetch_add(1, Ordering::Relaxed);
    }

    /// At start: how many dead letters wait in the journal directory.
    fn count_dead_letters(&self) {
        let Some(journal) = self.fallback.journal() else {
            return;
        };
        match dead_letter::read(journal.dir()) {
            Ok(letters) if !letters.is_empty() => {
                tracing::warn!(
                    target: "session_store",
                    count = letters.len(),
                    path = %dead_letter::path(journal.dir()).display(),
                    "dead letters wait: journaled writes that could not be written back \
                     (`pgsession journal list` shows them)"
                );
                self.dead_letters
                    .store(letters.len() as u64, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(target: "session_store", error = %e, "cannot read the dead letters")
            }
        }
    }

    /// The journal's facts for `/health`.
    pub(super) fn journal_health(&self, config: &Config) -> crate::health::JournalHealth {
        let journal = self.fallback.journal();
        crate::health::JournalHealth {
            entries: self.fallback.journal_len(),
            bytes: self.fallback.journal_bytes(),
            max_bytes: config.journal_max_bytes() as u64,
            fallback: self.fallback.is_on(),
            dir: journal.map(|j| j.dir().display().to_string()),
            broken: journal.and_then(|j| j.broken()),
            conflicts: self.conflicts.load(Ordering::Relaxed),
            dead_letters: self.dead_letters.load(Ordering::Relaxed),
        }
    }
}

impl Store {
    /// Probes the database while the breaker is open, and writes the
    /// journal back; closes the breaker once nothing is left.
    pub(super) async fn recover(self) {
        let mut tick = tokio::time::interval(RECOVERY_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_adoption = Instant::now();
        loop {
            tokio::select! {
                () = self.inner.life.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if last_adoption.elapsed() >= ADOPT_EVERY {
                last_adoption = Instant::now();
                self.adopt_orphans().await;
            }
            let breaker = &self.inner.recovery.breaker;
            match breaker.state() {
                BreakerState::Closed if self.journal_len() > 0 => {
                    // Entries adopted from a store that died, or writes
                    // journaled when a direct attempt found the database
                    // away before the breaker opened.
                    if let Err(e) = self.write_back().await {
                        tracing::debug!(target: "session_store", error = %e, "write-back interrupted");
                    }
                }
                BreakerState::Closed => {}
                BreakerState::Open => {
                    let probe = breaker.try_probe(Instant::now());
                    if probe.is_some() {
                        self.breaker_moved(probe);
                        self.probe_and_write_back().await;
                    }
                }
                BreakerState::HalfOpen => self.probe_and_write_back().await,
            }
            if self.journal_len() == 0 {
                self.inner.recovery.fallback.truncate_if_empty();
            }
        }
    }

    /// The half-open step: one probe; on success the journal is written
    /// back, then the breaker closes (atomically with the journal being
    /// empty, so no write slips in between).
    async fn probe_and_write_back(&self) {
        let recovery = &self.inner.recovery;
        let contact = self.inner.events.contact(
            crate::health::CheckSource::Probe,
            self.inner.config.slow_check_threshold(),
        );
        let probe = self.ping(self.inner.config.connect_budget()).await;
        contact.finish(probe.as_ref().err());
        let written = match probe {
            Ok(()) => self.write_back().await,
            Err(e) => Err(e),
        };
        match written {
            Ok(()) => {
                if let Some(transition) = recovery.fallback.if_empty(|| recovery.breaker.close()) {
                    self.breaker_moved(transition);
                }
            }
            Err(e) => {
                tracing::debug!(target: "session_store", error = %e, "probe failed; the breaker stays open");
                self.breaker_moved(recovery.breaker.probe_failed(Instant::now()));
            }
        }
    }

    /// Logs, counts and shows a move of the breaker.
    pub(super) fn breaker_moved(&self, transition: Transition) {
        let Some((from, to)) = transition else { return };
        metrics::gauge!(crate::metrics::BREAKER_STATE).set(to.gauge());
        let message = format!("circuit breaker {} -> {}", from.as_str(), to.as_str());
        match to {
            BreakerState::Open => tracing::warn!(
                target: "session_store",
                journal = self.journal_len(),
                "{message}: the database is considered away; serving from the fallback"
            ),
            BreakerState::HalfOpen => {
                tracing::info!(target: "session_store", "{message}: probing the database")
            }
            BreakerState::Closed => {
                tracing::info!(target: "session_store", "{message}: the database is back")
            }
        }
        self.inner.events.breaker_moved(from, to, message);
    }

    /// At start: entries adopted from stores that died join the journal;
    /// damaged files are reported.
    pub(super) fn take_adopted(&self, (adopted, found): Adopted) {
        let events = &self.inner.events;
        for found in found {
            match found {
                Found::Adopted { path, entries } => {
                    let message = format!(
                        "{entries} journaled writes adopted from {} (a process that stopped \
                         before writing them back); written back when the database answers",
                        path.display()
                    );
                    tracing::info!(target: "session_store", "{message}");
                    events.push("journal", message);
                }
                Found::Damaged {
                    path,
                    kept,
                    line,
                    reason,
                } => {
                    let message = format!(
                        "journal file {} is damaged (line {line}: {reason}); kept aside as {}",
                        path.display(),
                        kept.display()
                    );
                    tracing::error!(target: "session_store", "{message}");
                    events.push("journal", message);
                }
            }
        }
        if adopted.is_empty() {
            return;
        }
        // Their moments in doubt come with them: `settle_in_doubt` reads
        // them from the journal's entries.
        for (sid, entry) in self.inner.recovery.fallback.adopt(adopted) {
            let _ = self.set_aside(&sid, &entry, Conflict::Duplicate, "another journal's entry");
        }
        metrics::gauge!(crate::metrics::JOURNAL_ENTRIES).set(self.journal_len() as f64);
    }

    /// While running: adopts the files of stores that died since.
    async fn adopt_orphans(&self) {
        let store = self.clone();
        let found = tokio::task::spawn_blocking(move || {
            store
                .inner
                .recovery
                .fallback
                .journal()
                .map(|journal| journal.adopt_orphans())
        })
        .await;
        if let Ok(Some(adopted)) = found {
            if !adopted.0.is_empty() || !adopted.1.is_empty() {
                self.take_adopted(adopted);
            }
        }
    }
}

/// The error of a write the journal did not take: with the fallback off,
/// the database's own (`away`); else the journal's, a 503 that says why.
pub(super) fn refusal(refused: Refused, away: Error) -> Error {
    match refused {
        Refused::Off => away,
        Refused::Journal(e) => {
            tracing::error!(target: "session_store", error = %e, "a write could not be journaled; answering 503");
            Error::JournalUnavailable {
                reason: e.to_string(),
            }
        }
    }
}

/// Opens the journal directory (unless the fallback is off): its error
/// names the setting, and says how to run without one.
fn open_journal(config: &Config, table: &str) -> Result<Option<Opened>, Error> {
    if !config.fallback() {
        tracing::warn!(
            target: "session_store",
            "fallback off (PGSESSION_FALLBACK=false): while the database is away, every session \
             operation answers 503; nothing is journaled"
        );
        return Ok(None);
    }
    let max = config.journal_max_bytes() as u64;
    match Journal::open(config.journal_dir(), table, max) {
        Ok(opened) => {
            tracing::info!(
                target: "session_store",
                path = %opened.journal.path().display(),
                max_bytes = max,
                "journal open: writes accepted while the database is away are fsynced here"
            );
            Ok(Some(opened))
        }
        Err(e) => Err(Error::Config(crate::ConfigError::invalid(
            "journal_dir",
            format!(
                "{e}; point PGSESSION_JOURNAL_DIR at a writable directory on a persistent disk, \
                 or set PGSESSION_FALLBACK=false to answer 503 during outages instead"
            ),
        ))),
    }
}
