//! Owns [`TestkitError`], the testkit's single error type, and its [`Result`] alias.

use std::{io, path::PathBuf};

/// Result type of every fallible testkit call.
pub type Result<T, E = TestkitError> = std::result::Result<T, E>;

/// Everything that can go wrong while preparing a test database or proxy.
#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    /// The PostgreSQL server binaries could not be located.
    #[error(
        "PostgreSQL binaries not found: looked for initdb and pg_ctl on PATH and in \
         `pg_config --bindir`; install postgresql or set DATABASE_URL"
    )]
    BinariesNotFound,
    /// The `pgbouncer` binary could not be located.
    #[error(
        "pgbouncer not found: looked on PATH and in /usr/sbin, /usr/local/sbin, /usr/local/bin \
         and /usr/bin; install it (Debian: apt-get install pgbouncer)"
    )]
    PgBouncerNotFound,
    /// PgBouncer did not come up; its log says why.
    #[error("PgBouncer did not start on 127.0.0.1:{port}: {reason}\nlog:\n{log}")]
    PgBouncerStart {
        /// The port it was meant to listen on.
        port: u16,
        /// What went wrong (it exited, or did not accept connections in time).
        reason: String,
        /// What it logged during this start attempt.
        log: String,
    },
    /// A file system or socket operation failed.
    #[error("{action}: {source}")]
    Io {
        /// What the testkit was doing.
        action: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// An external command (initdb, pg_ctl, pg_basebackup, cp, chown) failed.
    #[error("`{command}` failed ({status}): {output}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// Its stdout and stderr.
        output: String,
    },
    /// The server did not come up; the server log says why.
    #[error("PostgreSQL did not start on 127.0.0.1:{port} (data dir {data_dir}): {output}\nserver log:\n{log}")]
    Start {
        /// The port the server was meant to listen on.
        port: u16,
        /// The cluster's data directory.
        data_dir: PathBuf,
        /// What `pg_ctl start` printed.
        output: String,
        /// The server log written during this start attempt.
        log: String,
    },
    /// A standby did not stream from its primary, or did not catch up, in time.
    #[error("replication: {0}")]
    Replication(String),
    /// A connection to PostgreSQL or a statement failed.
    #[error("{action}: {source}")]
    Postgres {
        /// What the testkit was doing.
        action: String,
        /// The underlying error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A database URL could not be rewritten to point at a test database.
    #[error("invalid database URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// Why it was rejected.
        reason: &'static str,
    },
}

impl TestkitError {
    pub(crate) fn io(action: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        let action = action.into();
        move |source| Self::Io { action, source }
    }

    pub(crate) fn pg(action: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> Self {
        let action = action.into();
        move |source| Self::Postgres { action, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binaries_say_what_to_do() {
        let message = TestkitError::BinariesNotFound.to_string();
        for needle in ["initdb", "PATH", "pg_config --bindir", "DATABASE_URL"] {
            assert!(message.contains(needle), "{message:?} lacks {needle:?}");
        }
    }
}
