//! One request's session: loaded on first use, changed by the handler,
//! and settled by the layer once the handler is done.

use std::sync::Arc;

use http::HeaderValue;
use serde::de::DeserializeOwned;
use serde::Serialize;
use time::OffsetDateTime;
use tokio::sync::Mutex;

use super::backend::DynBackend;
use super::error::SessionError;
use super::settings::{CookieSecure, Settings};
use crate::cookie::{SessionId, Unsigned};
use crate::record::SessionRecord;

/// The session of the current request, from the extractor (axum) or the
/// request's extensions (tower). Clones share the same session.
///
/// Nothing is read from the store until a method needs it; nothing is
/// written until the handler returns, and then only what changed.
///
/// ```no_run
/// use axum::{routing::post, Json, Router};
/// use pgsession::http::{Session, SessionError, SessionLayer};
///
/// async fn count(session: Session) -> Result<Json<u64>, SessionError> {
///     let views: u64 = session.get("views").await?.unwrap_or(0);
///     session.insert("views", views + 1).await?;
///     Ok(Json(views + 1))
/// }
///
/// # fn app(store: pgsession::Store, secrets: pgsession::cookie::Secrets) -> Router {
/// Router::new().route("/count", post(count)).layer(SessionLayer::new(store, secrets))
/// # }
/// ```
#[derive(Clone)]
pub struct Session {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("has_cookie", &self.shared.incoming.is_some())
            .finish_non_exhaustive()
    }
}

struct Shared {
    backend: Arc<dyn DynBackend>,
    settings: Arc<Settings>,
    /// The verified id the request's cookie carried, if any.
    incoming: Option<Unsigned>,
    /// Whether this request's cookie gets `Secure`.
    secure: bool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    loaded: bool,
    /// The session, if there is one (loaded or created).
    record: Option<SessionRecord>,
    /// Its id; for a session created by this request, a fresh one.
    id: Option<SessionId>,
    /// The session was created by this request (no row yet).
    is_new: bool,
    /// `expire` of the row that was loaded.
    stored_expire: Option<OffsetDateTime>,
    modified: bool,
    /// `destroy()` was called.
    destroyed: bool,
}

impl Session {
    pub(crate) fn new(
        backend: Arc<dyn DynBackend>,
        settings: Arc<Settings>,
        incoming: Option<Unsigned>,
        secure: bool,
    ) -> Session {
        Session {
            shared: Arc::new(Shared {
                backend,
                settings,
                incoming,
                secure,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// The value under `key`, if the session has one of type `T`.
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, SessionError> {
        let state = self.loaded().await?;
        Ok(state.record.as_ref().and_then(|r| r.get(key)))
    }

    /// Whether the request has a session (an existing one, or one created
    /// during this request).
    pub async fn exists(&self) -> Result<bool, SessionError> {
        Ok(self.loaded().await?.record.is_some())
    }

    /// The session id, if there is a session.
    pub async fn id(&self) -> Result<Option<SessionId>, SessionError> {
        let state = self.loaded().await?;
        Ok(state.record.as_ref().and(state.id.clone()))
    }

    /// Stores `value` under `key`, creating the session if there is none.
    ///
    /// An existing session that could not be read (the store is away) is
    /// never replaced by a new one: this fails instead.
    pub async fn insert(&self, key: &str, value: impl Serialize) -> Result<(), SessionError> {
        let mut state = self.loaded().await?;
        let settings = &self.shared.settings;
        if state.record.is_none() {
            state.record = Some(settings.new_record(OffsetDateTime::now_utc()));
            state.id = Some(SessionId::generate());
            state.is_new = true;
        }
        let record = state.record.as_mut().expect("created above");
        let previous = record.insert(key, value)?;
        if let Err(e) = record.check_size(settings.max_session_bytes) {
            match previous {
                Some(previous) => record.data_mut().insert(key.to_owned(), previous),
                None => record.remove(key),
            };
            return Err(e.into());
        }
        state.modified = true;
        Ok(())
    }

    /// Removes `key`; returns its value.
    pub async fn remove(&self, key: &str) -> Result<Option<serde_json::Value>, SessionError> {
        let mut state = self.loaded().await?;
        let removed = state.record.as_mut().and_then(|r| r.remove(key));
        state.modified |= removed.is_some();
        Ok(removed)
    }

    /// Replaces the session by a new, empty one with a new id, and deletes
    /// the old one at once (against session fixation: call it at login).
    ///
    /// When nothing has read the session yet, the cookie's id is deleted
    /// without loading it first (as `destroy` does): a login costs no read.
    pub async fn regenerate(&self) -> Result<(), SessionError> {
        let mut state = self.shared.state.lock().await;
        if let Some(old) = self.stored_id(&state) {
            self.shared.backend.destroy(old.as_str()).await?;
        }
        state.loaded = true;
        let settings = &self.shared.settings;
        state.record = Some(settings.new_record(OffsetDateTime::now_utc()));
        state.id = Some(SessionId::generate());
        state.is_new = true;
        state.stored_expire = None;
        state.modified = false;
        state.destroyed = false;
        Ok(())
    }

    /// Deletes the session and clears the cookie (logout).
    ///
    /// The response clears the cookie even when the store fails (and the
    /// error answers 503): a client that asked to log out never keeps a
    /// cookie from this response on.
    pub async fn destroy(&self) -> Result<(), SessionError> {
        let mut state = self.shared.state.lock().await;
        let stored = self.stored_id(&state);
        let result = match stored {
            Some(id) => self.shared.backend.destroy(id.as_str()).await,
            None => Ok(()),
        };
        *state = State {
            loaded: true,
            destroyed: true,
            ..State::default()
        };
        Ok(result?)
    }

    /// The id of the row this request's session is stored under, if any:
    /// the loaded one, or, before anything loaded it, the cookie's (its row
    /// may not exist; deleting it then costs nothing more than a read would).
    fn stored_id(&self, state: &State) -> Option<SessionId> {
        match (&state.id, state.is_new, &self.shared.incoming) {
            (Some(id), false, _) => Some(id.clone()),
            (None, _, Some(incoming)) if !state.loaded => Some(incoming.sid.clone()),
            _ => None,
        }
    }

    /// The state with the session loaded (one read, the first time).
    async fn loaded(&self) -> Result<tokio::sync::MutexGuard<'_, State>, SessionError> {
        let mut state = self.shared.state.lock().await;
        if state.loaded {
            return Ok(state);
        }
        if let Some(incoming) = &self.shared.incoming {
            // An error leaves `loaded` false: the next call tries again,
            // and nothing can replace the session meanwhile.
            if let Some(stored) = self.shared.backend.load(incoming.sid.as_str()).await? {
                match SessionRecord::from_json(&stored.json) {
                    Ok(record) => {
                        state.record = Some(record);
                        state.id = Some(incoming.sid.clone());
                        state.stored_expire = Some(stored.expire);
                    }
                    Err(e) => tracing::warn!(
                        target: "session_store",
                        sid = ?incoming.sid,
                        error = %e,
                        "stored session is unreadable; treated as no session"
                    ),
                }
            }
        }
        state.loaded = true;
        Ok(state)
    }

    /// After the handler: saves, touches or deletes what needs it, and
    /// returns the `Set-Cookie` value to send, if any.
    pub(crate) async fn settle(&self) -> Result<Option<HeaderValue>, SessionError> {
        let mut state = self.shared.state.lock().await;
        let settings = &self.shared.settings;
        if state.destroyed {
            return Ok(self
                .shared
                .incoming
                .as_ref()
                .and_then(|_| settings.removal_cookie(self.shared.secure)));
        }
        let (Some(id), true) = (state.id.clone(), state.record.is_some()) else {
            return Ok(None);
        };
        let backend = &self.shared.backend;
        let now = OffsetDateTime::now_utc();
        let is_new = state.is_new;
        let modified = state.modified;
        let stored_expire = state.stored_expire;
        let record = state.record.as_mut().expect("checked above");
        if settings.secure == CookieSecure::Auto {
            record.cookie.secure = Some(self.shared.secure);
        }

        let needs_resign = self
            .shared
            .incoming
            .as_ref()
            .is_some_and(|i| i.needs_resign() && !is_new);
        let set_cookie = if is_new {
            if !(modified || settings.save_uninitialized) {
                return Ok(None);
            }
            record.cookie.reset_max_age(now);
            save(backend.as_ref(), &id, record, now, settings).await?;
            true
        } else if modified {
            record.cookie.reset_max_age(now);
            save(backend.as_ref(), &id, record, now, settings).await?;
            settings.rolling || record.cookie.expires.is_some() || needs_resign
        } else {
            // Unchanged: move the expiry only when it would move by more
            // than the touch step, so that a page view is not a write.
            let mut cookie = record.cookie.clone();
            cookie.reset_max_age(now);
            let renewed = crate::record::row_expire(cookie.expires, now, settings.lifetime);
            let moves_by = stored_expire.map_or(time::Duration::MAX, |stored| renewed - stored);
            if moves_by > settings.touch_step {
                backend.touch(id.as_str(), renewed).await?;
            }
            if settings.rolling {
                record.cookie = cookie;
            }
            settings.rolling || needs_resign
        };
        Ok(set_cookie
            .then(|| settings.session_cookie(&record.cookie, &id))
            .flatten())
    }
}

async fn save(
    backend: &dyn DynBackend,
    id: &SessionId,
    record: &SessionRecord,
    now: OffsetDateTime,
    settings: &Settings,
) -> Result<(), SessionError> {
    let json = record.to_json_limited(settings.max_session_bytes)?;
    let expire = record.expire_for_row(now, settings.lifetime);
    backend.save(id.as_str(), &json, expire).await?;
    Ok(())
}
