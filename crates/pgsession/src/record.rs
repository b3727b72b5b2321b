//! The stored session document: the `sess json` column, exactly as
//! express-session writes it and connect-pg-simple stores it.
//!
//! express-session stores `JSON.stringify(req.session)`: the application's
//! keys plus a `cookie` object (`originalMaxAge`, `expires`, `secure`,
//! `httpOnly`, `domain`, `path`, `sameSite`, ...). This module owns that
//! format ([`SessionRecord`], [`CookieData`]), its size limit
//! ([`DEFAULT_MAX_SESSION_BYTES`]) and connect-pg-simple's rule for the
//! `expire` column ([`SessionRecord::expire_for_row`]). Keys it does not
//! know, in the document or in its cookie, are kept as they are, so a Node
//! service and a Rust service can take turns writing the same session.
//!
//! ```
//! use pgsession::record::SessionRecord;
//!
//! let json = r#"{"cookie":{"originalMaxAge":86400000,"expires":"2026-11-27T18:00:00.000Z",
//!     "httpOnly":true,"path":"/","sameSite":"lax"},"user":"alice","views":3}"#;
//! let mut record = SessionRecord::from_json(json)?;
//! assert_eq!(record.get::<String>("user").as_deref(), Some("alice"));
//! let views: u64 = record.get("views").unwrap_or(0);
//! record.insert("views", views + 1)?;
//! assert!(record.insert("cookie", 1).is_err()); // reserved
//! let stored = record.to_json_limited(pgsession::record::DEFAULT_MAX_SESSION_BYTES)?;
//! assert!(stored.starts_with(r#"{"cookie":{"originalMaxAge":86400000,"expires":"2026-11-27T18:00:00.000Z""#));
//! # Ok::<(), pgsession::record::RecordError>(())
//! ```

use std::fmt;

use serde::de::{DeserializeOwned, Deserializer};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::format_description::BorrowedFormatItem;
use time::macros::format_description;
use time::{Duration, OffsetDateTime, PrimitiveDateTime, UtcOffset};

use crate::cookie::{Priority, SameSite, Secrets, SessionId, SetCookie};

/// The default largest serialized session, in bytes: big enough for any
/// reasonable session, small enough that one client cannot bloat the table.
pub const DEFAULT_MAX_SESSION_BYTES: usize = 64 * 1024;

/// connect-pg-simple's default lifetime (its `ttl`) for rows whose cookie
/// has no `expires`: one day.
pub const DEFAULT_LIFETIME: Duration = Duration::DAY;

/// The top-level key that holds the cookie; applications cannot use it.
pub const COOKIE_KEY: &str = "cookie";

/// The known cookie keys, in the order express-session's `Cookie#toJSON`
/// writes them.
const KNOWN_COOKIE_KEYS: [&str; 9] = [
    "originalMaxAge",
    "partitioned",
    "priority",
    "expires",
    "secure",
    "httpOnly",
    "domain",
    "path",
    "sameSite",
];

/// Why a session document was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The text is not JSON at all (or nests deeper than serde_json allows).
    #[error("session document is not valid JSON: {0}")]
    InvalidJson(#[source] serde_json::Error),
    /// The document is JSON but not an object.
    #[error("session document must be a JSON object, found {found}")]
    NotAnObject {
        /// The JSON type found instead.
        found: &'static str,
    },
    /// The document's `cookie` is present but not an object.
    #[error("the session's \"cookie\" must be a JSON object, found {found}")]
    CookieNotAnObject {
        /// The JSON type found instead.
        found: &'static str,
    },
    /// The serialized session is bigger than the limit.
    #[error("session is {size} bytes serialized, over the limit of {limit} bytes")]
    TooLarge {
        /// Its size in bytes.
        size: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// An attempt to set the reserved `cookie` key through the data accessors.
    #[error("the session key \"cookie\" is reserved for the session cookie")]
    ReservedKey,
    /// A value that cannot be represented as JSON (e.g. a map with non-string keys).
    #[error("value for session key {key:?} cannot be stored as JSON: {source}")]
    Unserializable {
        /// The key it was to be stored under.
        key: String,
        /// serde_json's reason.
        #[source]
        source: serde_json::Error,
    },
}

/// One session as stored: the cookie settings express-session keeps with it,
/// and everything the application put in the session.
///
/// Serializes as express-session does: `cookie` first, then the data keys.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SessionRecord {
    /// The cookie's settings and expiry, as in the `cookie` key.
    pub cookie: CookieData,
    data: Map<String, Value>,
}

impl SessionRecord {
    /// An empty session with the given cookie settings.
    pub fn new(cookie: CookieData) -> SessionRecord {
        SessionRecord {
            cookie,
            data: Map::new(),
        }
    }

    /// Parses a stored document. Refuses non-objects and a `cookie` that is
    /// not an object; a missing `cookie` gets express-session's defaults.
    pub fn from_json(json: &str) -> Result<SessionRecord, RecordError> {
        let value: Value = serde_json::from_str(json).map_err(RecordError::InvalidJson)?;
        SessionRecord::from_value(value)
    }

    /// Like [`SessionRecord::from_json`], for a document already parsed (as
    /// tokio-postgres returns a `json` column).
    pub fn from_value(value: Value) -> Result<SessionRecord, RecordError> {
        let Value::Object(mut data) = value else {
            return Err(RecordError::NotAnObject {
                found: json_type(&value),
            });
        };
        let cookie = match data.remove(COOKIE_KEY) {
            None => CookieData::default(),
            Some(Value::Object(map)) => CookieData::from_map(map),
            Some(other) => {
                return Err(RecordError::CookieNotAnObject {
                    found: json_type(&other),
                })
            }
        };
        Ok(SessionRecord { cookie, data })
    }

    /// The document as express-session would store it.
    pub fn to_json(&self) -> String {
        // Serializing a map of JSON values into a String cannot fail, and
        // this type's Serialize impls never return errors.
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }

    /// The document as JSON, if it fits in `limit_bytes`; the store path,
    /// since it serializes once.
    pub fn to_json_limited(&self, limit_bytes: usize) -> Result<String, RecordError> {
        let json = self.to_json();
        if json.len() > limit_bytes {
            return Err(RecordError::TooLarge {
                size: json.len(),
                limit: limit_bytes,
            });
        }
        Ok(json)
    }

    /// Checks the serialized size against `limit_bytes` (usually
    /// [`DEFAULT_MAX_SESSION_BYTES`]) and returns the size.
    pub fn check_size(&self, limit_bytes: usize) -> Result<usize, RecordError> {
        // Counted, not built: a session is measured on every insert.
        struct Count(usize);
        impl std::io::Write for Count {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0 += bytes.len();
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut size = Count(0);
        // Cannot fail, as in `to_json`.
        let _ = serde_json::to_writer(&mut size, self);
        if size.0 > limit_bytes {
            return Err(RecordError::TooLarge {
                size: size.0,
                limit: limit_bytes,
            });
        }
        Ok(size.0)
    }

    /// The `expire` column for this session, by connect-pg-simple's rule: the
    /// cookie's `expires` if it has one, else `now + default_lifetime`
    /// (connect-pg-simple's `ttl`, [`DEFAULT_LIFETIME`] by default), rounded
    /// up to a whole second as its `Math.ceil` does. Always in UTC.
    ///
    /// ```
    /// use pgsession::record::{SessionRecord, DEFAULT_LIFETIME};
    /// use time::macros::datetime;
    /// let now = datetime!(2026-11-26 18:00:00.25 UTC);
    /// let no_expiry = SessionRecord::default();
    /// assert_eq!(no_expiry.expire_for_row(now, DEFAULT_LIFETIME), datetime!(2026-11-27 18:00:01 UTC));
    /// ```
    pub fn expire_for_row(
        &self,
        now: OffsetDateTime,
        default_lifetime: Duration,
    ) -> OffsetDateTime {
        row_expire(self.cookie.expires, now, default_lifetime)
    }

    /// The application's value under `key`, if present and of type `T`.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Option<T> {
        T::deserialize(self.data.get(key)?).ok()
    }

    /// Stores `value` under `key`, returning the previous value. Refuses the
    /// reserved key `cookie` and values that are not representable as JSON.
    pub fn insert(
        &mut self,
        key: impl Into<String>,
        value: impl Serialize,
    ) -> Result<Option<Value>, RecordError> {
        let key = key.into();
        if key == COOKIE_KEY {
            return Err(RecordError::ReservedKey);
        }
        match serde_json::to_value(value) {
            Ok(value) => Ok(self.data.insert(key, value)),
            Err(source) => Err(RecordError::Unserializable { key, source }),
        }
    }

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<Value> {
        self.data.remove(key)
    }

    /// All the application's keys (everything but `cookie`).
    pub fn data(&self) -> &Map<String, Value> {
        &self.data
    }

    /// Mutable access to the application's keys. A `cookie` key put here is
    /// not written out: the real cookie always wins.
    pub fn data_mut(&mut self) -> &mut Map<String, Value> {
        &mut self.data
    }

    /// The application's keys, taking them out of the record.
    pub fn into_data(self) -> Map<String, Value> {
        self.data
    }
}

impl Serialize for SessionRecord {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry(COOKIE_KEY, &self.cookie)?;
        for (key, value) in &self.data {
            if key != COOKIE_KEY {
                map.serialize_entry(key, value)?;
            }
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for SessionRecord {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        SessionRecord::from_value(value).map_err(serde::de::Error::custom)
    }
}

/// The session's `cookie` object, as express-session's `Cookie#toJSON`.
///
/// Known keys are typed; `None` means absent (JSON.stringify drops
/// `undefined`), except `originalMaxAge` and `expires`, which express-session
/// always writes and which are written as `null` when `None`.
///
/// Unknown keys, and known keys whose value has an unexpected type (say
/// `"secure": "yes"` written by another program), are kept verbatim in
/// [`CookieData::extra`] and written back unchanged, rather than making the
/// whole session unreadable.
#[derive(Debug, Clone, PartialEq)]
pub struct CookieData {
    /// `originalMaxAge`: the lifetime in milliseconds the cookie was set
    /// with; `None` for a browser-session cookie.
    pub original_max_age: Option<i64>,
    /// `partitioned` (CHIPS).
    pub partitioned: Option<bool>,
    /// `priority`: `low`, `medium` or `high`.
    pub priority: Option<String>,
    /// `expires`: when the cookie, and so the session, ends; `None` for a
    /// browser-session cookie. Written as JavaScript's `toISOString`.
    pub expires: Option<OffsetDateTime>,
    /// `secure`.
    pub secure: Option<bool>,
    /// `httpOnly`.
    pub http_only: Option<bool>,
    /// `domain`.
    pub domain: Option<String>,
    /// `path`.
    pub path: Option<String>,
    /// `sameSite`: a string or a boolean in express-session.
    pub same_site: Option<SameSiteValue>,
    /// Every other key, and known keys with unexpected value types.
    pub extra: Map<String, Value>,
}

impl Default for CookieData {
    /// express-session's `new Cookie()`: path `/`, httpOnly, no expiry.
    fn default() -> Self {
        CookieData {
            original_max_age: None,
            partitioned: None,
            priority: None,
            expires: None,
            secure: None,
            http_only: Some(true),
            domain: None,
            path: Some("/".to_owned()),
            same_site: None,
            extra: Map::new(),
        }
    }
}

impl CookieData {
    /// Sets the lifetime as express-session's `cookie.maxAge = ms` does:
    /// `expires = now + max_age` and `originalMaxAge` = its milliseconds;
    /// `None` makes it a browser-session cookie.
    ///
    /// ```
    /// use pgsession::record::CookieData;
    /// use time::{macros::datetime, Duration};
    /// let mut cookie = CookieData::default();
    /// cookie.set_max_age(datetime!(2026-11-26 18:00 UTC), Some(Duration::DAY));
    /// assert_eq!(cookie.original_max_age, Some(86_400_000));
    /// assert_eq!(cookie.expires, Some(datetime!(2026-11-27 18:00 UTC)));
    /// ```
    pub fn set_max_age(&mut self, now: OffsetDateTime, max_age: Option<Duration>) {
        match max_age {
            Some(max_age) => {
                let millis = i64::try_from(max_age.whole_milliseconds()).unwrap_or(
                    if max_age.is_negative() {
                        i64::MIN
                    } else {
                        i64::MAX
                    },
                );
                self.original_max_age = Some(millis);
                self.expires = Some(
                    now.checked_add(max_age)
                        .unwrap_or_else(|| clamp_datetime(!max_age.is_negative())),
                );
            }
            None => {
                self.original_max_age = None;
                self.expires = None;
            }
        }
        self.extra.remove("originalMaxAge");
        self.extra.remove("expires");
    }

    /// Restarts the lifetime from `now` with the original max age, as
    /// express-session's `session.resetMaxAge()` / `touch()` (rolling sessions).
    pub fn reset_max_age(&mut self, now: OffsetDateTime) {
        let max_age = self.original_max_age.map(Duration::milliseconds);
        self.set_max_age(now, max_age);
    }

    /// The `SameSite` attribute this cookie is sent with, as the `cookie`
    /// package reads the stored value (`true` is `Strict`, `false` none).
    pub fn same_site_mode(&self) -> Option<SameSite> {
        self.same_site.as_ref().and_then(SameSiteValue::mode)
    }

    /// The `Set-Cookie` for this session, as express-session builds it from
    /// `req.session.cookie`: the signed id with `Domain`, `Path`, `Expires`,
    /// `HttpOnly`, `Secure`, `Partitioned`, `Priority` and `SameSite` from
    /// these settings. Invalid stored values (an unknown priority or
    /// sameSite) are left out.
    pub fn to_set_cookie(&self, name: &str, sid: &SessionId, secrets: &Secrets) -> SetCookie {
        let mut out = SetCookie::for_session(name, sid, secrets)
            .http_only(self.http_only.unwrap_or(false))
            .secure(self.secure.unwrap_or(false))
            .partitioned(self.partitioned.unwrap_or(false));
        if let Some(domain) = &self.domain {
            out = out.domain(domain.clone());
        }
        if let Some(path) = &self.path {
            out = out.path(path.clone());
        }
        if let Some(expires) = self.expires {
            out = out.expires(expires);
        }
        if let Some(priority) = self
            .priority
            .as_deref()
            .and_then(|p| p.parse::<Priority>().ok())
        {
            out = out.priority(priority);
        }
        if let Some(same_site) = self.same_site_mode() {
            out = out.same_site(same_site);
        }
        out
    }

    /// Reads a cookie object, keeping unexpected values in `extra`.
    fn from_map(map: Map<String, Value>) -> CookieData {
        let mut cookie = CookieData {
            http_only: None,
            path: None,
            ..CookieData::default()
        };
        for (key, value) in map {
            let leftover = match key.as_str() {
                "originalMaxAge" => match value {
                    Value::Null => None,
                    Value::Number(ref n) if n.as_i64().is_some() => {
                        cookie.original_max_age = n.as_i64();
                        None
                    }
                    other => Some(other),
                },
                "expires" => match value {
                    Value::Null => None,
                    Value::String(ref s) => match parse_js_date(s) {
                        Some(date) => {
                            cookie.expires = Some(date);
                            None
                        }
                        None => Some(value),
                    },
                    other => Some(other),
                },
                "partitioned" => take_bool(value, &mut cookie.partitioned),
                "secure" => take_bool(value, &mut cookie.secure),
                "httpOnly" => take_bool(value, &mut cookie.http_only),
                "priority" => take_string(value, &mut cookie.priority),
                "domain" => take_string(value, &mut cookie.domain),
                "path" => take_string(value, &mut cookie.path),
                "sameSite" => match value {
                    Value::Bool(b) => {
                        cookie.same_site = Some(SameSiteValue::Flag(b));
                        None
                    }
                    Value::String(s) => {
                        cookie.same_site = Some(SameSiteValue::from_stored(s));
                        None
                    }
                    other => Some(other),
                },
                _ => Some(value),
            };
            if let Some(value) = leftover {
                cookie.extra.insert(key, value);
            }
        }
        cookie
    }

    /// A typed known field's JSON value, `None` when it is not set.
    fn known_value(&self, key: &str) -> Option<Value> {
        match key {
            "originalMaxAge" => self.original_max_age.map(Value::from),
            "partitioned" => self.partitioned.map(Value::Bool),
            "priority" => self.priority.clone().map(Value::String),
            "expires" => self.expires.map(|d| Value::String(to_js_iso_string(d))),
            "secure" => self.secure.map(Value::Bool),
            "httpOnly" => self.http_only.map(Value::Bool),
            "domain" => self.domain.clone().map(Value::String),
            "path" => self.path.clone().map(Value::String),
            "sameSite" => self.same_site.as_ref().map(SameSiteValue::to_value),
            _ => None,
        }
    }
}

fn take_bool(value: Value, slot: &mut Option<bool>) -> Option<Value> {
    match value {
        Value::Bool(b) => {
            *slot = Some(b);
            None
        }
        other => Some(other),
    }
}

fn take_string(value: Value, slot: &mut Option<String>) -> Option<Value> {
    match value {
        Value::String(s) => {
            *slot = Some(s);
            None
        }
        other => Some(other),
    }
}

impl Serialize for CookieData {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        for key in KNOWN_COOKIE_KEYS {
            if let Some(value) = self.known_value(key) {
                map.serialize_entry(key, &value)?;
            } else if let Some(value) = self.extra.get(key) {
                map.serialize_entry(key, value)?;
            } else if key == "originalMaxAge" || key == "expires" {
                map.serialize_entry(key, &Value::Null)?;
            }
        }
        for (key, value) in &self.extra {
            if !KNOWN_COOKIE_KEYS.contains(&key.as_str()) {
                map.serialize_entry(key, value)?;
            }
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for CookieData {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match Value::deserialize(deserializer)? {
            Value::Object(map) => Ok(CookieData::from_map(map)),
            other => Err(serde::de::Error::custom(RecordError::CookieNotAnObject {
                found: json_type(&other),
            })),
        }
    }
}

/// The cookie's `sameSite` as stored: express-session accepts `true`,
/// `false` or a string, and writes back whatever it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SameSiteValue {
    /// `true` (meaning `Strict`) or `false` (no attribute).
    Flag(bool),
    /// `"strict"`, `"lax"` or `"none"`, exactly so spelled.
    Mode(SameSite),
    /// Any other string (`"Lax"`, or garbage), kept verbatim.
    Other(String),
}

impl SameSiteValue {
    /// What the `cookie` package makes of it: `true` is `Strict`, `false`
    /// is no attribute, strings are read case-insensitively.
    pub fn mode(&self) -> Option<SameSite> {
        match self {
            SameSiteValue::Flag(true) => Some(SameSite::Strict),
            SameSiteValue::Flag(false) => None,
            SameSiteValue::Mode(mode) => Some(*mode),
            SameSiteValue::Other(s) => s.parse().ok(),
        }
    }

    fn from_stored(s: String) -> SameSiteValue {
        match s.as_str() {
            "strict" => SameSiteValue::Mode(SameSite::Strict),
            "lax" => SameSiteValue::Mode(SameSite::Lax),
            "none" => SameSiteValue::Mode(SameSite::None),
            _ => SameSiteValue::Other(s),
        }
    }

    fn to_value(&self) -> Value {
        match self {
            SameSiteValue::Flag(b) => Value::Bool(*b),
            SameSiteValue::Mode(mode) => Value::String(mode.as_lowercase().to_owned()),
            SameSiteValue::Other(s) => Value::String(s.clone()),
        }
    }
}

impl From<SameSite> for SameSiteValue {
    fn from(mode: SameSite) -> Self {
        SameSiteValue::Mode(mode)
    }
}

impl fmt::Display for SameSiteValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SameSiteValue::Flag(b) => write!(f, "{b}"),
            SameSiteValue::Mode(mode) => f.write_str(mode.as_lowercase()),
            SameSiteValue::Other(s) => f.write_str(s),
        }
    }
}

/// JavaScript's `Date.prototype.toISOString` layout.
const JS_ISO: &[BorrowedFormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");

/// Formats a date as JavaScript's `toISOString` does (`2026-11-26T18:00:00.000Z`):
/// UTC, exactly three fractional digits (truncated), `Z`. Dates beyond year
/// 9999 in UTC are clamped to its end.
///
/// ```
/// use pgsession::record::to_js_iso_string;
/// use time::macros::datetime;
/// assert_eq!(to_js_iso_string(datetime!(2026-11-26 19:00:00.1239 +01:00)), "2026-11-26T18:00:00.123Z");
/// ```
pub fn to_js_iso_string(date: OffsetDateTime) -> String {
    let utc = date
        .checked_to_offset(UtcOffset::UTC)
        .unwrap_or_else(|| clamp_datetime(date.year() > 0));
    utc.format(JS_ISO).unwrap_or_default()
}

/// Reads a stored `expires` as JavaScript's `Date` keeps it: RFC 3339, in
/// UTC, truncated to whole milliseconds, so that [`to_js_iso_string`] writes
/// back the same moment. `None` when it is not RFC 3339 or falls outside
/// years 0 to 9999 in UTC (`toISOString` would write it differently); such
/// a value is kept verbatim in [`CookieData::extra`].
fn parse_js_date(text: &str) -> Option<OffsetDateTime> {
    let utc = OffsetDateTime::parse(text, &Rfc3339)
        .ok()?
        .checked_to_offset(UtcOffset::UTC)?;
    if !(0..=9999).contains(&utc.year()) {
        return None;
    }
    utc.replace_nanosecond(u32::from(utc.millisecond()) * 1_000_000)
        .ok()
}

/// The latest (or earliest) representable moment, in UTC.
fn clamp_datetime(latest: bool) -> OffsetDateTime {
    if latest {
        PrimitiveDateTime::MAX.assume_utc()
    } else {
        PrimitiveDateTime::MIN.assume_utc()
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// [`SessionRecord::expire_for_row`] of a cookie whose `expires` is
/// `expires`: for a caller that has the cookie but not a record.
pub(crate) fn row_expire(
    expires: Option<OffsetDateTime>,
    now: OffsetDateTime,
    default_lifetime: Duration,
) -> OffsetDateTime {
    let base = match expires {
        Some(expires) => expires,
        None => now
            .checked_add(default_lifetime)
            .unwrap_or_else(|| clamp_datetime(default_lifetime.is_positive())),
    };
    let utc = base
        .checked_to_offset(UtcOffset::UTC)
        .unwrap_or_else(|| clamp_datetime(base.year() > 0));
    if utc.nanosecond() == 0 {
        utc
    } else {
        utc.truncate_to_second()
            .checked_add(Duration::SECOND)
            .unwrap_or(utc)
    }
}

/// A session as stored: its document (the `sess` column, JSON text) and
/// when it expires.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredSession {
    /// The `sess` column, as text.
    pub json: String,
    /// The `expire` column, in UTC.
    pub expire: OffsetDateTime,
}

impl std::fmt::Debug for StoredSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Session documents hold user data: show their size only.
        f.debug_struct("StoredSession")
            .field("json_bytes", &self.json.len())
            .field("expire", &self.expire)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const EXPRESS_DOC: &str = r#"{"cookie":{"originalMaxAge":86400000,"expires":"2026-11-27T18:00:00.000Z","secure":false,"httpOnly":true,"path":"/","sameSite":"lax"},"user":"alice","views":3,"nested":{"a":[1,2]}}"#;

    fn parse(json: &str) -> SessionRecord {
        match SessionRecord::from_json(json) {
            Ok(r) => r,
            Err(e) => panic!("{json}: {e}"),
        }
    }

    fn value(json: &str) -> Value {
        serde_json::from_str(json).expect("test JSON")
    }

    #[test]
    fn express_document_round_trips() {
        let record = parse(EXPRESS_DOC);
        assert_eq!(record.cookie.original_max_age, Some(86_400_000));
        assert_eq!(record.cookie.expires, Some(datetime!(2026-11-27 18:00 UTC)));
        assert_eq!(record.cookie.secure, Some(false));
        assert_eq!(record.cookie.http_only, Some(true));
        assert_eq!(record.cookie.path.as_deref(), Some("/"));
        assert_eq!(record.cookie.domain, None);
        assert_eq!(
            record.cookie.same_site,
            Some(SameSiteValue::Mode(SameSite::Lax))
        );
        assert!(record.cookie.extra.is_empty());
        assert_eq!(record.get::<String>("user").as_deref(), Some("alice"));
        assert_eq!(record.get::<u32>("views"), Some(3));
        assert_eq!(record.data().len(), 3);

        let out = record.to_json();
        assert_eq!(value(&out), value(EXPRESS_DOC));
        // Byte for byte in the cookie part, including express-session's key order.
        assert!(out.starts_with(
            r#"{"cookie":{"originalMaxAge":86400000,"expires":"2026-11-27T18:00:00.000Z","secure":false,"httpOnly":true,"path":"/","sameSite":"lax"},"#
        ), "{out}");
        assert_eq!(parse(&out), record);
    }

    #[test]
    fn real_node_document_round_trips() {
        // As stored by the interop Node app (express-session 1.19.0 +
        // connect-pg-simple 10.0.0), read back with psql; its `expire` column
        // was 2026-11-27 18:10:50.
        let node = r#"{"cookie":{"originalMaxAge":86400000,"expires":"2026-11-27T18:10:49.635Z","secure":false,"httpOnly":true,"path":"/","sameSite":"lax"},"user":"alice","views":2}"#;
        let record = parse(node);
        assert_eq!(record.to_json(), node);
        assert_eq!(
            record.expire_for_row(datetime!(2026-11-26 18:10:49.9 UTC), DEFAULT_LIFETIME),
            datetime!(2026-11-27 18:10:50 UTC)
        );
        // express-session's defaults when no maxAge is configured.
        let browser_session = r#"{"cookie":{"originalMaxAge":null,"expires":null,"httpOnly":true,"path":"/"},"flash":[]}"#;
        let record = parse(browser_session);
        assert_eq!(record.cookie, CookieData::default());
        assert_eq!(record.to_json(), browser_session);
    }

    #[test]
    fn unknown_and_odd_cookie_keys_survive() {
        let doc = r#"{"cookie":{"originalMaxAge":1.5,"partitioned":true,"priority":"High","expires":"soon",
            "secure":"auto","httpOnly":null,"domain":"example.com","path":"/app","sameSite":true,
            "custom":{"x":1},"zzz":[null]},"k":null}"#;
        let record = parse(doc);
        let c = &record.cookie;
        assert_eq!(c.original_max_age, None);
        assert_eq!(c.expires, None);
        assert_eq!(c.secure, None);
        assert_eq!(c.http_only, None);
        assert_eq!(c.partitioned, Some(true));
        assert_eq!(c.priority.as_deref(), Some("High"));
        assert_eq!(c.domain.as_deref(), Some("example.com"));
        assert_eq!(c.same_site, Some(SameSiteValue::Flag(true)));
        assert_eq!(c.same_site_mode(), Some(SameSite::Strict));
        for key in [
            "originalMaxAge",
            "expires",
            "secure",
            "httpOnly",
            "custom",
            "zzz",
        ] {
            assert!(c.extra.contains_key(key), "{key}");
        }
        let out = record.to_json();
        assert_eq!(value(&out), value(doc));
        assert_eq!(record.get::<Value>("k"), Some(Value::Null));
        // Setting a typed field replaces the odd value rather than duplicating the key.
        let mut record = record;
        record.cookie.secure = Some(true);
        record
            .cookie
            .set_max_age(datetime!(2026-01-01 0:00 UTC), Some(Duration::HOUR));
        let out: Value = value(&record.to_json());
        assert_eq!(out["cookie"]["secure"], Value::Bool(true));
        assert_eq!(out["cookie"]["originalMaxAge"], Value::from(3_600_000));
        assert_eq!(
            out["cookie"]["expires"],
            Value::from("2026-01-01T01:00:00.000Z")
        );
        let text = record.to_json();
        assert_eq!(text.matches("\"secure\"").count(), 1, "{text}");
    }

    #[test]
    fn same_site_spellings_round_trip() {
        for (stored, mode) in [
            ("\"lax\"", Some(SameSite::Lax)),
            ("\"strict\"", Some(SameSite::Strict)),
            ("\"none\"", Some(SameSite::None)),
            ("\"Lax\"", Some(SameSite::Lax)),
            ("\"bogus\"", None),
            ("true", Some(SameSite::Strict)),
            ("false", None),
        ] {
            let doc = format!(
                r#"{{"cookie":{{"originalMaxAge":null,"expires":null,"sameSite":{stored}}}}}"#
            );
            let record = parse(&doc);
            assert_eq!(record.cookie.same_site_mode(), mode, "{stored}");
            assert_eq!(record.to_json(), doc);
        }
    }

    #[test]
    fn missing_cookie_gets_defaults() {
        let record = parse(r#"{"user":"bob"}"#);
        assert_eq!(record.cookie, CookieData::default());
        assert_eq!(
            record.to_json(),
            r#"{"cookie":{"originalMaxAge":null,"expires":null,"httpOnly":true,"path":"/"},"user":"bob"}"#
        );
        assert_eq!(parse("{}").data().len(), 0);
    }

    #[test]
    fn non_objects_are_refused() {
        for (doc, found) in [
            ("[]", "an array"),
            ("[1,2]", "an array"),
            ("\"str\"", "a string"),
            ("null", "null"),
            ("3", "a number"),
            ("true", "a boolean"),
        ] {
            match SessionRecord::from_json(doc) {
                Err(RecordError::NotAnObject { found: f }) => assert_eq!(f, found),
                other => panic!("{doc}: {other:?}"),
            }
        }
        for doc in [
            r#"{"cookie":null}"#,
            r#"{"cookie":[]}"#,
            r#"{"cookie":"x"}"#,
            r#"{"cookie":1}"#,
        ] {
            assert!(
                matches!(
                    SessionRecord::from_json(doc),
                    Err(RecordError::CookieNotAnObject { .. })
                ),
                "{doc}"
            );
        }
        for doc in ["", "{", "{\"a\":}", "nul", "{} {}"] {
            assert!(
                matches!(
                    SessionRecord::from_json(doc),
                    Err(RecordError::InvalidJson(_))
                ),
                "{doc}"
            );
        }
        // Deep nesting is an error, not a stack overflow.
        let deep = "[".repeat(100_000) + &"]".repeat(100_000);
        assert!(SessionRecord::from_json(&format!("{{\"a\":{deep}}}")).is_err());
        // And via serde.
        assert!(serde_json::from_str::<SessionRecord>("[]").is_err());
        assert!(serde_json::from_str::<SessionRecord>(EXPRESS_DOC).is_ok());
    }

    #[test]
    fn expires_is_read_as_a_javascript_date() {
        // Found by the `record` fuzz target: a sub-millisecond `expires`
        // was kept to the nanosecond but written back to the millisecond,
        // so a session read and written back changed. JavaScript's Date
        // truncates to the millisecond; so does reading now.
        let record = parse(r#"{"cookie":{"expires":"2026-11-26T19:23:35.0842Z"}}"#);
        assert_eq!(
            record.cookie.expires,
            Some(datetime!(2026-11-26 19:23:35.084 UTC))
        );
        assert_eq!(parse(&record.to_json()), record);
        // Dates toISOString could not write back the same way (outside
        // years 0 to 9999 in UTC) are kept verbatim rather than changed.
        for odd in ["9999-12-31T23:00:00-05:00", "0000-01-01T00:00:00+01:00"] {
            let doc = format!(r#"{{"cookie":{{"expires":"{odd}"}}}}"#);
            let record = parse(&doc);
            assert_eq!(record.cookie.expires, None, "{odd}");
            assert_eq!(record.cookie.extra["expires"], Value::from(odd));
            assert_eq!(parse(&record.to_json()), record, "{odd}");
        }
        // Other offsets are the same moment in UTC.
        let record = parse(r#"{"cookie":{"expires":"2026-11-27T01:30:00.123456+07:30"}}"#);
        assert_eq!(
            record.cookie.expires,
            Some(datetime!(2026-11-26 18:00:00.123 UTC))
        );
        assert_eq!(parse(&record.to_json()), record);
    }

    #[test]
    fn numbers_are_read_back_exactly() {
        // Found by the `record` fuzz target: serde_json's default float
        // parser read 12e88 one ULP off, so a session read and written
        // back changed. The `float_roundtrip` feature fixes it.
        for (doc, expected) in [
            (r#"{"n":12e88}"#, 12e88),
            (r#"{"n":1.2e+89}"#, 1.2e89),
            (r#"{"n":1.2345655555555557e90}"#, 1.234_565_555_555_555_7e90),
            (r#"{"n":9.99}"#, 9.99),
            (r#"{"n":-5e-8}"#, -5e-8),
        ] {
            let record = parse(doc);
            assert_eq!(record.get::<f64>("n"), Some(expected), "{doc}");
            let out = record.to_json();
            assert_eq!(parse(&out), record, "{doc} -> {out}");
        }
    }

    #[test]
    fn size_limit() {
        let mut record = parse(EXPRESS_DOC);
        let size = record.check_size(DEFAULT_MAX_SESSION_BYTES).expect("small");
        assert_eq!(size, record.to_json().len());
        assert!(record.check_size(size).is_ok());
        assert!(record.check_size(size - 1).is_err());
        record
            .insert("blob", "x".repeat(DEFAULT_MAX_SESSION_BYTES))
            .unwrap();
        let err = record.check_size(DEFAULT_MAX_SESSION_BYTES).unwrap_err();
        match &err {
            RecordError::TooLarge { size, limit } => {
                assert!(*size > DEFAULT_MAX_SESSION_BYTES);
                assert_eq!(*limit, DEFAULT_MAX_SESSION_BYTES);
                let text = err.to_string();
                assert!(
                    text.contains(&size.to_string()) && text.contains("65536"),
                    "{text}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(record.to_json_limited(DEFAULT_MAX_SESSION_BYTES).is_err());
    }

    #[test]
    fn expires_is_written_like_to_iso_string() {
        for (date, text) in [
            (datetime!(2026-11-26 18:00 UTC), "2026-11-26T18:00:00.000Z"),
            (
                datetime!(2026-11-26 18:00:00.5 UTC),
                "2026-11-26T18:00:00.500Z",
            ),
            (
                datetime!(2026-11-26 18:00:00.123_999_999 UTC),
                "2026-11-26T18:00:00.123Z",
            ),
            (
                datetime!(2026-11-27 01:30 +07:30),
                "2026-11-26T18:00:00.000Z",
            ),
            (datetime!(1970-01-01 0:00 UTC), "1970-01-01T00:00:00.000Z"),
            (
                datetime!(9999-12-31 23:00 -05:00),
                "9999-12-31T23:59:59.999Z",
            ),
        ] {
            assert_eq!(to_js_iso_string(date), text);
            let mut record = SessionRecord::default();
            record.cookie.expires = Some(date);
            let out = value(&record.to_json());
            assert_eq!(out["cookie"]["expires"], Value::from(text));
        }
        // Any RFC 3339 is read.
        let record = parse(r#"{"cookie":{"expires":"2026-11-26T19:00:00+01:00"}}"#);
        assert_eq!(record.cookie.expires, Some(datetime!(2026-11-26 18:00 UTC)));
        assert!(record
            .to_json()
            .contains(r#""expires":"2026-11-26T18:00:00.000Z""#));
    }

    #[test]
    fn expire_for_row_follows_connect_pg_simple() {
        let now = datetime!(2026-11-26 18:00:00 UTC);
        let mut record = SessionRecord::default();
        assert_eq!(
            record.expire_for_row(now, DEFAULT_LIFETIME),
            datetime!(2026-11-27 18:00 UTC)
        );
        assert_eq!(
            record.expire_for_row(now, Duration::seconds(90)),
            datetime!(2026-11-26 18:01:30 UTC)
        );
        record.cookie.expires = Some(datetime!(2026-12-01 10:00:00.001 UTC));
        assert_eq!(
            record.expire_for_row(now, DEFAULT_LIFETIME),
            datetime!(2026-12-01 10:00:01 UTC)
        );
        record.cookie.expires = Some(datetime!(2026-12-01 12:00 +02:00));
        let row = record.expire_for_row(now, DEFAULT_LIFETIME);
        assert_eq!(row, datetime!(2026-12-01 10:00 UTC));
        assert_eq!(row.offset(), UtcOffset::UTC);
        // Past expiry is kept as is (the row is simply already expired).
        record.cookie.expires = Some(datetime!(2000-01-01 0:00 UTC));
        assert_eq!(
            record.expire_for_row(now, DEFAULT_LIFETIME),
            datetime!(2000-01-01 0:00 UTC)
        );
        // Absurd lifetimes clamp instead of panicking.
        record.cookie.expires = None;
        let far = record.expire_for_row(now, Duration::MAX);
        assert_eq!(far.year(), 9999);
        let _ = record.expire_for_row(now, Duration::MIN);
    }

    #[test]
    fn data_accessors() {
        let mut record = SessionRecord::default();
        assert_eq!(record.get::<String>("user"), None);
        assert_eq!(record.insert("user", "alice").unwrap(), None);
        assert_eq!(record.get::<String>("user").as_deref(), Some("alice"));
        // Wrong type gives None.
        assert_eq!(record.get::<u64>("user"), None);
        assert_eq!(
            record.insert("user", "bob").unwrap(),
            Some(Value::from("alice"))
        );
        record.insert("list", vec![1, 2, 3]).unwrap();
        assert_eq!(record.get::<Vec<u8>>("list"), Some(vec![1, 2, 3]));
        assert!(matches!(
            record.insert("cookie", "x"),
            Err(RecordError::ReservedKey)
        ));
        assert!(matches!(
            record.insert("cookie", Value::Null),
            Err(RecordError::ReservedKey)
        ));
        let mut bad = std::collections::HashMap::new();
        bad.insert((1, 2), 3);
        assert!(matches!(
            record.insert("bad", bad),
            Err(RecordError::Unserializable { .. })
        ));
        assert_eq!(record.remove("user"), Some(Value::from("bob")));
        assert_eq!(record.remove("user"), None);
        // A "cookie" smuggled in through data_mut is not written out.
        record.data_mut().insert("cookie".into(), Value::from(1));
        let out = value(&record.to_json());
        assert!(out["cookie"].is_object());
        assert_eq!(record.to_json().matches("\"cookie\"").count(), 1);
        assert_eq!(record.clone().into_data().len(), 2);
    }

    #[test]
    fn cookie_helpers() {
        let now = datetime!(2026-11-26 18:00 UTC);
        let mut cookie = CookieData::default();
        cookie.set_max_age(now, Some(Duration::DAY));
        cookie.same_site = Some(SameSite::Lax.into());
        cookie.reset_max_age(now + Duration::HOUR);
        assert_eq!(cookie.expires, Some(datetime!(2026-11-27 19:00 UTC)));
        assert_eq!(cookie.original_max_age, Some(86_400_000));
        let secrets = Secrets::new(["tobiiscool"]).unwrap();
        let sid = SessionId::parse("hello").unwrap();
        assert_eq!(
            cookie
                .to_set_cookie("connect.sid", &sid, &secrets)
                .to_header_value()
                .unwrap(),
            "connect.sid=s%3Ahello.DGDUkGlIkCzPz%2BC0B064FNgHdEjox7ch8tOBGslZ5QI; Path=/; \
             Expires=Fri, 27 Nov 2026 19:00:00 GMT; HttpOnly; SameSite=Lax"
        );
        cookie.set_max_age(now, None);
        assert_eq!(cookie.expires, None);
        assert_eq!(cookie.original_max_age, None);
        cookie.set_max_age(now, Some(Duration::MAX));
        assert_eq!(cookie.original_max_age, Some(i64::MAX));
        assert!(to_js_iso_string(cookie.expires.unwrap()).starts_with("9999-12-31"));
    }
}
