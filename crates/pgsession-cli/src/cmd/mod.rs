//! The subcommands, each an `async fn` taking its parsed arguments, so that
//! they can be called (and tested) without a process; plus what they share:
//! building the store and waiting for it with the start-up retries.

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
    // One-shot commands keep no fallback and run no background pruner:
    // they journal nothing, and must
    // not adopt the journal files of a server that died in this directory.
    let config = adjust(args.builder()?.fallback(false).prune(false)).build()?;
    Store::new(config).context("cannot create the session store")
}

/// Waits for the store's start-up sequence ([`Store::wait_ready`]: the
/// start-up retries with their backoff); fails with the last error, saying
/// what could not be done.
pub(crate) async fn wait_ready(store: &Store) -> anyhow::Result<()> {
    store.wait_ready().await.map_err(|e| {
        let target = store.config().target();
        let context = if e.is_transient() {
            format!(
                "cannot reach the session database at {target} ({} attempts)",
                store.config().startup_retries() + 1
            )
        } else {
            format!("cannot prepare the session table on {target}")
        };
        anyhow::Error::new(e).context(context)
    })
}

/// `"schema"."table"`, as the store names its table.
pub(crate) fn table_name(config: &pgsession::Config) -> String {
    pgsession::schema::qualified(config.schema(), config.table())
}
