//! An in-memory [`SessionBackend`]: for tests, and for `pgsession serve`
//! when no PostgreSQL can be had. Sessions end with the process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use time::OffsetDateTime;

use crate::backend::SessionBackend;
use crate::error::Error;
use crate::record::StoredSession;

/// Sessions in a map behind a mutex; expired entries are dropped when read
/// and by [`MemoryStore::prune`].
///
/// ```
/// # tokio_test_block_on(async {
/// use pgsession::{MemoryStore, SessionBackend};
/// let store = MemoryStore::new();
/// let expire = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
/// store.save("sid", "{}", expire).await?;
/// assert!(store.load("sid").await?.is_some());
/// # Ok::<(), pgsession::Error>(())
/// # }).unwrap();
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    sessions: Arc<Mutex<HashMap<String, StoredSession>>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// Unexpired sessions held.
    pub fn len(&self) -> usize {
        let now = OffsetDateTime::now_utc();
        self.map().values().filter(|s| s.expire >= now).count()
    }

    /// Whether no unexpired session is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops expired sessions; returns how many.
    pub fn prune(&self) -> usize {
        let now = OffsetDateTime::now_utc();
        let mut map = self.map();
        let before = map.len();
        map.retain(|_, s| s.expire >= now);
        before - map.len()
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, StoredSession>> {
        // A panic while holding the lock cannot leave the map half-written
        // (every change is one insert or remove), so poisoning is ignored.
        self.sessions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl SessionBackend for MemoryStore {
    async fn load(&self, sid: &str) -> Result<Option<StoredSession>, Error> {
        let now = OffsetDateTime::now_utc();
        let mut map = self.map();
        match map.get(sid) {
            Some(s) if s.expire >= now => Ok(Some(s.clone())),
            Some(_) => {
                map.remove(sid);
                Ok(None)
            }
            None => Ok(None),
        }
    }

    async fn save(&self, sid: &str, json: &str, expire: OffsetDateTime) -> Result<(), Error> {
        self.map().insert(
            sid.to_owned(),
            StoredSession {
                json: json.to_owned(),
                expire,
            },
        );
        Ok(())
    }

    async fn touch(&self, sid: &str, expire: OffsetDateTime) -> Result<bool, Error> {
        Ok(self.map().get_mut(sid).map(|s| s.expire = expire).is_some())
    }

    async fn destroy(&self, sid: &str) -> Result<(), Error> {
        self.map().remove(sid);
        Ok(())
    }
}
