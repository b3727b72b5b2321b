//! An axum application keeping its sessions in PostgreSQL with pgsession.
//!
//! Run with:
//!
//! ```text
//! DATABASE_URL=postgres://localhost/app SESSION_SECRET=change-me cargo run -p example-axum
//! curl -c jar -b jar -X POST localhost:8080/login -H 'content-type: application/json' -d '{"user":"alice"}'
//! curl -c jar -b jar -X POST localhost:8080/counter
//! ```
//!
//! Its cookie and rows are express-session's: point an Express app with
//! connect-pg-simple at the same table (`session_store`) and secret, and
//! both see the same sessions (see `interop/node/server.js`).

use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use pgsession::cookie::Secrets;
use pgsession::http::{CookieSecure, Session, SessionError, SessionLayer};
use pgsession::{Config, Store};
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Deserialize)]
struct Login {
    user: String,
}

async fn login(session: Session, Json(login): Json<Login>) -> Result<Json<Value>, SessionError> {
    // A new id at login, the old session deleted: no session fixation.
    session.regenerate().await?;
    session.insert("user", &login.user).await?;
    Ok(Json(json!({ "user": login.user })))
}

async fn counter(session: Session) -> Result<Json<Value>, SessionError> {
    let views = session.get::<u64>("views").await?.unwrap_or(0) + 1;
    session.insert("views", views).await?;
    Ok(Json(json!({ "views": views })))
}

async fn logout(session: Session) -> Result<StatusCode, SessionError> {
    session.destroy().await?;
    Ok(StatusCode::NO_CONTENT)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().init();
    let store = Store::new(Config::from_env()?)?;
    let secrets = Secrets::parse_list(&std::env::var("SESSION_SECRET")?)?;
    let sessions = SessionLayer::new(store.clone(), secrets)
        // Plain HTTP on localhost; keep the default (Secure) behind HTTPS.
        .with_cookie_secure(CookieSecure::Never);
    let app = Router::new()
        .route("/login", post(login))
        .route("/counter", post(counter))
        .route("/logout", post(logout))
        .layer(sessions);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
    axum::serve(listener, app).await?;
    store.close().await;
    Ok(())
}
