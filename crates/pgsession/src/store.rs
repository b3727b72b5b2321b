//! The store engine: the session operations on PostgreSQL, the start-up
//! sequence that creates the table without ever caching a failure, and the
//! pruner of expired rows.

use std::sync::Arc;
use std::time::Duration;

use time::{OffsetDateTime, PrimitiveDateTime, UtcOffset};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::Error;
use crate::pool::{Checkout, PoolStatus, SessionPool};
use crate::resilience::retry;
use crate::schema::Statements;

/// A session as stored: its document (the `sess` column, JSON text) and
/// when it expires.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredSession {
    /// The `sess` column, as text.
    pub json: String,
    /// The `expire` column, in UTC.
    pub expire: OffsetDateTime,
}

impl std::fmt::Debug for StoredSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Session documents hold user data: show their size only.
        f.debug_struct("StoredSession")
            .field("json_bytes", &self.json.len())
            .field("expire", &self.expire)
            .finish()
    }
}

/// What the server says about a pool connection: the settings in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    /// `SELECT version()`.
    pub version: String,
    /// `SHOW TimeZone` (should be `UTC`).
    pub time_zone: String,
    /// `SHOW statement_timeout`, e.g. `30s` (`0` behind a pooler that
    /// refused the startup option).
    pub statement_timeout: String,
    /// Whether the server is a read-only standby.
    pub in_recovery: bool,
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

/// The session store on PostgreSQL. Cheap to clone; clones share one pool.
///
/// Created with [`Store::new`], it starts at once, whether or not the
/// database answers: the table is created in the background (retried with
/// backoff) or, failing that, by the first operation that reaches the
/// database.
///
/// ```no_run
/// # async fn example() -> Result<(), pgsession::Error> {
/// use time::{Duration, OffsetDateTime};
/// let config = pgsession::Config::builder().url("postgres://localhost/app").build()?;
/// let store = pgsession::Store::new(config)?;
/// let expire = OffsetDateTime::now_utc() + Duration::hours(1);
/// store.save("some-session-id", r#"{"cookie":{},"user":"alice"}"#, expire).await?;
/// let stored = store.load("some-session-id").await?.expect("just saved");
/// assert!(stored.json.contains("alice"));
/// store.close().await;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: Config,
    pool: SessionPool,
    sql: Statements,
    /// Set once the table is known to exist. Failures are never stored.
    schema_ready: OnceCell<()>,
    shutdown: CancellationToken,
    tasks: tokio_util::task::TaskTracker,
}

impl Store {
    /// Builds the store and starts its background work (table creation,
    /// pool upkeep). Fails only on a configuration it cannot use (such as an
    /// unreadable `sslrootcert`), never because the database is away.
    ///
    /// Must be called inside a Tokio runtime.
    pub fn new(config: Config) -> Result<Store, Error> {
        let pool = SessionPool::new(&config)?;
        let sql = Statements::new(config.schema(), config.table());
        let store = Store {
            inner: Arc::new(Inner {
                config,
                pool,
                sql,
                schema_ready: OnceCell::new(),
                shutdown: CancellationToken::new(),
                tasks: tokio_util::task::TaskTracker::new(),
            }),
        };
        store.spawn(Self::initialize_in_background);
        store.spawn(Self::upkeep);
        Ok(store)
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Whether the table is known to exist, i.e. start-up is complete.
    pub fn is_ready(&self) -> bool {
        self.inner.schema_ready.initialized()
    }

    /// Waits until the store is ready, making one attempt itself if none is
    /// under way. Fails with the error of that attempt.
    pub async fn ready(&self) -> Result<(), Error> {
        self.ensure_schema().await
    }

    /// The pool's figures now.
    pub fn pool_status(&self) -> PoolStatus {
        self.inner.pool.status()
    }

    /// Whether connections carry the server-side statement timeout (false
    /// when the server refused startup options, as poolers do).
    pub fn server_statement_timeout(&self) -> bool {
        self.inner.pool.uses_startup_options()
    }

    /// Asks the server, through the pool, for its version and the settings
    /// of the connection (for `doctor` and for tests).
    pub async fn server_info(&self) -> Result<ServerInfo, Error> {
        self.run("info", |conn| async move {
            let result = async {
                let row = conn
                    .client()
                    .query_one(
                        "SELECT version(), current_setting('TimeZone'), \
                         current_setting('statement_timeout'), pg_is_in_recovery()",
                        &[],
                    )
                    .await?;
                Ok(ServerInfo {
                    version: row.get(0),
                    time_zone: row.get(1),
                    statement_timeout: row.get(2),
                    in_recovery: row.get(3),
                })
            }
            .await;
            (conn, result)
        })
        .await
    }

    /// Loads an unexpired session.
    pub async fn load(&self, sid: &str) -> Result<Option<StoredSession>, Error> {
        let rows = self
            .run("load", |conn| async move {
                let result = async {
                    let client = conn.client();
                    let stmt = client.prepare_cached(&self.inner.sql.load).await?;
                    Ok(client.query_opt(&stmt, &[&sid]).await?)
                }
                .await;
                (conn, result)
            })
            .await?;
        Ok(rows.map(|row| StoredSession {
            json: row.get(0),
            expire: row.get::<_, PrimitiveDateTime>(1).assume_utc(),
        }))
    }

    /// Inserts or replaces a session (an upsert).
    pub async fn save(&self, sid: &str, json: &str, expire: OffsetDateTime) -> Result<(), Error> {
        let limit = self.inner.config.max_session_bytes();
        if json.len() > limit {
            return Err(Error::TooLarge {
                size: json.len(),
                limit,
            });
        }
        let expire = to_timestamp(expire);
        self.run("save", |conn| async move {
            let result = async {
                let client = conn.client();
                let stmt = client.prepare_cached(&self.inner.sql.save).await?;
                client.execute(&stmt, &[&sid, &json, &expire]).await?;
                Ok(())
            }
            .await;
            (conn, result)
        })
        .await
    }

    /// Moves a session's expiry, leaving its document alone. Returns whether
    /// the session existed.
    pub async fn touch(&self, sid: &str, expire: OffsetDateTime) -> Result<bool, Error> {
        let expire = to_timestamp(expire);
        self.run("touch", |conn| async move {
            let result = async {
                let client = conn.client();
                let stmt = client.prepare_cached(&self.inner.sql.touch).await?;
                Ok(client.execute(&stmt, &[&sid, &expire]).await? > 0)
            }
            .await;
            (conn, result)
        })
        .await
    }

    /// Deletes a session. Deleting a missing session is not an error.
    pub async fn destroy(&self, sid: &str) -> Result<(), Error> {
        self.run("destroy", |conn| async move {
            let result = async {
                let client = conn.client();
                let stmt = client.prepare_cached(&self.inner.sql.destroy).await?;
                client.execute(&stmt, &[&sid]).await?;
                Ok(())
            }
            .await;
            (conn, result)
        })
        .await
    }

    /// Counts unexpired sessions.
    pub async fn count(&self) -> Result<u64, Error> {
        self.count_with(&self.inner.sql.count).await
    }

    /// Counts expired sessions still in the table (what a prune would delete).
    pub async fn count_expired(&self) -> Result<u64, Error> {
        self.count_with(&self.inner.sql.count_expired).await
    }

    async fn count_with(&self, sql: &str) -> Result<u64, Error> {
        self.run("count", |conn| async move {
            let result = async {
                let client = conn.client();
                let stmt = client.prepare_cached(sql).await?;
                let n: i64 = client.query_one(&stmt, &[]).await?.get(0);
                Ok(n.max(0) as u64)
            }
            .await;
            (conn, result)
        })
        .await
    }

    /// Deletes every session. Returns how many rows were deleted.
    pub async fn clear(&self) -> Result<u64, Error> {
        self.run("clear", |conn| async move {
            let result = async {
                let client = conn.client();
                Ok(client.execute(self.inner.sql.clear.as_str(), &[]).await?)
            }
            .await;
            (conn, result)
        })
        .await
    }

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

    /// Stops background tasks and closes the pool. Operations after this
    /// fail with [`Error::Closed`].
    pub async fn close(&self) {
        self.inner.shutdown.cancel();
        self.inner.tasks.close();
        self.inner.pool.close();
        self.inner.tasks.wait().await;
    }

    /// Runs one operation: table check, a connection, the query, all
    /// retried on transient errors within the query timeout.
    ///
    /// `query` gets the checkout and hands it back with its result, so that
    /// a connection the query broke is not returned to the pool.
    async fn run<T, F, Fut>(&self, op: &'static str, query: F) -> Result<T, Error>
    where
        F: Fn(Checkout) -> Fut,
        Fut: std::future::Future<Output = (Checkout, Result<T, Error>)>,
    {
        if self.inner.shutdown.is_cancelled() {
            return Err(Error::Closed);
        }
        let started = std::time::Instant::now();
        let result = retry::retry_within(op, self.inner.config.query_timeout(), || async {
            self.ensure_schema().await?;
            let conn = self.inner.pool.checkout().await?;
            let (conn, result) = query(conn).await;
            conn.finish(&result);
            result
        })
        .await;
        record(op, started, &result);
        result
    }

    async fn ensure_schema(&self) -> Result<(), Error> {
        self.inner
            .schema_ready
            .get_or_try_init(|| async {
                let deadline =
                    self.inner.config.connect_timeout() + self.inner.config.query_timeout();
                let conn = self.inner.pool.checkout().await?;
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

    /// The start-up sequence: a first attempt, the start-up retries, then
    /// slower attempts until the table exists or the store closes.
    async fn initialize_in_background(self) {
        let config = &self.inner.config;
        let delays = retry::startup_backoff(config.startup_backoff(), config.startup_retries())
            .chain(retry::background_backoff(config.startup_backoff() * 8));
        let total = config.startup_retries() + 1;
        let mut attempt = 0;
        for delay in std::iter::once(Duration::ZERO).chain(delays) {
            tokio::select! {
                () = self.inner.shutdown.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
            attempt += 1;
            match self.ensure_schema().await {
                Ok(()) => return,
                Err(e) if attempt < total => tracing::warn!(
                    target: "session_store",
                    attempt, of = total, error = %e,
                    "database not reachable yet; retrying"
                ),
                Err(e) if attempt == total => tracing::warn!(
                    target: "session_store",
                    error = %e,
                    "database still not reachable after {total} attempts; the store runs degraded \
                     and keeps retrying in the background"
                ),
                Err(e) => {
                    tracing::debug!(target: "session_store", attempt, error = %e, "still not reachable")
                }
            }
        }
    }

    /// Pool upkeep: idle connections closed, the warm minimum kept open.
    async fn upkeep(self) {
        let period = (self.inner.config.idle_timeout() / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(5));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.inner.shutdown.cancelled() => return,
                _ = tick.tick() => self.inner.pool.maintain(),
            }
        }
    }

    fn spawn<F, Fut>(&self, task: F)
    where
        F: FnOnce(Store) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        // Tasks hold a weak-free clone: they end when `shutdown` fires.
        self.inner.tasks.spawn(task(self.clone()));
    }
}

/// Creates the schema, table and index when missing, under an advisory
/// transaction lock so that instances starting together do not collide.
async fn create_schema(conn: &Checkout, inner: &Inner) -> Result<(), Error> {
    let sql = &inner.sql;
    let client = conn.client();
    let table: bool = client
        .query_one(sql.table_exists.as_str(), &[&sql.qualified])
        .await?
        .get(0);
    let index: bool = client
        .query_one(sql.expire_index_exists.as_str(), &[&sql.qualified])
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
    // A transaction-scoped lock: released at commit or when the link drops,
    // and valid behind a transaction pooler too.
    client.batch_execute("BEGIN").await?;
    let txn = client;
    txn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&key])
        .await?;
    if inner.config.schema().as_str() != "public" {
        let present: bool = txn
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
                &[&inner.config.schema().as_str()],
            )
            .await?
            .get(0);
        if !present {
            txn.batch_execute(&sql.create_schema).await?;
        }
    }
    txn.batch_execute(&sql.create_table).await?;
    let index: bool = txn
        .query_one(sql.expire_index_exists.as_str(), &[&sql.qualified])
        .await?
        .get(0);
    if !index {
        txn.batch_execute(&sql.create_index).await?;
    }
    txn.batch_execute("COMMIT").await?;
    Ok(())
}

/// Bounds one step by `deadline`.
async fn bounded<T>(
    op: &'static str,
    deadline: Duration,
    step: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::time::timeout(deadline, step)
        .await
        .unwrap_or(Err(Error::QueryTimeout {
            op,
            after: deadline,
        }))
}

/// Counts and times an operation for the metrics.
fn record<T>(op: &'static str, started: std::time::Instant, result: &Result<T, Error>) {
    metrics::histogram!("pgsession_query_seconds", "op" => op).record(started.elapsed());
    let outcome = if result.is_ok() { "ok" } else { "error" };
    metrics::counter!("pgsession_operations_total", "op" => op, "outcome" => outcome).increment(1);
    if let Err(e) = result {
        metrics::counter!("pgsession_errors_total", "kind" => e.kind().as_str()).increment(1);
    }
}

/// `expire` is a `timestamp` holding UTC.
fn to_timestamp(at: OffsetDateTime) -> PrimitiveDateTime {
    let utc = at.to_offset(UtcOffset::UTC);
    PrimitiveDateTime::new(utc.date(), utc.time())
}
