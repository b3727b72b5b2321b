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
//! nor the data. The key `cookie` is reserved: saving a record whose data
//! has it fails with [`session_store::Error::Encode`] rather than losing it.
//!
//! Two things a shared table does not make shared: the cookies (tower-sessions
//! sends the bare id, express-session a signed `s:` value), and a
//! browser-session expiry ([`Expiry::OnSessionEnd`](tower_sessions_core::Expiry)),
//! which tower-sessions stores as a two-week expiry date and so reaches the
//! document as a dated cookie.
//!
//! Expired rows are removed by [`Store::spawn_pruner`], or through
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
//! let store = pgsession::Store::new(config)?;
//! store.spawn_pruner();
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
    /// Saves a new session under an id no live session has.
    ///
    /// Ids are 128 random bits, so a collision means a broken random number
    /// generator rather than bad luck; checking with a `load` before the
    /// `save` (which is an upsert) is then enough, although it is not
    /// atomic: two requests would have to draw the same id within the same
    /// round trip. An expired row still in the table is not live, and is
    /// replaced.
    async fn create(&self, record: &mut Record) -> session_store::Result<()> {
        while self
            .store
            .load(&record.id.to_string())
            .await
            .map_err(backend)?
            .is_some()
        {
            record.id = Id::default();
        }
        self.save(record).await
    }

    async fn save(&self, record: &Record) -> session_store::Result<()> {
        let json = encode(record, OffsetDateTime::now_utc())?;
        self.store
            .save(&record.id.to_string(), &json, record.expiry_date)
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
                data: document.into_data().into_iter().collect(),
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

/// The express-session document for `record`, saved at `now`.
///
/// tower-sessions keeps only the expiry date, so `originalMaxAge` is the
/// lifetime left at `now` (what express-session's `maxAge` would say) to the
/// nearest millisecond, never negative; `expires` is the expiry date itself.
fn encode(record: &Record, now: OffsetDateTime) -> session_store::Result<String> {
    let remaining = ((record.expiry_date - now).whole_microseconds() + 500).max(0) / 1000;
    let cookie = CookieData {
        original_max_age: Some(i64::try_from(remaining).unwrap_or(i64::MAX)),
        expires: Some(record.expiry_date),
        ..CookieData::default()
    };
    let mut document = SessionRecord::new(cookie);
    for (key, value) in &record.data {
        document
            .insert(key.as_str(), value)
            .map_err(|e| session_store::Error::Encode(e.to_string()))?;
    }
    Ok(document.to_json())
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
    fn the_cookie_key_is_refused() {
        let mut data = Data::new();
        data.insert("cookie".into(), Value::from("mine"));
        let now = OffsetDateTime::now_utc();
        match encode(&record(data, now), now) {
            Err(session_store::Error::Encode(message)) => {
                assert!(message.contains("reserved"), "{message}")
            }
            other => panic!("{other:?}"),
        }
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
        match backend(Error::Closed) {
            session_store::Error::Backend(message) => {
                assert_eq!(message, "the session store is closed")
            }
            other => panic!("{other:?}"),
        }
    }
}
