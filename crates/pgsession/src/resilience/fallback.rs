//! The fallback: a bounded cache of sessions recently read or written, and
//! the ordered journal of writes accepted while the database was away.
//!
//! The journal keeps the latest state per session (a save, a new expiry, or
//! a deletion), in the order sessions were last changed, so that writing it
//! back gives the database exactly what the clients were told. While a
//! session has an entry in the journal, the journal is its truth: reads come
//! from it and further writes join it, even once the breaker is closed, so a
//! newer direct write can never be overtaken by an older journal entry.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use lru::LruCache;
use time::OffsetDateTime;

use crate::store::StoredSession;

/// A write waiting in the journal.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Pending {
    /// Insert or replace the session.
    Save {
        json: String,
        #[serde(with = "time::serde::rfc3339")]
        expire: OffsetDateTime,
    },
    /// Move the expiry only.
    Touch {
        #[serde(with = "time::serde::rfc3339")]
        expire: OffsetDateTime,
    },
    /// Delete the session; a destroyed session stays destroyed.
    Destroy,
}

impl Pending {
    /// The entry that results from `self` followed by `next`.
    fn then(self, next: Pending) -> Pending {
        match (self, next) {
            (Pending::Save { json, .. }, Pending::Touch { expire }) => {
                Pending::Save { json, expire }
            }
            (Pending::Destroy, Pending::Touch { .. }) => Pending::Destroy,
            (_, next) => next,
        }
    }
}

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
    pub(crate) max_journal: usize,
}

#[derive(Debug)]
pub(crate) struct Fallback {
    settings: FallbackSettings,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    cache: LruCache<String, StoredSession>,
    cache_bytes: usize,
    journal: HashMap<String, (u64, Pending)>,
    order: BTreeMap<u64, String>,
    next_seq: u64,
    /// Sessions just served from the fallback after the database failed
    /// them, until when: their writes go straight to the journal rather
    /// than wait on the database a second time in the same request.
    degraded: HashMap<String, std::time::Instant>,
}

/// The journal is full: the write cannot be accepted without risking it.
#[derive(Debug)]
pub(crate) struct JournalFull;

fn cost(sid: &str, session: &StoredSession) -> usize {
    sid.len() + session.json.len() + 64
}

impl Fallback {
    pub(crate) fn new(settings: FallbackSettings) -> Fallback {
        Fallback {
            settings,
            inner: Mutex::new(Inner {
                cache: LruCache::unbounded(),
                cache_bytes: 0,
                journal: HashMap::new(),
                order: BTreeMap::new(),
                next_seq: 0,
                degraded: HashMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Each change below leaves the maps consistent before it can panic
        // (allocation failure aborts), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps a copy of a session read from, or written to, the database.
    pub(crate) fn remember(&self, sid: &str, session: StoredSession) {
        if self.settings.max_entries == 0 {
            return;
        }
        let mut inner = self.lock();
        inner.put(sid, session, self.settings);
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
            cached.expire = expire;
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
        match inner.journal.get(sid).map(|(_, p)| p.clone()) {
            Some(Pending::Save { json, expire }) => {
                Lookup::Pending(live(StoredSession { json, expire }))
            }
            Some(Pending::Destroy) => Lookup::Pending(None),
            Some(Pending::Touch { expire }) => match inner.cache.get(sid) {
                Some(cached) => Lookup::Pending(live(StoredSession {
                    json: cached.json.clone(),
                    expire,
                })),
                None => Lookup::Miss,
            },
            None if !cache => Lookup::Miss,
            None => match inner.cache.get(sid).cloned() {
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

    /// Marks `sid` as just served from the fallback, until `until`.
    pub(crate) fn mark_degraded(&self, sid: &str, until: std::time::Instant) {
        let mut inner = self.lock();
        if inner.degraded.len() >= self.settings.max_journal {
            let now = std::time::Instant::now();
            inner.degraded.retain(|_, until| *until > now);
        }
        if inner.degraded.len() < self.settings.max_journal {
            inner.degraded.insert(sid.to_owned(), until);
        }
    }

    /// Adds a write to the journal (and to the cache), if `accept` says so
    /// under the journal's lock. `accept` is told whether the session
    /// already has an entry or was just served from the fallback; the store
    /// adds "or the breaker is not closed", so that the decision and the
    /// write are one step against the write-back closing the breaker.
    pub(crate) fn journal_if(
        &self,
        sid: &str,
        write: impl FnOnce() -> Pending,
        accept: impl FnOnce(bool) -> bool,
    ) -> Result<bool, JournalFull> {
        let mut inner = self.lock();
        let degraded = match inner.degraded.get(sid) {
            Some(until) if *until > std::time::Instant::now() => true,
            Some(_) => {
                inner.degraded.remove(sid);
                false
            }
            None => false,
        };
        let pending = inner.journal.contains_key(sid);
        if !accept(pending || degraded) {
            return Ok(false);
        }
        if !pending && inner.journal.len() >= self.settings.max_journal {
            return Err(JournalFull);
        }
        // Built only now: a write that goes to the database never copies
        // its document into an entry.
        inner.record(sid, write(), self.settings);
        Ok(true)
    }

    /// Entries waiting.
    pub(crate) fn journal_len(&self) -> usize {
        self.lock().journal.len()
    }

    /// The oldest entry, to write back: `(sequence, sid, write)`.
    pub(crate) fn oldest(&self) -> Option<(u64, String, Pending)> {
        let inner = self.lock();
        let (seq, sid) = inner.order.first_key_value()?;
        let (_, pending) = &inner.journal[sid];
        Some((*seq, sid.clone(), pending.clone()))
    }

    /// Removes an entry written back, unless it changed meanwhile.
    pub(crate) fn written_back(&self, seq: u64, sid: &str) {
        let mut inner = self.lock();
        if inner.journal.get(sid).is_some_and(|(s, _)| *s == seq) {
            inner.journal.remove(sid);
            inner.order.remove(&seq);
        }
    }

    /// Runs `f` with the journal locked, if it is empty (closing the
    /// breaker must not race a write joining the journal).
    pub(crate) fn if_empty<T>(&self, f: impl FnOnce() -> T) -> Option<T> {
        let inner = self.lock();
        inner.journal.is_empty().then(f)
    }

    /// Every entry, oldest first (for the spool file).
    pub(crate) fn entries(&self) -> Vec<(String, Pending)> {
        let inner = self.lock();
        inner
            .order
            .values()
            .map(|sid| (sid.clone(), inner.journal[sid].1.clone()))
            .collect()
    }

    /// Puts spooled entries back, in order, ahead of nothing (at start-up).
    pub(crate) fn restore(&self, entries: Vec<(String, Pending)>) {
        let mut inner = self.lock();
        for (sid, write) in entries {
            inner.record(&sid, write, self.settings);
        }
    }
}

impl Inner {
    fn put(&mut self, sid: &str, session: StoredSession, settings: FallbackSettings) {
        self.cache_bytes += cost(sid, &session);
        // A session already cached (the common case: every save of an
        // active one) is replaced in place, without a new key.
        let old = match self.cache.get_mut(sid) {
            Some(cached) => Some(std::mem::replace(cached, session)),
            None => self.cache.put(sid.to_owned(), session),
        };
        if let Some(old) = old {
            self.cache_bytes -= cost(sid, &old);
        }
        while self.cache.len() > settings.max_entries || self.cache_bytes > settings.max_bytes {
            match self.cache.pop_lru() {
                Some((old_sid, old)) => self.cache_bytes -= cost(&old_sid, &old),
                None => break,
            }
        }
    }

    fn record(&mut self, sid: &str, write: Pending, settings: FallbackSettings) {
        let merged = match self.journal.remove(sid) {
            Some((seq, previous)) => {
                self.order.remove(&seq);
                previous.then(write)
            }
            None => write,
        };
        match &merged {
            Pending::Save { json, expire } => {
                if settings.max_entries > 0 {
                    self.put(
                        sid,
                        StoredSession {
                            json: json.clone(),
                            expire: *expire,
                        },
                        settings,
                    );
                }
            }
            Pending::Touch { expire } => {
                if let Some(cached) = self.cache.get_mut(sid) {
                    cached.expire = *expire;
                }
            }
            Pending::Destroy => {
                if let Some(old) = self.cache.pop(sid) {
                    self.cache_bytes -= cost(sid, &old);
                }
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.order.insert(seq, sid.to_owned());
        self.journal.insert(sid.to_owned(), (seq, merged));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fallback(max_entries: usize, max_bytes: usize) -> Fallback {
        Fallback::new(FallbackSettings {
            max_entries,
            max_bytes,
            max_journal: 3,
        })
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

    #[test]
    fn the_cache_evicts_the_least_recently_used_by_count_and_bytes() {
        let f = fallback(2, 10_000);
        f.remember("a", session("{}", 60));
        f.remember("b", session("{}", 60));
        assert!(matches!(f.lookup("a", now()), Lookup::Cached(_))); // a is now the most recent
        f.remember("c", session("{}", 60));
        assert_eq!(f.lookup("b", now()), Lookup::Miss);
        assert!(matches!(f.lookup("a", now()), Lookup::Cached(_)));

        let f = fallback(100, 300);
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
        let f = fallback(10, 10_000);
        f.remember("a", session("{}", -1));
        assert_eq!(f.lookup("a", now()), Lookup::Miss);
    }

    #[test]
    fn the_journal_keeps_the_latest_state_in_order() {
        let f = fallback(10, 10_000);
        let always = |_| true;
        f.journal_if(
            "a",
            || Pending::Save {
                json: "1".into(),
                expire: now(),
            },
            always,
        )
        .unwrap();
        f.journal_if(
            "b",
            || Pending::Save {
                json: "x".into(),
                expire: now(),
            },
            always,
        )
        .unwrap();
        let later = now() + time::Duration::HOUR;
        f.journal_if("a", || Pending::Touch { expire: later }, always)
            .unwrap();
        f.journal_if("b", || Pending::Destroy, always).unwrap();
        f.journal_if("b", || Pending::Touch { expire: later }, always)
            .unwrap();
        assert_eq!(f.journal_len(), 2);
        assert_eq!(
            f.entries(),
            vec![
                (
                    "a".into(),
                    Pending::Save {
                        json: "1".into(),
                        expire: later
                    }
                ),
                ("b".into(), Pending::Destroy),
            ]
        );
        assert_eq!(
            f.lookup("b", now()),
            Lookup::Pending(None),
            "destroyed stays destroyed"
        );
        assert_eq!(
            f.lookup("a", now()),
            Lookup::Pending(Some(StoredSession {
                json: "1".into(),
                expire: later
            }))
        );
    }

    #[test]
    fn an_entry_changed_during_its_write_back_stays() {
        let f = fallback(10, 10_000);
        f.journal_if(
            "a",
            || Pending::Save {
                json: "1".into(),
                expire: now(),
            },
            |_| true,
        )
        .unwrap();
        let (seq, sid, _) = f.oldest().unwrap();
        f.journal_if(
            "a",
            || Pending::Save {
                json: "2".into(),
                expire: now(),
            },
            |_| true,
        )
        .unwrap();
        f.written_back(seq, &sid);
        assert_eq!(f.journal_len(), 1);
        let (seq, sid, write) = f.oldest().unwrap();
        assert!(matches!(write, Pending::Save { json, .. } if json == "2"));
        f.written_back(seq, &sid);
        assert_eq!(f.journal_len(), 0);
    }

    #[test]
    fn a_full_journal_refuses_new_sessions_but_takes_known_ones() {
        let f = fallback(10, 10_000);
        for sid in ["a", "b", "c"] {
            f.journal_if(sid, || Pending::Destroy, |_| true).unwrap();
        }
        assert!(f.journal_if("d", || Pending::Destroy, |_| true).is_err());
        assert!(f.journal_if("a", || Pending::Destroy, |_| true).is_ok());
    }

    #[test]
    fn a_session_just_served_from_the_fallback_goes_to_the_journal() {
        let f = fallback(10, 10_000);
        f.mark_degraded(
            "a",
            std::time::Instant::now() + std::time::Duration::from_secs(60),
        );
        assert!(f
            .journal_if("a", || Pending::Destroy, |known| known)
            .unwrap());
        f.mark_degraded(
            "b",
            std::time::Instant::now() - std::time::Duration::from_secs(1),
        );
        assert!(
            !f.journal_if("b", || Pending::Destroy, |known| known)
                .unwrap(),
            "the mark has lapsed"
        );
    }

    #[test]
    fn accept_decides_under_the_lock() {
        let f = fallback(10, 10_000);
        assert!(!f
            .journal_if("a", || Pending::Destroy, |pending| pending)
            .unwrap());
        assert_eq!(f.journal_len(), 0);
    }
}
