//! What the HTTP layer needs from a place that keeps sessions: the
//! PostgreSQL [`Store`](crate::Store), or the [`MemoryStore`](crate::MemoryStore)
//! for tests and for running without a database.

use std::future::Future;

use time::OffsetDateTime;

use crate::error::Error;
use crate::record::StoredSession;

/// A place that keeps session documents by id.
///
/// Every method is idempotent, so a caller may retry any of them.
pub trait SessionBackend: Clone + Send + Sync + 'static {
    /// The unexpired session `sid`, if any.
    fn load(&self, sid: &str) -> impl Future<Output = Result<Option<StoredSession>, Error>> + Send;

    /// Inserts or replaces session `sid`.
    fn save(
        &self,
        sid: &str,
        json: &str,
        expire: OffsetDateTime,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Moves the expiry of `sid`; false when there is no such session.
    fn touch(
        &self,
        sid: &str,
        expire: OffsetDateTime,
    ) -> impl Future<Output = Result<bool, Error>> + Send;

    /// Removes `sid`; removing a missing session is not an error.
    fn destroy(&self, sid: &str) -> impl Future<Output = Result<(), Error>> + Send;

    /// How long a session without a cookie expiry lives, if this backend is
    /// configured with it: the [`SessionLayer`](crate::http::SessionLayer)
    /// takes it, so that one setting reaches both.
    fn lifetime(&self) -> Option<std::time::Duration> {
        None
    }

    /// The largest session document this backend takes, if configured.
    fn max_session_bytes(&self) -> Option<usize> {
        None
    }
}

impl SessionBackend for crate::Store {
    async fn load(&self, sid: &str) -> Result<Option<StoredSession>, Error> {
        crate::Store::load(self, sid).await
    }

    async fn save(&self, sid: &str, json: &str, expire: OffsetDateTime) -> Result<(), Error> {
        crate::Store::save(self, sid, json, expire).await
    }

    async fn touch(&self, sid: &str, expire: OffsetDateTime) -> Result<bool, Error> {
        crate::Store::touch(self, sid, expire).await
    }

    async fn destroy(&self, sid: &str) -> Result<(), Error> {
        crate::Store::destroy(self, sid).await
    }

    fn lifetime(&self) -> Option<std::time::Duration> {
        Some(self.config().lifetime())
    }

    fn max_session_bytes(&self) -> Option<usize> {
        Some(self.config().max_session_bytes())
    }
}
