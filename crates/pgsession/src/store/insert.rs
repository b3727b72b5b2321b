//! A new session, written only if its id is free: the insert-only write
//! behind tower-sessions' `create` (see `crate::tower_sessions`).
//!
//! With the database answering, it is one `INSERT ... ON CONFLICT (sid) DO
//! NOTHING`: of concurrent inserts of one id, exactly one lands and the
//! others learn that the id is taken. Any row holds its id, expired or not
//! (the prune frees it).
//!
//! While the database is away, the insert is journaled as what it is to the
//! write-back: a save of a session this store has never seen, which lands
//! only if its id is still free when the database returns and is otherwise
//! kept as an `id_taken` dead letter (see `writeback`). Until then an id
//! that the journal or the cache knows is taken; for the journal, the check
//! and the journaling are one step under its lock, so that two inserts of
//! one id in an outage never both succeed.

// Only the tower-sessions adapter inserts.
#![cfg_attr(not(feature = "tower-sessions"), allow(dead_code))]

use std::time::Instant;

use time::OffsetDateTime;

use super::guard::on_conn;
use super::recovery::refusal;
use super::{record_op, Outcome, Store};
use crate::error::Error;
use crate::record::StoredSession;
use crate::resilience::fallback::{Journaled, Lookup, Refused};
use crate::resilience::journal::{Pending, Ticket};

/// What the fallback made of an insert.
enum Journal {
    /// The journal or the cache knows the id.
    Taken,
    /// The database is not known to be away: the insert goes there.
    No,
    Yes(Ticket),
    Refused(Refused),
}

impl Store {
    /// Inserts a session unless its id is taken. `Ok(true)`: inserted, or
    /// (the database away) fsynced to the journal, to be inserted at
    /// write-back if its id is still free then. `Ok(false)`: the id is
    /// taken and nothing was written.
    pub(crate) async fn insert(
        &self,
        sid: &str,
        json: &str,
        expire: OffsetDateTime,
    ) -> Result<bool, Error> {
        let limit = self.inner.config.max_session_bytes();
        if json.len() > limit {
            return Err(Error::TooLarge {
                size: json.len(),
                limit,
            });
        }
        let started = Instant::now();
        let (result, outcome) = match self.journal_insert(sid, json, expire, None, false) {
            Journal::No => match self.db_insert(sid, json, expire).await {
                Ok(inserted) => {
                    if inserted {
                        let session = StoredSession {
                            json: json.to_owned(),
                            expire,
                        };
                        self.inner.recovery.fallback.saved(sid, session);
                    }
                    (Ok(inserted), Outcome::Ok)
                }
                Err(e) => self.insert_failed(sid, json, expire, e).await,
            },
            other => self.journaled(other, Error::Unavailable).await,
        };
        record_op("insert", started, &result, outcome);
        result
    }

    /// An insert the database did not take: journaled if the database is
    /// away, as `write` does for the other writes. Unanswered, the row may
    /// hold `json`: the journal entry counts it as its own.
    async fn insert_failed(
        &self,
        sid: &str,
        json: &str,
        expire: OffsetDateTime,
        error: Error,
    ) -> (Result<bool, Error>, Outcome) {
        let in_doubt = error.is_transient();
        if in_doubt {
            self.inner.recovery.mark_in_doubt();
        }
        let sent = Some(json).filter(|_| in_doubt);
        if error.is_outage() {
            let journal = self.journal_insert(sid, json, expire, sent, true);
            return self.journaled(journal, error).await;
        }
        if let Some(json) = sent {
            self.inner.recovery.fallback.in_doubt(sid, json);
        }
        (Err(error), Outcome::Error)
    }

    /// Journals the insert if the database is away (`away`, or the breaker
    /// not closed) and the fallback does not know the id.
    fn journal_insert(
        &self,
        sid: &str,
        json: &str,
        expire: OffsetDateTime,
        sent: Option<&str>,
        away: bool,
    ) -> Journal {
        let fallback = &self.inner.recovery.fallback;
        let breaker = &self.inner.recovery.breaker;
        // Read again under the journal's lock, as `write` does.
        let away = || away || !breaker.is_closed();
        // A cached session is a live one. (A journaled one is checked below,
        // under the lock: that check must be one step with the journaling.)
        let now = OffsetDateTime::now_utc();
        if away() && matches!(fallback.lookup(sid, now), Lookup::Cached(_)) {
            return Journal::Taken;
        }
        let mut taken = false;
        let write = || Pending::Save {
            json: json.to_owned(),
            expire,
        };
        let journaled = fallback.journal_if(sid, write, sent, |pending| {
            taken = pending;
            !pending && away()
        });
        match journaled {
            _ if taken => Journal::Taken,
            Ok(Journaled::No) => Journal::No,
            Ok(Journaled::Yes(ticket)) => Journal::Yes(ticket),
            Err(refused) => Journal::Refused(refused),
        }
    }

    /// The answer of an insert the fallback took, or refused (`away` is the
    /// error to give when there is no fallback).
    async fn journaled(&self, journal: Journal, away: Error) -> (Result<bool, Error>, Outcome) {
        match journal {
            Journal::Taken => (Ok(false), Outcome::Fallback),
            Journal::Yes(ticket) => {
                let (result, outcome) = self.acknowledge::<()>(ticket).await;
                (result.map(|_| true), outcome)
            }
            Journal::Refused(refused) => (Err(refusal(refused, away)), Outcome::Error),
            Journal::No => unreachable!("the fallback accepts every insert of an absent database"),
        }
    }

    /// The insert-only statement; whether it inserted a row.
    async fn db_insert(
        &self,
        sid: &str,
        json: &str,
        expire: OffsetDateTime,
    ) -> Result<bool, Error> {
        let db = &self.inner.db;
        self.run_db(
            "insert",
            self.deadline(),
            false,
            on_conn!(|conn| db.insert(conn, sid, json, expire)),
        )
        .await
    }
}
