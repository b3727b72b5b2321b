//! The peer server: the reference server's HTTP contract on axum 0.8 +
//! tower-sessions 0.14 + tower-sessions-sqlx-store 0.15 (`PostgresStore`, a
//! sqlx pool of 5 connections), as a Rust developer would write it today.
//!
//! It runs as `pgsession-bench peer-server` in a process of its own, so that
//! its peak RSS can be read like the reference server's.

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use tower_sessions::{Expiry, Session, SessionManagerLayer};
use tower_sessions_sqlx_store::PostgresStore;

/// `pgsession-bench peer-server`.
#[derive(Debug, clap::Args)]
pub(crate) struct PeerArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:3001")]
    listen: SocketAddr,
    /// PostgreSQL URL.
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// Save the session on every response (tower-sessions' rolling expiry).
    #[arg(long)]
    always_save: bool,
    /// Connections in the sqlx pool.
    #[arg(long, default_value_t = 5)]
    pool_size: u32,
}

/// Runs the peer server until SIGTERM or SIGINT.
pub(crate) async fn serve(args: PeerArgs) -> anyhow::Result<()> {
    let pool = PgPoolOptions::new()
        .max_connections(args.pool_size)
        .connect(&args.database_url)
        .await?;
    let store = PostgresStore::new(pool);
    store.migrate().await?;
    // What tower-sessions' documentation sets up next to the store.
    let deletion = tokio::spawn(
        tower_sessions::ExpiredDeletion::continuously_delete_expired(
            store.clone(),
            Duration::from_secs(60),
        ),
    );
    let sessions = SessionManagerLayer::new(store)
        .with_secure(false)
        .with_same_site(tower_sessions::cookie::SameSite::Lax)
        .with_expiry(Expiry::OnInactivity(time::Duration::days(1)))
        .with_always_save(args.always_save);
    let app = Router::new()
        .route("/login", post(login))
        .route("/me", get(me))
        .route("/counter", get(read_counter).post(count))
        .route("/logout", post(logout))
        .route("/healthz", get(|| async { "ok" }))
        .layer(sessions);
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    deletion.abort();
    Ok(())
}

pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Every session error is a 500, as in a typical application.
type Answer<T> = Result<T, StatusCode>;

fn internal(_: tower_sessions::session::Error) -> StatusCode {
    StatusCode::INTERNAL_SERVER_ERROR
}

#[derive(Deserialize)]
struct Login {
    user: String,
}

/// `POST /login {"user"}`: a new session id (the old row is deleted), `user` stored.
async fn login(session: Session, Json(login): Json<Login>) -> Answer<Json<Value>> {
    session.cycle_id().await.map_err(internal)?;
    session
        .insert("user", &login.user)
        .await
        .map_err(internal)?;
    Ok(Json(json!({ "user": login.user })))
}

/// `GET /me`: the user and views, or 401.
async fn me(session: Session) -> Answer<Json<Value>> {
    let user: Option<String> = session.get("user").await.map_err(internal)?;
    let user = user.ok_or(StatusCode::UNAUTHORIZED)?;
    let views: u64 = session.get("views").await.map_err(internal)?.unwrap_or(0);
    Ok(Json(json!({ "user": user, "views": views })))
}

/// `GET /counter`: the views, without changing the session.
async fn read_counter(session: Session) -> Answer<Json<Value>> {
    let views: u64 = session.get("views").await.map_err(internal)?.unwrap_or(0);
    Ok(Json(json!({ "views": views })))
}

/// `POST /counter`: views + 1.
async fn count(session: Session) -> Answer<Json<Value>> {
    let views: u64 = session.get("views").await.map_err(internal)?.unwrap_or(0) + 1;
    session.insert("views", views).await.map_err(internal)?;
    Ok(Json(json!({ "views": views })))
}

/// `POST /logout`: the session is deleted; 204.
async fn logout(session: Session) -> Answer<StatusCode> {
    session.flush().await.map_err(internal)?;
    Ok(StatusCode::NO_CONTENT)
}
