//! The dedicated session pool: deadpool-postgres with our own connector.
//!
//! It owns what the design asks of each connection: connect timeout (TLS and
//! authentication included), TCP keepalive, `TimeZone=UTC` and a server-side
//! `statement_timeout` as startup options (dropped by themselves when the
//! server refuses them, as a pooler does), replacement after a maximum
//! number of uses, idle connections closed after the idle timeout, and a
//! warm minimum kept open. [`Checkout`] adds the client-side deadline: a
//! query that outlives it is cancelled on the server and its connection
//! thrown away.
//!
//! The pool's maximum is kept by a gate of its own (see [`Gate`]), so that
//! it can be lowered for real when the server refuses more connections
//! (SQLSTATE 53300): the pool then keeps to the connections it holds, and
//! a caller that gets none within the acquire timeout gets
//! [`Error::AcquireTimeout`], never the server's refusal. [`Progress`]
//! tells the store how far an attempt got, so that only the failures of
//! opening a connection, or of a connection just opened, count against
//! the database.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::{
    Connect, Hook, HookError, Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime,
    Timeouts,
};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{CancelToken, Row};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::{Config, PoolerMode};
use crate::error::Error;

/// A snapshot of the pool, for health, metrics and the dashboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PoolStatus {
    /// Connections open now.
    pub size: usize,
    /// Open connections not in use.
    pub idle: usize,
    /// Connections handed out.
    pub in_use: usize,
    /// Callers waiting for a connection.
    pub waiting: usize,
    /// Current maximum size.
    pub max: usize,
    /// Connections opened since the pool was made.
    pub opened_total: u64,
}

/// The session pool. Cheap to clone.
#[derive(Clone)]
pub(crate) struct SessionPool {
    pool: Pool,
    tls: MakeRustlsConnect,
    shared: Arc<Shared>,
    gate: Arc<Gate>,
    /// Opens the probes' connections, outside the pool.
    prober: Arc<(SessionConnector, tokio_postgres::Config)>,
    min_idle: usize,
    idle_timeout: Duration,
    acquire_timeout: Duration,
    connect_timeout: Duration,
}

impl std::fmt::Debug for SessionPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionPool")
            .field("status", &self.status())
            .finish()
    }
}

/// State the connector and the pool share.
#[derive(Debug, Default)]
struct Shared {
    /// Cleared when the server refuses startup options (a pooler).
    startup_options: AtomicBool,
    /// Behind a transaction pooler: unnamed statements only. Set by the
    /// configuration, or when the server refuses startup options (only
    /// poolers do; whether in session or transaction mode cannot be told,
    /// so the mode that works in both is used).
    pooled: AtomicBool,
    opened_total: AtomicU64,
    warming: AtomicBool,
    /// Of a multi-host URL, the host the last connection was opened to:
    /// new connections try it first (after a failover, the promoted
    /// standby), not a host that has gone silent.
    last_host: std::sync::atomic::AtomicUsize,
    /// Set by each refusal for lack of connection slots, taken by the
    /// store's upkeep: the server's free slots are then taken to be none.
    refused: AtomicBool,
    /// The size the pool kept to at the refusal that logged the warning,
    /// for the store's event (0: none to report).
    announce: AtomicUsize,
    /// The last refusal, so that a stretch of them logs one warning.
    last_refusal: Mutex<Option<Instant>>,
    /// Probes under way (see [`SessionPool::probe_slot`]).
    probes: AtomicUsize,
}

impl Shared {
    /// Startup options and named statements unless `config` says a
    /// transaction pooler is in between.
    fn for_config(config: &Config) -> Arc<Shared> {
        Arc::new(Shared {
            startup_options: AtomicBool::new(config.pooler() == PoolerMode::Direct),
            pooled: AtomicBool::new(config.pooler() == PoolerMode::Transaction),
            ..Shared::default()
        })
    }

    /// Behind a pooler: no startup options, unnamed statements from now
    /// on. True the first time, for the caller's warning.
    fn go_unnamed(&self) -> bool {
        self.startup_options.store(false, Ordering::Relaxed);
        !self.pooled.swap(true, Ordering::Relaxed)
    }
}

impl SessionPool {
    /// Builds the pool; opens nothing yet.
    pub(crate) fn new(config: &Config) -> Result<SessionPool, Error> {
        let tls = crate::tls::connector(config.tls())?;
        let shared = Shared::for_config(config);
        let connector = SessionConnector::new(config, tls.clone(), shared.clone());
        let prober = Arc::new((connector.clone(), config.postgres().clone()));
        let manager = Manager::from_connect(
            config.postgres().clone(),
            connector,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let max_uses = config.max_uses();
        // Deadpool's maximum is the ceiling; the gate keeps the size in force.
        let pool = Pool::builder(manager)
            .max_size(config.pool_max_size().max(config.pool_size()))
            .runtime(Runtime::Tokio1)
            .timeouts(Timeouts {
                wait: Some(config.acquire_timeout()),
                // Each host of a multi-host URL gets the connect timeout.
                create: Some(config.connect_budget()),
                recycle: Some(Duration::from_secs(5)),
            })
            .pre_recycle(Hook::sync_fn(move |client, metrics| {
                // A link the server closed while idle (an idle timeout, a
                // serverless database suspending) is expected: it is
                // replaced here, quietly, before deadpool's own check would
                // log a WARN for it.
                if client.is_closed() {
                    tracing::debug!(target: "session_pool", "an idle connection was closed by the server; replacing it");
                    return Err(HookError::message("closed by the server"));
                }
                // recycle_count counts reuses; this checkout would be use
                // number recycle_count + 2.
                if metrics.recycle_count + 1 >= max_uses {
                    return Err(HookError::message("connection reached its maximum uses"));
                }
                Ok(())
            }))
            .build()
            .map_err(|e| Error::Config(crate::ConfigError::invalid("pool_size", e.to_string())))?;
        Ok(SessionPool {
            pool,
            tls,
            shared,
            gate: Arc::new(Gate::new(config.pool_size())),
            prober,
            min_idle: config.min_idle(),
            idle_timeout: config.idle_timeout(),
            acquire_timeout: config.acquire_timeout(),
            connect_timeout: config.connect_timeout(),
        })
    }

    /// Takes a connection, waiting at most the acquire timeout for a free
    /// slot and the connect timeout for a new connection.
    pub(crate) async fn checkout(&self) -> Result<Checkout, Error> {
        self.checkout_tracked(&Progress::default()).await
    }

    /// [`SessionPool::checkout`], recording in `progress` whether it waits
    /// for a slot, opens a connection, or got one (fresh or reused): the
    /// stage at which a failure or a deadline met the attempt.
    ///
    /// A server out of connection slots (53300) is not an error here: the
    /// pool keeps to the connections it holds and the caller waits for one
    /// of them, as for any busy pool.
    pub(crate) async fn checkout_tracked(&self, progress: &Progress) -> Result<Checkout, Error> {
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + self.acquire_timeout;
        let mut pause = REFUSED_PAUSE;
        let got = loop {
            progress.set(Stage::Waiting);
            let pass = match self.gate.enter(deadline, self.acquire_timeout).await {
                Ok(pass) => pass,
                Err(e) => break Err(e),
            };
            progress.set(Stage::Connecting);
            let asked = Instant::now();
            match self.pool.get().await {
                Ok(conn) => break Ok((conn, pass, asked)),
                Err(deadpool_postgres::PoolError::Backend(e)) if out_of_slots(&e) => {
                    drop(pass);
                    if self.out_of_slots(&e) > 0 {
                        continue; // wait at the gate for a connection held
                    }
                    // None held: nothing to wait for but the server.
                    if tokio::time::Instant::now() + pause >= deadline {
                        tokio::time::sleep_until(deadline).await;
                        break Err(Error::AcquireTimeout(self.acquire_timeout));
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Err(e) => break Err(self.pool_error(e)),
            }
        };
        metrics::histogram!(crate::metrics::POOL_ACQUIRE_SECONDS).record(started.elapsed());
        let (conn, pass, asked) = got?;
        let opened = Object::metrics(&conn);
        // Opened by this very call: never used, and created since it asked.
        let fresh = opened.recycled.is_none() && opened.created >= asked;
        progress.set(if fresh { Stage::Fresh } else { Stage::Reused });
        Ok(Checkout {
            conn: Some(conn),
            tls: self.tls.clone(),
            unnamed: self.is_pooled(),
            fresh,
            _pass: pass,
        })
    }

    /// The server refused a connection for lack of slots: the pool keeps to
    /// the connections it holds (at least one, to try again with). Returns
    /// how many it holds. Warns once per stretch of refusals.
    fn out_of_slots(&self, error: &tokio_postgres::Error) -> usize {
        let held = self.pool.status().size;
        let keep = held.max(1);
        // Before the gate moves: the upkeep must not grow the pool again on
        // a stale count of the server's free slots.
        self.shared.refused.store(true, Ordering::Release);
        let from = self.gate.lower_to(keep);
        let now = Instant::now();
        let mut last = self
            .shared
            .last_refusal
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let quiet_before = last.is_none_or(|at| now.duration_since(at) >= REFUSAL_QUIET);
        *last = Some(now);
        drop(last);
        if quiet_before {
            self.shared.announce.store(keep, Ordering::Release);
            let reason = error
                .as_db_error()
                .map_or_else(|| crate::error::chain(error), |db| db.message().to_owned());
            let keeping = match held {
                0 => "the pool holds none and asks again until the acquire timeout".to_owned(),
                n => format!("the pool keeps to the {n} connections it holds"),
            };
            tracing::warn!(
                target: "session_pool",
                held,
                max_was = from,
                "the server refuses more connections (SQLSTATE 53300: {reason}): {keeping}, and \
                 callers that get none within the acquire timeout get a 503. Lower \
                 PGSESSION_POOL_SIZE and PGSESSION_POOL_MAX_SIZE, or raise the limit (the \
                 role's or the database's CONNECTION LIMIT, or max_connections)"
            );
        } else {
            tracing::debug!(target: "session_pool", held, "the server refused another connection (53300)");
        }
        held
    }

    /// Whether the server refused a connection for lack of slots since the
    /// last call.
    pub(crate) fn take_refused(&self) -> bool {
        self.shared.refused.swap(false, Ordering::AcqRel)
    }

    /// The size the pool kept to at a refusal that began a stretch, once.
    pub(crate) fn take_announcement(&self) -> Option<usize> {
        Some(self.shared.announce.swap(0, Ordering::AcqRel)).filter(|&n| n > 0)
    }

    /// A place for one probe, if fewer than `limit` are under way.
    pub(crate) fn probe_slot(&self, limit: usize) -> Option<ProbeSlot> {
        let shared = &self.shared;
        shared
            .probes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()?;
        Some(ProbeSlot(shared.clone()))
    }

    /// Opens a connection outside the pool, runs `SELECT 1` on it and
    /// closes it, each step within `bound`: a question that no connection
    /// sitting in the pool can answer for (in a blackhole an idle
    /// connection hangs as a busy one does; only a new one tells).
    pub(crate) async fn probe_fresh(
        &self,
        bound: Duration,
        progress: &Progress,
    ) -> Result<(), Error> {
        let timed_out = || Error::QueryTimeout {
            op: "probe",
            after: bound,
        };
        let (connector, pg_config) = &*self.prober;
        progress.set(Stage::Connecting);
        let (client, _task) = tokio::time::timeout(bound, connector.connect(pg_config))
            .await
            .map_err(|_| timed_out())??;
        progress.set(Stage::Fresh);
        tokio::time::timeout(bound, client.simple_query("SELECT 1"))
            .await
            .map_err(|_| timed_out())??;
        Ok(())
    }

    /// A deadpool failure as the store's error, with the timeouts in force
    /// (deadpool does not say which).
    fn pool_error(&self, error: deadpool_postgres::PoolError) -> Error {
        use deadpool_postgres::{PoolError, TimeoutType};
        match error {
            PoolError::Backend(e) => Error::Postgres(e),
            PoolError::Timeout(TimeoutType::Wait) => Error::AcquireTimeout(self.acquire_timeout),
            PoolError::Timeout(_) => Error::ConnectTimeout(self.connect_timeout),
            PoolError::Closed | PoolError::NoRuntimeSpecified | PoolError::PostCreateHook(_) => {
                Error::StoreClosed
            }
        }
    }

    /// The pool's figures now.
    pub(crate) fn status(&self) -> PoolStatus {
        let s = self.pool.status();
        PoolStatus {
            size: s.size,
            idle: s.available,
            in_use: s.size.saturating_sub(s.available),
            waiting: s.waiting + self.gate.waiting.load(Ordering::Relaxed),
            max: self.gate.max(),
            opened_total: self.shared.opened_total.load(Ordering::Relaxed),
        }
    }

    /// Whether the pool talks to a transaction pooler (unnamed statements,
    /// transaction-scoped locks).
    pub(crate) fn is_pooled(&self) -> bool {
        self.shared.pooled.load(Ordering::Relaxed)
    }

    /// Switches to unnamed statements: the server lost a prepared statement,
    /// which only a transaction pooler makes happen.
    pub(crate) fn mark_pooled(&self) {
        // A pooler that let the startup options through ignored them: the
        // statement timeout is the client's alone from now on.
        if self.shared.go_unnamed() {
            tracing::warn!(
                target: "session_pool",
                "a prepared statement vanished between statements: behind a transaction pooler; \
                 sending unnamed statements from now on (set PGSESSION_POOLER=transaction to say so)"
            );
        }
    }

    /// Whether connections carry the startup options (false behind a pooler).
    pub(crate) fn uses_startup_options(&self) -> bool {
        self.shared.startup_options.load(Ordering::Relaxed)
    }

    /// Changes the maximum size from `from` to `to` (the self-sizing
    /// pool), unless it moved meanwhile (a refusal lowered it: that wins).
    /// Idle connections beyond the new size are closed at once; busy ones
    /// stay until the idle timeout closes them.
    pub(crate) fn resize(&self, from: usize, to: usize) -> bool {
        if !self.gate.resize(from, to) {
            return false;
        }
        let mut excess = self.pool.status().size.saturating_sub(to);
        if excess > 0 {
            self.pool.retain(|_, _| {
                let keep = excess == 0;
                excess = excess.saturating_sub(1);
                keep
            });
        }
        true
    }

    /// One maintenance pass: closes connections idle for longer than the idle
    /// timeout (keeping the warm minimum) and opens connections up to it.
    pub(crate) fn maintain(&self) {
        let status = self.pool.status();
        let mut warm = status.size.saturating_sub(status.available);
        let (min_idle, idle_timeout) = (self.min_idle, self.idle_timeout);
        let removed = self
            .pool
            .retain(|_, metrics| {
                if warm < min_idle {
                    warm += 1;
                    return true;
                }
                metrics.last_used() < idle_timeout
            })
            .removed
            .len();
        if removed > 0 {
            tracing::debug!(target: "session_pool", removed, "closed idle connections");
        }
        if self.pool.status().size < self.warm_target()
            && !self.shared.warming.swap(true, Ordering::AcqRel)
        {
            let pool = self.clone();
            tokio::spawn(async move {
                if let Err(e) = pool.warm().await {
                    tracing::debug!(target: "session_pool", error = %e, "could not open warm connection");
                }
                pool.shared.warming.store(false, Ordering::Release);
            });
        }
    }

    /// The warm minimum, within the size in force (a server at its limit
    /// may leave room for fewer).
    fn warm_target(&self) -> usize {
        self.min_idle.min(self.gate.max())
    }

    async fn warm(&self) -> Result<(), Error> {
        let mut held = Vec::new();
        let target = self.warm_target();
        while self.pool.status().size < target && held.len() < target {
            held.push(self.checkout().await?);
        }
        for conn in held {
            conn.finish(&Ok::<(), Error>(()));
        }
        Ok(())
    }

    /// Closes the pool: waiting and future checkouts fail, open connections
    /// are dropped as they come back.
    pub(crate) fn close(&self) {
        self.gate.permits.close();
        self.pool.close();
    }
}

/// One probe under way, until dropped.
#[derive(Debug)]
pub(crate) struct ProbeSlot(Arc<Shared>);

impl Drop for ProbeSlot {
    fn drop(&mut self) {
        self.0.probes.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How long a server that refuses connections (53300) must stay quiet
/// before the next refusal is warned of again: a pool at the limit is
/// refused again at every attempt to grow, and one warning says it all.
const REFUSAL_QUIET: Duration = Duration::from_secs(600);

/// First pause before asking again a server that refused the only
/// connection the pool would have had.
const REFUSED_PAUSE: Duration = Duration::from_millis(50);

/// Whether the server refused the connection for lack of slots (its
/// `max_connections`, or the role's or database's `CONNECTION LIMIT`).
fn out_of_slots(error: &tokio_postgres::Error) -> bool {
    error.code() == Some(&SqlState::TOO_MANY_CONNECTIONS)
}

/// How far one attempt got: what a failure at that point says about the
/// database. Failing to open a connection, or on one just opened, says it
/// is away; a statement failing on a reused connection may only show that
/// this connection died while idle (its backend was terminated, the server
/// or a middlebox closed it), and waiting for a slot says the pool is busy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Stage {
    /// Not in an attempt (between retries).
    Idle = 0,
    /// Waiting for a slot in the pool.
    Waiting = 1,
    /// Taking an idle connection or opening a new one.
    Connecting = 2,
    /// Running on a connection opened for this attempt.
    Fresh = 3,
    /// Running on a connection that served earlier operations.
    Reused = 4,
}

impl Stage {
    /// Whether a failure at this stage met the database itself: opening a
    /// connection, or on a connection just opened.
    pub(crate) fn opening(self) -> bool {
        matches!(self, Stage::Connecting | Stage::Fresh)
    }
}

/// The [`Stage`] of an attempt, shared with whoever judges its failure
/// (also after a deadline dropped the attempt midway).
#[derive(Debug, Default)]
pub(crate) struct Progress(AtomicU8);

impl Progress {
    pub(crate) fn set(&self, stage: Stage) {
        self.0.store(stage as u8, Ordering::Relaxed);
    }

    pub(crate) fn stage(&self) -> Stage {
        match self.0.load(Ordering::Relaxed) {
            1 => Stage::Waiting,
            2 => Stage::Connecting,
            3 => Stage::Fresh,
            4 => Stage::Reused,
            _ => Stage::Idle,
        }
    }

    /// The stage, which goes back to [`Stage::Idle`].
    pub(crate) fn take(&self) -> Stage {
        let stage = self.stage();
        self.set(Stage::Idle);
        stage
    }
}

/// The pool's maximum size in force. Deadpool's own `resize` cannot lower
/// it for real: it takes back only the permits of idle connections beyond
/// the new size, so a pool of 10 resized to 2 while it held 2 would still
/// open 8 more, each refused by a server at its limit. Deadpool's maximum
/// stays at the ceiling, and a checkout first passes this gate.
#[derive(Debug)]
struct Gate {
    permits: Semaphore,
    max: AtomicUsize,
    /// Permits to retire when they come back: the maximum was lowered
    /// while they were out.
    owed: AtomicUsize,
    /// Callers waiting for a permit.
    waiting: AtomicUsize,
    /// Serialises changes of the maximum.
    resizing: Mutex<()>,
}

/// A caller's place under the gate, given back when dropped.
#[derive(Debug)]
struct Pass(Arc<Gate>);

impl Drop for Pass {
    fn drop(&mut self) {
        self.0.leave();
    }
}

impl Gate {
    fn new(max: usize) -> Gate {
        Gate {
            permits: Semaphore::new(max),
            max: AtomicUsize::new(max),
            owed: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            resizing: Mutex::new(()),
        }
    }

    fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }

    /// Waits for a place until `deadline`.
    async fn enter(
        self: &Arc<Self>,
        deadline: tokio::time::Instant,
        wait: Duration,
    ) -> Result<Pass, Error> {
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        let acquired = match self.permits.try_acquire() {
            Ok(permit) => Ok(permit),
            Err(tokio::sync::TryAcquireError::Closed) => return Err(Error::StoreClosed),
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                self.waiting.fetch_add(1, Ordering::Relaxed);
                let _waiting = Waiting(&self.waiting);
                match tokio::time::timeout_at(deadline, self.permits.acquire()).await {
                    Ok(Ok(permit)) => Ok(permit),
                    Ok(Err(_)) => return Err(Error::StoreClosed),
                    Err(_) => Err(Error::AcquireTimeout(wait)),
                }
            }
        };
        let permit = acquired?;
        permit.forget();
        Ok(Pass(self.clone()))
    }

    fn leave(&self) {
        let retired = self
            .owed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |owed| {
                owed.checked_sub(1)
            })
            .is_ok();
        if !retired {
            self.permits.add_permits(1);
        }
    }

    /// Lowers the maximum to `to`, if it is higher. Returns the maximum
    /// before.
    fn lower_to(&self, to: usize) -> usize {
        let _resizing = self.resizing.lock().unwrap_or_else(|p| p.into_inner());
        let from = self.max();
        if to < from {
            self.set(from, to);
        }
        from
    }

    /// Moves the maximum from `from` to `to`; false if it is not `from`.
    fn resize(&self, from: usize, to: usize) -> bool {
        let _resizing = self.resizing.lock().unwrap_or_else(|p| p.into_inner());
        if self.max() != from {
            return false;
        }
        self.set(from, to);
        true
    }

    fn set(&self, from: usize, to: usize) {
        self.max.store(to, Ordering::Relaxed);
        if to > from {
            let more = to - from;
            // Permits still owed need only not be retired.
            let owed = self
                .owed
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |owed| {
                    Some(owed.saturating_sub(more))
                })
                .unwrap_or(0);
            self.permits.add_permits(more - owed.min(more));
        } else if to < from {
            let fewer = from - to;
            // Owed first, so that a place given back meanwhile is retired
            // rather than handed out again.
            self.owed.fetch_add(fewer, Ordering::AcqRel);
            let taken = self.permits.forget_permits(fewer);
            let mut surplus = 0;
            let _ = self
                .owed
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |owed| {
                    surplus = taken.saturating_sub(owed);
                    Some(owed.saturating_sub(taken))
                });
            // Places given back meanwhile paid part of the debt that the
            // permits taken paid again.
            self.permits.add_permits(surplus);
        }
    }
}

/// A connection taken from the pool for one operation.
///
/// If the operation is abandoned (its deadline passed, or the caller went
/// away) while a query runs, dropping the checkout cancels the query on the
/// server and throws the connection away instead of returning it.
pub(crate) struct Checkout {
    conn: Option<Object>,
    tls: MakeRustlsConnect,
    /// Send unnamed statements (a transaction pooler may run each
    /// transaction on another server connection, where a named prepared
    /// statement does not exist).
    unnamed: bool,
    /// Opened for this checkout.
    fresh: bool,
    /// The place under the gate; dropped after the connection went back.
    _pass: Pass,
}

/// Parameters of a statement, with the types they are sent as.
pub(crate) type Params<'a> = [(&'a (dyn ToSql + Sync), Type)];

impl Checkout {
    /// The client, for the duration of the operation.
    pub(crate) fn client(&self) -> &deadpool_postgres::ClientWrapper {
        self.conn
            .as_ref()
            .expect("connection present until the checkout ends")
    }

    /// Whether statements go unnamed (behind a transaction pooler).
    pub(crate) fn is_pooled(&self) -> bool {
        self.unnamed
    }

    /// Whether the connection was opened for this checkout (a failure on
    /// it says more about the database than one on a connection that sat
    /// idle in the pool).
    pub(crate) fn is_fresh(&self) -> bool {
        self.fresh
    }

    /// Runs `sql` and returns its one row, if any: a cached prepared
    /// statement on a direct connection, an unnamed one behind a pooler.
    pub(crate) async fn query_opt(
        &self,
        sql: &str,
        params: &Params<'_>,
    ) -> Result<Option<Row>, tokio_postgres::Error> {
        if self.unnamed {
            return self.client().query_typed_opt(sql, params).await;
        }
        let (stmt, values) = self.prepared(sql, params).await?;
        self.client().query_opt(&stmt, &values).await
    }

    /// Runs `sql` and returns its rows, as [`Checkout::query_opt`].
    pub(crate) async fn query(
        &self,
        sql: &str,
        params: &Params<'_>,
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        if self.unnamed {
            return self.client().query_typed(sql, params).await;
        }
        let (stmt, values) = self.prepared(sql, params).await?;
        self.client().query(&stmt, &values).await
    }

    /// Runs `sql` and returns its one row, as [`Checkout::query_opt`].
    pub(crate) async fn query_one(
        &self,
        sql: &str,
        params: &Params<'_>,
    ) -> Result<Row, tokio_postgres::Error> {
        if self.unnamed {
            return self.client().query_typed_one(sql, params).await;
        }
        let (stmt, values) = self.prepared(sql, params).await?;
        self.client().query_one(&stmt, &values).await
    }

    /// Runs `sql` and returns the rows it affected, as [`Checkout::query_opt`].
    pub(crate) async fn execute(
        &self,
        sql: &str,
        params: &Params<'_>,
    ) -> Result<u64, tokio_postgres::Error> {
        if self.unnamed {
            return self.client().execute_typed(sql, params).await;
        }
        let (stmt, values) = self.prepared(sql, params).await?;
        self.client().execute(&stmt, &values).await
    }

    /// The connection's cached prepared statement for `sql`, and the values
    /// to bind to it.
    async fn prepared<'p>(
        &self,
        sql: &str,
        params: &'p Params<'p>,
    ) -> Result<(tokio_postgres::Statement, Vec<&'p (dyn ToSql + Sync)>), tokio_postgres::Error>
    {
        let types: Vec<Type> = params.iter().map(|(_, t)| t.clone()).collect();
        let stmt = self.client().prepare_typed_cached(sql, &types).await?;
        Ok((stmt, params.iter().map(|(v, _)| *v).collect()))
    }

    /// Throws the connection away (its state is unknown, e.g. inside a
    /// failed transaction or holding a lock).
    pub(crate) fn discard(mut self) {
        if let Some(conn) = self.conn.take() {
            drop(Object::take(conn));
        }
    }

    /// Ends the operation: the connection goes back to the pool, unless the
    /// result shows it is no longer trustworthy.
    pub(crate) fn finish<T>(mut self, result: &Result<T, Error>) {
        let conn = self.conn.take().expect("finished once");
        if matches!(result, Err(e) if e.poisons_connection()) || conn.is_closed() {
            drop(Object::take(conn));
        }
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        // Still holding the connection: the operation was abandoned midway.
        let Some(conn) = self.conn.take() else { return };
        let token: CancelToken = conn.cancel_token();
        drop(Object::take(conn));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let tls = self.tls.clone();
            runtime.spawn(async move {
                if let Err(e) = token.cancel_query(tls).await {
                    tracing::debug!(target: "session_pool", error = %e, "could not cancel an abandoned query");
                }
            });
        }
    }
}

type ConnectFuture<'a> = Pin<
    Box<
        dyn Future<Output = Result<(tokio_postgres::Client, JoinHandle<()>), tokio_postgres::Error>>
            + Send
            + 'a,
    >,
>;

/// Opens one connection to `config`'s database exactly as the pool opens
/// its own: the same TLS connector (so `sslmode`, `sslrootcert` and channel
/// binding behave the same), the same startup options (`TimeZone=UTC`, the
/// statement timeout; left out if a pooler refuses them), and for a
/// multi-host URL each host in turn, starting with the first. It is for
/// `pgsession doctor`, whose verdict on a login must be the pool's. The
/// connection closes when the client is dropped.
///
/// An unusable TLS setting is [`Error::Config`]; a refusal, a failed
/// handshake or login is [`Error::Postgres`] with the driver's error. Only
/// the TCP connect of each host is bounded (by the connect timeout), as
/// in the pool: bound the whole call with the caller's own deadline.
pub async fn connect_one(config: &Config) -> Result<tokio_postgres::Client, Error> {
    let tls = crate::tls::connector(config.tls())?;
    let shared = Shared::for_config(config);
    let connector = SessionConnector::new(config, tls, shared);
    let (client, _task) = connector
        .connect(config.postgres())
        .await
        .map_err(Error::Postgres)?;
    Ok(client)
}

/// Each host of `config`'s URL as a configuration of its own, whatever its
/// role (`target_session_attrs=any`), so that a report can look at every
/// host (`pgsession doctor` on a multi-host URL: which is the primary, how
/// far behind the standbys are). A single-host URL gives itself.
pub fn each_host(config: &Config) -> Vec<Config> {
    if config.per_host.is_empty() {
        return vec![config.clone()];
    }
    config
        .per_host
        .iter()
        .map(|one| {
            let mut single = config.clone();
            single.pg = one.clone();
            single
                .pg
                .target_session_attrs(tokio_postgres::config::TargetSessionAttrs::Any);
            single.per_host.clear();
            single
        })
        .collect()
}

/// Opens connections for the pool.
#[derive(Clone)]
struct SessionConnector {
    tls: MakeRustlsConnect,
    shared: Arc<Shared>,
    /// `-c TimeZone=UTC -c statement_timeout=...`, after the user's own.
    options: String,
    /// One configuration per host of a multi-host URL (empty for one host).
    hosts: Vec<tokio_postgres::Config>,
    connect_timeout: Duration,
}

impl Connect for SessionConnector {
    fn connect(&self, pg_config: &tokio_postgres::Config) -> ConnectFuture<'_> {
        let pg_config = pg_config.clone();
        Box::pin(async move {
            // Several hosts: tried one at a time, each within the connect
            // timeout (as libpq does), so that a host that accepts the TCP
            // connection and then says nothing cannot use up the whole
            // budget. tokio-postgres bounds only the TCP connect of each.
            if !self.hosts.is_empty() {
                let start = self.shared.last_host.load(Ordering::Relaxed) % self.hosts.len();
                let order: Vec<usize> = (0..self.hosts.len())
                    .map(|i| (start + i) % self.hosts.len())
                    .collect();
                let (last, first) = order.split_last().expect("at least one host");
                for &i in first {
                    match tokio::time::timeout(
                        self.connect_timeout,
                        self.connect_host(self.hosts[i].clone()),
                    )
                    .await
                    {
                        Ok(Ok(pair)) => {
                            self.shared.last_host.store(i, Ordering::Relaxed);
                            return Ok(pair);
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(target: "session_pool", error = %crate::error::chain(&e), "host failed; trying the next")
                        }
                        Err(_) => {
                            tracing::debug!(target: "session_pool", "host silent past the connect timeout; trying the next")
                        }
                    }
                }
                // The pool's create timeout bounds the last one.
                let pair = self.connect_host(self.hosts[*last].clone()).await?;
                self.shared.last_host.store(*last, Ordering::Relaxed);
                return Ok(pair);
            }
            self.connect_host(pg_config).await
        })
    }
}

impl SessionConnector {
    fn new(config: &Config, tls: MakeRustlsConnect, shared: Arc<Shared>) -> SessionConnector {
        let mut options = config
            .postgres()
            .get_options()
            .unwrap_or_default()
            .to_owned();
        options.push_str(&format!(
            " -c TimeZone=UTC -c statement_timeout={} -c {OPTIONS_MARKER}=on",
            config.statement_timeout().as_millis()
        ));
        SessionConnector {
            tls,
            shared,
            options: options.trim().to_owned(),
            hosts: config.per_host.clone(),
            connect_timeout: config.connect_timeout(),
        }
    }

    /// A pooler may let startup options through and ignore them (PgBouncer
    /// with `ignore_startup_parameters = options`); PostgreSQL itself always
    /// applies them. A marker setting tells the two apart: when it is
    /// missing, the pool is behind a transaction pooler (named statements
    /// there can even run another client's statement of the same name).
    async fn check_options_applied(
        &self,
        client: &tokio_postgres::Client,
    ) -> Result<(), tokio_postgres::Error> {
        let query = format!("SELECT current_setting('{OPTIONS_MARKER}', true)");
        let applied = client.simple_query(&query).await?.iter().any(|message| {
            matches!(message, tokio_postgres::SimpleQueryMessage::Row(row) if row.get(0) == Some("on"))
        });
        if !applied && self.shared.go_unnamed() {
            tracing::warn!(
                target: "session_pool",
                "startup options were ignored (a pooler?); statement timeouts are now enforced \
                 by the client only, and statements are sent unnamed"
            );
        }
        Ok(())
    }

    /// One connection to the host(s) of `pg_config`, with the startup
    /// options unless the server refuses them.
    async fn connect_host(
        &self,
        pg_config: tokio_postgres::Config,
    ) -> Result<(tokio_postgres::Client, JoinHandle<()>), tokio_postgres::Error> {
        if self.shared.startup_options.load(Ordering::Relaxed) {
            let mut with_options = pg_config.clone();
            with_options.options(self.options.as_str());
            match with_options.connect(self.tls.clone()).await {
                Ok(pair) => {
                    let (client, task) = self.spawn(pair);
                    self.check_options_applied(&client).await?;
                    return Ok((client, task));
                }
                Err(e) if refuses_startup_options(&e) => {
                    self.shared.go_unnamed();
                    tracing::warn!(
                        target: "session_pool",
                        "the server refused startup options (a pooler?); \
                         statement timeouts are now enforced by the client only, \
                         and statements are sent unnamed"
                    );
                }
                Err(e) => return Err(e),
            }
        }
        let pair = pg_config.connect(self.tls.clone()).await?;
        Ok(self.spawn(pair))
    }

    fn spawn<S>(
        &self,
        (client, connection): (
            tokio_postgres::Client,
            tokio_postgres::Connection<tokio_postgres::Socket, S>,
        ),
    ) -> (tokio_postgres::Client, JoinHandle<()>)
    where
        S: tokio_postgres::tls::TlsStream + Unpin + Send + 'static,
    {
        self.shared.opened_total.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(target: "session_pool", "opened connection");
        let task = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(target: "session_pool", error = %e, "connection ended");
            }
        });
        (client, task)
    }
}

/// A setting of our own, sent with the startup options to see whether
/// they were applied.
const OPTIONS_MARKER: &str = "pgsession.startup_options";

/// PgBouncer answers `unsupported startup parameter: options`; others may
/// use 08P01 or 42704 for parameters they do not know.
fn refuses_startup_options(error: &tokio_postgres::Error) -> bool {
    error.as_db_error().is_some_and(|db| {
        let message = db.message().to_ascii_lowercase();
        message.contains("unsupported startup parameter")
            || (message.contains("options") && message.contains("parameter"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes a place if one is free now.
    async fn enter_now(gate: &Arc<Gate>) -> Option<Pass> {
        gate.enter(tokio::time::Instant::now(), Duration::ZERO)
            .await
            .ok()
    }

    #[tokio::test]
    async fn a_lowered_maximum_holds_while_places_are_out() {
        let gate = Arc::new(Gate::new(5));
        let mut out = Vec::new();
        for _ in 0..3 {
            out.push(enter_now(&gate).await.expect("a free place"));
        }
        assert_eq!(gate.lower_to(2), 5);
        assert_eq!(gate.max(), 2);
        assert!(enter_now(&gate).await.is_none(), "3 out, maximum 2");
        out.pop();
        assert!(enter_now(&gate).await.is_none(), "2 out, maximum 2");
        out.pop();
        let again = enter_now(&gate).await.expect("1 out, maximum 2");
        assert!(enter_now(&gate).await.is_none());
        // Growing adds exactly the difference.
        assert!(gate.resize(2, 4));
        let more = [enter_now(&gate).await, enter_now(&gate).await];
        assert!(more.iter().all(Option::is_some));
        assert!(enter_now(&gate).await.is_none(), "4 out, maximum 4");
        drop((again, more, out));
        assert_eq!(gate.permits.available_permits(), 4);
    }

    #[tokio::test]
    async fn growing_pays_what_a_lowering_still_owes() {
        let gate = Arc::new(Gate::new(2));
        let out = [enter_now(&gate).await, enter_now(&gate).await];
        gate.lower_to(1);
        assert!(gate.resize(1, 3));
        let third = enter_now(&gate).await.expect("2 out, maximum 3");
        assert!(enter_now(&gate).await.is_none());
        drop((out, third));
        assert_eq!(gate.permits.available_permits(), 3);
        // A resize from a maximum that moved meanwhile is not applied.
        assert!(!gate.resize(2, 6));
        assert_eq!(gate.lower_to(4), 3, "lowering only lowers");
        assert_eq!(gate.max(), 3);
    }
}
