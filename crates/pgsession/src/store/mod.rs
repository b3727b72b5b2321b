//! The store engine: the session operations, each going to PostgreSQL when
//! it can and to the fallback when it cannot. [`Store`] is two parts and
//! the routing between them:
//!
//! - [`database`]: the database part, what is said to PostgreSQL and on
//!   which connection (pool, statements, table creation, batchers);
//! - [`recovery`]: the recovery part, what is done while the database is
//!   away (breaker, fallback and journal, adoption of dead stores'
//!   journals), and the task that probes and closes the breaker;
//!
//! and, around them:
//!
//! - [`guard`]: one operation on the database, guarded (breaker, retries
//!   within the deadline, health evidence, configuration errors);
//! - [`batch`]: concurrent loads and saves combined into one statement;
//! - [`writeback`]: the journal written back, each write conditional on
//!   the row it was based on; conflicts set aside as dead letters;
//! - [`upkeep`]: start-up, pool upkeep, health checks;
//! - [`insert`]: a new session only if its id is free (tower-sessions'
//!   `create`);
//! - [`prune`]: deleting expired rows.
//!
//! The rule of every write: its `Ok` means committed in PostgreSQL, or
//! fsynced in the on-disk journal (`resilience::journal`). A write goes to
//! the journal only while the database is away (breaker open, or a failure
//! [`Error::is_outage`] says so); busy (a saturated pool, a slow statement,
//! the server's connection limit) it fails with a transient error, a 503.

mod batch;
mod database;
mod guard;
mod insert;
mod prune;
mod recovery;
mod upkeep;
mod writeback;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

pub use prune::PruneOutcome;

use crate::config::Config;
use crate::error::Error;
use crate::health::{Event, Events, HealthStatus, StoreHealth};
use crate::pool::PoolStatus;
use crate::record::StoredSession;
use crate::resilience::breaker::BreakerState;
use crate::resilience::fallback::{Journaled, Lookup};
use crate::resilience::journal::Pending;
use database::Database;
use guard::on_conn;
use recovery::{refusal, Recovery};

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
    /// The server process of the connection that answered.
    pub backend_pid: i32,
}

/// The session store on PostgreSQL. Cheap to clone; clones share one pool.
///
/// Created with [`Store::new`], it starts at once, whether or not the
/// database answers: the table is created in the background (retried with
/// backoff) or, failing that, by the first operation that reaches the
/// database. When the database goes away, the circuit breaker opens and
/// operations use the fallback: recently used sessions are read from a
/// cache, and writes are fsynced to a journal on local disk before they
/// are acknowledged. When the database returns, the journal is written
/// back, each write only if the row is still what it was based on; a store
/// started later on the same journal directory writes back what a process
/// that died left there.
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
    /// What is said to PostgreSQL, and on which connection.
    db: Database,
    /// What is done while the database is away.
    recovery: Recovery,
    /// The health timeline: breaker moves, checks, write-backs, conflicts.
    events: Events,
    /// A configuration error the database reported, until an operation
    /// succeeds again (for `/health`, and to log it once).
    config_problem: crate::health::ConfigProblem,
    life: Lifecycle,
}

/// The store's own life: start-up, background tasks, close.
#[derive(Debug)]
struct Lifecycle {
    /// The start-up sequence's outcome, for [`Store::wait_ready`].
    startup: tokio::sync::watch::Sender<Startup>,
    /// Stops the background tasks.
    shutdown: CancellationToken,
    /// Set at the end of [`Store::close`]: operations are refused.
    closed: AtomicBool,
    tasks: tokio_util::task::TaskTracker,
}

/// Where the start-up sequence is, for [`Store::wait_ready`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Startup {
    /// Attempts and start-up retries under way.
    Starting,
    /// The table exists.
    Ready,
    /// The start-up retries are spent, or met an error waiting does not
    /// mend; attempts go on in the background.
    Degraded,
}

/// How an operation ended, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    Fallback,
    Error,
}

impl Store {
    /// Builds the store and starts its background work (table creation,
    /// pool upkeep, health checks, recovery). Opens the journal directory
    /// and adopts the journal files of processes that died. Fails only on a
    /// configuration it cannot use (an unreadable `sslrootcert`, a journal
    /// directory it cannot write), never because the database is away.
    ///
    /// Must be called inside a Tokio runtime.
    pub fn new(config: Config) -> Result<Store, Error> {
        let db = Database::new(&config)?;
        let (recovery, adopted) = Recovery::new(&config, &db.sql.lock_name)?;
        let store = Store {
            inner: Arc::new(Inner {
                config,
                db,
                recovery,
                events: Events::default(),
                config_problem: Default::default(),
                life: Lifecycle {
                    startup: tokio::sync::watch::Sender::new(Startup::Starting),
                    shutdown: CancellationToken::new(),
                    closed: AtomicBool::new(false),
                    tasks: tokio_util::task::TaskTracker::new(),
                },
            }),
        };
        metrics::gauge!(crate::metrics::BREAKER_STATE).set(BreakerState::Closed.gauge());
        store.take_adopted(adopted);
        store.spawn(Self::initialize_in_background);
        store.spawn(Self::upkeep);
        store.spawn(Self::recover);
        store.spawn(Self::check_health);
        if store.inner.config.prune() {
            store.spawn_pruner();
        }
        Ok(store)
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Whether the table is known to exist, i.e. start-up is complete.
    pub fn is_ready(&self) -> bool {
        self.inner.db.is_ready()
    }

    /// Waits until the store is ready, making one attempt itself if none is
    /// under way. Fails with the error of that attempt.
    pub async fn ready(&self) -> Result<(), Error> {
        self.ensure_schema().await
    }

    /// Waits for the start-up sequence to end: the first attempt and the
    /// start-up retries, with their backoff and jitter (1 s, 2 s, 4 s by
    /// default), or an error that waiting does not mend (a configuration
    /// error). Ready: `Ok`. Else one last attempt is made and its error
    /// returned, while the store keeps trying in the background. The one
    /// readiness path of the library and of `pgsession`'s commands.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// // Nothing listens on port 9: the start-up retries are spent, then the
    /// // error of a last attempt says why.
    /// let config = pgsession::Config::builder()
    ///     .url("postgres://127.0.0.1:9/app")
    ///     .startup_retries(1)
    ///     .startup_backoff(std::time::Duration::from_millis(10))
    ///     .fallback(false)
    ///     .build()?;
    /// let store = pgsession::Store::new(config)?;
    /// let error = store.wait_ready().await.unwrap_err();
    /// assert!(error.is_outage(), "{error}");
    /// # Ok(()) }
    /// ```
    pub async fn wait_ready(&self) -> Result<(), Error> {
        let mut startup = self.inner.life.startup.subscribe();
        let settled = tokio::select! {
            () = self.inner.life.shutdown.cancelled() => return Err(Error::StoreClosed),
            settled = startup.wait_for(|s| *s != Startup::Starting) => settled.map(|s| *s),
        };
        match settled {
            Ok(Startup::Ready) => Ok(()),
            _ => self.ready().await,
        }
    }

    /// The pool's figures now.
    pub fn pool_status(&self) -> PoolStatus {
        self.inner.db.pool.status()
    }

    /// The circuit breaker's position now.
    pub fn breaker_state(&self) -> BreakerState {
        self.inner.recovery.breaker.state()
    }

    /// Sessions with writes waiting in the journal.
    pub fn journal_len(&self) -> usize {
        self.inner.recovery.fallback.journal_len()
    }

    /// Bytes the journal's waiting writes take on disk.
    pub fn journal_bytes(&self) -> u64 {
        self.inner.recovery.fallback.journal_bytes()
    }

    /// Whether connections carry the server-side statement timeout (false
    /// when the server refused startup options, as poolers do).
    pub fn server_statement_timeout(&self) -> bool {
        self.inner.db.pool.uses_startup_options()
    }

    /// The facts behind `/health`.
    pub fn health(&self) -> StoreHealth {
        let breaker = self.breaker_state();
        let last_check = self.inner.events.last_check();
        let ready = self.is_ready();
        let config_error = self.inner.config_problem.get();
        let status = if self.is_closed() {
            HealthStatus::Down
        } else if ready
            && breaker == BreakerState::Closed
            && last_check.is_none_or(|c| c.ok)
            && config_error.is_none()
        {
            HealthStatus::Ok
        } else {
            HealthStatus::Degraded
        };
        StoreHealth {
            status,
            ready,
            breaker,
            pool: self.pool_status(),
            last_check,
            journal: self.inner.recovery.journal_health(&self.inner.config),
            config_error,
        }
    }

    /// Recent events (breaker moves, slow or failed checks, resizes,
    /// spooling), oldest first.
    pub fn recent_events(&self) -> Vec<Event> {
        self.inner.events.recent()
    }

    /// The incident timeline: the events folded (an outage, the breaker's
    /// probes, a write-back with its progress, conflicts), oldest first.
    pub fn timeline(&self) -> Vec<crate::health::TimelineEntry> {
        self.inner.events.timeline()
    }

    /// Sets the pool and journal gauges to their values now (call before
    /// rendering metrics).
    pub fn publish_metrics(&self) {
        let pool = self.pool_status();
        metrics::gauge!(crate::metrics::POOL_SIZE).set(pool.size as f64);
        metrics::gauge!(crate::metrics::POOL_IDLE).set(pool.idle as f64);
        metrics::gauge!(crate::metrics::POOL_IN_USE).set(pool.in_use as f64);
        metrics::gauge!(crate::metrics::POOL_WAITING).set(pool.waiting as f64);
        metrics::gauge!(crate::metrics::POOL_MAX).set(pool.max as f64);
        metrics::gauge!(crate::metrics::JOURNAL_ENTRIES).set(self.journal_len() as f64);
        metrics::gauge!(crate::metrics::JOURNAL_BYTES).set(self.journal_bytes() as f64);
        metrics::gauge!(crate::metrics::BREAKER_STATE).set(self.breaker_state().gauge());
    }

    /// Asks the server, through the pool, for its version and the settings
    /// of the connection (for `doctor` and for tests).
    pub async fn server_info(&self) -> Result<ServerInfo, Error> {
        let db = &self.inner.db;
        self.run_db(
            "info",
            self.deadline(),
            false,
            on_conn!(|conn| db.server_info(conn)),
        )
        .await
    }

    /// Loads an unexpired session: from the database, or, while it is
    /// away, from the fallback. A session the fallback does not know fails
    /// with [`Error::Unavailable`]: it is never taken for a missing one.
    pub async fn load(&self, sid: &str) -> Result<Option<StoredSession>, Error> {
        let started = std::time::Instant::now();
        let now = OffsetDateTime::now_utc();
        let fallback = &self.inner.recovery.fallback;
        // With the breaker closed only the journal matters: a cached copy
        // is not served, so it is not copied either.
        let closed = self.inner.recovery.breaker.is_closed();
        let known = if closed || !fallback.is_on() {
            fallback.lookup_pending(sid, now)
        } else {
            fallback.lookup(sid, now)
        };
        let served = match known {
            Lookup::Pending(found) => Some(Ok(found)),
            Lookup::Cached(cached) => Some(Ok(Some(cached))),
            Lookup::Miss if !closed => Some(Err(Error::Unavailable)),
            Lookup::Miss => None,
        };
        if let Some(result) = served {
            let outcome = if result.is_ok() {
                Outcome::Fallback
            } else {
                Outcome::Error
            };
            record_op("load", started, &result, outcome);
            return result;
        }
        let (result, outcome) = match self.db_load(sid).await {
            Ok(Some(found)) => {
                fallback.remember(sid, found.clone());
                (Ok(Some(found)), Outcome::Ok)
            }
            Ok(None) => {
                fallback.forget(sid);
                (Ok(None), Outcome::Ok)
            }
            // Away: the cache answers for what it knows. Busy: a 503.
            Err(e) if e.is_outage() && fallback.is_on() => match fallback.lookup(sid, now) {
                Lookup::Pending(found) => (Ok(found), Outcome::Fallback),
                Lookup::Cached(cached) => (Ok(Some(cached)), Outcome::Fallback),
                Lookup::Miss => (Err(e), Outcome::Error),
            },
            Err(e) => (Err(e), Outcome::Error),
        };
        record_op("load", started, &result, outcome);
        result
    }

    /// Inserts or replaces a session (an upsert). While the database is
    /// away the write is fsynced to the journal instead.
    pub async fn save(&self, sid: &str, json: &str, expire: OffsetDateTime) -> Result<(), Error> {
        let limit = self.inner.config.max_session_bytes();
        if json.len() > limit {
            return Err(Error::TooLarge {
                size: json.len(),
                limit,
            });
        }
        let write = || Pending::Save {
            json: json.to_owned(),
            expire,
        };
        let done = self
            .write(
                "save",
                sid,
                write,
                Some(json),
                self.db_save(sid, json, expire),
            )
            .await?;
        if done.is_some() {
            self.inner.recovery.fallback.saved(
                sid,
                StoredSession {
                    json: json.to_owned(),
                    expire,
                },
            );
        }
        Ok(())
    }

    /// Moves a session's expiry, leaving its document alone. Returns whether
    /// the session existed (always true when journaled).
    pub async fn touch(&self, sid: &str, expire: OffsetDateTime) -> Result<bool, Error> {
        let write = || Pending::Touch { expire };
        match self
            .write(
                "touch",
                sid,
                write,
                None,
                self.db_touch_with(sid, expire, self.deadline(), false),
            )
            .await?
        {
            Some(existed) => {
                self.inner.recovery.fallback.retime(sid, expire);
                Ok(existed)
            }
            None => Ok(true),
        }
    }

    /// Deletes a session. Deleting a missing session is not an error.
    /// Journaled while the database is away, a deletion wins over any
    /// other write of the session at write-back.
    pub async fn destroy(&self, sid: &str) -> Result<(), Error> {
        let done = self
            .write(
                "destroy",
                sid,
                || Pending::Destroy,
                None,
                self.db_destroy_with(sid, self.deadline(), false),
            )
            .await?;
        if done.is_some() {
            self.inner.recovery.fallback.forget(sid);
        }
        Ok(())
    }

    /// A write: to the journal while the breaker is open (or the session
    /// already waits there), else to the database, and to the journal if
    /// the database turns out to be away. `None` when journaled. `sent` is
    /// the document a save sends: if the statement goes unanswered, the
    /// row may hold it.
    async fn write<T>(
        &self,
        op: &'static str,
        sid: &str,
        journal_entry: impl Fn() -> Pending,
        sent: Option<&str>,
        direct: impl std::future::Future<Output = Result<T, Error>>,
    ) -> Result<Option<T>, Error> {
        let started = std::time::Instant::now();
        let breaker = &self.inner.recovery.breaker;
        let fallback = &self.inner.recovery.fallback;
        let first = fallback.journal_if(sid, &journal_entry, None, |pending| {
            pending || !breaker.is_closed()
        });
        let (result, outcome) = match first {
            Ok(Journaled::Yes(ticket)) => self.acknowledge(ticket).await,
            Err(refused) => (Err(refusal(refused, Error::Unavailable)), Outcome::Error),
            Ok(Journaled::No) => match direct.await {
                Ok(done) => (Ok(Some(done)), Outcome::Ok),
                Err(e) => {
                    // Any attempt of the operation may have been the one
                    // that went unanswered (a reset link, retried, then
                    // refused by the open breaker): a failed write is in
                    // doubt unless the server's answer refused it for good.
                    // Accepting one's own document as a base is always
                    // safe: the row holds it only if this write landed.
                    let in_doubt = e.is_transient();
                    if in_doubt {
                        self.inner.recovery.mark_in_doubt();
                    }
                    let in_doubt = sent.filter(|_| in_doubt);
                    if e.is_outage() {
                        match fallback.journal_if(sid, &journal_entry, in_doubt, |_| true) {
                            Ok(Journaled::Yes(ticket)) => self.acknowledge(ticket).await,
                            Ok(Journaled::No) => unreachable!("accepted above"),
                            Err(refused) => (Err(refusal(refused, e)), Outcome::Error),
                        }
                    } else {
                        if let Some(json) = in_doubt {
                            fallback.in_doubt(sid, json);
                        }
                        (Err(e), Outcome::Error)
                    }
                }
            },
        };
        if outcome == Outcome::Fallback {
            metrics::gauge!(crate::metrics::JOURNAL_ENTRIES).set(fallback.journal_len() as f64);
        }
        record_op(op, started, &result, outcome);
        result
    }

    /// Waits for a journaled write to be on disk: only then is it
    /// acknowledged.
    async fn acknowledge<T>(
        &self,
        ticket: crate::resilience::journal::Ticket,
    ) -> (Result<Option<T>, Error>, Outcome) {
        match self.inner.recovery.fallback.durable(ticket).await {
            Ok(()) => (Ok(None), Outcome::Fallback),
            Err(refused) => (Err(refusal(refused, Error::Unavailable)), Outcome::Error),
        }
    }

    /// Counts unexpired sessions.
    pub async fn count(&self) -> Result<u64, Error> {
        self.count_rows(false).await
    }

    /// Counts expired sessions still in the table (what a prune would delete).
    pub async fn count_expired(&self) -> Result<u64, Error> {
        self.count_rows(true).await
    }

    async fn count_rows(&self, expired: bool) -> Result<u64, Error> {
        let db = &self.inner.db;
        self.run_db(
            "count",
            self.deadline(),
            false,
            on_conn!(|conn| db.count(conn, expired)),
        )
        .await
    }

    /// Deletes every session. Returns how many rows were deleted.
    pub async fn clear(&self) -> Result<u64, Error> {
        let db = &self.inner.db;
        self.run_db(
            "clear",
            self.deadline(),
            false,
            on_conn!(|conn| db.clear(conn)),
        )
        .await
    }

    /// Stops background tasks, writes the journal back if the database
    /// answers, else spools it to disk, and closes the pool. Operations
    /// after this fail with [`Error::StoreClosed`].
    pub async fn close(&self) {
        let life = &self.inner.life;
        life.shutdown.cancel();
        life.tasks.close();
        life.tasks.wait().await;
        self.flush_at_close().await;
        life.closed.store(true, Ordering::Release);
        self.inner.db.pool.close();
    }

    /// Whether [`Store::close`] has ended.
    fn is_closed(&self) -> bool {
        self.inner.life.closed.load(Ordering::Acquire)
    }

    fn spawn<F, Fut>(&self, task: F)
    where
        F: FnOnce(Store) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        // Tasks hold a clone of the store; they end when `shutdown` fires.
        self.inner.life.tasks.spawn(task(self.clone()));
    }
}

/// Counts and times an operation for the metrics.
fn record_op<T>(
    op: &'static str,
    started: std::time::Instant,
    result: &Result<T, Error>,
    outcome: Outcome,
) {
    metrics::histogram!(crate::metrics::QUERY_SECONDS, "op" => op).record(started.elapsed());
    let outcome = match outcome {
        Outcome::Ok => "ok",
        Outcome::Fallback => "fallback",
        Outcome::Error => "error",
    };
    metrics::counter!(crate::metrics::OPERATIONS, "op" => op, "outcome" => outcome).increment(1);
    if let Err(e) = result {
        metrics::counter!(crate::metrics::ERRORS, "kind" => e.kind().as_str()).increment(1);
    }
}
