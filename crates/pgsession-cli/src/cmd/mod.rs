//! The subcommands, each an `async fn` taking its parsed arguments, so that
//! they can be called (and tested) without a process; plus what they share:
//! building the store and waiting for it with the start-up retries.

use std::time::Duration;

use anyhow::Context as _;
use pgsession::{ConfigBuilder, Store};

use crate::args::{Command, StoreArgs};
use crate::UsageError;

pub(crate) mod doctor;
pub(crate) mod journal;
pub(crate) mod migrate;
pub(crate) mod prune;
pub(crate) mod serve;

/// Runs one command to completion. `serve` stops on SIGTERM or SIGINT.
pub(crate) async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => serve::run(args, serve::Shutdown::on_signals()?).await,
        Command::Migrate(args) => migrate::run(args).await,
        Command::Prune(args) => prune::run(args).await,
        Command::Doctor(args) => doctor::run(args).await,
        Command::Journal(args) => journal::run(args).await,
    }
}

/// A store for a one-shot command (`migrate`, `prune`), its configuration
/// adjusted by `adjust`: DATABASE_URL is required.
pub(crate) fn store_for_command(
    args: &StoreArgs,
    adjust: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
) -> anyhow::Result<Store> {
    if args.database_url().is_none() {
        return Err(
            UsageError::new("no database given: set DATABASE_URL or pass --database-url").into(),
        );
    }
    // One-shot commands keep no fallback: they journal nothing, and must
    // not adopt the journal files of a server that died in this directory.
    let config = adjust(args.builder()?.fallback(false)).build()?;
    Store::new(config).context("cannot create the session store")
}

/// Waits until the store is ready (the table exists), trying again on
/// transient errors with the start-up retries and backoff of the
/// configuration (1 s, 2 s, 4 s by default). Fails with the last error.
pub(crate) async fn wait_ready(store: &Store) -> anyhow::Result<()> {
    let config = store.config();
    let retries = config.startup_retries();
    let mut delay = config.startup_backoff();
    let mut attempt = 0;
    loop {
        match store.ready().await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_transient() && attempt < retries => {
                attempt += 1;
                tracing::warn!(
                    target: "session_store",
                    attempt, of = retries + 1, error = %e, retry_in = ?delay,
                    "database not reachable yet; retrying"
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(60));
            }
            Err(e) => {
                let attempts = attempt + 1;
                let target = config.target();
                let context = if e.is_transient() {
                    format!(
                        "cannot reach the session database at {target} ({attempts} attempt{})",
                        if attempts == 1 { "" } else { "s" }
                    )
                } else {
                    format!("cannot prepare the session table on {target}")
                };
                return Err(e).context(context);
            }
        }
    }
}

/// `"schema"."table"`, as the store names its table.
pub(crate) fn table_name(config: &pgsession::Config) -> String {
    format!("{}.{}", config.schema().quoted(), config.table().quoted())
}
