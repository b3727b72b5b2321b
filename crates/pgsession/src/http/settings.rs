//! The layer's options ([`Settings`]), shared by every request: checked
//! when they are set, and turned into new sessions' cookie data and into
//! `Set-Cookie` headers.

use http::HeaderValue;
use time::OffsetDateTime;

use crate::cookie::{SameSite, Secrets, SessionId, SetCookie};
use crate::record::{CookieData, SessionRecord};

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
#[derive(Debug, Clone)]
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

impl Settings {
    /// The defaults of express-session, with the store's lifetime and size
    /// limit where it has them.
    pub(crate) fn new(
        secrets: Secrets,
        lifetime: Option<std::time::Duration>,
        max_session_bytes: Option<usize>,
    ) -> Settings {
        Settings {
            secrets,
            cookie_name: "connect.sid".into(),
            path: "/".into(),
            domain: None,
            secure: CookieSecure::Always,
            http_only: true,
            same_site: Some(SameSite::Lax),
            max_age: None,
            lifetime: lifetime.map_or(time::Duration::DAY, to_time),
            rolling: false,
            save_uninitialized: false,
            touch_step: time::Duration::seconds(60),
            max_session_bytes: max_session_bytes
                .unwrap_or(crate::record::DEFAULT_MAX_SESSION_BYTES),
        }
    }

    /// A new session's cookie data, from the layer's options.
    pub(crate) fn new_record(&self, now: OffsetDateTime) -> SessionRecord {
        let mut cookie = CookieData {
            path: Some(self.path.clone()),
            domain: self.domain.clone(),
            http_only: Some(self.http_only),
            secure: Some(self.secure == CookieSecure::Always),
            same_site: self.same_site.map(crate::record::SameSiteValue::Mode),
            ..CookieData::default()
        };
        cookie.set_max_age(now, self.max_age);
        SessionRecord::new(cookie)
    }

    pub(crate) fn session_cookie(
        &self,
        cookie: &CookieData,
        id: &SessionId,
    ) -> Option<HeaderValue> {
        header_value(cookie.to_set_cookie(&self.cookie_name, id, &self.secrets))
    }

    pub(crate) fn removal_cookie(&self, secure: bool) -> Option<HeaderValue> {
        let mut removal = SetCookie::removal(self.cookie_name.clone())
            .path(self.path.clone())
            .http_only(self.http_only)
            .secure(secure);
        if let Some(domain) = &self.domain {
            removal = removal.domain(domain.clone());
        }
        if let Some(same_site) = self.same_site {
            removal = removal.same_site(same_site);
        }
        header_value(removal)
    }
}

fn header_value(cookie: SetCookie) -> Option<HeaderValue> {
    // The layer's options are checked when it is built; a value refused
    // here came from a stored cookie another program wrote, and is logged
    // and answered without a cookie rather than with a panic.
    match cookie.to_header_value().map(|v| HeaderValue::from_str(&v)) {
        Ok(Ok(value)) => Some(value),
        Ok(Err(e)) => {
            tracing::warn!(target: "session_store", error = %e, "session cookie is not a valid header");
            None
        }
        Err(e) => {
            tracing::warn!(target: "session_store", error = %e, "session cookie refused");
            None
        }
    }
}

/// A `std` duration as a `time` one, saturating.
pub(crate) fn to_time(duration: std::time::Duration) -> time::Duration {
    time::Duration::try_from(duration).unwrap_or(time::Duration::MAX)
}
