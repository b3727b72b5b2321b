//! [`SessionBackend`](crate::SessionBackend) behind a trait object, so that
//! [`Session`](super::Session) is one type whichever store is behind it.

use std::future::Future;
use std::pin::Pin;

use time::OffsetDateTime;

use crate::{Error, SessionBackend, StoredSession};

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, Error>> + Send + 'a>>;

/// The object-safe twin of [`SessionBackend`].
pub(crate) trait DynBackend: Send + Sync {
    fn load<'a>(&'a self, sid: &'a str) -> BoxFuture<'a, Option<StoredSession>>;
    fn save<'a>(&'a self, sid: &'a str, json: &'a str, expire: OffsetDateTime)
        -> BoxFuture<'a, ()>;
    fn touch<'a>(&'a self, sid: &'a str, expire: OffsetDateTime) -> BoxFuture<'a, bool>;
    fn destroy<'a>(&'a self, sid: &'a str) -> BoxFuture<'a, ()>;
}

impl<B: SessionBackend> DynBackend for B {
    fn load<'a>(&'a self, sid: &'a str) -> BoxFuture<'a, Option<StoredSession>> {
        Box::pin(SessionBackend::load(self, sid))
    }
    fn save<'a>(
        &'a self,
        sid: &'a str,
        json: &'a str,
        expire: OffsetDateTime,
    ) -> BoxFuture<'a, ()> {
        Box::pin(SessionBackend::save(self, sid, json, expire))
    }
    fn touch<'a>(&'a self, sid: &'a str, expire: OffsetDateTime) -> BoxFuture<'a, bool> {
        Box::pin(SessionBackend::touch(self, sid, expire))
    }
    fn destroy<'a>(&'a self, sid: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(SessionBackend::destroy(self, sid))
    }
}
