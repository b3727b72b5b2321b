//! Log output: `tracing` events to stderr, filtered by `RUST_LOG` (default
//! `info`), as text or as one JSON object per line (`--log-format`).
//!
//! The library logs under the targets `session_store` and `session_pool`, so
//! `RUST_LOG=session_pool=debug` shows the health checks and pool figures.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::args::LogFormat;

/// At debug level tokio-postgres logs every query's parameters: session
/// ids and documents. Unless `RUST_LOG` names the driver itself, it stays at
/// info.
fn quiet_driver(filter: EnvFilter, spec: &str) -> EnvFilter {
    if spec.contains("tokio_postgres") {
        return filter;
    }
    filter.add_directive("tokio_postgres=info".parse().expect("a valid directive"))
}

/// Installs the global subscriber. Called once, before any command runs.
pub(crate) fn init(format: LogFormat) {
    let (filter, bad_filter) = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => match EnvFilter::try_new(&spec) {
            Ok(filter) => (quiet_driver(filter, &spec), None),
            Err(e) => (EnvFilter::new("info"), Some(e.to_string())),
        },
        _ => (EnvFilter::new("info"), None),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().with_current_span(false).try_init(),
    };
    if installed.is_ok() {
        if let Some(error) = bad_filter {
            tracing::warn!(%error, "RUST_LOG is not a valid filter; logging at info");
        }
    }
}
