//! [`SessionLayer`] and its service: reads the cookie, gives the request a
//! [`Session`], and settles it before the response leaves.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{header, Request, Response};
use tower::{Layer, Service};

use super::backend::DynBackend;
use super::session::Session;
use crate::cookie::{parse_cookie_header, unsign, CookieLookup, SameSite, Secrets};
use crate::SessionBackend;

/// When the session cookie is marked `Secure`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CookieSecure {
    /// Always (the default): browsers send it over HTTPS only.
    #[default]
    Always,
    /// Never: for plain-HTTP development servers.
    Never,
    /// When the request came over HTTPS, as its URI or a proxy's
    /// `X-Forwarded-Proto: https` says (express-session's `secure: 'auto'`).
    Auto,
}

/// The layer's options, shared by every request.
#[derive(Debug)]
pub(crate) struct Settings {
    pub(crate) secrets: Secrets,
    pub(crate) cookie_name: String,
    pub(crate) path: String,
    pub(crate) domain: Option<String>,
    pub(crate) secure: CookieSecure,
    pub(crate) http_only: bool,
    pub(crate) same_site: Option<SameSite>,
    pub(crate) max_age: Option<time::Duration>,
    pub(crate) lifetime: time::Duration,
    pub(crate) rolling: bool,
    pub(crate) save_uninitialized: bool,
    pub(crate) touch_step: time::Duration,
    pub(crate) max_session_bytes: usize,
}

/// A tower layer that gives every request a lazy [`Session`] kept in
/// `backend`, with express-session's cookie (`connect.sid`, signed with the
/// first of `secrets`).
///
/// Defaults: `HttpOnly`, `SameSite=Lax`, `Secure`, path `/`, a
/// browser-session cookie (no max age) whose row lives one day, not
/// rolling, uninitialized sessions not saved, touch step 60 s, sessions up
/// to 64 KiB.
///
/// ```no_run
/// use std::time::Duration;
/// use pgsession::http::{CookieSecure, SessionLayer};
/// # fn build(store: pgsession::Store) -> Result<(), pgsession::cookie::CookieError> {
/// let secrets = pgsession::cookie::Secrets::parse_list("new-secret,old-secret")?;
/// let layer = SessionLayer::new(store, secrets)
///     .with_max_age(Some(Duration::from_secs(7 * 24 * 3600)))
///     .with_rolling(true)
///     .with_cookie_secure(CookieSecure::Auto);
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
    /// A layer keeping sessions in `backend`, signing cookies with `secrets`.
    pub fn new(backend: impl SessionBackend, secrets: Secrets) -> SessionLayer {
        SessionLayer {
            backend: Arc::new(backend),
            settings: Arc::new(Settings {
                secrets,
                cookie_name: "connect.sid".into(),
                path: "/".into(),
                domain: None,
                secure: CookieSecure::Always,
                http_only: true,
                same_site: Some(SameSite::Lax),
                max_age: None,
                lifetime: time::Duration::DAY,
                rolling: false,
                save_uninitialized: false,
                touch_step: time::Duration::seconds(60),
                max_session_bytes: crate::record::DEFAULT_MAX_SESSION_BYTES,
            }),
        }
    }

    fn with(mut self, change: impl FnOnce(&mut Settings)) -> Self {
        let settings =
            Arc::get_mut(&mut self.settings).expect("options are set before the layer is cloned");
        change(settings);
        self
    }

    /// Cookie name. Default: `connect.sid` (express-session's).
    pub fn with_cookie_name(self, name: impl Into<String>) -> Self {
        let name = name.into();
        self.with(|s| s.cookie_name = name)
    }
    /// Cookie path. Default: `/`.
    pub fn with_path(self, path: impl Into<String>) -> Self {
        let path = path.into();
        self.with(|s| s.path = path)
    }
    /// Cookie domain. Default: none (the host only).
    pub fn with_domain(self, domain: impl Into<String>) -> Self {
        let domain = domain.into();
        self.with(|s| s.domain = Some(domain))
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
    /// Default: 1 day (connect-pg-simple's).
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
    /// Largest session accepted, serialized. Default: 64 KiB.
    pub fn with_max_session_bytes(self, bytes: usize) -> Self {
        self.with(|s| s.max_session_bytes = bytes)
    }
}

fn to_time(duration: Duration) -> time::Duration {
    time::Duration::try_from(duration).unwrap_or(time::Duration::MAX)
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
