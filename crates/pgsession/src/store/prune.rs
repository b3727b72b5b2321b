//! Pruning: expired rows deleted in batches, by one instance at a time, on
//! a randomized schedule.

use super::db::bounded;
use super::Store;
use crate::error::Error;

/// What one prune did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PruneOutcome {
    /// This instance held the prune lock and deleted `deleted` rows in
    /// `batches` statements.
    Pruned {
        /// Rows deleted.
        deleted: u64,
        /// DELETE statements sent.
        batches: u64,
    },
    /// Another instance was pruning; nothing was done.
    Skipped,
}

impl Store {
    /// Deletes expired sessions in batches, unless another instance is
    /// pruning (then [`PruneOutcome::Skipped`]).
    pub async fn prune(&self) -> Result<PruneOutcome, Error> {
        self.prune_with_progress(|_| {}).await
    }

    /// [`Store::prune`], calling `progress` with the rows deleted so far
    /// after each batch.
    pub async fn prune_with_progress(
        &self,
        mut progress: impl FnMut(u64) + Send,
    ) -> Result<PruneOutcome, Error> {
        self.ensure_schema().await?;
        let deadline = self.inner.config.query_timeout();
        let batch = self.inner.config.prune_batch_size() as i64;
        let sql = &self.inner.sql;
        let key = format!("pgsession:prune:{}", sql.lock_name);

        let conn = self.inner.pool.checkout().await?;
        let result = async {
            let client = conn.client();
            let locked: bool = bounded("prune", deadline, async {
                Ok(client
                    .query_one("SELECT pg_try_advisory_lock(hashtext($1))", &[&key])
                    .await?)
            })
            .await?
            .get(0);
            if !locked {
                return Ok(PruneOutcome::Skipped);
            }
            let deleting = async {
                let stmt = client.prepare_cached(&sql.prune_batch).await?;
                let (mut deleted, mut batches) = (0, 0);
                loop {
                    let n = bounded("prune", deadline, async {
                        Ok(client.execute(&stmt, &[&batch]).await?)
                    })
                    .await?;
                    deleted += n;
                    batches += 1;
                    progress(deleted);
                    if n < batch as u64 || self.inner.shutdown.is_cancelled() {
                        return Ok::<_, Error>(PruneOutcome::Pruned { deleted, batches });
                    }
                }
            }
            .await;
            // Unlock even after a failed batch; if this fails too, the
            // connection is dropped and the server releases the lock.
            bounded("prune", deadline, async {
                Ok(client
                    .execute("SELECT pg_advisory_unlock(hashtext($1))", &[&key])
                    .await?)
            })
            .await?;
            deleting
        }
        .await;
        match &result {
            Ok(_) => conn.finish(&result),
            // The lock may still be held: let the server release it.
            Err(_) => conn.discard(),
        }
        if let Ok(PruneOutcome::Pruned { deleted, batches }) = result {
            tracing::info!(target: "session_store", deleted, batches, "pruned expired sessions");
        }
        result
    }

    /// Starts the pruner: every prune interval, randomized between 50 and
    /// 150 %, one prune. Errors are logged and the pruner goes on. It stops
    /// with [`Store::close`].
    pub fn spawn_pruner(&self) {
        self.spawn(|store| async move {
            loop {
                let mean = store.inner.config.prune_interval();
                let delay = mean.mul_f64(rand::random_range(0.5..1.5));
                tokio::select! {
                    () = store.inner.shutdown.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
                if let Err(e) = store.prune().await {
                    tracing::warn!(target: "session_store", error = %e, "prune failed; will try again next time");
                }
            }
        });
    }
}
