//! `pgsession migrate`: creates the session table and its index on
//! `expire` when they are missing (under the store's advisory lock, so it is
//! safe while servers run), waiting for the database with the start-up
//! retries. Fails with exit code 1 when the database cannot be reached.

use crate::args::MigrateArgs;
use crate::cmd::{store_for_command, table_name, wait_ready};

/// Runs the command.
pub(crate) async fn run(args: MigrateArgs) -> anyhow::Result<()> {
    // Creating the table is the point, whatever PGSESSION_CREATE_TABLE says.
    let store = store_for_command(&args.store, |b| b.create_table(true))?;
    let result = migrate(&store).await;
    store.close().await;
    result
}

async fn migrate(store: &pgsession::Store) -> anyhow::Result<()> {
    let table = table_name(store.config());
    println!("database: {}", store.config().target());
    wait_ready(store).await?;
    println!("table {table} and its index on expire are in place (created if they were missing)");
    let info = store.server_info().await?;
    let version = info
        .version
        .split(" on ")
        .next()
        .unwrap_or(&info.version)
        .to_owned();
    let active = store.count().await?;
    let expired = store.count_expired().await?;
    println!("server: {version}");
    println!("sessions: {active} active, {expired} expired");
    Ok(())
}
