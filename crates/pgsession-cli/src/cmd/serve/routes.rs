//! The routes of `serve`, exactly as the design's contract says:
//!
//! | request | answer |
//! |---|---|
//! | `POST /login` `{"user":"alice"}` | new session id (the old session is destroyed), `user` stored; 200 `{"user":"alice"}`; a missing or bad body: 400 `{"error":..}` |
//! | `GET /me` | 200 `{"user":"alice","views":N}` when logged in, else 401 `{"error":"not logged in"}` |
//! | `POST /counter` | `views` + 1, creating the session if needed; 200 `{"views":N}` |
//! | `GET /counter` | 200 `{"views":N}`, 0 without a session; the session is not changed |
//! | `POST /logout` | the session is destroyed; 204 |
//! | `GET /healthz` | 200 while the process runs |
//! | `GET /readyz` | 200 when the store can serve, else 503 |
//! | `GET /health` | 200, JSON: status, breaker, pool, last check, journal |
//! | `GET /metrics` | Prometheus text |
//! | `GET /history` | JSON: the dashboard's samples of the last 16 minutes, one a second (`?since=MS`: only newer ones) |
//! | `GET /dashboard` | a page that draws `/history` and `/health` live |
//!
//! Only the session routes sit behind the [`SessionLayer`]; the operational
//! ones never touch a session. A session that cannot be read or written
//! answers with the layer's error (503 with `Retry-After` when the store is
//! away).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, RawQuery, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use pgsession::http::{Session, SessionError, SessionLayer};
use serde_json::{json, Value};

use super::{health, history, metrics, AppState};

/// The largest request body accepted (a login is a few bytes).
const MAX_BODY_BYTES: usize = 16 * 1024;
/// The longest user name `/login` accepts.
const MAX_USER_CHARS: usize = 256;

/// The whole application.
pub(crate) fn router(state: AppState, layer: SessionLayer) -> Router {
    let sessions = Router::new()
        .route("/login", post(login))
        .route("/me", get(me))
        .route("/counter", get(get_counter).post(post_counter))
        .route("/logout", post(logout))
        .layer(layer)
        .layer(middleware::from_fn(count_request));
    let operations = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/history", get(history_json))
        .route("/dashboard", get(dashboard))
        .with_state(state.clone());
    sessions
        .merge(operations)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(
            state.in_flight.clone(),
            count_in_flight,
        ))
}

/// A JSON error body with `status`.
fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

async fn login(session: Session, body: Bytes) -> Result<Response, SessionError> {
    let user = match login_user(&body) {
        Ok(user) => user,
        Err(message) => return Ok(error(StatusCode::BAD_REQUEST, &message)),
    };
    session.regenerate().await?;
    session.insert("user", &user).await?;
    Ok(Json(json!({ "user": user })).into_response())
}

/// The `user` of a login body. Any content type is accepted, as long as the
/// body is JSON (so that `curl -d '{"user":"alice"}'` works).
fn login_user(body: &[u8]) -> Result<String, String> {
    const EXPECTED: &str = r#"expected a JSON body such as {"user":"alice"}"#;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(EXPECTED.to_owned());
    }
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("invalid JSON ({e}); {EXPECTED}"))?;
    match value.get("user") {
        Some(Value::String(user))
            if !user.trim().is_empty() && user.chars().count() <= MAX_USER_CHARS =>
        {
            Ok(user.clone())
        }
        Some(_) => Err(format!(
            "\"user\" must be a non-empty string of at most {MAX_USER_CHARS} characters"
        )),
        None => Err(format!("missing \"user\"; {EXPECTED}")),
    }
}

async fn me(session: Session) -> Result<Response, SessionError> {
    let Some(user) = session.get::<String>("user").await? else {
        return Ok(error(StatusCode::UNAUTHORIZED, "not logged in"));
    };
    let views: u64 = session.get("views").await?.unwrap_or(0);
    Ok(Json(json!({ "user": user, "views": views })).into_response())
}

async fn post_counter(session: Session) -> Result<Json<Value>, SessionError> {
    let views: u64 = session.get("views").await?.unwrap_or(0);
    let views = views.saturating_add(1);
    session.insert("views", views).await?;
    Ok(Json(json!({ "views": views })))
}

async fn get_counter(session: Session) -> Result<Json<Value>, SessionError> {
    let views: u64 = session.get("views").await?.unwrap_or(0);
    Ok(Json(json!({ "views": views })))
}

async fn logout(session: Session) -> Result<StatusCode, SessionError> {
    session.destroy().await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AppState>) -> Response {
    if health::is_ready(&state) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the session table could not be checked yet\n",
        )
            .into_response()
    }
}

async fn health(State(state): State<AppState>) -> Response {
    let body = health::health_json(&state);
    ([(header::CACHE_CONTROL, "no-store")], Json(body)).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics::render_metrics(&state),
    )
        .into_response()
}

/// The server's history of the dashboard's figures (see [`history`]),
/// taken by its sampler: answering costs a copy of the ring.
async fn history_json(RawQuery(query): RawQuery) -> Response {
    let since = query.as_deref().and_then(|q| {
        q.split('&')
            .find_map(|pair| pair.strip_prefix("since="))
            .and_then(|ms| ms.parse::<i64>().ok())
    });
    let body = history::history().json(since);
    ([(header::CACHE_CONTROL, "no-store")], Json(body)).into_response()
}

/// The dashboard: one self-contained page (its script and styles inline),
/// which may only talk to this server.
async fn dashboard() -> Response {
    (
        [
            (header::CACHE_CONTROL, "no-cache"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
                 frame-ancestors 'none'",
            ),
        ],
        Html(include_str!("dashboard.html")),
    )
        .into_response()
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "no such route")
}

/// Counts session requests by status class, for `/metrics` and the
/// dashboard.
async fn count_request(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    metrics::count_request(response.status().as_u16());
    response
}

/// Counts requests in flight, for the shutdown log and `/health`.
async fn count_in_flight(
    State(in_flight): State<Arc<AtomicUsize>>,
    request: Request,
    next: Next,
) -> Response {
    struct Guard(Arc<AtomicUsize>);
    impl Drop for Guard {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    in_flight.fetch_add(1, Ordering::SeqCst);
    let _guard = Guard(in_flight);
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_bodies() {
        assert_eq!(login_user(br#"{"user":"alice"}"#).unwrap(), "alice");
        assert_eq!(login_user(br#" {"user":"bob","extra":1} "#).unwrap(), "bob");
        for bad in [
            &b""[..],
            b"  ",
            b"not json",
            b"{}",
            br#"{"user":""}"#,
            br#"{"user":"  "}"#,
            br#"{"user":5}"#,
            br#"{"user":null}"#,
            br#"["alice"]"#,
        ] {
            assert!(login_user(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let long = format!(r#"{{"user":"{}"}}"#, "x".repeat(MAX_USER_CHARS + 1));
        assert!(login_user(long.as_bytes()).is_err());
    }
}
