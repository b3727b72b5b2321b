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
use std::path::Path;
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
mod history;
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
    let given_secrets = given_secrets(args.secret.as_deref())?;

    let listener = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;

    // The recorder first: the store records from its first moment (the
    // start-up health check, the operations' handles), and a metric
    // recorded before a recorder exists is lost.
    metrics::install();
    let backend = open_backend(&args, builder).await?;
    let secrets = match given_secrets {
        Some(secrets) => secrets,
        None => match generated_secrets(&backend, &args.data_dir) {
            Ok(secrets) => secrets,
            Err(e) => {
                let _ = close_backend(backend).await;
                return Err(e);
            }
        },
    };
    let result = serve(listener, addr, &backend, secrets, &args, shutdown).await;
    let closed = close_backend(backend).await;
    result.and(closed)
}

/// The signing secrets of `PGSESSION_SECRET`, checked before anything
/// starts; `None` when it is not set.
fn given_secrets(list: Option<&str>) -> anyhow::Result<Option<Secrets>> {
    match list {
        Some(list) if !list.is_empty() => Secrets::parse_list(list)
            .map(Some)
            .map_err(|e| UsageError::new(format!("PGSESSION_SECRET (--secret): {e}")).into()),
        _ => Ok(None),
    }
}

/// The file, in the data directory, that keeps the secret made when
/// `PGSESSION_SECRET` is not set.
const SECRET_FILE: &str = "secret";

/// The signing secret when `PGSESSION_SECRET` is not set. Sessions kept in
/// PostgreSQL outlive the process, so the secret does too: it is made once
/// and kept in `<data dir>/secret` (mode 0600), and every later start reuses
/// it. The in-memory store loses its sessions at exit anyway: a new secret.
fn generated_secrets(backend: &Backend, data_dir: &Path) -> anyhow::Result<Secrets> {
    let embedded = match backend {
        Backend::Memory(_) => {
            tracing::info!(
                "PGSESSION_SECRET is not set: cookies are signed with a random secret made now \
                 (sessions are in memory and end with this process anyway)"
            );
            return Ok(Secrets::parse_list(&random_secret())?);
        }
        Backend::Postgres { embedded, .. } => embedded.is_some(),
    };
    let path = std::path::absolute(data_dir.join(SECRET_FILE))
        .unwrap_or_else(|_| data_dir.join(SECRET_FILE));
    let (secrets, made) = kept_secret(&path)?;
    let when = if made {
        "made now"
    } else {
        "made by an earlier run"
    };
    if embedded {
        tracing::info!(
            secret_file = %path.display(),
            "PGSESSION_SECRET is not set: cookies are signed with the secret kept in {} ({when}), \
             so sessions survive a restart. Keep that file private, or set PGSESSION_SECRET to \
             choose the secret",
            path.display()
        );
    } else {
        tracing::warn!(
            secret_file = %path.display(),
            "PGSESSION_SECRET is not set: cookies are signed with the secret kept in {} ({when}), \
             which only this machine has. Set the same PGSESSION_SECRET on every server of this \
             database, or a session made by one is refused by the others",
            path.display()
        );
    }
    Ok(secrets)
}

/// The secret kept in `path`, made now (and `true`) when there is none.
/// The file is written whole under another name, then linked into place,
/// so that two servers started together agree on one secret and none reads
/// half a file.
fn kept_secret(path: &Path) -> anyhow::Result<(Secrets, bool)> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};

    let read = |path: &Path| -> anyhow::Result<Option<Secrets>> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "cannot read the signing secret kept in {}",
                    path.display()
                )))
            }
        };
        let mode = std::fs::metadata(path)?.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                secret_file = %path.display(),
                "the signing secret could be read by other users (mode {:o}): made private (0600)",
                mode & 0o777
            );
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("cannot make {} private", path.display()))?;
        }
        let secrets = Secrets::parse_list(text.trim()).map_err(|e| {
            UsageError::new(format!(
                "the signing secret kept in {} is not valid ({e}); remove the file (a new one is                  made, and current sessions end) or set PGSESSION_SECRET",
                path.display()
            ))
        })?;
        Ok(Some(secrets))
    };

    if let Some(secrets) = read(path)? {
        return Ok((secrets, false));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the data directory {}", dir.display()))?;
    let secret = random_secret();
    let temporary = dir.join(format!(".{SECRET_FILE}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&temporary); // left by a crash of a process with our pid
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .and_then(|mut file| {
            file.write_all(format!("{secret}\n").as_bytes())?;
            file.sync_all()
        });
    let linked = written.and_then(|()| std::fs::hard_link(&temporary, path));
    let _ = std::fs::remove_file(&temporary);
    match linked {
        Ok(()) => {
            if let Ok(dir) = std::fs::File::open(dir) {
                let _ = dir.sync_all();
            }
            Ok((Secrets::parse_list(&secret)?, true))
        }
        // Another server made it meanwhile: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => match read(path)? {
            Some(secrets) => Ok((secrets, false)),
            None => anyhow::bail!("{} vanished while it was being made", path.display()),
        },
        Err(e) => Err(anyhow::Error::new(e).context(format!(
            "cannot keep the signing secret in {} (set PGSESSION_SECRET instead)",
            path.display()
        ))),
    }
}

/// A new random secret: two session ids, 64 characters.
fn random_secret() -> String {
    format!("{}{}", SessionId::generate(), SessionId::generate())
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
    let Some(binaries) = embedded::find_binaries() else {
        tracing::warn!(
            "NO DATABASE: DATABASE_URL is not set and no PostgreSQL server binaries were found \
             (initdb and pg_ctl on PATH or in `pg_config --bindir`). Sessions are kept IN MEMORY \
             and END WITH THIS PROCESS. Set DATABASE_URL to keep them."
        );
        return Ok(Backend::Memory(MemoryStore::new()));
    };
    match EmbeddedPostgres::start(&args.data_dir, binaries).await {
        Ok(pg) => {
            let why_there = if pg.relocated() {
                format!(
                    "; running as root, and the `postgres` user that runs it cannot reach {}, \
                     so it lives there, linked from {}",
                    pg.dir().display(),
                    pg.dir().join("data").display()
                )
            } else {
                String::new()
            };
            tracing::info!(
                data_dir = %pg.data_dir().display(),
                port = pg.port(),
                "DATABASE_URL is not set: sessions are stored in an embedded PostgreSQL \
                 (127.0.0.1:{}, data in {}{why_there}), kept across restarts",
                pg.port(),
                pg.data_dir().display()
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
            // The layer takes the store's lifetime and size limit.
            let layer = pgsession::http::SessionLayer::new(store.clone(), secrets);
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
    history::spawn(state.clone(), stop_tasks.clone());
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
