//! The fallback: a bounded cache of sessions recently read or written, and
//! the journal of writes accepted while the database was away, in memory
//! (for reads and the write-back) and on disk (for durability).
//!
//! The journal keeps the latest state per session (a save, a new expiry, or
//! a deletion), in the order sessions were last changed, with what the
//! first journaled write was based on (see [`Base`]). While a session has
//! an entry, the journal is its truth: reads come from it and further
//! writes join it, even once the breaker is closed, so a newer direct
//! write can never be overtaken by an older journal entry.
//!
//! Every change to the memory journal is appended to the disk journal under
//! the same lock, so both keep one order; the caller then waits for the
//! group `fsync` before it acknowledges.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use lru::LruCache;
use time::OffsetDateTime;

use super::journal::{
    digest, doc_prefix, unix_ms_now, Base, Entry, Journal, JournalError, Pending, Ticket,
};
use crate::record::StoredSession;

/// What the fallback knows of a session.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// The journal holds its latest state: this (or nothing: destroyed or
    /// expired).
    Pending(Option<StoredSession>),
    /// A cached copy, as last read or written.
    Cached(StoredSession),
    /// Unknown here.
    Miss,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct FallbackSettings {
    pub(crate) max_entries: usize,
    pub(crate) max_bytes: usize,
}

/// Why a write was not journaled.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum Refused {
    /// The fallback is off (`fallback = false`).
    #[error("the fallback is off")]
    Off,
    #[error(transparent)]
    Journal(#[from] JournalError),
}

/// A write journaled, not yet durable.
#[derive(Debug)]
pub(crate) enum Journaled {
    /// `accept` said no: the write goes to the database.
    No,
    /// Appended; wait on the ticket before acknowledging.
    Yes(Ticket),
}

#[derive(Debug)]
pub(crate) struct Fallback {
    settings: FallbackSettings,
    /// `None`: the fallback is off, outages answer 503.
    journal: Option<Journal>,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    cache: LruCache<String, Cached>,
    cache_bytes: usize,
    journal: HashMap<String, Live>,
    order: BTreeMap<u64, String>,
    next_seq: u64,
    /// Bytes the live entries take in the file.
    live_bytes: u64,
    /// Documents of saves sent without an answer and not journaled (their
    /// request got a 503): the row may hold one of them, which a later
    /// journaled write of the session must accept as its base.
    doubt: LruCache<String, Vec<String>>,
}

/// A cached session, with what the write-back may find in its row.
#[derive(Debug)]
struct Cached {
    session: StoredSession,
    /// [`doc_prefix`]es of this instance's own earlier documents of the
    /// session, oldest first, since it last read one it had not written.
    /// After a failover to an asynchronous replica the row may hold one of
    /// them (the server lost the writes after it): a journaled write then
    /// still lands, as it would have on the lost row, instead of being set
    /// aside (see `Base`).
    earlier: Vec<u64>,
}

/// Earlier documents remembered per cached session: the writes of one
/// session that a failover to an asynchronous replica may lose (its
/// replication lag), at most.
const EARLIER_DOCS: usize = 32;

/// Whether a document put in the cache is this instance's own write, or
/// one it read (which may be another writer's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Own,
    Read,
}

#[derive(Debug)]
struct Live {
    seq: u64,
    entry: Entry,
    /// Its line in the file, for the byte count and for compaction.
    line: String,
}

/// Whether an append keeps to `journal_max_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Limit {
    /// A new write: refused past the limit (the client gets a 503).
    Kept,
    /// What the journal must record about a write it already holds.
    Ignored,
}

/// Sessions whose unanswered saves are remembered: beyond, the oldest are
/// forgotten, and a conflict is reported rather than a guess made.
const DOUBT_CAPACITY: usize = 10_000;

fn cost(sid: &str, cached: &Cached) -> usize {
    sid.len() + cached.session.json.len() + 64 + 8 * cached.earlier.len()
}

impl Fallback {
    pub(crate) fn new(settings: FallbackSettings, journal: Option<Journal>) -> Fallback {
        Fallback {
            settings,
            journal,
            inner: Mutex::new(Inner {
                cache: LruCache::unbounded(),
                cache_bytes: 0,
                journal: HashMap::new(),
                order: BTreeMap::new(),
                next_seq: 1,
                live_bytes: 0,
                doubt: LruCache::new(
                    std::num::NonZeroUsize::new(DOUBT_CAPACITY).expect("non-zero"),
                ),
            }),
        }
    }

    /// Whether reads and writes may be served here while the database is
    /// away.
    pub(crate) fn is_on(&self) -> bool {
        self.journal.is_some()
    }

    /// The disk journal, if the fallback is on.
    pub(crate) fn journal(&self) -> Option<&Journal> {
        self.journal.as_ref()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Each change below leaves the maps consistent before it can panic
        // (allocation failure aborts), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps a copy of a session read from, or written to, the database.
    pub(crate) fn remember(&self, sid: &str, session: StoredSession) {
        if self.settings.max_entries > 0 {
            self.lock().put(sid, session, Origin::Read, self.settings);
        }
    }

    /// A save reached the database: its row is known, nothing is in doubt.
    pub(crate) fn saved(&self, sid: &str, session: StoredSession) {
        self.lock().saved(sid, session, self.settings);
    }

    /// Drops the cached copy (the session was destroyed, or not found).
    pub(crate) fn forget(&self, sid: &str) {
        let mut inner = self.lock();
        if let Some(old) = inner.cache.pop(sid) {
            inner.cache_bytes -= cost(sid, &old);
        }
    }

    /// Moves the cached copy's expiry (a touch reached the database).
    pub(crate) fn retime(&self, sid: &str, expire: OffsetDateTime) {
        if let Some(cached) = self.lock().cache.get_mut(sid) {
            cached.session.expire = expire;
        }
    }

    /// A save was sent without an answer and not journaled: the row may
    /// hold `json` from now on.
    pub(crate) fn in_doubt(&self, sid: &str, json: &str) {
        let mut inner = self.lock();
        let digest = digest(json);
        match inner.doubt.get_mut(sid) {
            Some(docs) if !docs.contains(&digest) => docs.push(digest),
            Some(_) => {}
            None => {
                inner.doubt.put(sid.to_owned(), vec![digest]);
            }
        }
    }

    /// What is known of `sid` without the database.
    pub(crate) fn lookup(&self, sid: &str, now: OffsetDateTime) -> Lookup {
        self.lookup_with(sid, now, true)
    }

    /// What the journal knows of `sid`: [`Lookup::Miss`] unless it holds a
    /// write. For a load that goes to the database anyway, which has no
    /// use for (a copy of) the cached session.
    pub(crate) fn lookup_pending(&self, sid: &str, now: OffsetDateTime) -> Lookup {
        self.lookup_with(sid, now, false)
    }

    fn lookup_with(&self, sid: &str, now: OffsetDateTime, cache: bool) -> Lookup {
        let mut inner = self.lock();
        let live = |s: StoredSession| (s.expire >= now).then_some(s);
        match inner.journal.get(sid).map(|l| &l.entry.write) {
            Some(Pending::Save { json, expire }) => Lookup::Pending(live(StoredSession {
                json: json.clone(),
                expire: *expire,
            })),
            Some(Pending::Destroy) => Lookup::Pending(None),
            Some(Pending::Touch { expire }) => {
                let expire = *expire;
                match inner.cache.get(sid) {
                    Some(cached) => Lookup::Pending(live(StoredSession {
                        json: cached.session.json.clone(),
                        expire,
                    })),
                    None => Lookup::Miss,
                }
            }
            None if !cache => Lookup::Miss,
            None => match inner.cache.get(sid).map(|c| c.session.clone()) {
                Some(cached) if cached.expire >= now => Lookup::Cached(cached),
                Some(_) => {
                    if let Some(old) = inner.cache.pop(sid) {
                        inner.cache_bytes -= cost(sid, &old);
                    }
                    Lookup::Miss
                }
                None => Lookup::Miss,
            },
        }
    }

    /// Adds a write to the journal (memory and disk), if `accept` says so
    /// under the journal's lock. `accept` is told whether the session
    /// already has an entry; the store adds "or the breaker is not closed",
    /// so that the decision and the write are one step against the
    /// write-back closing the breaker. `sent` is the document of a save
    /// that was sent to the database without an answer: the row may hold
    /// it.
    pub(crate) fn journal_if(
        &self,
        sid: &str,
        write: impl FnOnce() -> Pending,
        sent: Option<&str>,
        accept: impl FnOnce(bool) -> bool,
    ) -> Result<Journaled, Refused> {
        let mut inner = self.lock();
        let pending = inner.journal.contains_key(sid);
        if !accept(pending) {
            return Ok(Journaled::No);
        }
        let journal = self.journal.as_ref().ok_or(Refused::Off)?;
        let (mut entry, previous) = match inner.journal.get(sid) {
            Some(live) => {
                let mut entry = live.entry.clone();
                entry.write = entry.write.then(write());
                (entry, Some(live.seq))
            }
            None => {
                // Built only now: a write that goes to the database never
                // copies its document into an entry.
                let mut base = match inner.cache.peek(sid) {
                    Some(cached) => Base {
                        absent: false,
                        docs: cached
                            .earlier
                            .iter()
                            .map(|prefix| format!("{prefix:016x}"))
                            .chain([digest(&cached.session.json)])
                            .collect(),
                    },
                    None => Base {
                        absent: true,
                        docs: Vec::new(),
                    },
                };
                for doc in inner.doubt.pop(sid).unwrap_or_default() {
                    base.add_doc(doc);
                }
                let entry = Entry {
                    write: write(),
                    base,
                    in_doubt_since: None,
                };
                (entry, None)
            }
        };
        if let Some(json) = sent {
            entry.base.add_doc(digest(json));
            entry.in_doubt_since = Some(unix_ms_now());
        }
        // Refused: the documents the row may hold are not forgotten.
        let docs = previous.is_none().then(|| entry.base.docs.clone());
        let ticket = match inner.store(journal, sid, entry, previous) {
            Ok(ticket) => ticket,
            Err(e) => {
                if let Some(docs) = docs.filter(|d| !d.is_empty()) {
                    inner.doubt.put(sid.to_owned(), docs);
                }
                return Err(e.into());
            }
        };
        inner.apply_to_cache(sid, self.settings);
        Ok(Journaled::Yes(ticket))
    }

    /// Waits until a journaled write is on disk.
    pub(crate) async fn durable(&self, ticket: Ticket) -> Result<(), Refused> {
        let journal = self.journal.as_ref().ok_or(Refused::Off)?;
        Ok(journal.durable(ticket).await?)
    }

    /// Entries waiting.
    pub(crate) fn journal_len(&self) -> usize {
        self.lock().journal.len()
    }

    /// Bytes the journal's live entries take on disk.
    pub(crate) fn journal_bytes(&self) -> u64 {
        self.lock().live_bytes
    }

    /// The oldest entry, to write back: `(sequence, sid, entry)`.
    pub(crate) fn oldest(&self) -> Option<(u64, String, Entry)> {
        let inner = self.lock();
        let (seq, sid) = inner.order.first_key_value()?;
        Some((*seq, sid.clone(), inner.journal[sid].entry.clone()))
    }

    /// The latest moment a journaled write was in doubt (Unix ms).
    pub(crate) fn latest_doubt(&self) -> Option<i64> {
        let inner = self.lock();
        inner
            .journal
            .values()
            .filter_map(|l| l.entry.in_doubt_since)
            .max()
    }

    /// Removes an entry written back (or set aside), unless it changed
    /// meanwhile; the `done` record is durable with the next sync.
    pub(crate) fn written_back(&self, seq: u64, sid: &str) -> bool {
        self.lock().remove(self.journal.as_ref(), seq, sid)
    }

    /// The write `landed` of entry `seq` reached the database. The entry is
    /// removed, unless a newer write joined it meanwhile: then the row now
    /// holds what landed, which that newer write must accept as its base.
    pub(crate) fn landed(&self, seq: u64, sid: &str, landed: &Pending) {
        {
            let mut inner = self.lock();
            if inner.remove(self.journal.as_ref(), seq, sid) {
                // Under the same lock: a direct write that follows cannot
                // be overtaken by this older copy in the cache.
                if let Pending::Save { json, expire } = landed {
                    let session = StoredSession {
                        json: json.clone(),
                        expire: *expire,
                    };
                    inner.saved(sid, session, self.settings);
                }
                return;
            }
        }
        self.rebase(sid, landed, None);
    }

    /// A write-back statement carrying `sent` went unanswered: the row may
    /// now hold it, and a late commit must be waited out.
    pub(crate) fn written_back_in_doubt(&self, sid: &str, sent: &Pending) {
        self.rebase(sid, sent, Some(unix_ms_now()));
    }

    /// Adds what `written` left in the row to the base of `sid`'s current
    /// entry (whatever its sequence number now).
    fn rebase(&self, sid: &str, written: &Pending, in_doubt_since: Option<i64>) {
        let Some(journal) = &self.journal else { return };
        let mut inner = self.lock();
        let Some(live) = inner.journal.get(sid) else {
            return;
        };
        let (seq, mut entry) = (live.seq, live.entry.clone());
        match written {
            Pending::Save { json, .. } => entry.base.add_doc(digest(json)),
            Pending::Destroy => entry.base.absent = true,
            Pending::Touch { .. } => {}
        }
        if in_doubt_since.is_some() {
            entry.in_doubt_since = in_doubt_since;
        }
        // Past the byte limit if need be: what the row may hold must reach
        // the base, or the write-back would take this instance's own write
        // for someone else's. Not waited on: if it is lost in a crash, the
        // entry meets a conflict at write-back and is kept as a dead
        // letter, not lost.
        let _ = inner.store_with(journal, sid, entry, Some(seq), Limit::Ignored);
    }

    /// Runs `f` with the journal locked, if it is empty (closing the
    /// breaker must not race a write joining the journal).
    pub(crate) fn if_empty<T>(&self, f: impl FnOnce() -> T) -> Option<T> {
        let inner = self.lock();
        inner.journal.is_empty().then(f)
    }

    /// Shrinks the file back to its header once nothing is left.
    pub(crate) fn truncate_if_empty(&self) {
        if let Some(journal) = &self.journal {
            journal.truncate_if(|| self.lock().journal.is_empty());
        }
    }

    /// Takes in entries adopted from a dead store's file (in order). An
    /// entry for a session that already has one here cannot be merged (each
    /// was based on its own view of the row): it is returned, to be set
    /// aside as a dead letter.
    pub(crate) fn adopt(&self, entries: Vec<(String, Entry)>) -> Vec<(String, Entry)> {
        let Some(journal) = &self.journal else {
            return entries;
        };
        let mut clashes = Vec::new();
        let mut inner = self.lock();
        for (sid, entry) in entries {
            if inner.journal.contains_key(&sid) {
                clashes.push((sid, entry));
                continue;
            }
            // Already durable in this store's file (written at adoption);
            // stored again under a sequence number of this store's.
            let _ = inner.store_unbounded(journal, &sid, entry);
            inner.apply_to_cache(&sid, self.settings);
        }
        clashes
    }
}

impl Inner {
    /// What a save that reached the database leaves: nothing in doubt, and
    /// its copy in the cache.
    fn saved(&mut self, sid: &str, session: StoredSession, settings: FallbackSettings) {
        self.doubt.pop(sid);
        self.put(sid, session, Origin::Own, settings);
    }

    /// Caches `session` (nothing with the cache off). The document it
    /// replaces joins the session's earlier documents if both are this
    /// instance's; a document read that differs from the cached one may
    /// be another writer's, and starts the history again.
    fn put(
        &mut self,
        sid: &str,
        session: StoredSession,
        origin: Origin,
        settings: FallbackSettings,
    ) {
        if settings.max_entries == 0 {
            return;
        }
        // A session already cached (the common case: every save of an
        // active one) is replaced in place, without a new key.
        if let Some(cached) = self.cache.get_mut(sid) {
            let before = cost(sid, cached);
            if cached.session.json != session.json {
                match origin {
                    Origin::Own => {
                        if cached.earlier.len() == EARLIER_DOCS {
                            cached.earlier.remove(0);
                        }
                        cached.earlier.push(doc_prefix(&cached.session.json));
                    }
                    Origin::Read => cached.earlier.clear(),
                }
            }
            cached.session = session;
            let after = cost(sid, cached);
            self.cache_bytes = self.cache_bytes + after - before;
        } else {
            let cached = Cached {
                session,
                earlier: Vec::new(),
            };
            self.cache_bytes += cost(sid, &cached);
            self.cache.put(sid.to_owned(), cached);
        }
        while self.cache.len() > settings.max_entries || self.cache_bytes > settings.max_bytes {
            match self.cache.pop_lru() {
                Some((old_sid, old)) => self.cache_bytes -= cost(&old_sid, &old),
                None => break,
            }
        }
    }

    /// Removes `sid`'s entry if it is still number `seq`, with its `done`
    /// record (durable with the next sync).
    fn remove(&mut self, journal: Option<&Journal>, seq: u64, sid: &str) -> bool {
        if self.journal.get(sid).is_none_or(|l| l.seq != seq) {
            return false;
        }
        let live = self.journal.remove(sid).expect("checked above");
        self.order.remove(&seq);
        self.live_bytes -= live.line.len() as u64;
        if let Some(journal) = journal {
            journal.append_done(seq, sid);
        }
        true
    }

    /// Appends `entry` as `sid`'s new state to the file, then to memory,
    /// within the byte limit.
    fn store(
        &mut self,
        journal: &Journal,
        sid: &str,
        entry: Entry,
        previous: Option<u64>,
    ) -> Result<Ticket, JournalError> {
        self.store_with(journal, sid, entry, previous, Limit::Kept)
    }

    fn store_with(
        &mut self,
        journal: &Journal,
        sid: &str,
        entry: Entry,
        previous: Option<u64>,
        limit: Limit,
    ) -> Result<Ticket, JournalError> {
        let seq = self.next_seq;
        let line = Journal::put_line(seq, sid, &entry);
        let replaced = previous
            .and_then(|_| self.journal.get(sid))
            .map_or(0, |l| l.line.len() as u64);
        let live = self.live_bytes - replaced + line.len() as u64;
        let ticket = match limit {
            Limit::Kept => journal.append_put(&line, live, || {
                // Compaction: every live record but the one being
                // replaced, then this one.
                self.order
                    .values()
                    .filter(|s| s.as_str() != sid)
                    .map(|s| self.journal[s].line.clone())
                    .chain(std::iter::once(line.clone()))
                    .collect()
            })?,
            Limit::Ignored => journal.append_put_unbounded(&line)?,
        };
        self.next_seq += 1;
        if let Some(old) = self.journal.remove(sid) {
            self.order.remove(&old.seq);
            self.live_bytes -= old.line.len() as u64;
        }
        self.live_bytes += line.len() as u64;
        self.order.insert(seq, sid.to_owned());
        self.journal
            .insert(sid.to_owned(), Live { seq, entry, line });
        Ok(ticket)
    }

    /// As [`Inner::store`], past the byte limit if need be (adopted entries
    /// were acknowledged by their store: they are never refused).
    fn store_unbounded(
        &mut self,
        journal: &Journal,
        sid: &str,
        entry: Entry,
    ) -> Result<Ticket, JournalError> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let line = Journal::put_line(seq, sid, &entry);
        let ticket = journal.append_put_unbounded(&line);
        self.live_bytes += line.len() as u64;
        self.order.insert(seq, sid.to_owned());
        self.journal
            .insert(sid.to_owned(), Live { seq, entry, line });
        ticket
    }

    /// Brings the cache in line with `sid`'s journal entry.
    fn apply_to_cache(&mut self, sid: &str, settings: FallbackSettings) {
        let write = self.journal[sid].entry.write.clone();
        match write {
            Pending::Save { json, expire } => {
                self.put(sid, StoredSession { json, expire }, Origin::Own, settings)
            }
            Pending::Touch { expire } => {
                if let Some(cached) = self.cache.get_mut(sid) {
                    cached.session.expire = expire;
                }
            }
            Pending::Destroy => {
                if let Some(old) = self.cache.pop(sid) {
                    self.cache_bytes -= cost(sid, &old);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fallback(max_entries: usize, max_bytes: usize) -> (Fallback, tempfile::TempDir) {
        fallback_with_journal(max_entries, max_bytes, 1 << 20)
    }

    fn fallback_with_journal(
        max_entries: usize,
        max_bytes: usize,
        journal_bytes: u64,
    ) -> (Fallback, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let crate::resilience::journal::Opened { journal, .. } =
            Journal::open(dir.path(), "public.s", journal_bytes).unwrap();
        let f = Fallback::new(
            FallbackSettings {
                max_entries,
                max_bytes,
            },
            Some(journal),
        );
        (f, dir)
    }

    fn session(json: &str, in_secs: i64) -> StoredSession {
        StoredSession {
            json: json.into(),
            expire: OffsetDateTime::now_utc() + time::Duration::seconds(in_secs),
        }
    }

    fn now() -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    fn always(_: bool) -> bool {
        true
    }

    fn journal(f: &Fallback, sid: &str, write: Pending) {
        assert!(matches!(
            f.journal_if(sid, || write, None, always).unwrap(),
            Journaled::Yes(_)
        ));
    }

    fn save(json: &str, expire: OffsetDateTime) -> Pending {
        Pending::Save {
            json: json.into(),
            expire,
        }
    }

    #[test]
    fn the_cache_evicts_the_least_recently_used_by_count_and_bytes() {
        let (f, _d) = fallback(2, 10_000);
        f.remember("a", session("{}", 60));
        f.remember("b", session("{}", 60));
        assert!(matches!(f.lookup("a", now()), Lookup::Cached(_))); // a is now the most recent
        f.remember("c", session("{}", 60));
        assert_eq!(f.lookup("b", now()), Lookup::Miss);
        assert!(matches!(f.lookup("a", now()), Lookup::Cached(_)));

        let (f, _d) = fallback(100, 300);
        f.remember("a", session(&"x".repeat(100), 60));
        f.remember("b", session(&"x".repeat(100), 60));
        assert_eq!(
            f.lookup("a", now()),
            Lookup::Miss,
            "over 300 bytes: the oldest goes"
        );
        assert!(matches!(f.lookup("b", now()), Lookup::Cached(_)));
    }

    #[test]
    fn expired_copies_are_not_served() {
        let (f, _d) = fallback(10, 10_000);
        f.remember("a", session("{}", -1));
        assert_eq!(f.lookup("a", now()), Lookup::Miss);
    }

    #[test]
    fn the_journal_keeps_the_latest_state_in_order_with_its_first_base() {
        let (f, _d) = fallback(10, 10_000);
        f.remember("a", session("old", 60));
        journal(&f, "a", save("1", now()));
        journal(&f, "b", save("x", now()));
        let later = now() + time::Duration::HOUR;
        journal(&f, "a", Pending::Touch { expire: later });
        journal(&f, "b", Pending::Destroy);
        journal(&f, "b", Pending::Touch { expire: later });
        assert_eq!(f.journal_len(), 2);
        let (seq, sid, entry) = f.oldest().unwrap();
        assert_eq!(sid, "a");
        assert_eq!(entry.write, save("1", later));
        assert_eq!(
            entry.base,
            Base {
                absent: false,
                docs: vec![digest("old")]
            },
            "based on the row as last read"
        );
        assert!(f.written_back(seq, &sid));
        let (_, sid, entry) = f.oldest().unwrap();
        assert_eq!((sid.as_str(), &entry.write), ("b", &Pending::Destroy));
        assert!(entry.base.absent, "b was never seen: created in the outage");
        assert_eq!(
            f.lookup("b", now()),
            Lookup::Pending(None),
            "destroyed stays destroyed"
        );
    }

    #[test]
    fn an_entry_changed_during_its_write_back_stays() {
        let (f, _d) = fallback(10, 10_000);
        journal(&f, "a", save("1", now()));
        let (seq, sid, _) = f.oldest().unwrap();
        journal(&f, "a", save("2", now()));
        assert!(!f.written_back(seq, &sid));
        assert_eq!(f.journal_len(), 1);
        let (seq, sid, entry) = f.oldest().unwrap();
        assert!(matches!(entry.write, Pending::Save { json, .. } if json == "2"));
        assert!(f.written_back(seq, &sid));
        assert_eq!(f.journal_len(), 0);
        assert_eq!(f.journal_bytes(), 0);
    }

    #[test]
    fn a_write_joining_during_its_write_back_accepts_what_landed() {
        let (f, _d) = fallback(10, 10_000);
        f.remember("a", session("seen", 60));
        journal(&f, "a", save("1", now()));
        let (seq, sid, landing) = f.oldest().unwrap();
        journal(&f, "a", save("2", now())); // joins while "1" is written back
        f.landed(seq, &sid, &landing.write);
        let (_, _, entry) = f.oldest().unwrap();
        assert_eq!(entry.base.docs, vec![digest("seen"), digest("1")]);
    }

    #[test]
    fn a_save_in_doubt_is_accepted_as_a_base() {
        let (f, _d) = fallback(10, 10_000);
        f.remember("a", session("seen", 60));
        // A 503'd save that may still commit, then a journaled one.
        f.in_doubt("a", "sent-then-503");
        journal(&f, "a", save("2", now()));
        // And one journaled after its own direct attempt went unanswered.
        f.journal_if("b", || save("3", now()), Some("3"), always)
            .unwrap();
        let (seq, _, a) = f.oldest().unwrap();
        assert_eq!(a.base.docs, vec![digest("seen"), digest("sent-then-503")]);
        assert_eq!(a.in_doubt_since, None);
        f.written_back(seq, "a");
        let (_, _, b) = f.oldest().unwrap();
        assert!(b.base.absent && b.base.docs == vec![digest("3")]);
        assert!(b.in_doubt_since.is_some());
    }

    #[test]
    fn a_base_accepts_this_instances_earlier_documents_until_it_reads_another_writers() {
        let prefix = |json: &str| digest(json)[..16].to_owned();
        let (f, _d) = fallback(10, 10_000);
        // Saves acknowledged by the database: after a failover to an
        // asynchronous replica the row may hold any of them.
        f.remember("a", session("0", 60));
        for json in ["1", "2", "3"] {
            f.saved("a", session(json, 60));
        }
        journal(&f, "a", save("4", now()));
        let (seq, _, a) = f.oldest().unwrap();
        assert_eq!(
            a.base.docs,
            vec![prefix("0"), prefix("1"), prefix("2"), digest("3")]
        );
        f.written_back(seq, "a");
        // A document read that this instance did not write may be
        // another writer's: nothing before it is accepted any more.
        f.saved("b", session("1", 60));
        f.saved("b", session("2", 60));
        f.remember("b", session("theirs", 60));
        journal(&f, "b", save("3", now()));
        let (_, _, b) = f.oldest().unwrap();
        assert_eq!(b.base.docs, vec![digest("theirs")]);
        // At most EARLIER_DOCS are remembered, the oldest dropped first.
        for n in 0..(EARLIER_DOCS + 5) {
            f.saved("c", session(&n.to_string(), 60));
        }
        let inner = f.lock();
        let earlier = &inner.cache.peek("c").unwrap().earlier;
        assert_eq!(earlier.len(), EARLIER_DOCS);
        assert_eq!(earlier[0], doc_prefix("4"));
    }

    #[test]
    fn a_full_journal_refuses_new_data_but_not_a_known_sessions_smaller_state() {
        let (f, _d) = fallback_with_journal(10, 10_000, 1_000);
        journal(&f, "a", save(&"x".repeat(300), now()));
        journal(&f, "b", save(&"x".repeat(300), now()));
        let refused = f.journal_if("c", || save(&"x".repeat(300), now()), None, always);
        assert!(
            matches!(refused, Err(Refused::Journal(JournalError::Full { .. }))),
            "{refused:?}"
        );
        // A logout replaces a large entry by a small one: always room.
        journal(&f, "a", Pending::Destroy);
        assert_eq!(f.journal_len(), 2);
    }

    #[test]
    fn with_the_fallback_off_nothing_is_journaled() {
        let f = Fallback::new(
            FallbackSettings {
                max_entries: 10,
                max_bytes: 10_000,
            },
            None,
        );
        assert!(matches!(
            f.journal_if("a", || Pending::Destroy, None, always),
            Err(Refused::Off)
        ));
        assert!(matches!(
            f.journal_if("a", || Pending::Destroy, None, |_| false),
            Ok(Journaled::No)
        ));
    }

    #[test]
    fn accept_decides_under_the_lock() {
        let (f, _d) = fallback(10, 10_000);
        assert!(matches!(
            f.journal_if("a", || Pending::Destroy, None, |pending| pending)
                .unwrap(),
            Journaled::No
        ));
        assert_eq!(f.journal_len(), 0);
    }

    #[test]
    fn adopted_entries_join_unless_the_session_has_one_already() {
        let (f, _d) = fallback(10, 10_000);
        journal(&f, "a", save("mine", now()));
        let theirs = |json: &str| Entry {
            write: save(json, now() + time::Duration::HOUR),
            base: Base::default(),
            in_doubt_since: None,
        };
        let clashes = f.adopt(vec![
            ("a".into(), theirs("theirs")),
            ("b".into(), theirs("b")),
        ]);
        assert_eq!(clashes.len(), 1);
        assert_eq!(clashes[0].0, "a");
        assert_eq!(f.journal_len(), 2);
        assert!(matches!(f.lookup("b", now()), Lookup::Pending(Some(s)) if s.json == "b"));
    }
}
