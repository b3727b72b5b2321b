//! The store's error type, and the one question every caller asks of it:
//! is this worth retrying?

use std::time::Duration;

use crate::config::ConfigError;

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
    Closed,

    /// The circuit breaker is open: the database is considered away and the
    /// operation was not attempted.
    #[error("the session database is unavailable (circuit breaker open)")]
    Unavailable,

    /// The statement that carried this operation together with others
    /// failed transiently; its message.
    #[error("{0} (in a batched statement)")]
    Batched(String),

    /// A session document is larger than the configured limit.
    #[error("session of {size} bytes is over the limit of {limit} bytes")]
    TooLarge {
        /// Size of the refused document, in bytes.
        size: usize,
        /// The limit in force.
        limit: usize,
    },
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
    /// The connection broke during a query.
    Closed,
    /// The server answered with an error (see [`Error::sql_state`]).
    Database,
    /// [`Error::Closed`].
    StoreClosed,
    /// [`Error::Unavailable`].
    Unavailable,
    /// [`Error::TooLarge`].
    TooLarge,
}

impl ErrorKind {
    /// The label, e.g. `"connect"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Config => "config",
            ErrorKind::Acquire => "acquire",
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Closed => "closed",
            ErrorKind::Database => "database",
            ErrorKind::StoreClosed => "store_closed",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::TooLarge => "too_large",
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
            Error::Postgres(e) if e.is_closed() => ErrorKind::Closed,
            Error::Postgres(_) => ErrorKind::Connect,
            Error::Closed => ErrorKind::StoreClosed,
            Error::Unavailable => ErrorKind::Unavailable,
            Error::Batched(_) => ErrorKind::Connect,
            Error::TooLarge { .. } => ErrorKind::TooLarge,
        }
    }

    /// The SQLSTATE code the server sent, if any (e.g. `"57P01"`).
    pub fn sql_state(&self) -> Option<&str> {
        match self {
            Error::Postgres(e) => e.code().map(|c| c.code()),
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
    /// assert!(!Error::Closed.is_transient());
    /// ```
    pub fn is_transient(&self) -> bool {
        match self {
            Error::AcquireTimeout(_)
            | Error::ConnectTimeout(_)
            | Error::QueryTimeout { .. }
            | Error::Batched(_)
            | Error::Unavailable => true,
            Error::Postgres(e) => match e.code() {
                Some(code) => is_transient_sql_state(code.code()),
                // No SQLSTATE: an I/O error, a closed connection or a
                // failed connect. All of these are link failures.
                None => true,
            },
            Error::Config(_) | Error::Closed | Error::TooLarge { .. } => false,
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

impl From<deadpool_postgres::PoolError> for Error {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        use deadpool_postgres::{PoolError, TimeoutType};
        match error {
            PoolError::Backend(e) => Error::Postgres(e),
            // The durations are filled in by the pool, which knows them.
            PoolError::Timeout(TimeoutType::Wait) => Error::AcquireTimeout(Duration::ZERO),
            PoolError::Timeout(_) => Error::ConnectTimeout(Duration::ZERO),
            PoolError::Closed => Error::Closed,
            PoolError::NoRuntimeSpecified | PoolError::PostCreateHook(_) => Error::Closed,
        }
    }
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
        assert_eq!(Error::Closed.kind().as_str(), "store_closed");
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
