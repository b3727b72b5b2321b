//! The HTTP layer on a real PostgreSQL: what reaches the server.

use axum::body::Body;
use axum::routing::get;
use axum::Router;
use http::{header, Request, StatusCode};
use pgsession::cookie::Secrets;
use pgsession::http::{Session, SessionError, SessionLayer};
use pgsession_testkit::{ClusterOptions, TestCluster};
use tower::ServiceExt;

use crate::common::*;

async fn counter(session: Session) -> Result<String, SessionError> {
    Ok(session.get::<u64>("views").await?.unwrap_or(0).to_string())
}

async fn increment(session: Session) -> Result<String, SessionError> {
    let views = session.get::<u64>("views").await?.unwrap_or(0) + 1;
    session.insert("views", views).await?;
    Ok(views.to_string())
}

/// Statements logged by the server between two markers.
fn statements_between(log: &str, begin: &str, end: &str) -> Vec<String> {
    let start = log.find(begin).expect("begin marker logged");
    let stop = log[start..].find(end).expect("end marker logged") + start;
    // Back to the start of the end marker's line.
    let stop = log[..stop].rfind('\n').unwrap_or(stop);
    log[start..stop]
        .lines()
        .filter_map(|line| line.split_once("LOG:  ").map(|(_, rest)| rest.to_owned()))
        .filter(|s| s.starts_with("execute") || s.starts_with("statement:"))
        .filter(|s| !s.contains("marker-"))
        .collect()
}

#[tokio::test]
async fn reads_of_an_unchanged_session_inside_the_touch_step_cost_one_select_each() {
    let cluster = TestCluster::start_with(ClusterOptions {
        log_statements: true,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("no throwaway PostgreSQL: {e}"));
    cluster.create_database("reads").await.unwrap();
    let url = cluster.url("reads");
    let store = store_with(config(&url)).await;
    let app = Router::new()
        .route("/counter", get(counter).post(increment))
        .layer(SessionLayer::new(
            store.clone(),
            Secrets::new(["s3cret"]).unwrap(),
        ));

    let created = app
        .clone()
        .oneshot(Request::post("/counter").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::OK);
    let set_cookie = created.headers()[header::SET_COOKIE].to_str().unwrap();
    let cookie = set_cookie.split(';').next().unwrap().to_owned();

    let marker = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(marker.1);
    let marker = marker.0;
    marker
        .simple_query("SELECT 'marker-reads-begin'")
        .await
        .unwrap();
    const READS: usize = 10;
    for _ in 0..READS {
        let response = app
            .clone()
            .oneshot(
                Request::get("/counter")
                    .header(header::COOKIE, &cookie)
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert!(response.headers().get(header::SET_COOKIE).is_none());
    }
    marker
        .simple_query("SELECT 'marker-reads-end'")
        .await
        .unwrap();

    let log = cluster.read_log().unwrap();
    let statements = statements_between(&log, "marker-reads-begin", "marker-reads-end");
    let selects = statements
        .iter()
        .filter(|s| s.contains("SELECT sess"))
        .count();
    let writes: Vec<_> = statements
        .iter()
        .filter(|s| ["INSERT", "UPDATE", "DELETE"].iter().any(|w| s.contains(w)))
        .collect();
    assert_eq!(selects, READS, "{statements:#?}");
    assert!(writes.is_empty(), "reads must not write: {writes:#?}");
    // The store's background work (the pool's headroom check, health
    // pings) may fall between the markers; the requests sent nothing else.
    let background = ["current_setting('max_connections')", "SELECT 1"];
    let others: Vec<_> = statements
        .iter()
        .filter(|s| !s.contains("SELECT sess") && !background.iter().any(|b| s.contains(b)))
        .collect();
    assert!(others.is_empty(), "nothing else either: {statements:#?}");
    store.close().await;
}
