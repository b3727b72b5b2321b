//! One operation on the database, guarded: refused at once while the
//! breaker is open, retried on transient errors within its deadline, each
//! failure event judged for the breaker (see [`Store::count_failure`]),
//! each answer or failure taken as health evidence, and configuration
//! errors recorded for `/health`. Concurrent loads and saves go through
//! the batchers first; the statements themselves are `database.rs`'s.

use std::time::{Duration, Instant};

use time::OffsetDateTime;

use super::batch::Submitted;
use super::database::{BatchAnswer, SaveRequest};
use super::Store;
use crate::error::{Error, ErrorKind};
use crate::pool::{Checkout, Progress, Stage};
use crate::record::StoredSession;
use crate::resilience::retry::{self, bounded};

/// The query of an operation, for [`Store::run_db`]: `$call` (a
/// `Database` method given `&Checkout`) runs on the checkout, which comes
/// back with the result. A macro because a closure returning a future that
/// borrows its argument cannot be written as a plain function here.
macro_rules! on_conn {
    (|$conn:ident| $call:expr) => {
        |$conn: $crate::pool::Checkout| async move {
            let result = {
                let $conn = &$conn;
                $call.await
            };
            ($conn, result)
        }
    };
}
pub(super) use on_conn;

impl Store {
    /// Runs one query on a pooled connection, retried on transient errors
    /// within `deadline`. Unless `bypass_breaker` (the recovery's own
    /// probe and write-back), an open breaker stops it at once with
    /// [`Error::Unavailable`].
    ///
    /// `query` gets the checkout and hands it back with its result, so that
    /// a connection the query broke is not returned to the pool.
    pub(super) async fn run_db<T, F, Fut>(
        &self,
        op: &'static str,
        deadline: Duration,
        bypass_breaker: bool,
        query: F,
    ) -> Result<T, Error>
    where
        F: Fn(Checkout) -> Fut,
        Fut: std::future::Future<Output = (Checkout, Result<T, Error>)>,
    {
        if self.is_closed() {
            return Err(Error::StoreClosed);
        }
        let breaker = &self.inner.recovery.breaker;
        // How far the attempt under way got: it decides whether its failure
        // (or the deadline, which may drop it midway) counts.
        let progress = Progress::default();
        // Health evidence: every answer, and every failure that shows the
        // database away (see `health::Contact`).
        let contact = self
            .inner
            .events
            .operation(op, self.inner.config.slow_check_threshold());
        let on_error = |error: &Error| {
            if error.sql_state() == Some("26000") {
                self.inner.db.pool.mark_pooled();
            }
            contact.failed(error);
            self.count_failure(error, progress.take());
        };
        let result = retry::retry_within(op, deadline, &on_error, || async {
            if !bypass_breaker && !breaker.is_closed() {
                return Err(Error::Unavailable);
            }
            self.inner
                .db
                .ensure_schema(&progress, self.schema_deadline())
                .await?;
            self.inner.db.attempt(op, &query, &progress).await
        })
        .await;
        match &result {
            Ok(_) => {
                contact.ok();
                breaker.record_success();
                self.inner.config_problem.clear();
            }
            // The deadline passed without an answer: as much a failure as a
            // refused connection when it met the opening of one (a
            // blackholed link fails no other way).
            Err(e @ Error::QueryTimeout { .. }) => {
                let reused = progress.stage() == Stage::Reused;
                on_error(e);
                if reused {
                    self.probe_after_timeout();
                }
            }
            Err(_) => {}
        }
        result
    }

    /// A statement timed out on a reused connection: not counted, since a
    /// busy database (a lock, a slow plan) looks the same from there. A
    /// `SELECT 1` on a connection opened for the purpose tells the two
    /// apart at once: in a blackhole the connect hangs as well, and counts;
    /// a busy database answers it, and the breaker hears of a success.
    /// Without it the breaker would learn of a blackhole only once the
    /// connections that sat idle in the pool had each timed out in turn.
    /// At most as many probes run at once as failures open the breaker.
    pub(super) fn probe_after_timeout(&self) {
        let config = &self.inner.config;
        if !self.inner.recovery.breaker.is_closed() {
            return; // the recovery probes instead
        }
        let Some(slot) = self
            .inner
            .db
            .pool
            .probe_slot(config.breaker_threshold() as usize)
        else {
            return;
        };
        let bound = config.connect_budget().min(config.query_timeout());
        self.spawn(move |store| async move {
            let _slot = slot;
            let progress = Progress::default();
            let probed = tokio::select! {
                () = store.inner.life.shutdown.cancelled() => return,
                probed = store.inner.db.pool.probe_fresh(bound, &progress) => probed,
            };
            match probed {
                Ok(()) => {
                    store.inner.recovery.breaker.record_success();
                    store.inner.config_problem.clear();
                }
                Err(e) => {
                    tracing::debug!(target: "session_store", error = %e, "probe after a timeout failed");
                    store.count_failure(&e, progress.stage());
                }
            }
        });
    }

    /// Judges a failed attempt that got as far as `stage`.
    ///
    /// The breaker counts failure events that show the database away: an
    /// outage ([`Error::is_outage`]) or a client-side timeout, met while
    /// opening a connection or on a connection opened for the attempt.
    /// One statement counts once, however many requests shared it. A
    /// statement failing on a reused connection is not counted: that
    /// connection may merely have died while idle, and the attempt is run
    /// again at once on another. A saturated pool (acquire timeout), a
    /// server out of connection slots (53300, which the pool absorbs) and a
    /// configuration error never count: none heals by serving from the
    /// fallback. A configuration error is recorded for `/health` and logged
    /// once instead.
    pub(super) fn count_failure(&self, error: &Error, stage: Stage) {
        if self.config_problem(error) {
            return;
        }
        let away = match error.kind() {
            ErrorKind::Timeout => true,
            ErrorKind::Unavailable => false,
            _ => error.is_outage(),
        };
        if away && stage.opening() {
            self.breaker_moved(self.inner.recovery.breaker.record_failure(Instant::now()));
        }
    }

    /// Records `error` if it is a configuration error (see
    /// [`Error::config_hint`]), with an event when it is a new one.
    pub(super) fn config_problem(&self, error: &Error) -> bool {
        if error.config_hint().is_none() {
            return false;
        }
        if let Some(text) = self.inner.config_problem.report(error) {
            self.inner.events.push("config_error", text);
        }
        true
    }

    /// The answers of a failed batch of `requests`. A transient failure is
    /// every request's (retrying each alone would wait out the deadline
    /// again); `run_db` told the breaker of it once: one statement failed,
    /// however many requests shared it. So is a configuration error. Any
    /// other permanent one may be one request's fault, so each runs alone
    /// to find whose (`None`).
    fn batch_failed<T>(&self, requests: usize, error: Error) -> Vec<BatchAnswer<T>> {
        // A configuration error is no request's own: it is shared too.
        if !error.is_transient() && error.config_hint().is_none() {
            return (0..requests).map(|_| None).collect();
        }
        let shared = std::sync::Arc::new(error);
        (0..requests)
            .map(|_| Some(Err(Error::Batched(shared.clone()))))
            .collect()
    }

    /// How long a batched request may wait for a batch slot: as long as
    /// it would wait for a pool connection.
    fn slot_deadline(&self) -> tokio::time::Instant {
        tokio::time::Instant::now() + self.inner.config.acquire_timeout()
    }

    pub(super) fn deadline(&self) -> Duration {
        self.inner.config.query_timeout()
    }

    /// How long the table's creation may take.
    fn schema_deadline(&self) -> Duration {
        self.inner.config.connect_budget() + self.inner.config.query_timeout()
    }

    /// What is left of the query timeout for a batch whose oldest request
    /// was queued at `oldest`: a request waits no longer for being batched.
    fn batch_deadline(&self, oldest: tokio::time::Instant) -> Duration {
        self.deadline().saturating_sub(oldest.elapsed())
    }

    /// A load, combined with concurrent ones when they queue.
    pub(super) async fn db_load(&self, sid: &str) -> Result<Option<StoredSession>, Error> {
        let batched = self
            .inner
            .db
            .loads
            .submit(sid.to_owned(), self.slot_deadline(), |sids, oldest| {
                self.load_batch(sids, self.batch_deadline(oldest))
            })
            .await;
        match batched {
            Submitted::Done(Some(result)) => result,
            Submitted::TimedOut => Err(Error::AcquireTimeout(self.inner.config.acquire_timeout())),
            // Rare: boxed so that its future does not make every load's larger.
            _ => Box::pin(self.db_load_with(sid, self.deadline(), false)).await,
        }
    }

    /// One batch of loads: alone, the plain statement; together, one
    /// `sid = ANY($1)`. `None` for a request that must run alone.
    async fn load_batch(
        &self,
        sids: Vec<String>,
        deadline: Duration,
    ) -> Vec<BatchAnswer<Option<StoredSession>>> {
        if let [sid] = sids.as_slice() {
            return vec![Some(self.db_load_with(sid, deadline, false).await)];
        }
        let db = &self.inner.db;
        let sids = &sids;
        let found = self
            .run_db(
                "load",
                deadline,
                false,
                on_conn!(|conn| db.load_many(conn, sids)),
            )
            .await;
        match found {
            Ok(found) => found.into_iter().map(|s| Some(Ok(s))).collect(),
            Err(e) => self.batch_failed(sids.len(), e),
        }
    }

    pub(super) async fn db_load_with(
        &self,
        sid: &str,
        deadline: Duration,
        bypass: bool,
    ) -> Result<Option<StoredSession>, Error> {
        let db = &self.inner.db;
        self.run_db(
            "load",
            deadline,
            bypass,
            on_conn!(|conn| db.load(conn, sid)),
        )
        .await
    }

    /// A save, combined with concurrent ones when they queue.
    pub(super) async fn db_save(
        &self,
        sid: &str,
        json: &str,
        expire: OffsetDateTime,
    ) -> Result<(), Error> {
        let request = (sid.to_owned(), json.to_owned(), expire);
        let batched = self
            .inner
            .db
            .saves
            .submit(request, self.slot_deadline(), |batch, oldest| {
                self.save_batch(batch, self.batch_deadline(oldest))
            })
            .await;
        match batched {
            Submitted::Done(Some(result)) => result,
            Submitted::TimedOut => Err(Error::AcquireTimeout(self.inner.config.acquire_timeout())),
            // Rare: boxed so that its future does not make every save's larger.
            _ => Box::pin(self.db_save_with(sid, json, expire, self.deadline(), false)).await,
        }
    }

    /// One batch of saves: alone, the plain upsert; together, one
    /// multi-row upsert.
    async fn save_batch(
        &self,
        batch: Vec<SaveRequest>,
        deadline: Duration,
    ) -> Vec<BatchAnswer<()>> {
        if let [(sid, json, expire)] = batch.as_slice() {
            return vec![Some(
                self.db_save_with(sid, json, *expire, deadline, false).await,
            )];
        }
        let db = &self.inner.db;
        let requests = &batch;
        let saved = self
            .run_db(
                "save",
                deadline,
                false,
                on_conn!(|conn| db.save_many(conn, requests)),
            )
            .await;
        match saved {
            Ok(()) => batch.iter().map(|_| Some(Ok(()))).collect(),
            Err(e) => self.batch_failed(batch.len(), e),
        }
    }

    pub(super) async fn db_save_with(
        &self,
        sid: &str,
        json: &str,
        expire: OffsetDateTime,
        deadline: Duration,
        bypass: bool,
    ) -> Result<(), Error> {
        let db = &self.inner.db;
        self.run_db(
            "save",
            deadline,
            bypass,
            on_conn!(|conn| db.save(conn, sid, json, expire)),
        )
        .await
    }

    pub(super) async fn db_touch_with(
        &self,
        sid: &str,
        expire: OffsetDateTime,
        deadline: Duration,
        bypass: bool,
    ) -> Result<bool, Error> {
        let db = &self.inner.db;
        self.run_db(
            "touch",
            deadline,
            bypass,
            on_conn!(|conn| db.touch(conn, sid, expire)),
        )
        .await
    }

    pub(super) async fn db_destroy_with(
        &self,
        sid: &str,
        deadline: Duration,
        bypass: bool,
    ) -> Result<(), Error> {
        let db = &self.inner.db;
        self.run_db(
            "destroy",
            deadline,
            bypass,
            on_conn!(|conn| db.destroy(conn, sid)),
        )
        .await
    }

    /// A `SELECT 1` through the pool, bypassing the breaker: the health
    /// check and the breaker's probe.
    pub(super) async fn ping(&self, deadline: Duration) -> Result<(), Error> {
        self.ping_tracked(deadline, &Progress::default()).await
    }

    /// [`Store::ping`], with its progress for [`Store::count_failure`]: a
    /// dead reused connection is replaced at once, as in an operation, so
    /// that a health check fails (and counts, once) only when the database
    /// does not answer.
    pub(super) async fn ping_tracked(
        &self,
        deadline: Duration,
        progress: &Progress,
    ) -> Result<(), Error> {
        let db = &self.inner.db;
        let mut dead = 0;
        loop {
            let conn = bounded("health", deadline, db.pool.checkout_tracked(progress)).await?;
            let fresh = conn.is_fresh();
            let result = bounded("health", deadline, db.ping(&conn)).await;
            conn.finish(&result);
            match result {
                Err(e) if db.dead_reused("health", &e, fresh, &mut dead) => {}
                other => return other,
            }
        }
    }

    /// Creates the table unless it is known to exist. A configuration
    /// error (a refused login, a missing table with `create_table` off) is
    /// recorded for `/health`.
    pub(super) async fn ensure_schema(&self) -> Result<(), Error> {
        let result = self
            .inner
            .db
            .ensure_schema(&Progress::default(), self.schema_deadline())
            .await;
        if let Err(e) = &result {
            self.config_problem(e);
        }
        result
    }
}
