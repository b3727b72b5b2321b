//! The README's "Using the library" section, as a new user copies it: an
//! axum app on `Config` from the environment, `Store::new` and
//! `SessionLayer::new`, nothing else. It honours `PGSESSION_LIFETIME`,
//! prunes expired rows, and keeps sessions across a restart.

use std::time::Duration;

use axum::body::Body;
use axum::{routing::post, Router};
use http::{header, Request, StatusCode};
use pgsession::{
    cookie::Secrets,
    http::{Session, SessionError, SessionLayer},
    Config, Store,
};
use tower::ServiceExt;

use crate::common::*;

// The README's handler, word for word.
async fn count(session: Session) -> Result<String, SessionError> {
    let views = session.get::<u64>("views").await?.unwrap_or(0) + 1;
    session.insert("views", views).await?; // saved before the response leaves
    Ok(views.to_string())
}

/// The README's `app()`, with `Config::from_env()` and
/// `std::env::var("SESSION_SECRET")` read from `env` instead of the
/// process's environment (which tests running side by side share).
fn app(env: &[(&str, &str)]) -> (Router, Store) {
    let store = Store::new(Config::from_vars(env.iter().copied()).unwrap()).unwrap();
    let secret = env.iter().find(|(k, _)| *k == "SESSION_SECRET").unwrap().1;
    let secrets = Secrets::parse_list(secret).unwrap();
    let router = Router::new()
        .route("/count", post(count))
        .layer(SessionLayer::new(store.clone(), secrets));
    (router, store)
}

async fn post_count(app: &Router, cookie: Option<&str>) -> (String, Option<String>) {
    let mut request = Request::post("/count");
    if let Some(cookie) = cookie {
        request = request.header(header::COOKIE, cookie);
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let cookie = response
        .headers()
        .get(header::SET_COOKIE)
        .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_owned());
    let body = axum::body::to_bytes(response.into_body(), 1 << 16)
        .await
        .unwrap();
    (String::from_utf8(body.to_vec()).unwrap(), cookie)
}

#[tokio::test]
async fn the_readme_app_honours_the_lifetime_prunes_and_keeps_sessions_across_a_restart() {
    let db = test_db().await;
    let journal = tempfile::tempdir().unwrap();
    let env = [
        ("DATABASE_URL", db.url()),
        ("PGSESSION_LIFETIME", "2h"),
        ("PGSESSION_PRUNE_INTERVAL", "200ms"),
        ("PGSESSION_JOURNAL_DIR", journal.path().to_str().unwrap()),
        ("SESSION_SECRET", "readme-secret"),
    ];
    let (router, store) = app(&env);
    store.wait_ready().await.unwrap();

    // PGSESSION_LIFETIME reaches the row's expiry (the default is a day).
    let (views, cookie) = post_count(&router, None).await;
    assert_eq!(views, "1");
    let cookie = cookie.expect("a session cookie");
    let lives: f64 = scalar(
        &db,
        "SELECT extract(epoch FROM expire - (now() AT TIME ZONE 'UTC'))::float8 FROM session_store",
    )
    .await;
    assert!(
        (7000.0..=7202.0).contains(&lives),
        "the row lives {lives} s, not PGSESSION_LIFETIME's 2 h"
    );

    // Expired rows are pruned without the app asking for it.
    db.client()
        .await
        .unwrap()
        .batch_execute(
            "INSERT INTO session_store (sid, sess, expire) \
             VALUES ('expired', '{}', (now() AT TIME ZONE 'UTC') - interval '1 minute')",
        )
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while scalar::<i64>(
        &db,
        "SELECT count(*) FROM session_store WHERE sid = 'expired'",
    )
    .await
        > 0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the expired row was never pruned"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A restart: a new store and layer on the same settings keep the session.
    store.close().await;
    let (router, store) = app(&env);
    let (views, _) = post_count(&router, Some(&cookie)).await;
    assert_eq!(views, "2", "the session survived the restart");
    store.close().await;
}
