//! The journal written back: each write lands only if the row is still what
//! it was based on, so that a write-back never undoes a newer write (of
//! another instance, or of a Node service on the same table) and never
//! brings back a destroyed session. What cannot land is counted, logged,
//! shown as an event, and kept as a dead letter.
//!
//! | journaled | lands when | else |
//! |---|---|---|
//! | save of a session seen | the row holds a document it was based on (or its own) | `changed` / `destroyed` |
//! | save of a session made in the outage | the id is still free | `id_taken` |
//! | touch | the row exists (the later of both expiries is kept) | `destroyed` (counted, no data to keep) |
//! | destroy | always: a logout wins | |
//!
//! Before it writes anything back, the store makes sure that no statement
//! it sent without an answer (timed out, link broken) can still commit
//! afterwards and overtake the write-back: such statements of this
//! application that still run are terminated, and waited out.

use std::time::{Duration, Instant};

use time::OffsetDateTime;

use super::guard::on_conn;
use super::Store;
use crate::error::Error;
use crate::pool::Checkout;
use crate::resilience::dead_letter::{self, Conflict, DeadLetter};
use crate::resilience::journal::{digest, Entry, Pending};

/// How one journal entry fared.
enum Landing {
    Landed,
    /// Set aside: the kind, and what the row held instead.
    Conflict(Conflict, &'static str),
}

/// Entries written back between two syncs of their `done` records and two
/// progress events.
const PROGRESS_EVERY: usize = 256;

impl Store {
    /// Writes the journal back, oldest first, each entry's latest state.
    /// Stops at the first transient failure (the entry stays).
    pub(super) async fn write_back(&self) -> Result<(), Error> {
        let deadline = self
            .inner
            .config
            .query_timeout()
            .min(Duration::from_secs(5));
        let fallback = &self.inner.recovery.fallback;
        if fallback.journal_len() == 0 {
            return Ok(());
        }
        self.settle_in_doubt(deadline).await?;
        let started = Instant::now();
        let total = fallback.journal_len();
        let mut written = 0usize;
        let mut set_aside = 0usize;
        let result = loop {
            let Some((seq, sid, entry)) = fallback.oldest() else {
                break Ok(());
            };
            let landing = match self.land(&sid, &entry, deadline).await {
                Ok(landing) => landing,
                Err(e) if e.is_transient() || matches!(e, Error::StoreClosed) => {
                    if e.is_unanswered() {
                        fallback.written_back_in_doubt(&sid, &entry.write);
                        self.inner.recovery.mark_in_doubt();
                    }
                    break Err(e);
                }
                Err(e) => {
                    tracing::error!(target: "session_store", error = %e, op = entry.write.op(), "a journaled write was refused by the database");
                    Landing::Conflict(Conflict::Failed, "the database refused it")
                }
            };
            match landing {
                Landing::Landed => {
                    written += 1;
                    fallback.landed(seq, &sid, &entry.write);
                }
                Landing::Conflict(kind, reason) => {
                    if let Err(e) = self.set_aside(&sid, &entry, kind, reason) {
                        // Kept in the journal: tried again next pass.
                        break Err(e);
                    }
                    set_aside += 1;
                    fallback.forget(&sid);
                    fallback.written_back(seq, &sid);
                }
            }
            metrics::gauge!(crate::metrics::JOURNAL_ENTRIES).set(fallback.journal_len() as f64);
            if (written + set_aside).is_multiple_of(PROGRESS_EVERY) {
                self.sync_done().await;
                self.progress(written + set_aside, total, started, false);
            }
        };
        self.sync_done().await;
        if written + set_aside > 0 {
            self.progress(written + set_aside, total, started, true);
            tracing::info!(target: "session_store", written, set_aside, "journal written back");
        }
        result
    }

    /// Makes the `done` records durable, so that a crash does not write
    /// the same entries back again (harmless, but slower).
    async fn sync_done(&self) {
        if let Some(journal) = self.inner.recovery.fallback.journal() {
            if let Err(e) = journal.sync_all().await {
                tracing::warn!(target: "session_store", error = %e, "journal sync failed");
            }
        }
    }

    /// One event per pass (and per [`PROGRESS_EVERY`] entries in a long
    /// one): how far, how fast, how much is left and when it will be done.
    fn progress(&self, done: usize, total: usize, started: Instant, last: bool) {
        let left = self.journal_len();
        let secs = started.elapsed().as_secs_f64().max(0.001);
        let rate = done as f64 / secs;
        let message = if last && left == 0 {
            format!("journal written back: {done} of {total} entries in {secs:.1} s")
        } else {
            let eta = left as f64 / rate.max(0.001);
            format!(
                "journal write-back: {done} of {total} entries, {rate:.0}/s, {left} left, \
                 about {eta:.0} s to go"
            )
        };
        let pass = crate::health::WriteBackPass {
            done: done as u64,
            left: left as u64,
            rate: Some(rate),
            secs,
        };
        self.inner.events.write_back(pass, message);
    }

    /// One entry, conditional on what it was based on.
    async fn land(&self, sid: &str, entry: &Entry, deadline: Duration) -> Result<Landing, Error> {
        let db = &self.inner.db;
        match &entry.write {
            Pending::Destroy => {
                self.db_destroy_with(sid, deadline, true).await?;
                Ok(Landing::Landed)
            }
            Pending::Touch { expire } => {
                let expire = *expire;
                Ok(
                    match self
                        .on_db(
                            deadline,
                            on_conn!(|conn| db.writeback_touch(conn, sid, expire)),
                        )
                        .await?
                    {
                        false => Landing::Conflict(Conflict::Destroyed, "no row"),
                        true => Landing::Landed,
                    },
                )
            }
            Pending::Save { json, expire } => {
                let (json, expire) = (json.as_str(), *expire);
                let insert = || {
                    self.on_db(
                        deadline,
                        on_conn!(|conn| db.insert(conn, sid, json, expire)),
                    )
                };
                if entry.base.absent && insert().await? {
                    return Ok(Landing::Landed);
                }
                // Its own document counts too: after a crash, an entry
                // whose `done` was lost finds itself already landed.
                let mut docs = entry.base.docs.clone();
                docs.push(digest(json));
                let docs = docs.as_slice();
                if self
                    .on_db(
                        deadline,
                        on_conn!(|conn| db.writeback_update(conn, sid, json, expire, docs)),
                    )
                    .await?
                {
                    return Ok(Landing::Landed);
                }
                let row = self
                    .on_db(deadline, on_conn!(|conn| db.row_digest(conn, sid)))
                    .await?;
                Ok(match (row, entry.base.absent) {
                    (None, true) => {
                        // Its id was taken and freed again meanwhile.
                        match insert().await? {
                            true => Landing::Landed,
                            false => Landing::Conflict(Conflict::IdTaken, "another session"),
                        }
                    }
                    (None, false) => Landing::Conflict(Conflict::Destroyed, "no row"),
                    (Some(_), true) => Landing::Conflict(Conflict::IdTaken, "another session"),
                    (Some(_), false) => {
                        Landing::Conflict(Conflict::Changed, "a document this instance never saw")
                    }
                })
            }
        }
    }

    /// A statement of the write-back: past the breaker, which it closes.
    async fn on_db<T, F, Fut>(&self, deadline: Duration, query: F) -> Result<T, Error>
    where
        F: Fn(Checkout) -> Fut,
        Fut: std::future::Future<Output = (Checkout, Result<T, Error>)>,
    {
        self.run_db("writeback", deadline, true, query).await
    }

    /// Counts, logs and shows a conflict, and keeps the write as a dead
    /// letter (a touch carries no data: it is counted and logged only).
    pub(super) fn set_aside(
        &self,
        sid: &str,
        entry: &Entry,
        kind: Conflict,
        reason: &str,
    ) -> Result<(), Error> {
        let inner = &self.inner;
        metrics::counter!(crate::metrics::WRITEBACK_CONFLICTS, "kind" => kind.as_str())
            .increment(1);
        inner.recovery.count_conflict();
        let op = entry.write.op();
        let keeps_data = !matches!(entry.write, Pending::Touch { .. });
        let message = format!("write-back conflict ({kind}): a journaled {op} found {reason}");
        inner.events.push("conflict", message.clone());
        if !keeps_data {
            tracing::warn!(target: "session_store", kind = kind.as_str(), op, "{message}; the session is left as it is");
            return Ok(());
        }
        let Some(journal) = inner.recovery.fallback.journal() else {
            return Ok(());
        };
        let letter = DeadLetter {
            at: OffsetDateTime::now_utc(),
            table: inner.db.sql.lock_name.clone(),
            sid: sid.to_owned(),
            kind,
            reason: format!("found {reason}"),
            write: entry.write.clone(),
        };
        dead_letter::append(journal.dir(), &letter).map_err(|e| {
            tracing::error!(target: "session_store", error = %e, "cannot write a dead letter; the entry stays in the journal");
            Error::JournalUnavailable {
                reason: format!("dead letter: {e}"),
            }
        })?;
        metrics::counter!(crate::metrics::DEAD_LETTERS, "kind" => kind.as_str()).increment(1);
        inner.recovery.count_dead_letter();
        let where_ = dead_letter::path(journal.dir());
        let text = format!(
            "{message}; the database keeps its state, the journaled {op} is kept aside in {} \
             (see `pgsession journal list`)",
            where_.display()
        );
        if kind == Conflict::Failed {
            tracing::error!(target: "session_store", kind = kind.as_str(), op, "{text}");
        } else {
            tracing::warn!(target: "session_store", kind = kind.as_str(), op, "{text}");
        }
        inner.events.push("dead_letter", text);
        Ok(())
    }

    /// Waits out statements this application sent without an answer: those
    /// that started before the latest such moment and still run are
    /// terminated, until none is left. A failure of this step stops the
    /// write-back (tried again next pass); a server that refuses it (no
    /// `pg_stat_activity`, as behind some poolers) is logged and passed.
    async fn settle_in_doubt(&self, deadline: Duration) -> Result<(), Error> {
        let recovery = &self.inner.recovery;
        let Some(latest) = recovery.latest_in_doubt() else {
            return Ok(());
        };
        let give_up = Instant::now() + deadline;
        let db = &self.inner.db;
        loop {
            let now_ms = crate::resilience::journal::unix_ms_now();
            // One second of margin towards "more": a statement sent just
            // before the moment, on a server whose clock runs a little
            // differently, is still caught.
            let age = ((now_ms - latest) as f64 / 1000.0 - 1.0).max(0.0);
            let counted = self
                .on_db(deadline, on_conn!(|conn| db.settle_in_doubt(conn, age)))
                .await;
            match counted {
                Ok((_, 0)) => break,
                Ok((terminated, running)) => {
                    tracing::info!(
                        target: "session_store",
                        running, terminated,
                        "statements sent before the outage still run; terminated before the write-back"
                    );
                }
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => {
                    tracing::warn!(target: "session_store", error = %e, "cannot check for statements still running from before the outage; writing back anyway");
                    break;
                }
            }
            if Instant::now() >= give_up {
                return Err(Error::QueryTimeout {
                    op: "writeback",
                    after: deadline,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        recovery.settled_up_to(latest);
        Ok(())
    }

    /// Applies a dead letter as it stands, whatever the row holds now (the
    /// operator decided): a save is an upsert, a touch moves the expiry, a
    /// destroy deletes.
    ///
    /// ```no_run
    /// # async fn example(store: pgsession::Store) -> Result<(), Box<dyn std::error::Error>> {
    /// let dir = store.config().journal_dir().to_owned();
    /// for letter in pgsession::dead_letter::read(&dir)? {
    ///     store.replay_dead_letter(&letter).await?;
    /// }
    /// pgsession::dead_letter::remove(&dir, |_, _| true)?;
    /// # Ok(()) }
    /// ```
    pub async fn replay_dead_letter(&self, letter: &DeadLetter) -> Result<(), Error> {
        let deadline = self.inner.config.query_timeout();
        match &letter.write {
            Pending::Save { json, expire } => {
                self.db_save_with(&letter.sid, json, *expire, deadline, false)
                    .await
            }
            Pending::Touch { expire } => self
                .db_touch_with(&letter.sid, *expire, deadline, false)
                .await
                .map(drop),
            Pending::Destroy => self.db_destroy_with(&letter.sid, deadline, false).await,
        }
    }

    /// At shutdown: one last write-back if the database answers. What is
    /// left stays in the journal file, durable; the next store started on
    /// this directory writes it back.
    pub(super) async fn flush_at_close(&self) {
        let Some(journal) = self.inner.recovery.fallback.journal() else {
            return;
        };
        if self.journal_len() > 0 {
            let attempt = self
                .inner
                .config
                .connect_timeout()
                .min(Duration::from_secs(5));
            if tokio::time::timeout(attempt, self.ping(attempt))
                .await
                .is_ok_and(|r| r.is_ok())
            {
                let _ = tokio::time::timeout(attempt, self.write_back()).await;
            }
        }
        let left = self.journal_len();
        if left == 0 {
            journal.remove();
        } else {
            self.sync_done().await;
            tracing::warn!(
                target: "session_store",
                path = %journal.path().display(),
                entries = left,
                "the database is away: journaled writes stay in the journal file; the next start \
                 on this directory writes them back"
            );
        }
    }
}
