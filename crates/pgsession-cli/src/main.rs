//! `pgsession`: the command-line face of the pgsession library.
//!
//! This file is a thin shell: parse the command line ([`args`]), set up
//! logging ([`logging`]), run one command ([`cmd`]) on a Tokio runtime, and
//! turn the outcome into an exit code: 0 on success, 1 on failure, 2 on a
//! usage error (a bad flag, or a bad value for a setting). Errors are printed
//! with their whole chain of causes, as `{:#}` does.

use std::fmt;
use std::process::ExitCode;

mod args;
mod cmd;
mod embedded;
mod logging;

fn main() -> ExitCode {
    let cli = match args::parse_from(std::env::args_os()) {
        Ok(cli) => cli,
        Err(e) => {
            // `--help` and `--version` come here too, with exit code 0.
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    logging::init(cli.log_format);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // Every error of the library says its cause once (in its
            // message or as its source, never both), so anyhow's chain is
            // printed as it is.
            eprintln!("error: {err:#}");
            if is_usage_error(&err) {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Runs the command on a multi-threaded runtime.
fn run(cli: args::Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))?;
    let result = runtime.block_on(cmd::run(cli.command));
    // Do not wait for stray blocking tasks (a signal listener, a stuck DNS
    // lookup) once the command is done.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

/// Whether `err` comes from how the command was called rather than from
/// what happened while it ran.
fn is_usage_error(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.is::<UsageError>()
            || e.is::<pgsession::ConfigError>()
            || e.downcast_ref::<pgsession::Error>()
                .is_some_and(|e| e.kind() == pgsession::ErrorKind::Config)
    })
}

/// A bad flag or setting value found after clap's own checks (exit code 2).
#[derive(Debug)]
pub(crate) struct UsageError(String);

impl UsageError {
    /// An error with this message.
    pub(crate) fn new(message: impl Into<String>) -> UsageError {
        UsageError(message.into())
    }
}

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_librarys_errors_say_their_cause_once() {
        let err = anyhow::Error::new(pgsession::http::SessionError::Store(
            pgsession::Error::Unavailable,
        ))
        .context("cannot serve");
        assert_eq!(
            format!("{err:#}"),
            "cannot serve: session store unavailable: the session database is unavailable \
             (circuit breaker open)"
        );
        let err = anyhow::Error::new(pgsession::Error::from(pgsession::ConfigError::Missing(
            "DATABASE_URL",
        )))
        .context("cannot start");
        let text = format!("{err:#}");
        assert_eq!(text.matches("DATABASE_URL").count(), 1, "{text}");
    }

    #[test]
    fn usage_errors_are_recognised() {
        let err = anyhow::Error::new(UsageError::new("bad")).context("while starting");
        assert!(is_usage_error(&err));
        let err = anyhow::Error::new(pgsession::ConfigError::Missing("DATABASE_URL"));
        assert!(is_usage_error(&err));
        assert!(!is_usage_error(&anyhow::anyhow!("the database is away")));
    }
}
