//! `pgsession serve`: the reference web server of the design's contract.
//!
//! It picks where sessions live (the database of `DATABASE_URL`; else an
//! embedded PostgreSQL; else memory, loudly), binds the listener, serves the
//! routes of [`routes`] (health from [`health`], metrics from [`metrics`]),
//! runs the pruner, and on SIGTERM or SIGINT shuts down in order: stop
//! accepting, let requests in flight finish within the grace period, stop
//! the background tasks and close the pool, stop the embedded PostgreSQL,
//! exit 0. A second signal cuts the grace period short.

use std::future::IntoFuture as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use pgsession::cookie::{Secrets, SessionId};
use pgsession::http::CookieSecure;
use pgsession::{ConfigBuilder, MemoryStore, Store};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::args::{CookieSecureArg, ServeArgs};
use crate::embedded::{self, EmbeddedPostgres};
use crate::UsageError;

mod health;
mod metrics;
mod routes;

/// When to stop: the first trigger starts a graceful shutdown, the second
/// ends the grace period at once.
#[derive(Debug, Clone, Default)]
pub(crate) struct Shutdown {
    graceful: CancellationToken,
    immediate: CancellationToken,
}

impl Shutdown {
    /// A shutdown that only [`Shutdown::trigger`] starts.
    pub(crate) fn new() -> Shutdown {
        Shutdown::default()
    }

    /// A shutdown triggered by SIGTERM and SIGINT. Must be called inside the
    /// runtime.
    pub(crate) fn on_signals() -> anyhow::Result<Shutdown> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
        let shutdown = Shutdown::new();
        let trigger = shutdown.clone();
        tokio::spawn(async move {
            loop {
                let name = tokio::select! {
                    _ = term.recv() => "SIGTERM",
                    _ = int.recv() => "SIGINT",
                };
                if trigger.graceful.is_cancelled() {
                    tracing::warn!(
                        signal = name,
                        "second signal: not waiting for requests in flight any longer"
                    );
                } else {
                    tracing::info!(signal = name, "shutting down");
                }
                trigger.trigger();
            }
        });
        Ok(shutdown)
    }

    /// Starts the shutdown, or, when it has started, ends the grace period.
    pub(crate) fn trigger(&self) {
        if self.graceful.is_cancelled() {
            self.immediate.cancel();
        } else {
            self.graceful.cancel();
        }
    }
}

/// Where the sessions of this server live.
#[derive(Debug)]
enum Backend {
    /// A PostgreSQL store, on the database given or on the embedded one.
    Postgres {
        store: Store,
        embedded: Option<EmbeddedPostgres>,
    },
    /// Memory only: sessions end with the process.
    Memory(MemoryStore),
}

/// Which kind of store the server runs on, as `/health` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StoreKind {
    /// The database of `DATABASE_URL`.
    Postgres,
    /// The embedded PostgreSQL.
    Embedded,
    /// The in-memory store.
    Memory,
}

impl StoreKind {
    /// The name in `/health`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            StoreKind::Postgres => "postgres",
            StoreKind::Embedded => "embedded",
            StoreKind::Memory => "memory",
        }
    }
}

/// What the operational routes read: the store (none for memory), its
/// kind, requests in flight.
#[derive(Debug, Clone)]
pub(crate) struct AppState {
    pub(crate) store: Option<Store>,
    pub(crate) kind: StoreKind,
    pub(crate) in_flight: Arc<AtomicUsize>,
}

/// Runs the server until `shutdown` is triggered and everything is stopped.
pub(crate) async fn run(args: ServeArgs, shutdown: Shutdown) -> anyhow::Result<()> {
    // Refuse bad settings before anything is started.
    let builder = args.store.builder()?;
    if args.store.database_url().is_none() {
        builder
            .clone()
            .url("postgres://127.0.0.1/pgsession")
            .build()?;
    }
    let secrets = secrets(args.secret.as_deref())?;

    let listener = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;

    let backend = open_backend(&args, builder).await?;
    let result = serve(listener, addr, &backend, secrets, &args, shutdown).await;
    let closed = close_backend(backend).await;
    result.and(closed)
}

/// The signing secrets: `PGSESSION_SECRET`, or a random one with a warning.
fn secrets(list: Option<&str>) -> anyhow::Result<Secrets> {
    match list {
        Some(list) if !list.is_empty() => Secrets::parse_list(list)
            .map_err(|e| UsageError::new(format!("PGSESSION_SECRET (--secret): {e}")).into()),
        _ => {
            tracing::warn!(
                "PGSESSION_SECRET is not set: cookies are signed with a random secret made now, \
                 so sessions will not survive a restart of this server"
            );
            let random = format!("{}{}", SessionId::generate(), SessionId::generate());
            Ok(Secrets::parse_list(&random)?)
        }
    }
}

/// The database given; else an embedded PostgreSQL; else memory.
async fn open_backend(args: &ServeArgs, builder: ConfigBuilder) -> anyhow::Result<Backend> {
    if args.store.database_url().is_some() {
        let config = builder.build()?;
        tracing::info!(database = %config.target(), "sessions are stored in PostgreSQL");
        let store = Store::new(config).context("cannot create the session store")?;
        return Ok(Backend::Postgres {
            store,
            embedded: None,
        });
    }
    let Some(bindir) = embedded::find_bindir() else {
        tracing::warn!(
            "NO DATABASE: DATABASE_URL is not set and no PostgreSQL server binaries were found \
             (initdb and pg_ctl on PATH or in `pg_config --bindir`). Sessions are kept IN MEMORY \
             and END WITH THIS PROCESS. Set DATABASE_URL to keep them."
        );
        return Ok(Backend::Memory(MemoryStore::new()));
    };
    match EmbeddedPostgres::start(&args.data_dir, &bindir).await {
        Ok(pg) => {
            tracing::info!(
                data_dir = %pg.dir().display(),
                port = pg.port(),
                "DATABASE_URL is not set: sessions are stored in an embedded PostgreSQL \
                 (127.0.0.1:{}, data in {}), kept across restarts",
                pg.port(),
                pg.dir().display()
            );
            let config = builder.url(pg.url()).build()?;
            let store = Store::new(config).context("cannot create the session store")?;
            Ok(Backend::Postgres {
                store,
                embedded: Some(pg),
            })
        }
        Err(e) => {
            tracing::error!(
                error = format!("{e:#}"),
                "cannot start the embedded PostgreSQL"
            );
            tracing::warn!(
                "NO DATABASE: DATABASE_URL is not set and the embedded PostgreSQL did not start. \
                 Sessions are kept IN MEMORY and END WITH THIS PROCESS. Set DATABASE_URL to \
                 keep them."
            );
            Ok(Backend::Memory(MemoryStore::new()))
        }
    }
}

/// Stops the store's background work, closes its pool, stops the embedded
/// PostgreSQL.
async fn close_backend(backend: Backend) -> anyhow::Result<()> {
    match backend {
        Backend::Postgres { store, embedded } => {
            store.close().await;
            tracing::info!(target: "session_store", "session store closed");
            match embedded {
                Some(pg) => pg.stop().await,
                None => Ok(()),
            }
        }
        Backend::Memory(_) => Ok(()),
    }
}

async fn serve(
    listener: TcpListener,
    addr: SocketAddr,
    backend: &Backend,
    secrets: Secrets,
    args: &ServeArgs,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let stop_tasks = CancellationToken::new();
    health::mark_started();
    metrics::spawn_upkeep(stop_tasks.clone());
    let (layer, store, kind) = match backend {
        Backend::Postgres { store, embedded } => {
            store.spawn_pruner();
            let layer = pgsession::http::SessionLayer::new(store.clone(), secrets)
                .with_lifetime(store.config().lifetime())
                .with_max_session_bytes(store.config().max_session_bytes());
            let kind = if embedded.is_some() {
                StoreKind::Embedded
            } else {
                StoreKind::Postgres
            };
            (layer, Some(store.clone()), kind)
        }
        Backend::Memory(memory) => (
            pgsession::http::SessionLayer::new(memory.clone(), secrets),
            None,
            StoreKind::Memory,
        ),
    };
    let layer = session_options(layer, args);
    let state = AppState {
        store,
        kind,
        in_flight: Arc::default(),
    };
    let in_flight = state.in_flight.clone();
    let app = routes::router(state, layer);

    tracing::info!("listening on http://{addr}");
    let server = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.graceful.clone().cancelled_owned())
        .into_future();
    let mut server = tokio::spawn(server);
    let grace = args.shutdown_grace;
    let result = tokio::select! {
        joined = &mut server => joined.context("the HTTP server task failed")?.context("the HTTP server failed"),
        () = grace_period_over(&shutdown, grace, &in_flight) => {
            let left = in_flight.load(Ordering::SeqCst);
            tracing::warn!(
                requests = left,
                "grace period over: dropping the requests still in flight"
            );
            server.abort();
            Ok(())
        }
    };
    stop_tasks.cancel();
    if result.is_ok() {
        tracing::info!("HTTP server stopped");
    }
    result
}

/// Resolves when the grace period after the shutdown signal is over (or a
/// second signal came).
async fn grace_period_over(shutdown: &Shutdown, grace: Duration, in_flight: &AtomicUsize) {
    shutdown.graceful.cancelled().await;
    tracing::info!(
        requests_in_flight = in_flight.load(Ordering::SeqCst),
        grace = ?grace,
        "no longer accepting connections; waiting for requests in flight"
    );
    tokio::select! {
        () = tokio::time::sleep(grace) => {}
        () = shutdown.immediate.cancelled() => {}
    }
}

/// The layer options `serve` takes from its flags.
fn session_options(
    layer: pgsession::http::SessionLayer,
    args: &ServeArgs,
) -> pgsession::http::SessionLayer {
    let secure = match args.cookie_secure {
        CookieSecureArg::Always => CookieSecure::Always,
        CookieSecureArg::Never => CookieSecure::Never,
        CookieSecureArg::Auto => CookieSecure::Auto,
    };
    layer
        .with_cookie_secure(secure)
        .with_rolling(args.rolling)
        .with_max_age(args.max_age)
        .with_touch_step(args.touch_step)
}
