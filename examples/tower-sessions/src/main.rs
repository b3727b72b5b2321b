//! An axum app on tower-sessions whose sessions live in PostgreSQL through
//! pgsession's tower-sessions adapter: log in, count visits, log out. This
//! file owns the whole example.
//!
//! Run with: DATABASE_URL=postgres://... cargo run -p example-tower-sessions
//!
//! Then, keeping the cookie between requests:
//!
//! ```text
//! curl -c jar -b jar localhost:3000/count
//! curl -c jar -b jar -X POST -H 'content-type: application/json' \
//!      -d '{"user":"alice"}' localhost:3000/login
//! curl -c jar -b jar localhost:3000/
//! curl -c jar -b jar -X POST localhost:3000/logout
//! ```
//!
//! The rows are express-session documents (`sess->>'user'`,
//! `sess->'cookie'->>'expires'`) in connect-pg-simple's table, so a Node
//! service can read them. `PGSESSION_*` variables tune the store, `LISTEN`
//! sets the address (default `127.0.0.1:3000`).

use anyhow::Context as _;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use pgsession::tower_sessions::TowerSessionStore;
use serde::Deserialize;
use tower_sessions::cookie::time::Duration;
use tower_sessions::{Expiry, Session, SessionManagerLayer};

/// The session key holding the logged-in user's name.
const USER: &str = "user";
/// The session key holding the visit counter.
const COUNT: &str = "count";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();

    let config = pgsession::Config::from_env().context("reading the store's configuration")?;
    let store = pgsession::Store::new(config).context("starting the session store")?;
    // Start-up goes on in the background if the database is away; the
    // requests wait for it. Expired rows are deleted every prune interval
    // (`PGSESSION_PRUNE=false` leaves that to a scheduled `pgsession prune`).

    let sessions = SessionManagerLayer::new(TowerSessionStore::new(store.clone()))
        // Plain HTTP for a local try-out; keep the default (true) behind TLS.
        .with_secure(false)
        .with_expiry(Expiry::OnInactivity(Duration::hours(1)));

    let app = Router::new()
        .route("/", get(whoami))
        .route("/count", get(count))
        .route("/login", post(login))
        .route("/logout", post(logout))
        .layer(sessions);

    let addr = std::env::var("LISTEN").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("listening on {addr}"))?;
    tracing::info!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            // If the signal cannot be awaited, shut down rather than hang.
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("serving")?;

    store.close().await;
    Ok(())
}

/// A session failure, as the response says it: no details to the client.
fn internal(error: tower_sessions::session::Error) -> StatusCode {
    tracing::error!(%error, "session error");
    StatusCode::INTERNAL_SERVER_ERROR
}

/// Says who is logged in.
async fn whoami(session: Session) -> Result<String, StatusCode> {
    let user: Option<String> = session.get(USER).await.map_err(internal)?;
    Ok(match user {
        Some(user) => format!("logged in as {user}\n"),
        None => "not logged in\n".to_owned(),
    })
}

/// Counts this session's visits.
async fn count(session: Session) -> Result<String, StatusCode> {
    let n = session
        .get::<u64>(COUNT)
        .await
        .map_err(internal)?
        .unwrap_or(0)
        + 1;
    session.insert(COUNT, n).await.map_err(internal)?;
    Ok(format!("{n}\n"))
}

/// The login form, as JSON.
#[derive(Debug, Deserialize)]
struct Login {
    user: String,
}

/// Logs in anyone who gives a name (it is an example), under a new session
/// id so that an id known before the login is useless after it.
async fn login(session: Session, Json(login): Json<Login>) -> Result<String, StatusCode> {
    let user = login.user.trim();
    if user.is_empty() {
        return Err(StatusCode::UNPROCESSABLE_ENTITY);
    }
    session.cycle_id().await.map_err(internal)?;
    session.insert(USER, user).await.map_err(internal)?;
    Ok(format!("logged in as {user}\n"))
}

/// Ends the session: its row is deleted and the cookie removed.
async fn logout(session: Session) -> Result<StatusCode, StatusCode> {
    session.flush().await.map_err(internal)?;
    Ok(StatusCode::NO_CONTENT)
}
