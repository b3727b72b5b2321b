//! The store's error type, and the questions every caller asks of it: is
//! this worth retrying, and does it mean the database is away (serve from
//! the fallback), busy (answer 503, journal nothing) or misconfigured (say
//! which setting to change)?

use std::sync::Arc;
use std::time::Duration;

/// What went wrong in a store operation.
///
/// [`Error::is_transient`] tells a passing fault (the database is waking,
/// restarting or unreachable) from a permanent one (bad SQL, a constraint, a
/// closed store). Messages never contain passwords or session data.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration was refused.
    #[error(transparent)]
    Config(#[from] ConfigError),

    /// No pooled connection became free within the acquire timeout.
    #[error("no session-pool connection became free within {0:?}")]
    AcquireTimeout(Duration),

    /// Opening a new connection did not finish within the connect timeout.
    #[error("connecting to PostgreSQL did not finish within {0:?}")]
    ConnectTimeout(Duration),

    /// A query did not finish within the query timeout; it was cancelled.
    #[error("{op} query did not finish within {after:?} and was cancelled")]
    QueryTimeout {
        /// The operation that timed out.
        op: &'static str,
        /// The deadline that passed.
        after: Duration,
    },

    /// The driver or the server reported an error. The message spells out
    /// the driver's whole chain of causes (its own `Display` says only "db
    /// error"), so they are not repeated as a `source`.
    #[error("PostgreSQL: {}", describe(.0))]
    Postgres(tokio_postgres::Error),

    /// The store was closed and no longer accepts operations.
    #[error("the session store is closed")]
    StoreClosed,

    /// The circuit breaker is open: the database is considered away and the
    /// operation was not attempted.
    #[error("the session database is unavailable (circuit breaker open)")]
    Unavailable,

    /// The statement that carried this operation together with others
    /// failed; the error of that statement, shared by every request in it
    /// (its kind and SQLSTATE are this error's).
    #[error("{0} (in a batched statement)")]
    Batched(Arc<Error>),

    /// The database is away and the write could not be made durable in the
    /// local journal (it is full, or its disk failed): nothing was
    /// acknowledged.
    #[error("the session database is away and the local journal cannot take the write: {reason}")]
    JournalUnavailable {
        /// Why, for the log (`full at 67108864 bytes`, an I/O error).
        reason: String,
    },

    /// A session document is larger than the configured limit.
    #[error("session of {size} bytes is over the limit of {limit} bytes")]
    TooLarge {
        /// Size of the refused document, in bytes.
        size: usize,
        /// The limit in force.
        limit: usize,
    },
}

/// A refused configuration value. The message names the setting, never a
/// password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A setting had a value that cannot be used.
    #[error("invalid value for `{setting}`: {reason}")]
    Invalid {
        /// The setting, e.g. `pool_size` or `sslmode`.
        setting: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A required setting was not given.
    #[error("`{0}` is required but was not set")]
    Missing(&'static str),
}

impl ConfigError {
    pub(crate) fn invalid(setting: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            setting: setting.into(),
            reason: reason.into(),
        }
    }
}

/// A short, stable label for an [`Error`], used in logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// [`Error::Config`].
    Config,
    /// [`Error::AcquireTimeout`].
    Acquire,
    /// A connection could not be opened (refused, reset, timed out, TLS).
    Connect,
    /// [`Error::QueryTimeout`].
    Timeout,
    /// The connection broke during a query (label `closed`).
    ConnectionClosed,
    /// The server answered with an error (see [`Error::sql_state`]).
    Database,
    /// [`Error::StoreClosed`].
    StoreClosed,
    /// [`Error::Unavailable`].
    Unavailable,
    /// [`Error::TooLarge`].
    TooLarge,
    /// [`Error::JournalUnavailable`].
    Journal,
}

impl ErrorKind {
    /// Every kind's label, as [`ErrorKind::as_str`] gives it (the values of
    /// `pgsession_errors_total{kind}`).
    pub const LABELS: [&'static str; 10] = [
        ErrorKind::Config.as_str(),
        ErrorKind::Acquire.as_str(),
        ErrorKind::Connect.as_str(),
        ErrorKind::Timeout.as_str(),
        ErrorKind::ConnectionClosed.as_str(),
        ErrorKind::Database.as_str(),
        ErrorKind::StoreClosed.as_str(),
        ErrorKind::Unavailable.as_str(),
        ErrorKind::TooLarge.as_str(),
        ErrorKind::Journal.as_str(),
    ];

    /// The label, e.g. `"connect"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Config => "config",
            ErrorKind::Acquire => "acquire",
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::ConnectionClosed => "closed",
            ErrorKind::Database => "database",
            ErrorKind::StoreClosed => "store_closed",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::Journal => "journal",
        }
    }
}

impl Error {
    /// Which kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Config(_) => ErrorKind::Config,
            Error::AcquireTimeout(_) => ErrorKind::Acquire,
            Error::ConnectTimeout(_) => ErrorKind::Connect,
            Error::QueryTimeout { .. } => ErrorKind::Timeout,
            Error::Postgres(e) if e.as_db_error().is_some() => ErrorKind::Database,
            Error::Postgres(e) if e.is_closed() => ErrorKind::ConnectionClosed,
            Error::Postgres(_) => ErrorKind::Connect,
            Error::StoreClosed => ErrorKind::StoreClosed,
            Error::Unavailable => ErrorKind::Unavailable,
            Error::Batched(e) => e.kind(),
            Error::TooLarge { .. } => ErrorKind::TooLarge,
            Error::JournalUnavailable { .. } => ErrorKind::Journal,
        }
    }

    /// The SQLSTATE code the server sent, if any (e.g. `"57P01"`).
    pub fn sql_state(&self) -> Option<&str> {
        match self {
            Error::Postgres(e) => e.code().map(|c| c.code()),
            Error::Batched(e) => e.sql_state(),
            _ => None,
        }
    }

    /// Whether this failure shows the database is away (unreachable, its
    /// link broken, shutting down, failing over, or the breaker open), as
    /// opposed to busy or misconfigured. Only such a failure sends a write
    /// to the journal or a read to the cache; see RELIABILITY.md, "Which
    /// errors journal".
    ///
    /// ```
    /// # use pgsession::Error;
    /// # use std::time::Duration;
    /// assert!(Error::Unavailable.is_outage());
    /// assert!(Error::ConnectTimeout(Duration::from_secs(20)).is_outage());
    /// // A saturated pool is busy, not away: the answer is a 503.
    /// assert!(!Error::AcquireTimeout(Duration::from_secs(1)).is_outage());
    /// ```
    pub fn is_outage(&self) -> bool {
        match self {
            Error::ConnectTimeout(_) | Error::Unavailable => true,
            Error::Batched(e) => e.is_outage(),
            Error::Postgres(e) => match e.code() {
                Some(code) => is_outage_sql_state(code.code()),
                None => tls_config_hint(e).is_none(),
            },
            _ => false,
        }
    }

    /// Whether a write that failed this way may still have committed: its
    /// statement was sent and no answer came (a client-side timeout, a link
    /// that broke mid-statement). A server's error answer means the
    /// statement was rolled back.
    pub(crate) fn is_unanswered(&self) -> bool {
        match self {
            Error::QueryTimeout { .. } => true,
            Error::Batched(e) => e.is_unanswered(),
            Error::Postgres(e) => e.code().is_none() && tls_config_hint(e).is_none(),
            _ => false,
        }
    }

    /// What to change when this failure comes from the configuration
    /// rather than the database's availability: a certificate that fails
    /// verification, a server that refuses TLS, a wrong password or user,
    /// a missing database. `None` for any other failure.
    ///
    /// Such an error is neither retried nor served from the fallback: it
    /// does not heal by waiting, and a journal filling behind it would only
    /// hide it.
    pub fn config_hint(&self) -> Option<String> {
        match self {
            Error::Config(e) => Some(format!("fix the setting: {e}")),
            Error::Batched(e) => e.config_hint(),
            Error::Postgres(e) => match e.code().map(|c| c.code()) {
                Some(code) => login_hint(code),
                None => tls_config_hint(e).map(str::to_owned),
            },
            _ => None,
        }
    }

    /// Whether the same operation may succeed if tried again later.
    ///
    /// Transient: connection refused, reset or closed; timeouts; SQLSTATE
    /// class 08 (connection exception), 57P01-57P03 (shutdown, crash,
    /// cannot connect now), 53300 (too many connections), 25006 (a write
    /// reached a read-only server, as after a failover) and 26000 (a
    /// prepared statement lost behind a transaction pooler).
    ///
    /// ```
    /// # use pgsession::Error;
    /// # use std::time::Duration;
    /// assert!(Error::AcquireTimeout(Duration::from_secs(1)).is_transient());
    /// assert!(!Error::StoreClosed.is_transient());
    /// ```
    pub fn is_transient(&self) -> bool {
        match self {
            Error::AcquireTimeout(_)
            | Error::ConnectTimeout(_)
            | Error::QueryTimeout { .. }
            | Error::Unavailable => true,
            Error::Batched(e) => e.is_transient(),
            Error::Postgres(e) => match e.code() {
                Some(code) => is_transient_sql_state(code.code()),
                // No SQLSTATE: an I/O error, a closed connection or a
                // failed connect: link failures, unless TLS refused the
                // server (a configuration error).
                None => tls_config_hint(e).is_none(),
            },
            Error::Config(_)
            | Error::StoreClosed
            | Error::TooLarge { .. }
            | Error::JournalUnavailable { .. } => false,
        }
    }

    /// Whether the connection that produced this error should be thrown
    /// away rather than returned to the pool.
    pub(crate) fn poisons_connection(&self) -> bool {
        self.is_transient() && !matches!(self, Error::AcquireTimeout(_) | Error::Unavailable)
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(error: tokio_postgres::Error) -> Self {
        Error::Postgres(error)
    }
}

/// A driver error for a message: a server error as severity, SQLSTATE and
/// message only (its DETAIL can quote row values, such as a session id),
/// anything else with its causes.
fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => chain(error),
    }
}

/// `error` and each of its causes, joined by `: `.
pub(crate) fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}

/// SQLSTATE codes that say the database is away: a connection exception
/// (class 08), a shutdown or crash (57P01, 57P02), a server starting up
/// (57P03), a standby that took a write after a failover (25006).
fn is_outage_sql_state(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "25006")
}

/// What to change for a login refused by configuration, by SQLSTATE (the
/// same hints `pgsession doctor` gives).
fn login_hint(code: &str) -> Option<String> {
    Some(match code {
        "28P01" => "password authentication failed: check the password in DATABASE_URL \
                    (percent-encode @ : / # ? in it: @ is %40)"
            .to_owned(),
        "28000" => "the server refuses this user from this address (pg_hba.conf), or requires \
                    TLS: add a pg_hba.conf entry for this client, or try sslmode=require"
            .to_owned(),
        "3D000" => {
            "the database does not exist: check the name at the end of DATABASE_URL".to_owned()
        }
        _ => return None,
    })
}

/// The hint for a TLS failure that configuration causes (the certificate
/// fails verification, or the server does not do TLS while `sslmode`
/// requires it); `None` for any other failure, such as a link reset in the
/// middle of a handshake.
fn tls_config_hint(error: &tokio_postgres::Error) -> Option<&'static str> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return tls_hint(tls);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(tls) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return tls_hint(tls);
            }
        }
        if e.to_string().contains("server does not support TLS") {
            return Some(
                "the server does not accept TLS but sslmode requires it: enable ssl on the \
                 server, or set sslmode=prefer (or disable) in DATABASE_URL",
            );
        }
        cause = e.source();
    }
    None
}

fn tls_hint(error: &rustls::Error) -> Option<&'static str> {
    use rustls::{CertificateError, Error as Tls};
    Some(match error {
        Tls::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "the server's certificate is not signed by a trusted CA: set sslrootcert=/path/to/ca.pem \
             in DATABASE_URL (your provider's CA bundle)"
        }
        Tls::InvalidCertificate(CertificateError::NotValidForName)
        | Tls::InvalidCertificate(CertificateError::NotValidForNameContext { .. }) => {
            "the server's certificate does not name this host: connect with the name it was \
             issued for, or use sslmode=verify-ca to check the chain only"
        }
        Tls::InvalidCertificate(CertificateError::Expired)
        | Tls::InvalidCertificate(CertificateError::ExpiredContext { .. }) => {
            "the server's certificate has expired: renew it on the server"
        }
        Tls::InvalidCertificate(_) | Tls::NoCertificatesPresented => {
            "the server's certificate fails verification: check it and sslrootcert in DATABASE_URL"
        }
        Tls::PeerIncompatible(_) | Tls::InappropriateHandshakeMessage { .. } => {
            "the server's TLS is incompatible: check the server's ssl settings and sslmode"
        }
        _ => return None,
    })
}

/// SQLSTATE codes after which a retry on a fresh connection may succeed.
///
/// 26000 (a prepared statement the server does not know) means a
/// transaction pooler ran the statement on another server connection: the
/// pool then switches to unnamed statements, and the retry works.
pub(crate) fn is_transient_sql_state(code: &str) -> bool {
    code.starts_with("08")
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" | "53300" | "25006" | "26000"
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sql_states_that_are_worth_a_retry() {
        for code in [
            "08000", "08006", "08P01", "57P01", "57P02", "57P03", "53300", "25006",
        ] {
            assert!(is_transient_sql_state(code), "{code}");
        }
        for code in ["23505", "42P01", "42601", "22P02", "57014"] {
            assert!(!is_transient_sql_state(code), "{code}");
        }
    }

    #[test]
    fn kinds_have_stable_labels() {
        assert_eq!(Error::StoreClosed.kind().as_str(), "store_closed");
        assert_eq!(
            Error::QueryTimeout {
                op: "load",
                after: Duration::from_secs(1)
            }
            .kind(),
            ErrorKind::Timeout
        );
    }
}
