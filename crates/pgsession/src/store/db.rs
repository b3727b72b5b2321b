//! One operation on the database: a connection, the query, retries on
//! transient errors within the deadline, and the breaker told of each
//! failure event (see [`Store::count_failure`]). Also the creation of the
//! table.

use std::time::{Duration, Instant};

use time::{OffsetDateTime, PrimitiveDateTime};

use super::batch::Submitted;
use super::{to_timestamp, Inner, Store, StoredSession};
use crate::error::{Error, ErrorKind};
use crate::pool::{Checkout, Params, Progress, Stage};
use crate::resilience::retry::{self, bounded};
use tokio_postgres::types::{ToSql, Type};

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
        if self.inner.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Error::StoreClosed);
        }
        let breaker = &self.inner.breaker;
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
                self.inner.pool.mark_pooled();
            }
            contact.failed(error);
            self.count_failure(error, progress.take());
        };
        let result = retry::retry_within(op, deadline, &on_error, || async {
            if !bypass_breaker && !breaker.is_closed() {
                return Err(Error::Unavailable);
            }
            self.ensure_schema_tracked(&progress).await?;
            self.attempt(op, &query, &progress).await
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
        if !self.inner.breaker.is_closed() {
            return; // the recovery probes instead
        }
        let Some(slot) = self
            .inner
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
                () = store.inner.shutdown.cancelled() => return,
                probed = store.inner.pool.probe_fresh(bound, &progress) => probed,
            };
            match probed {
                Ok(()) => {
                    store.inner.breaker.record_success();
                    store.inner.config_problem.clear();
                }
                Err(e) => {
                    tracing::debug!(target: "session_store", error = %e, "probe after a timeout failed");
                    store.count_failure(&e, progress.stage());
                }
            }
        });
    }

    /// One attempt: a connection and the query on it.
    ///
    /// A query that fails on a reused connection because that connection
    /// is dead (its backend terminated, the link closed while idle) is run
    /// again at once on another: each dead one is thrown away, so once the
    /// pool has no more, the next is opened for it. One dead connection
    /// says nothing of the database, and a backoff would only slow the
    /// caller; a failure on a fresh connection goes to the retry's backoff.
    async fn attempt<T, F, Fut>(
        &self,
        op: &'static str,
        query: &F,
        progress: &Progress,
    ) -> Result<T, Error>
    where
        F: Fn(Checkout) -> Fut,
        Fut: std::future::Future<Output = (Checkout, Result<T, Error>)>,
    {
        let mut dead = 0;
        loop {
            let conn = self.inner.pool.checkout_tracked(progress).await?;
            let fresh = conn.is_fresh();
            let (conn, result) = query(conn).await;
            conn.finish(&result);
            match result {
                Err(e) if self.dead_reused(op, &e, fresh, &mut dead) => {}
                other => return other,
            }
        }
    }

    /// Whether `error`, met on a connection (`fresh` or reused), shows only
    /// that a reused connection was dead: then the caller tries another at
    /// once, up to one per connection the pool may hold.
    fn dead_reused(&self, op: &'static str, error: &Error, fresh: bool, dead: &mut usize) -> bool {
        if fresh || !error.is_outage() || *dead > self.inner.config.pool_max_size() {
            return false;
        }
        *dead += 1;
        metrics::counter!(crate::metrics::RETRIES, "op" => op).increment(1);
        tracing::debug!(
            target: "session_store",
            op,
            error = %error,
            "a pooled connection was dead; trying again at once on another"
        );
        true
    }

    /// How long a batched request may wait for a batch slot: as long as
    /// it would wait for a pool connection.
    fn slot_deadline(&self) -> tokio::time::Instant {
        tokio::time::Instant::now() + self.inner.config.acquire_timeout()
    }

    fn deadline(&self) -> Duration {
        self.inner.config.query_timeout()
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
    ) -> Vec<Option<Result<Option<StoredSession>, Error>>> {
        if let [sid] = sids.as_slice() {
            return vec![Some(self.db_load_with(sid, deadline, false).await)];
        }
        let sql = &self.inner.sql.load_many;
        let rows = self
            .run_db("load", deadline, false, |conn| {
                let sids = &sids;
                async move {
                    let result =
                        async { Ok(conn.query(sql, &[(sids, Type::TEXT_ARRAY)]).await?) }.await;
                    (conn, result)
                }
            })
            .await;
        match rows {
            Ok(rows) => {
                // Each found session with the number of requests for it, so
                // that only a session asked for twice is copied.
                let mut found: std::collections::HashMap<String, (StoredSession, usize)> = rows
                    .into_iter()
                    .filter_map(|row| {
                        let session = self.stored(row.get(1), row.get(2))?;
                        Some((row.get(0), (session, 0)))
                    })
                    .collect();
                for sid in &sids {
                    if let Some((_, wanted)) = found.get_mut(sid) {
                        *wanted += 1;
                    }
                }
                sids.iter()
                    .map(|sid| {
                        let Some((_, wanted)) = found.get_mut(sid) else {
                            return Some(Ok(None));
                        };
                        *wanted -= 1;
                        let session = if *wanted == 0 {
                            found.remove(sid).map(|(session, _)| session)
                        } else {
                            found.get(sid).map(|(session, _)| session.clone())
                        };
                        Some(Ok(session))
                    })
                    .collect()
            }
            Err(e) => self.batch_failed(sids.len(), e),
        }
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
            self.breaker_moved(self.inner.breaker.record_failure(Instant::now()));
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
    fn batch_failed<T>(&self, requests: usize, error: Error) -> Vec<Option<Result<T, Error>>> {
        // A configuration error is no request's own: it is shared too.
        if !error.is_transient() && error.config_hint().is_none() {
            return (0..requests).map(|_| None).collect();
        }
        let shared = std::sync::Arc::new(error);
        (0..requests)
            .map(|_| Some(Err(Error::Batched(shared.clone()))))
            .collect()
    }

    async fn db_load_with(
        &self,
        sid: &str,
        deadline: Duration,
        bypass: bool,
    ) -> Result<Option<StoredSession>, Error> {
        let row = self
            .run_db("load", deadline, bypass, |conn| async move {
                let result = async {
                    Ok(conn
                        .query_opt(&self.inner.sql.load, &[(&sid, Type::VARCHAR)])
                        .await?)
                }
                .await;
                (conn, result)
            })
            .await?;
        Ok(row.and_then(|row| self.stored(row.get(0), row.get(1))))
    }

    /// A stored row as a session. A NULL document (only in a table another
    /// program altered) or one over `max_session_bytes` (this store never
    /// saves one) is not parsed: no session, with a warning.
    fn stored(&self, json: Option<String>, expire: PrimitiveDateTime) -> Option<StoredSession> {
        let limit = self.inner.config.max_session_bytes();
        match json {
            Some(json) if json.len() > limit => {
                tracing::warn!(
                    target: "session_store",
                    bytes = json.len(),
                    limit,
                    "stored session is over max_session_bytes; treated as no session"
                );
                None
            }
            Some(json) => Some(StoredSession {
                json,
                expire: expire.assume_utc(),
            }),
            None => {
                tracing::warn!(target: "session_store", "stored session has a NULL document; treated as no session");
                None
            }
        }
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
    /// multi-row upsert of `unnest`ed arrays, the last write of each
    /// session winning (a row may be upserted once per statement).
    async fn save_batch(
        &self,
        batch: Vec<(String, String, OffsetDateTime)>,
        deadline: Duration,
    ) -> Vec<Option<Result<(), Error>>> {
        if let [(sid, json, expire)] = batch.as_slice() {
            return vec![Some(
                self.db_save_with(sid, json, *expire, deadline, false).await,
            )];
        }
        // In sid order, so that concurrent batches lock their rows in the
        // same order and cannot deadlock one another; of several writes of
        // one session, the last (sorted first among its equals) is kept.
        let mut keep: Vec<usize> = (0..batch.len()).collect();
        keep.sort_unstable_by(|&a, &b| batch[a].0.cmp(&batch[b].0).then(b.cmp(&a)));
        keep.dedup_by(|later, kept| batch[*later].0 == batch[*kept].0);
        let sids: Vec<&str> = keep.iter().map(|&i| batch[i].0.as_str()).collect();
        let jsons: Vec<&str> = keep.iter().map(|&i| batch[i].1.as_str()).collect();
        let expires: Vec<PrimitiveDateTime> =
            keep.iter().map(|&i| to_timestamp(batch[i].2)).collect();
        let sql = &self.inner.sql.save_many;
        let saved = self
            .run_db("save", deadline, false, |conn| {
                let params: [(&(dyn ToSql + Sync), Type); 3] = [
                    (&sids, Type::TEXT_ARRAY),
                    (&jsons, Type::TEXT_ARRAY),
                    (&expires, Type::TIMESTAMP_ARRAY),
                ];
                async move {
                    let result = async { Ok(conn.execute(sql, &params).await.map(drop)?) }.await;
                    (conn, result)
                }
            })
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
        let expire = to_timestamp(expire);
        self.run_db("save", deadline, bypass, |conn| async move {
            let params: &Params = &[
                (&sid, Type::VARCHAR),
                (&json, Type::TEXT),
                (&expire, Type::TIMESTAMP),
            ];
            let result =
                async { Ok(conn.execute(&self.inner.sql.save, params).await.map(drop)?) }.await;
            (conn, result)
        })
        .await
    }

    pub(super) async fn db_touch(&self, sid: &str, expire: OffsetDateTime) -> Result<bool, Error> {
        self.db_touch_with(sid, expire, self.deadline(), false)
            .await
    }

    pub(super) async fn db_touch_with(
        &self,
        sid: &str,
        expire: OffsetDateTime,
        deadline: Duration,
        bypass: bool,
    ) -> Result<bool, Error> {
        let expire = to_timestamp(expire);
        self.run_db("touch", deadline, bypass, |conn| async move {
            let params: &Params = &[(&sid, Type::VARCHAR), (&expire, Type::TIMESTAMP)];
            let result = async { Ok(conn.execute(&self.inner.sql.touch, params).await? > 0) }.await;
            (conn, result)
        })
        .await
    }

    pub(super) async fn db_destroy(&self, sid: &str) -> Result<(), Error> {
        self.db_destroy_with(sid, self.deadline(), false).await
    }

    pub(super) async fn db_destroy_with(
        &self,
        sid: &str,
        deadline: Duration,
        bypass: bool,
    ) -> Result<(), Error> {
        self.run_db("destroy", deadline, bypass, |conn| async move {
            let result = async {
                Ok(conn
                    .execute(&self.inner.sql.destroy, &[(&sid, Type::VARCHAR)])
                    .await
                    .map(drop)?)
            }
            .await;
            (conn, result)
        })
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
        let mut dead = 0;
        loop {
            let checkout = self.inner.pool.checkout_tracked(progress);
            let conn = bounded("health", deadline, checkout).await?;
            let fresh = conn.is_fresh();
            let result = bounded("health", deadline, async {
                conn.client().simple_query("SELECT 1").await?;
                Ok(())
            })
            .await;
            conn.finish(&result);
            match result {
                Err(e) if self.dead_reused("health", &e, fresh, &mut dead) => {}
                other => return other,
            }
        }
    }

    /// Creates the table unless it is known to exist. A configuration
    /// error (a refused login, a missing table with `create_table` off) is
    /// recorded for `/health`.
    pub(super) async fn ensure_schema(&self) -> Result<(), Error> {
        let result = self.ensure_schema_tracked(&Progress::default()).await;
        if let Err(e) = &result {
            self.config_problem(e);
        }
        result
    }

    /// [`Store::ensure_schema`] as part of an operation's attempt, whose
    /// failure the operation judges.
    async fn ensure_schema_tracked(&self, progress: &Progress) -> Result<(), Error> {
        self.inner
            .schema_ready
            .get_or_try_init(|| async {
                let deadline =
                    self.inner.config.connect_budget() + self.inner.config.query_timeout();
                let conn = self.inner.pool.checkout_tracked(progress).await?;
                let result = bounded("schema", deadline, create_schema(&conn, &self.inner)).await;
                if result.is_err() {
                    // It may have failed inside the transaction.
                    conn.discard();
                } else {
                    conn.finish(&result);
                    tracing::info!(
                        target: "session_store",
                        table = %self.inner.sql.lock_name,
                        "session table ready"
                    );
                }
                result
            })
            .await
            .map(|_| ())
    }
}

/// Creates the schema, table and index when missing, under an advisory
/// transaction lock so that instances starting together do not collide.
async fn create_schema(conn: &Checkout, inner: &Inner) -> Result<(), Error> {
    let sql = &inner.sql;
    let qualified = (&sql.qualified as &(dyn ToSql + Sync), Type::TEXT);
    let table: bool = conn
        .query_one(&sql.table_exists, std::slice::from_ref(&qualified))
        .await?
        .get(0);
    let index: bool = conn
        .query_one(&sql.expire_index_exists, std::slice::from_ref(&qualified))
        .await?
        .get(0);
    if table && index {
        return Ok(());
    }
    if !inner.config.create_table() {
        return Err(Error::Config(crate::ConfigError::invalid(
            "create_table",
            format!(
                "table {} (or its index on expire) is missing and create_table is off",
                sql.lock_name
            ),
        )));
    }
    let key = format!("pgsession:schema:{}", sql.lock_name);
    let client = conn.client();
    // A transaction-scoped lock: released at commit or when the link drops,
    // and valid behind a transaction pooler too.
    client.batch_execute("BEGIN").await?;
    conn.execute(&sql.creation_lock, &[(&key, Type::TEXT)])
        .await?;
    if inner.config.schema().as_str() != "public" {
        let present: bool = conn
            .query_one(
                &sql.schema_exists,
                &[(&inner.config.schema().as_str(), Type::TEXT)],
            )
            .await?
            .get(0);
        if !present {
            client.batch_execute(&sql.create_schema).await?;
        }
    }
    client.batch_execute(&sql.create_table).await?;
    let index: bool = conn
        .query_one(&sql.expire_index_exists, &[qualified])
        .await?
        .get(0);
    if !index {
        client.batch_execute(&sql.create_index).await?;
    }
    client.batch_execute("COMMIT").await?;
    Ok(())
}
