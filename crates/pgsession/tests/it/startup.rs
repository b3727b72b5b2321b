//! Start-up when the database is away: the store starts, is not ready,
//! and the first operation that reaches the database creates the table.

use std::time::Duration;

use crate::common::*;

#[tokio::test]
async fn a_store_started_while_the_database_is_stopped_starts_anyway() {
    let db = throwaway_db().await;
    let cluster = db.cluster().expect("throwaway cluster").clone();
    cluster.stop().await.unwrap();

    // Background retries far apart, so that the operation below is what
    // reaches the database first.
    let store = pgsession::Store::new(
        config(db.url())
            .startup_retries(0)
            .startup_backoff(Duration::from_secs(3600))
            .query_timeout(Duration::from_secs(2))
            .build()
            .unwrap(),
    )
    .expect("starts without a database");
    assert!(!store.is_ready());
    let err = store.load("sid").await.unwrap_err();
    assert!(
        err.is_transient(),
        "a stopped database is a transient failure: {err}"
    );
    assert!(
        !store.is_ready(),
        "a failure is not remembered as readiness"
    );

    cluster.start_again().await.unwrap();
    let table_before: bool = scalar(
        &db,
        "SELECT to_regclass('public.session_store') IS NOT NULL",
    )
    .await;
    assert!(!table_before);

    store
        .save("sid", r#"{"user":"alice"}"#, in_secs(60))
        .await
        .expect("first operation after the database is back");
    // The failures above opened the breaker, so the save may have gone to
    // the journal; either way it reaches the database, creating the table.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let table: bool = scalar(
            &db,
            "SELECT to_regclass('public.session_store') IS NOT NULL",
        )
        .await;
        let stored = table
            && scalar::<bool>(
                &db,
                "SELECT EXISTS (SELECT 1 FROM session_store WHERE sid = 'sid')",
            )
            .await;
        if stored {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the save never reached the database"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(store.is_ready());
    assert!(store.load("sid").await.unwrap().is_some());
    store.close().await;
}

#[tokio::test]
async fn the_background_start_up_finishes_once_the_database_is_up() {
    let db = throwaway_db().await;
    let cluster = db.cluster().expect("throwaway cluster").clone();
    cluster.stop().await.unwrap();
    let store = pgsession::Store::new(
        config(db.url())
            .startup_backoff(Duration::from_millis(200))
            .startup_retries(1)
            .build()
            .unwrap(),
    )
    .unwrap();
    // The start-up sequence (a first attempt and one retry) ends while the
    // database is stopped; the store keeps trying in the background.
    let err = store.wait_ready().await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(!store.is_ready());
    cluster.start_again().await.unwrap();
    // No operation: the background retries alone must create the table.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !store.is_ready() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "store never became ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let table: bool = scalar(
        &db,
        "SELECT to_regclass('public.session_store') IS NOT NULL",
    )
    .await;
    assert!(table);
    store.close().await;
}

#[tokio::test]
async fn operations_survive_a_database_restart() {
    let db = throwaway_db().await;
    let cluster = db.cluster().unwrap().clone();
    let store = store(&db).await;
    store.save("sid", r#"{"n":1}"#, in_secs(60)).await.unwrap();
    cluster.restart().await.unwrap();
    // The pooled connection is dead; the operation retries on a new one.
    assert!(store.load("sid").await.unwrap().is_some());
    store.close().await;
}
