//! [`SessionLayer`] and its service: reads the cookie, gives the request a
//! [`Session`], and settles it before the response leaves.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{header, Request, Response};
use tower::{Layer, Service};

use super::backend::DynBackend;
use super::session::Session;
use super::settings::{to_time, CookieSecure, Settings};
use crate::cookie::{
    self, parse_cookie_header, unsign, CookieError, CookieLookup, SameSite, Secrets,
};
use crate::SessionBackend;

/// A tower layer that gives every request a lazy [`Session`] kept in
/// `backend`, with express-session's cookie (`connect.sid`, signed with the
/// first of `secrets`).
///
/// The session lifetime and the size limit come from the backend: for a
/// [`Store`](crate::Store), its configuration (`PGSESSION_LIFETIME`,
/// `PGSESSION_MAX_SESSION_BYTES`), so that one setting reaches both.
/// Other defaults: `HttpOnly`, `SameSite=Lax`, `Secure`, path `/`, a
/// browser-session cookie (no max age), not rolling, uninitialized sessions
/// not saved, touch step 60 s.
///
/// Options that could make a cookie no browser accepts (name, path,
/// domain) are checked when set and return an error; none panics, before
/// or after the layer is cloned.
///
/// ```
/// use std::time::Duration;
/// use pgsession::http::{CookieSecure, SessionLayer};
/// # fn main() -> Result<(), pgsession::cookie::CookieError> {
/// let secrets = pgsession::cookie::Secrets::parse_list("new-secret,old-secret")?;
/// let layer = SessionLayer::new(pgsession::MemoryStore::new(), secrets)
///     .with_cookie_name("app.sid")?
///     .with_max_age(Some(Duration::from_secs(7 * 24 * 3600)))
///     .with_rolling(true)
///     .with_cookie_secure(CookieSecure::Auto);
/// assert!(SessionLayer::new(pgsession::MemoryStore::new(), pgsession::cookie::Secrets::parse_list("s")?)
///     .with_cookie_name("no spaces; please")
///     .is_err());
/// # let _ = layer;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SessionLayer {
    backend: Arc<dyn DynBackend>,
    settings: Arc<Settings>,
}

impl std::fmt::Debug for SessionLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionLayer")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl SessionLayer {
    /// A layer keeping sessions in `backend`, signing cookies with
    /// `secrets`, with the backend's lifetime and size limit.
    pub fn new(backend: impl SessionBackend, secrets: Secrets) -> SessionLayer {
        let settings = Settings::new(secrets, backend.lifetime(), backend.max_session_bytes());
        SessionLayer {
            backend: Arc::new(backend),
            settings: Arc::new(settings),
        }
    }

    /// Changes the options of this layer (a clone keeps the ones it had).
    fn with(mut self, change: impl FnOnce(&mut Settings)) -> Self {
        change(Arc::make_mut(&mut self.settings));
        self
    }

    /// Cookie name. Default: `connect.sid` (express-session's). Fails for
    /// a name that is not an HTTP token.
    pub fn with_cookie_name(self, name: impl Into<String>) -> Result<Self, CookieError> {
        let name = name.into();
        cookie::check_name(&name)?;
        Ok(self.with(|s| s.cookie_name = name))
    }
    /// Cookie path. Default: `/`. Fails for a path with `;`, `<` or
    /// control characters.
    pub fn with_path(self, path: impl Into<String>) -> Result<Self, CookieError> {
        let path = path.into();
        cookie::check_path(&path)?;
        Ok(self.with(|s| s.path = path))
    }
    /// Cookie domain. Default: none (the host only). Fails for a domain
    /// the `cookie` package would refuse.
    pub fn with_domain(self, domain: impl Into<String>) -> Result<Self, CookieError> {
        let domain = domain.into();
        cookie::check_domain(&domain)?;
        Ok(self.with(|s| s.domain = Some(domain)))
    }
    /// When the cookie is `Secure`. Default: [`CookieSecure::Always`].
    pub fn with_cookie_secure(self, secure: CookieSecure) -> Self {
        self.with(|s| s.secure = secure)
    }
    /// `HttpOnly`. Default: true.
    pub fn with_http_only(self, http_only: bool) -> Self {
        self.with(|s| s.http_only = http_only)
    }
    /// `SameSite`; `None` leaves the attribute out. Default: `Lax`.
    pub fn with_same_site(self, same_site: Option<SameSite>) -> Self {
        self.with(|s| s.same_site = same_site)
    }
    /// Cookie lifetime (sets `Expires`); `None` for a browser-session
    /// cookie. Default: `None`.
    pub fn with_max_age(self, max_age: Option<Duration>) -> Self {
        self.with(|s| s.max_age = max_age.map(to_time))
    }
    /// How long a session without a cookie expiry lives in the table.
    /// Default: the store's `lifetime` (1 day, connect-pg-simple's).
    pub fn with_lifetime(self, lifetime: Duration) -> Self {
        self.with(|s| s.lifetime = to_time(lifetime))
    }
    /// Renew the cookie on every response (express-session's `rolling`).
    /// Default: false.
    pub fn with_rolling(self, rolling: bool) -> Self {
        self.with(|s| s.rolling = rolling)
    }
    /// Save sessions nothing was stored in (express-session's
    /// `saveUninitialized`). Default: false.
    pub fn with_save_uninitialized(self, save: bool) -> Self {
        self.with(|s| s.save_uninitialized = save)
    }
    /// An unchanged session's expiry is written only when it would move by
    /// more than this. Default: 60 s.
    pub fn with_touch_step(self, step: Duration) -> Self {
        self.with(|s| s.touch_step = to_time(step))
    }
    /// Largest session accepted, serialized. Default: the store's
    /// `max_session_bytes` (64 KiB).
    pub fn with_max_session_bytes(self, bytes: usize) -> Self {
        self.with(|s| s.max_session_bytes = bytes)
    }
}

impl<S> Layer<S> for SessionLayer {
    type Service = SessionService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SessionService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`SessionLayer`] wraps around the application.
#[derive(Clone)]
pub struct SessionService<S> {
    inner: S,
    layer: SessionLayer,
}

impl<S> std::fmt::Debug for SessionService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionService").finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for SessionService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: From<String> + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let settings = &self.layer.settings;
        let incoming = match parse_cookie_header(
            request
                .headers()
                .get_all(header::COOKIE)
                .iter()
                .map(|v| v.as_bytes()),
            &settings.cookie_name,
        ) {
            CookieLookup::Found(value) => unsign(value, &settings.secrets),
            CookieLookup::Missing => None,
            refused => {
                tracing::debug!(target: "session_store", cookie = ?refused, "session cookie ignored");
                None
            }
        };
        let secure = match settings.secure {
            CookieSecure::Always => true,
            CookieSecure::Never => false,
            CookieSecure::Auto => is_https(&request),
        };
        let session = Session::new(
            self.layer.backend.clone(),
            settings.clone(),
            incoming,
            secure,
        );
        request.extensions_mut().insert(session.clone());

        // Use the service that was polled ready; leave a fresh clone behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let mut response = inner.call(request).await?;
            match session.settle().await {
                Ok(Some(cookie)) => {
                    response.headers_mut().append(header::SET_COOKIE, cookie);
                }
                Ok(None) => {}
                // The handler's answer is not sent: its changes were not
                // stored, and the client must know.
                Err(e) => {
                    tracing::warn!(target: "session_store", error = %e, "session not saved; answering with an error");
                    response = e.to_response();
                }
            }
            Ok(response)
        })
    }
}

fn is_https<B>(request: &Request<B>) -> bool {
    request.uri().scheme() == Some(&http::uri::Scheme::HTTPS)
        || request
            .headers()
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .next()
                    .is_some_and(|p| p.trim().eq_ignore_ascii_case("https"))
            })
}
