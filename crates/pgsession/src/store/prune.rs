//! Pruning: expired rows deleted in batches, by one instance at a time, on
//! a randomized schedule.

use tokio_postgres::types::Type;

use super::{record_op, Outcome, Store};
use crate::error::Error;
use crate::pool::{Checkout, Params};
use crate::resilience::retry::bounded;
use crate::schema::{PRUNE_TRY_LOCK, PRUNE_TRY_XACT_LOCK, PRUNE_UNLOCK};

/// Rows deleted and statements sent so far by one prune.
#[derive(Debug, Default)]
struct Tally {
    deleted: u64,
    batches: u64,
}

impl Tally {
    fn outcome(&self) -> PruneOutcome {
        PruneOutcome::Pruned {
            deleted: self.deleted,
            batches: self.batches,
        }
    }
}

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
        progress: impl FnMut(u64) + Send,
    ) -> Result<PruneOutcome, Error> {
        let started = std::time::Instant::now();
        let result = async {
            self.ensure_schema().await?;
            let conn = self.inner.db.pool.checkout().await?;
            let result = if conn.is_pooled() {
                self.prune_in_transactions(&conn, progress).await
            } else {
                self.prune_under_session_lock(&conn, progress).await
            };
            match &result {
                Ok(_) => conn.finish(&result),
                // A lock or a transaction may still be open: let the server
                // release it with the connection.
                Err(_) => conn.discard(),
            }
            result
        }
        .await;
        let outcome = if result.is_ok() {
            Outcome::Ok
        } else {
            Outcome::Error
        };
        record_op("prune", started, &result, outcome);
        if let Ok(PruneOutcome::Pruned { deleted, batches }) = result {
            tracing::info!(target: "session_store", deleted, batches, "pruned expired sessions");
        }
        result
    }

    /// Direct connection: a session advisory lock held over all batches.
    async fn prune_under_session_lock(
        &self,
        conn: &Checkout,
        mut progress: impl FnMut(u64) + Send,
    ) -> Result<PruneOutcome, Error> {
        let deadline = self.inner.config.query_timeout();
        let key = self.prune_lock_key();
        let lock: &Params = &[(&key, Type::TEXT)];
        if !self.try_lock(conn, PRUNE_TRY_LOCK, lock).await? {
            return Ok(PruneOutcome::Skipped);
        }
        let mut tally = Tally::default();
        let deleting = loop {
            match self.prune_batch(conn).await {
                Ok(n) if self.counted(&mut tally, n, &mut progress) => break Ok(tally.outcome()),
                Ok(_) => {}
                Err(e) => break Err(e),
            }
        };
        // Unlock even after a failed batch; if this fails too, the
        // connection is dropped and the server releases the lock.
        bounded("prune", deadline, async {
            Ok(conn.execute(PRUNE_UNLOCK, lock).await?)
        })
        .await?;
        deleting
    }

    /// Behind a transaction pooler, where session locks do not hold: each
    /// batch is a transaction that takes a transaction-scoped lock first.
    async fn prune_in_transactions(
        &self,
        conn: &Checkout,
        mut progress: impl FnMut(u64) + Send,
    ) -> Result<PruneOutcome, Error> {
        let key = self.prune_lock_key();
        let lock: &Params = &[(&key, Type::TEXT)];
        let client = conn.client();
        let mut tally = Tally::default();
        loop {
            client.batch_execute("BEGIN").await?;
            if !self.try_lock(conn, PRUNE_TRY_XACT_LOCK, lock).await? {
                client.batch_execute("ROLLBACK").await?;
                // Another instance took over (or held it from the start).
                return Ok(if tally.batches == 0 {
                    PruneOutcome::Skipped
                } else {
                    tally.outcome()
                });
            }
            let n = self.prune_batch(conn).await?;
            client.batch_execute("COMMIT").await?;
            if self.counted(&mut tally, n, &mut progress) {
                return Ok(tally.outcome());
            }
        }
    }

    /// `pg_try_advisory_lock` or `pg_try_advisory_xact_lock` on `lock`.
    async fn try_lock(&self, conn: &Checkout, sql: &str, lock: &Params<'_>) -> Result<bool, Error> {
        let deadline = self.inner.config.query_timeout();
        Ok(bounded("prune", deadline, async {
            Ok(conn.query_one(sql, lock).await?)
        })
        .await?
        .get(0))
    }

    /// Counts a batch of `n` rows and reports progress; true when it was
    /// the last (a short batch, or the store closing).
    fn counted(&self, tally: &mut Tally, n: u64, progress: &mut impl FnMut(u64)) -> bool {
        tally.deleted += n;
        tally.batches += 1;
        progress(tally.deleted);
        n < self.batch_size() as u64 || self.inner.life.shutdown.is_cancelled()
    }

    async fn prune_batch(&self, conn: &Checkout) -> Result<u64, Error> {
        let batch = self.batch_size() as i64;
        let sql = &self.inner.db.sql.prune_batch;
        bounded("prune", self.inner.config.query_timeout(), async {
            Ok(conn.execute(sql, &[(&batch, Type::INT8)]).await?)
        })
        .await
    }

    fn batch_size(&self) -> usize {
        self.inner.config.prune_batch_size()
    }

    fn prune_lock_key(&self) -> String {
        format!("pgsession:prune:{}", self.inner.db.sql.lock_name)
    }

    /// The pruner, started by [`Store::new`] unless `prune` is off: every
    /// prune interval, randomized between 50 and 150 %, one prune. Errors
    /// are logged and the pruner goes on. It stops with [`Store::close`].
    pub(super) fn spawn_pruner(&self) {
        self.spawn(|store| async move {
            loop {
                let mean = store.inner.config.prune_interval();
                let delay = mean.mul_f64(rand::random_range(0.5..1.5));
                tokio::select! {
                    () = store.inner.life.shutdown.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
                if let Err(e) = store.prune().await {
                    tracing::warn!(target: "session_store", error = %e, "prune failed; will try again next time");
                }
            }
        });
    }
}
