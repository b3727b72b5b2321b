//! The session cookie, byte for byte as express-session writes and reads it.
//!
//! This module owns everything that touches the `connect.sid`-style cookie:
//! the signing secrets ([`Secrets`]), session ids ([`SessionId`]), the
//! `s:<sid>.<mac>` signature of the `cookie-signature` package ([`sign`],
//! [`unsign`]), the percent-encoding of the `cookie` package
//! ([`encode_cookie_value`]), finding the cookie in `Cookie` request headers
//! ([`parse_cookie_header`]) and formatting `Set-Cookie` values
//! ([`SetCookie`]). Node services using express-session with the same secret
//! accept the cookies made here, and the other way round.
//!
//! ```
//! use pgsession::cookie::{self, Secrets, SessionId, SameSite, SetCookie};
//!
//! let secrets = Secrets::parse_list("current-secret,previous-secret")?;
//! let sid = SessionId::generate();
//! let header = SetCookie::for_session("connect.sid", &sid, &secrets)
//!     .path("/")
//!     .http_only(true)
//!     .same_site(SameSite::Lax)
//!     .to_header_value()?;
//! assert!(header.starts_with("connect.sid=s%3A"));
//!
//! // A later request brings the cookie back.
//! let value = &header["connect.sid=".len()..header.find(';').unwrap_or(header.len())];
//! let unsigned = cookie::unsign(value, &secrets).expect("valid signature");
//! assert_eq!(unsigned.sid, sid);
//! assert_eq!(unsigned.secret_index, 0);
//! # Ok::<(), pgsession::cookie::CookieError>(())
//! ```

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC};
use rand::TryRng as _;
use sha2::Sha256;
use subtle::ConstantTimeEq;
use time::format_description::BorrowedFormatItem;
use time::macros::format_description;
use time::{OffsetDateTime, UtcOffset};

/// The most secrets [`Secrets`] accepts: each one costs an HMAC per rejected
/// cookie, so an unbounded list would let a bad cookie cost unbounded work.
pub const MAX_SECRETS: usize = 16;

/// The most bytes of `Cookie` request headers [`parse_cookie_header`] reads;
/// more is treated as no session (browsers send at most about 4 KiB per cookie).
pub const MAX_COOKIE_HEADER_BYTES: usize = 8192;

/// The longest session id, in bytes, that [`unsign`] and [`SessionId::parse`]
/// accept: generated ids have 32, and nothing legitimate comes close.
pub const MAX_SESSION_ID_BYTES: usize = 256;

/// Random bytes in a generated session id, as express-session's `uid(24)`.
const SESSION_ID_RANDOM_BYTES: usize = 24;

/// The longest raw cookie value [`unsign`] looks at: a maximal id, fully
/// percent-encoded, plus prefix, dot and MAC fits well below it.
const MAX_RAW_COOKIE_VALUE_BYTES: usize = 1024;

/// express-session's marker in front of a signed value.
const SIGNED_PREFIX: &str = "s:";

/// Everything that can go wrong in this module; none of it carries a secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CookieError {
    /// No secret was given; at least one is needed to sign.
    #[error("no session secret given: at least one is needed")]
    NoSecrets,
    /// One of the secrets is the empty string (often a stray comma in the list).
    #[error("session secret number {index} (counting from 0) is empty")]
    EmptySecret {
        /// Position of the empty secret in the list.
        index: usize,
    },
    /// A secret the HMAC implementation refused (it accepts any length, so
    /// this is not expected).
    #[error("session secret number {index} (counting from 0) cannot be used as an HMAC key")]
    InvalidSecret {
        /// Position of the secret in the list.
        index: usize,
    },
    /// More secrets than [`MAX_SECRETS`].
    #[error("{count} session secrets given, at most {max} are allowed (MAX_SECRETS)")]
    TooManySecrets {
        /// How many were given.
        count: usize,
        /// The limit, [`MAX_SECRETS`].
        max: usize,
    },
    /// The operating system's random generator failed.
    #[error("the operating system's random number generator failed: {0}")]
    Rng(#[source] rand::rngs::SysError),
    /// A session id that is empty or longer than [`MAX_SESSION_ID_BYTES`].
    #[error("invalid session id: {reason}")]
    InvalidSessionId {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A `SameSite` setting that is none of strict, lax, none.
    #[error("invalid SameSite value {0:?}: expected strict, lax or none")]
    InvalidSameSite(String),
    /// A `Priority` setting that is none of low, medium, high.
    #[error("invalid cookie priority {0:?}: expected low, medium or high")]
    InvalidPriority(String),
    /// A cookie name that is not an HTTP token.
    #[error("invalid cookie name {0:?}")]
    InvalidName(String),
    /// A cookie domain that the `cookie` package would refuse.
    #[error("invalid cookie domain {0:?}")]
    InvalidDomain(String),
    /// A cookie path with `;`, `<` or control characters.
    #[error("invalid cookie path {0:?}")]
    InvalidPath(String),
    /// An `Expires` date that cannot be written as an HTTP date.
    #[error("cookie expiry date out of range")]
    InvalidExpires,
}

/// The signing secrets: the first signs new cookies, every one of them
/// verifies, so a secret can be rotated without logging everybody out.
///
/// Each secret is kept as a pre-keyed HMAC-SHA256 state, so signing costs no
/// key setup. `Debug` prints only how many there are.
#[derive(Clone)]
pub struct Secrets {
    keys: Vec<Hmac<Sha256>>,
}

impl Secrets {
    /// Takes the secrets in order of preference (the first one signs).
    ///
    /// Refuses an empty list, an empty secret and more than [`MAX_SECRETS`].
    ///
    /// ```
    /// use pgsession::cookie::Secrets;
    /// let secrets = Secrets::new(["new secret", "old secret"])?;
    /// assert_eq!(secrets.len(), 2);
    /// assert!(Secrets::new(Vec::<String>::new()).is_err());
    /// # Ok::<(), pgsession::cookie::CookieError>(())
    /// ```
    pub fn new<I, S>(secrets: I) -> Result<Secrets, CookieError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut keys = Vec::new();
        for (index, secret) in secrets.into_iter().enumerate() {
            if index >= MAX_SECRETS {
                // Count the rest only to give a precise error.
                return Err(CookieError::TooManySecrets {
                    count: index + 1,
                    max: MAX_SECRETS,
                });
            }
            let secret: String = secret.into();
            if secret.is_empty() {
                return Err(CookieError::EmptySecret { index });
            }
            let key = keyed_mac(secret.as_bytes()).ok_or(CookieError::InvalidSecret { index })?;
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(CookieError::NoSecrets);
        }
        Ok(Secrets { keys })
    }

    /// Parses a comma separated list, as in `PGSESSION_SECRET` (the Node
    /// side splits the same variable with `split(',')`). Nothing is trimmed:
    /// the bytes between commas are the secret.
    pub fn parse_list(list: &str) -> Result<Secrets, CookieError> {
        let parts: Vec<&str> = list.split(',').collect();
        if parts.len() > MAX_SECRETS {
            return Err(CookieError::TooManySecrets {
                count: parts.len(),
                max: MAX_SECRETS,
            });
        }
        Secrets::new(parts)
    }

    /// How many secrets there are (at least 1).
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Always false: a `Secrets` holds at least one secret. Here for clippy's
    /// `len_without_is_empty` and for symmetry.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The unpadded standard base64 HMAC of `value` with secret `index`.
    fn mac_base64(&self, index: usize, value: &str) -> Option<String> {
        let mut mac = self.keys.get(index)?.clone();
        mac.update(value.as_bytes());
        Some(STANDARD_NO_PAD.encode(mac.finalize().into_bytes()))
    }
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secrets")
            .field("count", &self.keys.len())
            .finish()
    }
}

fn keyed_mac(key: &[u8]) -> Option<Hmac<Sha256>> {
    // HMAC accepts keys of any length, so this is always `Some`.
    Hmac::<Sha256>::new_from_slice(key).ok()
}

/// A session id: the part of the cookie between `s:` and the signature, and
/// the `sid` column of the store.
///
/// It is a bearer secret, so `Debug` shows only its first 4 characters;
/// `Display` and [`SessionId::as_str`] give all of it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(String);

impl SessionId {
    /// A new random id: 24 bytes from the operating system's generator,
    /// base64url without padding (32 characters), as express-session's
    /// `uid-safe` makes them.
    ///
    /// Should the OS generator fail (it does not on supported systems), falls
    /// back to `rand`'s thread-local CSPRNG, itself seeded from the OS. Use
    /// [`SessionId::try_generate`] to get the error instead.
    ///
    /// ```
    /// let id = pgsession::cookie::SessionId::generate();
    /// assert_eq!(id.as_str().len(), 32);
    /// ```
    pub fn generate() -> SessionId {
        match SessionId::try_generate() {
            Ok(id) => id,
            Err(_) => {
                let mut bytes = [0u8; SESSION_ID_RANDOM_BYTES];
                rand::fill(&mut bytes);
                SessionId(URL_SAFE_NO_PAD.encode(bytes))
            }
        }
    }

    /// Like [`SessionId::generate`], but only from the operating system's
    /// generator, with its error if it fails.
    pub fn try_generate() -> Result<SessionId, CookieError> {
        let mut bytes = [0u8; SESSION_ID_RANDOM_BYTES];
        rand::rngs::SysRng
            .try_fill_bytes(&mut bytes)
            .map_err(CookieError::Rng)?;
        Ok(SessionId(URL_SAFE_NO_PAD.encode(bytes)))
    }

    /// Wraps an id read from elsewhere (the store, another service), refusing
    /// an empty one or one over [`MAX_SESSION_ID_BYTES`].
    pub fn parse(id: impl Into<String>) -> Result<SessionId, CookieError> {
        let id = id.into();
        check_sid(&id)
            .map(|()| SessionId(id))
            .map_err(|reason| CookieError::InvalidSessionId { reason })
    }

    /// The id itself.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id as an owned `String`.
    pub fn into_string(self) -> String {
        self.0
    }
}

fn check_sid(sid: &str) -> Result<(), &'static str> {
    if sid.is_empty() {
        Err("empty")
    } else if sid.len() > MAX_SESSION_ID_BYTES {
        Err("longer than MAX_SESSION_ID_BYTES")
    } else {
        Ok(())
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: String = self.0.chars().take(4).collect();
        write!(f, "SessionId({shown:?}…)")
    }
}

impl AsRef<str> for SessionId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Signs a session id as express-session does: `s:` + sid + `.` + the
/// unpadded standard base64 HMAC-SHA256 of sid under the first secret.
///
/// The result still has to go through [`encode_cookie_value`] before it is
/// put in a header (or use [`signed_cookie_value`], which does both).
///
/// ```
/// use pgsession::cookie::{sign, Secrets};
/// let secrets = Secrets::new(["tobiiscool"])?;
/// assert_eq!(sign("hello", &secrets), "s:hello.DGDUkGlIkCzPz+C0B064FNgHdEjox7ch8tOBGslZ5QI");
/// # Ok::<(), pgsession::cookie::CookieError>(())
/// ```
pub fn sign(sid: &str, secrets: &Secrets) -> String {
    let mac = secrets.mac_base64(0, sid).unwrap_or_default();
    let mut out = String::with_capacity(SIGNED_PREFIX.len() + sid.len() + 1 + mac.len());
    out.push_str(SIGNED_PREFIX);
    out.push_str(sid);
    out.push('.');
    out.push_str(&mac);
    out
}

/// The cookie value for a session id, signed and encoded, ready for
/// `Set-Cookie` (`s%3A<sid>.<mac>`).
pub fn signed_cookie_value(sid: &SessionId, secrets: &Secrets) -> String {
    encode_cookie_value(&sign(sid.as_str(), secrets))
}

/// The characters JavaScript's `encodeURIComponent` leaves alone are
/// `A-Z a-z 0-9 - _ . ! ~ * ' ( )`; everything else is escaped.
const URI_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'!')
    .remove(b'~')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');

/// Percent-encodes a cookie value like JavaScript's `encodeURIComponent`,
/// the default encoder of the `cookie` package's `serialize`.
///
/// ```
/// use pgsession::cookie::encode_cookie_value;
/// assert_eq!(encode_cookie_value("s:a+b/c=.d"), "s%3Aa%2Bb%2Fc%3D.d");
/// ```
pub fn encode_cookie_value(value: &str) -> String {
    percent_encoding::utf8_percent_encode(value, URI_COMPONENT).to_string()
}

/// JavaScript's `decodeURIComponent`: `None` where it would throw (a `%` not
/// followed by two hex digits, or escapes that are not UTF-8).
fn decode_uri_component(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hi = bytes.get(i + 1).and_then(|c| hex_value(*c))?;
            let lo = bytes.get(i + 2).and_then(|c| hex_value(*c))?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// A cookie whose signature checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsigned {
    /// The session id it carries.
    pub sid: SessionId,
    /// Which secret verified it: 0 is the current one; more means it was
    /// signed with an older secret and should be sent again, re-signed.
    pub secret_index: usize,
}

impl Unsigned {
    /// True when an older secret verified the cookie, so it should be re-signed.
    pub fn needs_resign(&self) -> bool {
        self.secret_index > 0
    }
}

/// Checks a raw cookie value (as found by [`parse_cookie_header`]) the way
/// express-session does, and returns the session id it carries.
///
/// The value is percent-decoded like the `cookie` package (where decoding
/// fails, the raw value is used), must start with `s:`, is split at its last
/// `.`, and the MAC is compared in constant time with each secret's in turn.
/// Anything else — no prefix, no dot, an empty or over-long id, a wrong
/// signature — gives `None`.
///
/// ```
/// use pgsession::cookie::{unsign, Secrets};
/// let secrets = Secrets::new(["tobiiscool"])?;
/// let ok = unsign("s%3Ahello.DGDUkGlIkCzPz%2BC0B064FNgHdEjox7ch8tOBGslZ5QI", &secrets);
/// assert_eq!(ok.map(|u| u.sid.to_string()), Some("hello".to_string()));
/// assert!(unsign("s%3Ahello.DGDUkGlIkCzPz%2BC0B064FNgHdEjox7ch8tOBGslZ5QJ", &secrets).is_none());
/// # Ok::<(), pgsession::cookie::CookieError>(())
/// ```
pub fn unsign(raw_cookie_value: &str, secrets: &Secrets) -> Option<Unsigned> {
    if raw_cookie_value.len() > MAX_RAW_COOKIE_VALUE_BYTES {
        return None;
    }
    let decoded;
    let value = if raw_cookie_value.contains('%') {
        decoded = decode_uri_component(raw_cookie_value);
        decoded.as_deref().unwrap_or(raw_cookie_value)
    } else {
        raw_cookie_value
    };
    let signed = value.strip_prefix(SIGNED_PREFIX)?;
    let dot = signed.rfind('.')?;
    let (sid, mac_with_dot) = signed.split_at(dot);
    let given_mac = mac_with_dot.get(1..)?;
    check_sid(sid).ok()?;
    let mut verified = None;
    for index in 0..secrets.len() {
        let expected = secrets.mac_base64(index, sid)?;
        // Lengths are public (always 43); the content is compared in constant time.
        let equal: bool = expected.as_bytes().ct_eq(given_mac.as_bytes()).into();
        if equal && verified.is_none() {
            verified = Some(index);
        }
    }
    verified.map(|secret_index| Unsigned {
        sid: SessionId(sid.to_owned()),
        secret_index,
    })
}

/// What [`parse_cookie_header`] found, so the caller can tell (and log) why
/// there is no session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CookieLookup<'a> {
    /// No cookie of that name.
    Missing,
    /// Exactly one value (possibly repeated identically): the raw value, still
    /// percent-encoded, surrounding double quotes removed. Give it to [`unsign`].
    Found(&'a str),
    /// The name appears with different values: ambiguous, maybe a cookie
    /// injected by a sibling domain, so treat it as no session.
    Duplicate,
    /// The `Cookie` headers together exceed [`MAX_COOKIE_HEADER_BYTES`].
    TooLarge,
    /// The value is not UTF-8, so it cannot be a cookie this crate signed.
    NotUtf8,
}

/// Finds the cookie `name` in one or more `Cookie` header values
/// (`a=b; c=d`), parsing like the `cookie` package's `parse` (pairs split at
/// `;`, name and value trimmed of spaces and tabs, a pair of surrounding
/// double quotes removed), but refusing ambiguity: see [`CookieLookup`].
///
/// Values are compared raw, so the same value sent once encoded and once not
/// counts as a duplicate.
///
/// ```
/// use pgsession::cookie::{parse_cookie_header, CookieLookup};
/// let headers: [&[u8]; 2] = [b"theme=dark; connect.sid=s%3Aabc.mac", b"lang=en"];
/// assert_eq!(parse_cookie_header(headers, "connect.sid"), CookieLookup::Found("s%3Aabc.mac"));
/// assert_eq!(parse_cookie_header(headers, "other"), CookieLookup::Missing);
/// ```
pub fn parse_cookie_header<'a, I>(header_values: I, name: &str) -> CookieLookup<'a>
where
    I: IntoIterator<Item = &'a [u8]>,
{
    let mut total = 0usize;
    let mut found: Option<&'a [u8]> = None;
    let mut duplicate = false;
    for header in header_values {
        total = total.saturating_add(header.len());
        if total > MAX_COOKIE_HEADER_BYTES {
            return CookieLookup::TooLarge;
        }
        if duplicate {
            // Keep reading only to apply the size limit.
            continue;
        }
        for pair in header.split(|&b| b == b';') {
            let Some(eq) = pair.iter().position(|&b| b == b'=') else {
                continue;
            };
            let (key, value) = pair.split_at(eq);
            let value = value.get(1..).unwrap_or_default();
            if trim_ows(key) != name.as_bytes() {
                continue;
            }
            let value = unquote(trim_ows(value));
            match found {
                None => found = Some(value),
                Some(previous) if previous == value => {}
                Some(_) => {
                    duplicate = true;
                    break;
                }
            }
        }
    }
    if duplicate {
        return CookieLookup::Duplicate;
    }
    match found {
        None => CookieLookup::Missing,
        Some(value) => match std::str::from_utf8(value) {
            Ok(value) => CookieLookup::Found(value),
            Err(_) => CookieLookup::NotUtf8,
        },
    }
}

/// Trims spaces and tabs, the only whitespace the `cookie` package trims.
fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Removes one pair of surrounding double quotes, as the `cookie` package
/// does (a lone `"` becomes empty there too).
fn unquote(s: &[u8]) -> &[u8] {
    match s {
        [b'"'] => &[],
        [b'"', inner @ .., b'"'] => inner,
        _ => s,
    }
}

/// The cookie's `SameSite` attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SameSite {
    /// `SameSite=Strict`: never sent on cross-site requests.
    Strict,
    /// `SameSite=Lax`: sent on top-level cross-site navigations only.
    Lax,
    /// `SameSite=None`: always sent (browsers require `Secure` with it).
    None,
}

impl SameSite {
    /// The attribute value as written in `Set-Cookie` (`Strict`, `Lax`, `None`).
    pub fn as_attribute(self) -> &'static str {
        match self {
            SameSite::Strict => "Strict",
            SameSite::Lax => "Lax",
            SameSite::None => "None",
        }
    }

    /// The lowercase spelling express-session stores in the session JSON.
    pub fn as_lowercase(self) -> &'static str {
        match self {
            SameSite::Strict => "strict",
            SameSite::Lax => "lax",
            SameSite::None => "none",
        }
    }
}

impl fmt::Display for SameSite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_attribute())
    }
}

impl FromStr for SameSite {
    type Err = CookieError;

    /// Case-insensitive `strict`, `lax` or `none`, as the `cookie` package accepts.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let choices = [
            ("strict", SameSite::Strict),
            ("lax", SameSite::Lax),
            ("none", SameSite::None),
        ];
        choose(s, &choices).ok_or_else(|| CookieError::InvalidSameSite(s.to_owned()))
    }
}

/// The cookie's `Priority` attribute (a Chrome extension the `cookie` package supports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Priority {
    /// `Priority=Low`.
    Low,
    /// `Priority=Medium`.
    Medium,
    /// `Priority=High`.
    High,
}

impl Priority {
    /// The attribute value as written in `Set-Cookie`.
    pub fn as_attribute(self) -> &'static str {
        match self {
            Priority::Low => "Low",
            Priority::Medium => "Medium",
            Priority::High => "High",
        }
    }
}

impl FromStr for Priority {
    type Err = CookieError;

    /// Case-insensitive `low`, `medium` or `high`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let choices = [
            ("low", Priority::Low),
            ("medium", Priority::Medium),
            ("high", Priority::High),
        ];
        choose(s, &choices).ok_or_else(|| CookieError::InvalidPriority(s.to_owned()))
    }
}

/// The value named by `s` (ASCII case-insensitive) among `choices`.
fn choose<T: Copy>(s: &str, choices: &[(&str, T)]) -> Option<T> {
    choices
        .iter()
        .find(|(name, _)| s.eq_ignore_ascii_case(name))
        .map(|&(_, value)| value)
}

/// The HTTP date of `Expires`, as JavaScript's `Date.prototype.toUTCString`.
const HTTP_DATE: &[BorrowedFormatItem<'static>] = format_description!(
    "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
);

/// Formats a date as an HTTP date in GMT (`Thu, 01 Jan 1970 00:00:00 GMT`),
/// the way the `cookie` package writes `Expires`.
///
/// ```
/// use pgsession::cookie::http_date;
/// let epoch = time::OffsetDateTime::UNIX_EPOCH;
/// assert_eq!(http_date(epoch).unwrap(), "Thu, 01 Jan 1970 00:00:00 GMT");
/// ```
pub fn http_date(date: OffsetDateTime) -> Result<String, CookieError> {
    date.checked_to_offset(UtcOffset::UTC)
        .and_then(|utc| utc.format(HTTP_DATE).ok())
        .ok_or(CookieError::InvalidExpires)
}

/// A `Set-Cookie` header value, formatted like the `cookie` package's
/// `serialize` as express-session calls it, attributes in the same order:
/// `Max-Age`, `Domain`, `Path`, `Expires`, `HttpOnly`, `Secure`,
/// `Partitioned`, `Priority`, `SameSite`.
///
/// The value is given unencoded and percent-encoded on output, as the
/// `cookie` package does. Names, domains and paths are checked on output
/// ([`SetCookie::to_header_value`]) with the `cookie` package's rules, so a
/// bad configuration cannot inject attributes.
///
/// ```
/// use pgsession::cookie::{SameSite, SetCookie};
/// let expires = time::macros::datetime!(2026-11-27 18:00:00 UTC);
/// let header = SetCookie::new("connect.sid", "s:abc.def")
///     .path("/")
///     .expires(expires)
///     .http_only(true)
///     .same_site(SameSite::Lax)
///     .to_header_value()?;
/// assert_eq!(
///     header,
///     "connect.sid=s%3Aabc.def; Path=/; Expires=Fri, 27 Nov 2026 18:00:00 GMT; HttpOnly; SameSite=Lax"
/// );
/// let gone = SetCookie::removal("connect.sid").to_header_value()?;
/// assert_eq!(gone, "connect.sid=; Path=/; Expires=Thu, 01 Jan 1970 00:00:00 GMT");
/// # Ok::<(), pgsession::cookie::CookieError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "a SetCookie does nothing until `to_header_value` formats it"]
pub struct SetCookie {
    name: String,
    value: String,
    max_age: Option<i64>,
    domain: Option<String>,
    path: Option<String>,
    expires: Option<OffsetDateTime>,
    http_only: bool,
    secure: bool,
    partitioned: bool,
    priority: Option<Priority>,
    same_site: Option<SameSite>,
}

impl SetCookie {
    /// A cookie with a name and an unencoded value and no attributes.
    pub fn new(name: impl Into<String>, value: impl Into<String>) -> SetCookie {
        SetCookie {
            name: name.into(),
            value: value.into(),
            max_age: None,
            domain: None,
            path: None,
            expires: None,
            http_only: false,
            secure: false,
            partitioned: false,
            priority: None,
            same_site: None,
        }
    }

    /// The session cookie: the id signed with the first secret (`s:<sid>.<mac>`).
    pub fn for_session(name: impl Into<String>, sid: &SessionId, secrets: &Secrets) -> SetCookie {
        SetCookie::new(name, sign(sid.as_str(), secrets))
    }

    /// A cookie that makes the browser drop `name`: empty value, `Path=/`,
    /// expired in 1970, as Express's `res.clearCookie`. Add the same `Domain`
    /// (and path) the cookie was set with, or the browser keeps it.
    pub fn removal(name: impl Into<String>) -> SetCookie {
        SetCookie::new(name, "")
            .path("/")
            .expires(OffsetDateTime::UNIX_EPOCH)
    }

    /// This cookie turned into its removal: same name and attributes, empty
    /// value, no `Max-Age`, `Expires` in 1970.
    pub fn into_removal(mut self) -> SetCookie {
        self.value.clear();
        self.max_age = None;
        self.expires = Some(OffsetDateTime::UNIX_EPOCH);
        self
    }

    /// `Max-Age` in seconds (express-session itself uses `Expires` instead).
    pub fn max_age(mut self, seconds: i64) -> SetCookie {
        self.max_age = Some(seconds);
        self
    }

    /// `Domain`.
    pub fn domain(mut self, domain: impl Into<String>) -> SetCookie {
        self.domain = Some(domain.into());
        self
    }

    /// `Path`.
    pub fn path(mut self, path: impl Into<String>) -> SetCookie {
        self.path = Some(path.into());
        self
    }

    /// `Expires`, written in GMT whatever the offset.
    pub fn expires(mut self, expires: OffsetDateTime) -> SetCookie {
        self.expires = Some(expires);
        self
    }

    /// `HttpOnly`: hidden from page scripts.
    pub fn http_only(mut self, on: bool) -> SetCookie {
        self.http_only = on;
        self
    }

    /// `Secure`: HTTPS only.
    pub fn secure(mut self, on: bool) -> SetCookie {
        self.secure = on;
        self
    }

    /// `Partitioned` (CHIPS).
    pub fn partitioned(mut self, on: bool) -> SetCookie {
        self.partitioned = on;
        self
    }

    /// `Priority`.
    pub fn priority(mut self, priority: Priority) -> SetCookie {
        self.priority = Some(priority);
        self
    }

    /// `SameSite`.
    pub fn same_site(mut self, same_site: SameSite) -> SetCookie {
        self.same_site = Some(same_site);
        self
    }

    /// The cookie's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The header value, after checking name, domain and path.
    pub fn to_header_value(&self) -> Result<String, CookieError> {
        if !valid_cookie_name(&self.name) {
            return Err(CookieError::InvalidName(self.name.clone()));
        }
        let mut out = String::with_capacity(128);
        out.push_str(&self.name);
        out.push('=');
        out.push_str(&encode_cookie_value(&self.value));
        if let Some(max_age) = self.max_age {
            out.push_str("; Max-Age=");
            out.push_str(&max_age.to_string());
        }
        if let Some(domain) = self.domain.as_deref().filter(|d| !d.is_empty()) {
            if !valid_domain(domain) {
                return Err(CookieError::InvalidDomain(domain.to_owned()));
            }
            out.push_str("; Domain=");
            out.push_str(domain);
        }
        if let Some(path) = self.path.as_deref().filter(|p| !p.is_empty()) {
            if !valid_path(path) {
                return Err(CookieError::InvalidPath(path.to_owned()));
            }
            out.push_str("; Path=");
            out.push_str(path);
        }
        if let Some(expires) = self.expires {
            out.push_str("; Expires=");
            out.push_str(&http_date(expires)?);
        }
        if self.http_only {
            out.push_str("; HttpOnly");
        }
        if self.secure {
            out.push_str("; Secure");
        }
        if self.partitioned {
            out.push_str("; Partitioned");
        }
        if let Some(priority) = self.priority {
            out.push_str("; Priority=");
            out.push_str(priority.as_attribute());
        }
        if let Some(same_site) = self.same_site {
            out.push_str("; SameSite=");
            out.push_str(same_site.as_attribute());
        }
        Ok(out)
    }
}

/// Checks a cookie name as [`SetCookie::to_header_value`] will.
pub(crate) fn check_name(name: &str) -> Result<(), CookieError> {
    valid_cookie_name(name)
        .then_some(())
        .ok_or_else(|| CookieError::InvalidName(name.to_owned()))
}

/// Checks a cookie domain as [`SetCookie::to_header_value`] will.
pub(crate) fn check_domain(domain: &str) -> Result<(), CookieError> {
    valid_domain(domain)
        .then_some(())
        .ok_or_else(|| CookieError::InvalidDomain(domain.to_owned()))
}

/// Checks a cookie path as [`SetCookie::to_header_value`] will.
pub(crate) fn check_path(path: &str) -> Result<(), CookieError> {
    valid_path(path)
        .then_some(())
        .ok_or_else(|| CookieError::InvalidPath(path.to_owned()))
}

/// The `cookie` package's name rule: an RFC 7230 token.
fn valid_cookie_name(name: &str) -> bool {
    !name.is_empty()
        && name.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

/// The `cookie` package's domain rule: an optional leading dot, then labels
/// of 1 to 63 letters, digits and inner hyphens, separated by dots.
fn valid_domain(domain: &str) -> bool {
    let domain = domain.strip_prefix('.').unwrap_or(domain);
    domain.split('.').all(|label| {
        let bytes = label.as_bytes();
        !bytes.is_empty()
            && bytes.len() <= 63
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
            && bytes.first() != Some(&b'-')
            && bytes.last() != Some(&b'-')
    })
}

/// The `cookie` package's path rule: printable ASCII except `;` and `<`.
fn valid_path(path: &str) -> bool {
    path.bytes()
        .all(|b| (0x20..=0x7e).contains(&b) && b != b';' && b != b'<')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets(list: &[&str]) -> Secrets {
        match Secrets::new(list.iter().copied()) {
            Ok(s) => s,
            Err(e) => panic!("bad test secrets: {e}"),
        }
    }

    #[test]
    fn known_vector_matches_cookie_signature() {
        let s = secrets(&["tobiiscool"]);
        assert_eq!(
            sign("hello", &s),
            "s:hello.DGDUkGlIkCzPz+C0B064FNgHdEjox7ch8tOBGslZ5QI"
        );
        assert_eq!(
            encode_cookie_value(&sign("hello", &s)),
            "s%3Ahello.DGDUkGlIkCzPz%2BC0B064FNgHdEjox7ch8tOBGslZ5QI"
        );
        let sid = SessionId::parse("hello").unwrap();
        assert_eq!(
            signed_cookie_value(&sid, &s),
            "s%3Ahello.DGDUkGlIkCzPz%2BC0B064FNgHdEjox7ch8tOBGslZ5QI"
        );
    }

    /// Cookie values printed by Node (cookie-signature 1.0.7 + cookie 0.7.2,
    /// as used by express-session 1.19.0) for these ids and secrets.
    const NODE_VECTORS: [(&str, &str, &str); 10] = [
        (
            "hello",
            "interop-secret",
            "s%3Ahello.U2IHYtYjqotNcsulcZmahbzcBfdrxOtYiFZwqLuYGqU",
        ),
        (
            "hello",
            "s\u{e9}cret",
            "s%3Ahello.RKY0NhRh2qohbVpewRfhrgIXt56T9CP2poA6WXGEMaQ",
        ),
        (
            "hello",
            "x",
            "s%3Ahello.MQerkf9HBnqK87iFRzLUMCJov7aqcKkwYmGrqWkItS8",
        ),
        (
            "10DNXr0CTJ_dt35Zow6LVUIyw-xh8mCN",
            "interop-secret",
            "s%3A10DNXr0CTJ_dt35Zow6LVUIyw-xh8mCN.5tYdDON%2BFpuPj1A2wHWfyr%2Barw0LULsIRh9RxayZ2VA",
        ),
        (
            "10DNXr0CTJ_dt35Zow6LVUIyw-xh8mCN",
            "x",
            "s%3A10DNXr0CTJ_dt35Zow6LVUIyw-xh8mCN.lHkK1fnKrwSNL2u7vARIaKwXsZ8%2F2296x2QDH%2BEqszY",
        ),
        (
            "\u{fc}n\u{ef}c\u{f8}d\u{e9}",
            "interop-secret",
            "s%3A%C3%BCn%C3%AFc%C3%B8d%C3%A9.UtJ8pl0j%2B3xRCFF8bftV%2B%2BgGRMOX000wiD%2FjcTu7d9E",
        ),
        (
            "a.b.c",
            "s\u{e9}cret",
            "s%3Aa.b.c.Jokg1eHzJVsjehDChxH2o%2By%2FtP%2FeS%2Bh4X6XpjEcH074",
        ),
        (
            "with space;=",
            "tobiiscool",
            "s%3Awith%20space%3B%3D.4aYrg8VL3%2F7wypAf0a37kWbdPw%2BC6hs2PnE6Tk4OwYU",
        ),
        (
            "with space;=",
            "x",
            "s%3Awith%20space%3B%3D.Vd22o3PlL2%2BekTE%2BGhrbjxjTWSsEg0XY9gy%2FcCI7yxo",
        ),
        // Node signs (and would accept) an empty id; this crate refuses it.
        (
            "",
            "interop-secret",
            "s%3A.s3BJeJ72rzEf3MqkgoVp0lI65zEOHVlWmaHM48E7o5I",
        ),
    ];

    #[test]
    fn matches_node_vectors() {
        for (sid, secret, node_value) in NODE_VECTORS {
            let s = secrets(&[secret]);
            assert_eq!(
                encode_cookie_value(&sign(sid, &s)),
                node_value,
                "{sid} / {secret}"
            );
            let unsigned = unsign(node_value, &s).map(|u| u.sid.into_string());
            if sid.is_empty() {
                assert_eq!(unsigned, None);
            } else {
                assert_eq!(unsigned.as_deref(), Some(sid));
            }
        }
        // A real Set-Cookie from the interop Node app (secret "interop-secret").
        let header = "connect.sid=s%3A10DNXr0CTJ_dt35Zow6LVUIyw-xh8mCN.5tYdDON%2BFpuPj1A2wHWfyr%2Barw0LULsIRh9RxayZ2VA; \
                      Path=/; Expires=Fri, 27 Nov 2026 18:10:49 GMT; HttpOnly; SameSite=Lax";
        let sid = SessionId::parse("10DNXr0CTJ_dt35Zow6LVUIyw-xh8mCN").unwrap();
        let ours = SetCookie::for_session("connect.sid", &sid, &secrets(&["interop-secret"]))
            .path("/")
            .expires(time::macros::datetime!(2026-11-27 18:10:49.635 UTC))
            .http_only(true)
            .same_site(SameSite::Lax)
            .to_header_value()
            .unwrap();
        assert_eq!(ours, header);
        // cookie.serialize with every attribute, from Node.
        let all = SetCookie::new("connect.sid", "s:abc")
            .max_age(60)
            .domain("example.com")
            .path("/")
            .expires(time::macros::datetime!(2026-11-27 18:00 UTC))
            .http_only(true)
            .secure(true)
            .partitioned(true)
            .priority(Priority::High)
            .same_site(SameSite::None)
            .to_header_value()
            .unwrap();
        assert_eq!(
            all,
            "connect.sid=s%3Aabc; Max-Age=60; Domain=example.com; Path=/; \
             Expires=Fri, 27 Nov 2026 18:00:00 GMT; HttpOnly; Secure; Partitioned; \
             Priority=High; SameSite=None"
        );
        // cookie.parse results from Node for the same headers.
        for (header, node) in [
            (" connect.sid = \"q\" ", "q"),
            ("connect.sid=%E0%A4%A", "%E0%A4%A"),
            ("junk; connect.sid=x=y", "x=y"),
            ("connect.sid=\"", ""),
            ("\tconnect.sid=\tt\t", "t"),
        ] {
            assert_eq!(
                parse_cookie_header([header.as_bytes()], "connect.sid"),
                CookieLookup::Found(node),
                "{header:?}"
            );
        }
    }

    #[test]
    fn round_trip_sign_encode_decode_unsign() {
        let s = secrets(&["a secret", "older"]);
        for _ in 0..50 {
            let sid = SessionId::generate();
            let raw = signed_cookie_value(&sid, &s);
            let header = format!("other=1; connect.sid={raw}; x=y");
            let found = match parse_cookie_header([header.as_bytes()], "connect.sid") {
                CookieLookup::Found(v) => v,
                other => panic!("expected Found, got {other:?}"),
            };
            let u = unsign(found, &s).expect("verifies");
            assert_eq!(u.sid, sid);
            assert_eq!(u.secret_index, 0);
            assert!(!u.needs_resign());
            // Also accepted unencoded, as Node accepts it.
            assert_eq!(
                unsign(&sign(sid.as_str(), &s), &s).map(|u| u.sid),
                Some(sid)
            );
        }
    }

    #[test]
    fn odd_but_valid_ids_round_trip() {
        let s = secrets(&["k"]);
        for sid in ["a.b.c", "with space", "ünïcødé", "%41", "s:x", "a;b=c"] {
            let raw = encode_cookie_value(&sign(sid, &s));
            let u = unsign(&raw, &s).unwrap_or_else(|| panic!("{sid} should verify"));
            assert_eq!(u.sid.as_str(), sid);
        }
    }

    #[test]
    fn old_secrets_verify_with_their_index() {
        let old = secrets(&["old"]);
        let rotated = secrets(&["new", "old"]);
        let raw = encode_cookie_value(&sign("session-1", &old));
        let u = unsign(&raw, &rotated).expect("old secret still verifies");
        assert_eq!(u.secret_index, 1);
        assert!(u.needs_resign());
        // And a cookie signed with the new secret is not accepted by the old list.
        let fresh = encode_cookie_value(&sign("session-1", &rotated));
        assert!(unsign(&fresh, &old).is_none());
        assert_eq!(unsign(&fresh, &rotated).map(|u| u.secret_index), Some(0));
    }

    #[test]
    fn bad_cookies_are_rejected() {
        let s = secrets(&["tobiiscool"]);
        let good = "s%3Ahello.DGDUkGlIkCzPz%2BC0B064FNgHdEjox7ch8tOBGslZ5QI";
        assert!(unsign(good, &s).is_some());
        let huge_sid = "a".repeat(MAX_SESSION_ID_BYTES + 1);
        let huge_signed = sign(&huge_sid, &s);
        let empty_signed = sign("", &s);
        let cases: Vec<String> = vec![
            // tampered sid
            "s%3Ahellp.DGDUkGlIkCzPz%2BC0B064FNgHdEjox7ch8tOBGslZ5QI".into(),
            // tampered mac
            "s%3Ahello.DGDUkGlIkCzPz%2BC0B064FNgHdEjox7ch8tOBGslZ5QJ".into(),
            // truncated mac
            "s%3Ahello.DGDUkGlIkCzPz%2BC0B064FNgHdEjox7ch8tOBGslZ5Q".into(),
            // mac with padding
            "s%3Ahello.DGDUkGlIkCzPz%2BC0B064FNgHdEjox7ch8tOBGslZ5QI%3D".into(),
            // truncated everything
            "s%3Ahello".into(),
            "s%3Ahello.".into(),
            // no prefix
            "hello.DGDUkGlIkCzPz%2BC0B064FNgHdEjox7ch8tOBGslZ5QI".into(),
            "S%3Ahello.DGDUkGlIkCzPz%2BC0B064FNgHdEjox7ch8tOBGslZ5QI".into(),
            // empty and near-empty
            String::new(),
            "s:".into(),
            "s%3A".into(),
            "s:.".into(),
            "s%3A.".into(),
            ".".into(),
            "%".into(),
            // empty sid, even when correctly signed
            encode_cookie_value(&empty_signed),
            empty_signed,
            // too long sid, even when correctly signed
            encode_cookie_value(&huge_signed),
            huge_signed,
            // huge garbage
            "s:".to_string() + &"x".repeat(100_000) + ".abc",
            // not UTF-8 once decoded, or malformed escapes: raw is used, no prefix
            "s%3Ahello%FF.DGDUkGlIkCzPz%2BC0B064FNgHdEjox7ch8tOBGslZ5QI".into(),
            "s%3Ahello%C3.DGDUkGlIkCzPz%2BC0B064FNgHdEjox7ch8tOBGslZ5QI".into(),
            "s%3Ahello%zz.DGDUkGlIkCzPz%2BC0B064FNgHdEjox7ch8tOBGslZ5QI".into(),
            "s%3Ahello.DGDUkGlIkCzPz%2BC0B064FNgHdEjox7ch8tOBGslZ5QI%".into(),
            "%ED%A0%80".into(),
            // quoted (quotes are removed by the header parser, not here)
            "\"s%3Ahello.DGDUkGlIkCzPz%2BC0B064FNgHdEjox7ch8tOBGslZ5QI\"".into(),
        ];
        for case in &cases {
            assert!(unsign(case, &s).is_none(), "accepted {case:?}");
        }
    }

    #[test]
    fn unsign_never_panics_on_odd_bytes() {
        let s = secrets(&["k1", "k2"]);
        let alphabet = [
            "s", ":", "%", "3A", ".", "é", "\u{0}", "%FF", "=", "+", "a", "%e9",
        ];
        // Every string of up to 4 pieces from the alphabet.
        let mut inputs = vec![String::new()];
        for _ in 0..4 {
            let mut next = Vec::new();
            for prefix in &inputs {
                for piece in alphabet {
                    next.push(format!("{prefix}{piece}"));
                }
            }
            inputs.extend(next);
        }
        for input in &inputs {
            let _ = unsign(input, &s);
            let _ = parse_cookie_header([input.as_bytes()], "s");
        }
    }

    #[test]
    fn generated_ids_look_like_uid_safe_24() {
        let a = SessionId::generate();
        let b = SessionId::generate();
        assert_eq!(a.as_str().len(), 32);
        assert!(a
            .as_str()
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
        assert_ne!(a, b);
        let c = SessionId::try_generate().expect("OS RNG works here");
        assert_eq!(c.as_str().len(), 32);
        assert_eq!(
            URL_SAFE_NO_PAD.decode(c.as_str()).map(|v| v.len()).ok(),
            Some(24)
        );
    }

    #[test]
    fn debug_hides_secrets_and_ids() {
        let s = secrets(&["super-secret-one", "super-secret-two"]);
        let shown = format!("{s:?}");
        assert_eq!(shown, "Secrets { count: 2 }");
        assert!(!shown.contains("super"));

        let sid = SessionId::parse("abcdefghijklmnop").unwrap();
        let shown = format!("{sid:?}");
        assert!(shown.contains("abcd"), "{shown}");
        assert!(!shown.contains("abcde"), "{shown}");
        assert_eq!(sid.to_string(), "abcdefghijklmnop");
        // Short and multi-byte ids do not panic.
        let _ = format!("{:?}", SessionId::parse("é").unwrap());
        let u = unsign(&sign("abcdefghijklmnop", &s), &s).unwrap();
        assert!(!format!("{u:?}").contains("abcde"));
    }

    #[test]
    fn secrets_limits() {
        assert!(matches!(
            Secrets::new(Vec::<String>::new()),
            Err(CookieError::NoSecrets)
        ));
        assert!(matches!(
            Secrets::new(["a", ""]),
            Err(CookieError::EmptySecret { index: 1 })
        ));
        let many: Vec<String> = (0..17).map(|i| format!("s{i}")).collect();
        let err = Secrets::new(many.clone()).unwrap_err();
        assert!(matches!(
            err,
            CookieError::TooManySecrets { count: 17, max: 16 }
        ));
        assert!(err.to_string().contains("MAX_SECRETS"));
        assert!(Secrets::new(many[..16].to_vec()).is_ok());
        let err = Secrets::parse_list(&many.join(",")).unwrap_err();
        assert!(matches!(err, CookieError::TooManySecrets { count: 17, .. }));
        assert_eq!(Secrets::parse_list("a,b").unwrap().len(), 2);
        assert_eq!(Secrets::parse_list("only").unwrap().len(), 1);
        assert!(matches!(
            Secrets::parse_list(""),
            Err(CookieError::EmptySecret { index: 0 })
        ));
        assert!(matches!(
            Secrets::parse_list("a,"),
            Err(CookieError::EmptySecret { index: 1 })
        ));
        // The error message never contains the secret.
        let err = Secrets::new(["topsecret", ""]).unwrap_err();
        assert!(!err.to_string().contains("topsecret"));
        // parse_list does not trim: " b" is a different secret from "b".
        let spaced = Secrets::parse_list("a, b").unwrap();
        let plain = secrets(&["b"]);
        assert!(unsign(&sign("x", &plain), &spaced).is_none());
    }

    #[test]
    fn session_id_parse_limits() {
        assert!(SessionId::parse("").is_err());
        assert!(SessionId::parse("a".repeat(MAX_SESSION_ID_BYTES)).is_ok());
        assert!(SessionId::parse("a".repeat(MAX_SESSION_ID_BYTES + 1)).is_err());
        assert_eq!(SessionId::parse("abc").unwrap().into_string(), "abc");
    }

    #[test]
    fn header_parsing() {
        let name = "connect.sid";
        fn find<'a>(headers: &[&'a str]) -> CookieLookup<'a> {
            parse_cookie_header(headers.iter().map(|h| h.as_bytes()), "connect.sid")
        }
        assert_eq!(find(&[]), CookieLookup::Missing);
        assert_eq!(find(&[""]), CookieLookup::Missing);
        assert_eq!(find(&["a=b"]), CookieLookup::Missing);
        assert_eq!(find(&["connect.sid"]), CookieLookup::Missing);
        assert_eq!(find(&["connect.sid=v"]), CookieLookup::Found("v"));
        assert_eq!(find(&["connect.sid="]), CookieLookup::Found(""));
        assert_eq!(find(&["a=b;connect.sid=v;c=d"]), CookieLookup::Found("v"));
        assert_eq!(
            find(&["a=b; \t connect.sid \t= \tv \t; c=d"]),
            CookieLookup::Found("v")
        );
        // Only spaces and tabs are trimmed (like the cookie package).
        assert_eq!(
            find(&["connect.sid=\u{a0}v"]),
            CookieLookup::Found("\u{a0}v")
        );
        // Name match is exact.
        assert_eq!(
            find(&["Connect.sid=v; connect.sidx=w"]),
            CookieLookup::Missing
        );
        // A value may contain '='.
        assert_eq!(find(&["connect.sid=a=b"]), CookieLookup::Found("a=b"));
        // Segments without '=' are skipped, as the cookie package's backtracking does.
        assert_eq!(find(&["junk; connect.sid=v"]), CookieLookup::Found("v"));
        // Quotes.
        assert_eq!(find(&["connect.sid=\"v\""]), CookieLookup::Found("v"));
        assert_eq!(find(&["connect.sid= \"v\" "]), CookieLookup::Found("v"));
        assert_eq!(find(&["connect.sid=\"\""]), CookieLookup::Found(""));
        assert_eq!(find(&["connect.sid=\""]), CookieLookup::Found(""));
        assert_eq!(find(&["connect.sid=\"v"]), CookieLookup::Found("\"v"));
        // Duplicates: identical is fine, different is ambiguous.
        assert_eq!(
            find(&["connect.sid=v; connect.sid=v"]),
            CookieLookup::Found("v")
        );
        assert_eq!(
            find(&["connect.sid=v", "connect.sid=\"v\""]),
            CookieLookup::Found("v")
        );
        assert_eq!(
            find(&["connect.sid=v; connect.sid=w"]),
            CookieLookup::Duplicate
        );
        assert_eq!(
            find(&["connect.sid=v", "x=1; connect.sid=w"]),
            CookieLookup::Duplicate
        );
        assert_eq!(
            find(&["connect.sid=v; connect.sid="]),
            CookieLookup::Duplicate
        );
        // Size limit, across headers; exactly the limit is fine.
        let at_limit = format!(
            "connect.sid=v; pad={}",
            "x".repeat(MAX_COOKIE_HEADER_BYTES - 19)
        );
        assert_eq!(at_limit.len(), MAX_COOKIE_HEADER_BYTES);
        assert_eq!(find(&[&at_limit]), CookieLookup::Found("v"));
        assert_eq!(find(&[&at_limit, "z"]), CookieLookup::TooLarge);
        let half = "y".repeat(MAX_COOKIE_HEADER_BYTES / 2 + 1);
        assert_eq!(
            find(&["connect.sid=v", &half, &half]),
            CookieLookup::TooLarge
        );
        assert_eq!(
            find(&["connect.sid=v; connect.sid=w", &half, &half]),
            CookieLookup::TooLarge
        );
        // Not UTF-8.
        let raw: [&[u8]; 1] = [b"connect.sid=\xff\xfe; a=\xff"];
        assert_eq!(parse_cookie_header(raw, name), CookieLookup::NotUtf8);
        let other: [&[u8]; 1] = [b"a=\xff; connect.sid=ok"];
        assert_eq!(parse_cookie_header(other, name), CookieLookup::Found("ok"));
    }

    #[test]
    fn same_site_and_priority_parse() {
        assert_eq!("lax".parse::<SameSite>().unwrap(), SameSite::Lax);
        assert_eq!("STRICT".parse::<SameSite>().unwrap(), SameSite::Strict);
        assert_eq!("None".parse::<SameSite>().unwrap(), SameSite::None);
        let err = "laxx".parse::<SameSite>().unwrap_err();
        assert!(err.to_string().contains("laxx"));
        assert_eq!("High".parse::<Priority>().unwrap(), Priority::High);
        assert!("urgent"
            .parse::<Priority>()
            .unwrap_err()
            .to_string()
            .contains("urgent"));
    }

    #[test]
    fn set_cookie_format_matches_the_cookie_package() {
        let s = secrets(&["tobiiscool"]);
        let sid = SessionId::parse("hello").unwrap();
        let expires = time::macros::datetime!(2026-11-27 19:00:00.789 +01:00);
        let full = SetCookie::for_session("connect.sid", &sid, &s)
            .max_age(60)
            .domain("example.com")
            .path("/")
            .expires(expires)
            .http_only(true)
            .secure(true)
            .partitioned(true)
            .priority(Priority::High)
            .same_site(SameSite::None)
            .to_header_value()
            .unwrap();
        assert_eq!(
            full,
            "connect.sid=s%3Ahello.DGDUkGlIkCzPz%2BC0B064FNgHdEjox7ch8tOBGslZ5QI; Max-Age=60; \
             Domain=example.com; Path=/; Expires=Fri, 27 Nov 2026 18:00:00 GMT; HttpOnly; \
             Secure; Partitioned; Priority=High; SameSite=None"
        );
        // What express-session emits with the interop configuration.
        let express = SetCookie::for_session("connect.sid", &sid, &s)
            .path("/")
            .expires(time::macros::datetime!(2026-01-05 07:08:09 UTC))
            .http_only(true)
            .same_site(SameSite::Lax)
            .to_header_value()
            .unwrap();
        assert_eq!(
            express,
            "connect.sid=s%3Ahello.DGDUkGlIkCzPz%2BC0B064FNgHdEjox7ch8tOBGslZ5QI; Path=/; \
             Expires=Mon, 05 Jan 2026 07:08:09 GMT; HttpOnly; SameSite=Lax"
        );
        assert_eq!(SetCookie::new("a", "").to_header_value().unwrap(), "a=");
        assert_eq!(
            SetCookie::new("a", "x y;z\u{e9}")
                .to_header_value()
                .unwrap(),
            "a=x%20y%3Bz%C3%A9"
        );
    }

    #[test]
    fn removal_cookies() {
        assert_eq!(
            SetCookie::removal("connect.sid").to_header_value().unwrap(),
            "connect.sid=; Path=/; Expires=Thu, 01 Jan 1970 00:00:00 GMT"
        );
        let template = SetCookie::new("connect.sid", "s:abc")
            .max_age(100)
            .domain(".example.com")
            .path("/app")
            .expires(time::macros::datetime!(2030-01-01 0:00 UTC))
            .http_only(true)
            .same_site(SameSite::Lax);
        assert_eq!(
            template.into_removal().to_header_value().unwrap(),
            "connect.sid=; Domain=.example.com; Path=/app; \
             Expires=Thu, 01 Jan 1970 00:00:00 GMT; HttpOnly; SameSite=Lax"
        );
    }

    #[test]
    fn set_cookie_refuses_injection() {
        assert!(matches!(
            SetCookie::new("bad name", "v").to_header_value(),
            Err(CookieError::InvalidName(_))
        ));
        assert!(SetCookie::new("", "v").to_header_value().is_err());
        assert!(SetCookie::new("a;b", "v").to_header_value().is_err());
        for domain in [
            "ex ample.com",
            "a.com; Secure",
            "-a.com",
            "a-.com",
            "a..com",
            "a.com.",
            "é.com",
        ] {
            assert!(
                matches!(
                    SetCookie::new("a", "v").domain(domain).to_header_value(),
                    Err(CookieError::InvalidDomain(_))
                ),
                "{domain}"
            );
        }
        for domain in [
            "localhost",
            ".example.com",
            "a-b.example.co.uk",
            "127.0.0.1",
        ] {
            assert!(
                SetCookie::new("a", "v")
                    .domain(domain)
                    .to_header_value()
                    .is_ok(),
                "{domain}"
            );
        }
        for path in ["/a;b", "/a\r\nSet-Cookie: x=y", "/<script>", "/\u{e9}"] {
            assert!(
                matches!(
                    SetCookie::new("a", "v").path(path).to_header_value(),
                    Err(CookieError::InvalidPath(_))
                ),
                "{path:?}"
            );
        }
        assert!(SetCookie::new("a", "v")
            .path("/a b/c")
            .to_header_value()
            .is_ok());
    }

    #[test]
    fn http_date_edges() {
        assert_eq!(
            http_date(time::macros::datetime!(2026-11-26 23:30:00 -05:00)).unwrap(),
            "Fri, 27 Nov 2026 04:30:00 GMT"
        );
        // Out of range once converted to UTC: an error, not a panic.
        let edge = time::macros::datetime!(9999-12-31 23:59:59 -10:00);
        assert!(matches!(http_date(edge), Err(CookieError::InvalidExpires)));
    }
}
