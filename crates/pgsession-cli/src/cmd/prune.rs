//! `pgsession prune`: deletes expired sessions now, in batches, under the
//! same lock as the servers' pruners (so that only one instance prunes at a
//! time), with a progress bar on a terminal when there are many rows.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use pgsession::PruneOutcome;

use crate::args::PruneArgs;
use crate::cmd::{store_for_command, table_name, wait_ready};

/// Above this many expired rows, a progress bar is drawn (on a terminal).
pub(crate) const PROGRESS_THRESHOLD: u64 = 10_000;

/// Runs the command.
pub(crate) async fn run(args: PruneArgs) -> anyhow::Result<()> {
    let store = store_for_command(&args.store, |b| b)?;
    let result = prune(&store).await;
    store.close().await;
    result
}

async fn prune(store: &pgsession::Store) -> anyhow::Result<()> {
    wait_ready(store).await?;
    let table = table_name(store.config());
    let expired = store.count_expired().await?;
    println!("{expired} expired sessions in {table}");
    let bar = (expired > PROGRESS_THRESHOLD).then(|| progress_bar(expired));
    let outcome = match &bar {
        Some(bar) => {
            let progress = bar.clone();
            store
                .prune_with_progress(move |deleted| progress.set_position(deleted))
                .await
        }
        None => store.prune().await,
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    match outcome? {
        PruneOutcome::Pruned { deleted, batches } => {
            println!(
                "deleted {deleted} expired session{} in {batches} batch{}",
                plural(deleted, "s"),
                plural(batches, "es")
            );
        }
        PruneOutcome::Skipped => {
            println!("another instance is pruning {table} right now; nothing was deleted");
        }
    }
    Ok(())
}

fn progress_bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {pos}/{len} deleted ({per_sec}, {eta} left)")
    {
        bar.set_style(style);
    }
    bar
}

fn plural(n: u64, suffix: &'static str) -> &'static str {
    if n == 1 {
        ""
    } else {
        suffix
    }
}
