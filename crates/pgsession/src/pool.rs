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

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{
    Connect, Hook, HookError, Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime,
    Timeouts,
};
use tokio::task::JoinHandle;
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
}

impl Shared {
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
        let shared = Arc::new(Shared {
            startup_options: AtomicBool::new(config.pooler() == PoolerMode::Direct),
            pooled: AtomicBool::new(config.pooler() == PoolerMode::Transaction),
            ..Shared::default()
        });
        let mut options = config
            .postgres()
            .get_options()
            .unwrap_or_default()
            .to_owned();
        options.push_str(&format!(
            " -c TimeZone=UTC -c statement_timeout={} -c {OPTIONS_MARKER}=on",
            config.statement_timeout().as_millis()
        ));
        let connector = SessionConnector {
            tls: tls.clone(),
            shared: shared.clone(),
            options: options.trim().to_owned(),
            hosts: config.per_host.clone(),
            connect_timeout: config.connect_timeout(),
        };
        let manager = Manager::from_connect(
            config.postgres().clone(),
            connector,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let max_uses = config.max_uses();
        let pool = Pool::builder(manager)
            .max_size(config.pool_size())
            .runtime(Runtime::Tokio1)
            .timeouts(Timeouts {
                wait: Some(config.acquire_timeout()),
                // Each host of a multi-host URL gets the connect timeout.
                create: Some(config.connect_budget()),
                recycle: Some(Duration::from_secs(5)),
            })
            .pre_recycle(Hook::sync_fn(move |_, metrics| {
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
            min_idle: config.min_idle(),
            idle_timeout: config.idle_timeout(),
            acquire_timeout: config.acquire_timeout(),
            connect_timeout: config.connect_timeout(),
        })
    }

    /// Takes a connection, waiting at most the acquire timeout for a free
    /// slot and the connect timeout for a new connection.
    pub(crate) async fn checkout(&self) -> Result<Checkout, Error> {
        let started = std::time::Instant::now();
        let got = self.pool.get().await;
        metrics::histogram!("pgsession_pool_acquire_seconds").record(started.elapsed());
        match got {
            Ok(conn) => Ok(Checkout {
                conn: Some(conn),
                tls: self.tls.clone(),
                unnamed: self.is_pooled(),
            }),
            Err(e) => Err(match Error::from(e) {
                Error::AcquireTimeout(_) => Error::AcquireTimeout(self.acquire_timeout),
                Error::ConnectTimeout(_) => Error::ConnectTimeout(self.connect_timeout),
                other => other,
            }),
        }
    }

    /// The pool's figures now.
    pub(crate) fn status(&self) -> PoolStatus {
        let s = self.pool.status();
        PoolStatus {
            size: s.size,
            idle: s.available,
            in_use: s.size.saturating_sub(s.available),
            waiting: s.waiting,
            max: s.max_size,
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

    /// Changes the maximum size (the self-sizing pool).
    pub(crate) fn resize(&self, max: usize) {
        self.pool.resize(max);
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
        if self.pool.status().size < self.min_idle
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

    async fn warm(&self) -> Result<(), Error> {
        let mut held = Vec::new();
        while self.pool.status().size < self.min_idle && held.len() < self.min_idle {
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
        self.pool.close();
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

/// Opens connections for the pool.
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
