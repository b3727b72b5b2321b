//! The store engine as a [tower-sessions] 0.14 session store: owns
//! [`TowerSessionStore`], the mapping between tower-sessions records and
//! express-session documents, and the one place where [`Error`] becomes a
//! tower-sessions error.
//!
//! Rows are written exactly as express-session and connect-pg-simple write
//! them, so the table can be shared with a Node service:
//!
//! - `sid` is the tower-sessions [`Id`] in its `Display` form (22 characters
//!   of unpadded base64url), as tower-sessions' own stores key their rows;
//! - `sess` holds the record's data keys at the top level, plus a `cookie`
//!   object (`originalMaxAge`, `expires` as JavaScript's `toISOString`,
//!   `httpOnly`, `path`) built with [`SessionRecord`] and [`CookieData`];
//! - `expire` is the record's expiry date.
//!
//! Reading, the `cookie` object stays ours: it is not handed to
//! tower-sessions as data, and the expiry comes from the `expire` column
//! (which connect-pg-simple's `touch` moves without rewriting the document).
//! A row whose document is not a JSON object (or whose `cookie` is not one)
//! is treated as no session, with a warning that names neither the full id
//! nor the data.
//!
//! A data key named `cookie` works: since express-session keeps its cookie
//! under that name, the adapter stores the key `cookie` as `_cookie`, and
//! any key of the form `_…_cookie` (underscores, then `cookie`) with one
//! more underscore, and reverses this when it loads. Only those keys
//! change, so a Node service sharing the table sees them with the extra
//! underscore. (tower-sessions' `Session::insert` never reaches the store,
//! so the adapter could not refuse the key there, only at save time.)
//!
//! Expiry dates are kept to the microsecond, as the `timestamp(6)` column
//! does: [`create`](SessionStore::create) and [`save`](SessionStore::save)
//! store the record's expiry date cut to whole microseconds, and `create`
//! cuts the record it is given too, so that what it holds is exactly what
//! [`load`](SessionStore::load) returns. A record given to `save` (which
//! cannot be changed) loads back up to 999 ns earlier than its
//! `expiry_date`.
//!
//! [`create`](SessionStore::create) is atomic: an insert-only statement,
//! drawing a new id until it finds a free one, so concurrent creates never
//! overwrite one another. An id held by any row, even an expired one, is
//! taken. While the database is away, a created session is fsynced to the
//! journal like every write of an outage (an id that the journal or the
//! cache knows is taken); at write-back it is inserted only if its id is
//! still free, and otherwise kept as a dead letter (`id_taken`, see
//! `pgsession journal`). With 128 random bits per id, that takes a broken
//! random number generator.
//!
//! Two things a shared table does not make shared: the cookies (tower-sessions
//! sends the bare id, express-session a signed `s:` value), and a
//! browser-session expiry ([`Expiry::OnSessionEnd`](tower_sessions_core::Expiry)),
//! which tower-sessions stores as a two-week expiry date and so reaches the
//! document as a dated cookie.
//!
//! Expired rows are removed by the store's pruner (on unless `prune` is
//! off), or through
//! [`ExpiredDeletion::delete_expired`], which runs one [`Store::prune`].
//!
//! ```no_run
//! use axum::{routing::get, Router};
//! use pgsession::tower_sessions::TowerSessionStore;
//! use tower_sessions::{Expiry, Session, SessionManagerLayer};
//!
//! async fn count(session: Session) -> String {
//!     let n: u64 = session.get("count").await.ok().flatten().unwrap_or(0) + 1;
//!     match session.insert("count", n).await {
//!         Ok(()) => format!("visit {n}"),
//!         Err(e) => format!("session error: {e}"),
//!     }
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = pgsession::Config::from_env()?;
//! let store = pgsession::Store::new(config)?; // prunes expired rows too
//!
//! let sessions = SessionManagerLayer::new(TowerSessionStore::new(store.clone()))
//!     .with_secure(false)
//!     .with_expiry(Expiry::OnInactivity(time::Duration::hours(1)));
//! let app = Router::new().route("/", get(count)).layer(sessions);
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app).await?;
//! store.close().await;
//! # Ok(()) }
//! ```
//!
//! [tower-sessions]: https://docs.rs/tower-sessions/0.14

use async_trait::async_trait;
use time::OffsetDateTime;
use tower_sessions_core::session::{Id, Record};
use tower_sessions_core::session_store::{self, ExpiredDeletion, SessionStore};

use crate::error::Error;
use crate::record::{CookieData, RecordError, SessionRecord};
use crate::store::{PruneOutcome, Store};

/// A [`Store`] as a tower-sessions [`SessionStore`] (and
/// [`ExpiredDeletion`]), writing express-session documents.
///
/// Cheap to clone: clones share the store and its pool.
#[derive(Debug, Clone)]
pub struct TowerSessionStore {
    store: Store,
}

impl TowerSessionStore {
    /// Wraps `store`. Its lifecycle stays the caller's: keep a clone to
    /// [`Store::close`] it at shutdown.
    pub fn new(store: Store) -> TowerSessionStore {
        TowerSessionStore { store }
    }

    /// The store underneath.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Gives the store back.
    pub fn into_inner(self) -> Store {
        self.store
    }
}

impl From<Store> for TowerSessionStore {
    fn from(store: Store) -> TowerSessionStore {
        TowerSessionStore::new(store)
    }
}

#[async_trait]
impl SessionStore for TowerSessionStore {
    /// Saves a new session under an id no row has, drawing new ids until
    /// one is free: one insert-only statement per id, so that of
    /// concurrent creates of one id exactly one keeps it. Cuts the record's
    /// expiry date to whole microseconds, as it is stored.
    async fn create(&self, record: &mut Record) -> session_store::Result<()> {
        record.expiry_date = to_micros(record.expiry_date);
        let json = encode(record, OffsetDateTime::now_utc())?;
        for _ in 0..CREATE_ATTEMPTS {
            let sid = record.id.to_string();
            let inserted = self
                .store
                .insert(&sid, &json, record.expiry_date)
                .await
                .map_err(backend)?;
            if inserted {
                return Ok(());
            }
            record.id = Id::default();
        }
        Err(session_store::Error::Backend(format!(
            "no free session id after {CREATE_ATTEMPTS} random ids: is the random number \
             generator broken?"
        )))
    }

    /// Inserts or replaces the session, its expiry date cut to whole
    /// microseconds.
    async fn save(&self, record: &Record) -> session_store::Result<()> {
        let expire = to_micros(record.expiry_date);
        let json = encode(record, OffsetDateTime::now_utc())?;
        self.store
            .save(&record.id.to_string(), &json, expire)
            .await
            .map_err(backend)
    }

    async fn load(&self, id: &Id) -> session_store::Result<Option<Record>> {
        let sid = id.to_string();
        let Some(stored) = self.store.load(&sid).await.map_err(backend)? else {
            return Ok(None);
        };
        match SessionRecord::from_json(&stored.json) {
            Ok(document) => Ok(Some(Record {
                id: *id,
                data: document
                    .into_data()
                    .into_iter()
                    .map(|(key, value)| (data_key(key), value))
                    .collect(),
                expiry_date: stored.expire,
            })),
            Err(e) => {
                tracing::warn!(
                    target: "session_store",
                    sid = %redact(&sid),
                    reason = %unreadable(&e),
                    "stored session is unreadable; treating it as no session"
                );
                Ok(None)
            }
        }
    }

    async fn delete(&self, id: &Id) -> session_store::Result<()> {
        self.store.destroy(&id.to_string()).await.map_err(backend)
    }
}

#[async_trait]
impl ExpiredDeletion for TowerSessionStore {
    /// One [`Store::prune`]. When another instance holds the prune lock,
    /// nothing is done and the result is still `Ok`: that instance is
    /// deleting the same rows.
    async fn delete_expired(&self) -> session_store::Result<()> {
        match self.store.prune().await.map_err(backend)? {
            PruneOutcome::Pruned { .. } => {}
            PruneOutcome::Skipped => tracing::debug!(
                target: "session_store",
                "another instance is pruning; skipped delete_expired"
            ),
        }
        Ok(())
    }
}

/// Ids [`create`](SessionStore::create) draws before it gives up. Ids are
/// 128 random bits: a second taken one already means a broken generator.
const CREATE_ATTEMPTS: usize = 16;

/// The express-session document for `record`, saved at `now`.
///
/// tower-sessions keeps only the expiry date, so `originalMaxAge` is the
/// lifetime left at `now` (what express-session's `maxAge` would say) to the
/// nearest millisecond, never negative; `expires` is the expiry date itself.
fn encode(record: &Record, now: OffsetDateTime) -> session_store::Result<String> {
    let expires = to_micros(record.expiry_date);
    let remaining = ((expires - now).whole_microseconds() + 500).max(0) / 1000;
    let cookie = CookieData {
        original_max_age: Some(i64::try_from(remaining).unwrap_or(i64::MAX)),
        expires: Some(expires),
        ..CookieData::default()
    };
    let mut document = SessionRecord::new(cookie);
    for (key, value) in &record.data {
        document
            .insert(stored_key(key), value)
            .map_err(|e| session_store::Error::Encode(e.to_string()))?;
    }
    Ok(document.to_json())
}

/// `at` cut to whole microseconds: what the `timestamp(6)` column keeps.
fn to_micros(at: OffsetDateTime) -> OffsetDateTime {
    let nanos = at.nanosecond();
    at.replace_nanosecond(nanos - nanos % 1_000)
        .expect("a whole number of microseconds is a valid nanosecond")
}

/// Whether `key` is `cookie` after zero or more underscores: the keys
/// [`stored_key`] escapes.
fn is_cookie_like(key: &str) -> bool {
    key.trim_start_matches('_') == "cookie"
}

/// A data key as the document holds it: `cookie` (express-session's own)
/// and the keys that look like its escaped form get one more `_`.
fn stored_key(key: &str) -> std::borrow::Cow<'_, str> {
    if is_cookie_like(key) {
        format!("_{key}").into()
    } else {
        key.into()
    }
}

/// A document's key as tower-sessions data: [`stored_key`] reversed.
fn data_key(key: String) -> String {
    match key.strip_prefix('_') {
        Some(unescaped) if is_cookie_like(&key) => unescaped.to_owned(),
        _ => key,
    }
}

/// Why a stored document cannot be read, without quoting any of it.
fn unreadable(error: &RecordError) -> String {
    match error {
        // serde_json's syntax errors quote no input, but say only where.
        RecordError::InvalidJson(e) => format!(
            "not valid JSON ({:?} error at line {} column {})",
            e.classify(),
            e.line(),
            e.column()
        ),
        // These name JSON types only.
        other => other.to_string(),
    }
}

/// The first characters of a session id: enough to match log lines, not
/// enough to use.
fn redact(sid: &str) -> String {
    let prefix: String = sid.chars().take(4).collect();
    format!("{prefix}…")
}

/// The adapter edge: a store error as tower-sessions reports it. The
/// message is the error's `Display`, which never holds passwords or
/// session data.
fn backend(error: Error) -> session_store::Error {
    session_store::Error::Backend(error.to_string())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use serde_json::Value;
    use time::macros::datetime;

    use super::*;

    type Data = HashMap<String, Value>;

    fn record(data: Data, expiry_date: OffsetDateTime) -> Record {
        Record {
            id: Id(42),
            data,
            expiry_date,
        }
    }

    #[test]
    fn documents_have_the_express_session_shape() {
        let now = datetime!(2026-11-26 18:00 UTC);
        let mut data = Data::new();
        data.insert("count".into(), Value::from(3));
        let json = encode(&record(data, now + time::Duration::DAY), now).unwrap();
        assert_eq!(
            json,
            r#"{"cookie":{"originalMaxAge":86400000,"expires":"2026-11-27T18:00:00.000Z","httpOnly":true,"path":"/"},"count":3}"#
        );
        let back = SessionRecord::from_json(&json).unwrap();
        assert_eq!(back.get::<u32>("count"), Some(3));
        assert_eq!(back.data().len(), 1);

        // A past expiry gives no negative max age.
        let json = encode(&record(Data::new(), now - time::Duration::HOUR), now).unwrap();
        assert!(json.contains(r#""originalMaxAge":0,"#), "{json}");
    }

    #[test]
    fn cookie_like_keys_are_escaped_one_to_one() {
        for (key, stored) in [
            ("cookie", "_cookie"),
            ("_cookie", "__cookie"),
            ("__cookie", "___cookie"),
            ("cookies", "cookies"),
            ("_", "_"),
            ("_user", "_user"),
            ("Cookie", "Cookie"),
        ] {
            assert_eq!(stored_key(key), stored, "{key}");
            assert_eq!(data_key(stored.to_owned()), key, "{stored}");
        }
        let mut data = Data::new();
        data.insert("cookie".into(), Value::from("mine"));
        let now = datetime!(2026-11-26 18:00 UTC);
        let json = encode(&record(data, now), now).unwrap();
        assert!(json.contains(r#""_cookie":"mine""#), "{json}");
        assert!(
            json.starts_with(r#"{"cookie":{"originalMaxAge":0,"#),
            "{json}"
        );
    }

    #[test]
    fn expiry_dates_are_cut_to_microseconds() {
        let at = datetime!(2026-11-26 18:00:00.123_456_789 UTC);
        assert_eq!(to_micros(at), datetime!(2026-11-26 18:00:00.123_456 UTC));
        let whole = datetime!(2026-11-26 18:00:00.123_456 UTC);
        assert_eq!(to_micros(whole), whole);
    }

    #[test]
    fn logs_quote_neither_ids_nor_data() {
        let sid = Id(i128::MAX).to_string();
        assert_eq!(sid.len(), 22);
        let shown = redact(&sid);
        assert!(!shown.contains(&sid[..8]), "{shown}");
        for doc in [
            r#"{"secret":"hunter2""#,
            r#"["hunter2"]"#,
            r#"{"cookie":"hunter2"}"#,
        ] {
            let reason = unreadable(&SessionRecord::from_json(doc).unwrap_err());
            assert!(!reason.contains("hunter2"), "{reason}");
        }
    }

    #[test]
    fn errors_keep_their_message() {
        match backend(Error::StoreClosed) {
            session_store::Error::Backend(message) => {
                assert_eq!(message, "the session store is closed")
            }
            other => panic!("{other:?}"),
        }
    }
}
