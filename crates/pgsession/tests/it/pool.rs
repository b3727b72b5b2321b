//! The dedicated pool: connections replaced after their maximum uses, idle
//! ones closed, a warm minimum, the session settings, and the query timeout.

use std::time::Duration;

use crate::common::*;

async fn backends(db: &pgsession_testkit::TestDb, app: &str) -> i64 {
    let client = db.client().await.unwrap();
    client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .await
        .unwrap()
        .get(0)
}

async fn wait_for(what: &str, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_connection_is_replaced_after_its_maximum_uses() {
    let db = test_db().await;
    let url = format!("{}?application_name=maxuses", db.url());
    let store = store_with(config(&url).pool_size(1).min_idle(0).max_uses(3)).await;
    let mut uses = std::collections::HashMap::new();
    for _ in 0..12 {
        let pid = store.server_info().await.unwrap().backend_pid;
        *uses.entry(pid).or_insert(0) += 1;
    }
    // Background work (start-up, checks) may take uses too: no connection
    // ever serves more than three, so twelve take at least four.
    assert!(uses.values().all(|&n| n <= 3), "{uses:?}");
    assert!(uses.len() >= 4, "{uses:?}");
    assert!(store.pool_status().opened_total >= 4);
    assert!(
        backends(&db, "maxuses").await <= 1,
        "replaced connections are closed"
    );
    store.close().await;
}

#[tokio::test]
async fn idle_connections_are_closed_down_to_the_warm_minimum() {
    let db = test_db().await;
    let url = format!("{}?application_name=idler", db.url());
    let store = store_with(
        config(&url)
            .pool_size(4)
            .min_idle(1)
            .idle_timeout(Duration::from_millis(300)),
    )
    .await;
    // Four concurrent operations open four connections. (Counts: concurrent
    // loads would share one batched statement, and so one connection.)
    let counts = (0..4).map(|_| store.count());
    let busy = futures_util::future::join_all(counts.map(|f| async {
        tokio::time::sleep(Duration::from_millis(1)).await;
        f.await
    }));
    let db_client = db.client().await.unwrap();
    // Hold a lock so the four loads wait on the server together.
    db_client
        .batch_execute("BEGIN; LOCK TABLE session_store IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let release = async {
        wait_for("four busy connections", async || {
            backends(&db, "idler").await == 4
        })
        .await;
        db_client.batch_execute("COMMIT").await.unwrap();
    };
    let (results, ()) = tokio::join!(busy, release);
    assert!(results.iter().all(|r| r.is_ok()));
    assert_eq!(store.pool_status().size, 4);

    wait_for("idle connections to close", async || {
        store.pool_status().size == 1
    })
    .await;
    wait_for("the server to see one connection", async || {
        backends(&db, "idler").await == 1
    })
    .await;
    store.close().await;
}

#[tokio::test]
async fn the_warm_minimum_is_opened_without_traffic() {
    let db = test_db().await;
    let url = format!("{}?application_name=warm", db.url());
    let store = store_with(config(&url).pool_size(5).min_idle(3)).await;
    wait_for("three warm connections", async || {
        store.pool_status().size >= 3
    })
    .await;
    wait_for("the server to see them", async || {
        backends(&db, "warm").await >= 3
    })
    .await;
    store.close().await;
}

#[tokio::test]
async fn connections_use_utc_and_the_statement_timeout() {
    let db = test_db().await;
    let store = store_with(config(db.url()).statement_timeout(Duration::from_secs(7))).await;
    let info = store.server_info().await.unwrap();
    assert_eq!(info.time_zone, "UTC");
    assert_eq!(info.statement_timeout, "7s");
    assert!(info.version.starts_with("PostgreSQL"), "{}", info.version);
    assert!(store.server_statement_timeout());
    store.close().await;
}

#[tokio::test]
async fn a_query_past_the_timeout_is_cancelled_on_the_server() {
    let db = test_db().await;
    let url = format!("{}?application_name=slow", db.url());
    let store = store_with(config(&url).query_timeout(Duration::from_secs(1))).await;
    let locker = db.client().await.unwrap();
    locker
        .batch_execute("BEGIN; LOCK TABLE session_store IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();

    let err = store.load("sid").await.unwrap_err();
    assert!(
        matches!(err, pgsession::Error::QueryTimeout { .. }),
        "{err}"
    );
    // The server no longer runs the abandoned statement.
    // Watched from a connection of its own: inside the locker's transaction
    // pg_stat_activity would show one snapshot for ever.
    let watcher = db.client().await.unwrap();
    wait_for("the query to be cancelled", async || {
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'slow' AND state = 'active'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        waiting == 0
    })
    .await;
    locker.batch_execute("COMMIT").await.unwrap();
    store
        .save("sid", "{}", in_secs(60))
        .await
        .expect("works again once the lock is gone");
    store.close().await;
}

#[tokio::test]
async fn the_pool_grows_while_callers_wait_and_shrinks_when_idle() {
    let db = test_db().await;
    let store = store_with(
        config(db.url())
            .pool_size(2)
            .pool_max_size(6)
            .idle_timeout(Duration::from_secs(1))
            .query_timeout(Duration::from_secs(30)),
    )
    .await;
    let locker = db.client().await.unwrap();
    locker
        .batch_execute("BEGIN; LOCK TABLE session_store IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    // Ten counts queue behind the lock: two hold connections, the rest wait.
    // (Concurrent loads would share one batched statement and connection.)
    let counts: Vec<_> = (0..10)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.count().await })
        })
        .collect();
    wait_for("the pool to grow to its ceiling", async || {
        store.pool_status().max == 6
    })
    .await;
    locker.batch_execute("COMMIT").await.unwrap();
    for count in counts {
        count
            .await
            .unwrap()
            .expect("every count completes once the lock is gone");
    }
    wait_for("the pool to shrink back", async || {
        store.pool_status().max == 2
    })
    .await;
    let events: Vec<_> = store
        .recent_events()
        .into_iter()
        .filter(|e| e.kind == "pool_resized")
        .collect();
    assert!(events.len() >= 3, "two steps up and one down: {events:?}");
    assert!(
        events
            .last()
            .unwrap()
            .message
            .contains("shrunk from 6 to 2"),
        "{events:?}"
    );
    store.close().await;
}

/// A server that closes idle sessions (`idle_session_timeout`, as serverless
/// databases do) is an expected event: requests after each close succeed,
/// and no WARN is logged for it (deadpool's own recycle check would log
/// one per closed connection).
#[tokio::test]
async fn connections_the_server_closed_while_idle_are_replaced_without_a_warning() {
    let (capture, _guard) = crate::security::Capture::start();
    let db = test_db().await;
    let admin = db.client().await.expect("admin connection");
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{}\" SET idle_session_timeout = '300ms'",
            db.name()
        ))
        .await
        .expect("set idle_session_timeout");
    // No warm minimum: nothing reopens a connection behind the test's back.
    let store = store_with(config(db.url()).min_idle(0)).await;
    let opened_before = store.pool_status().opened_total;
    for round in 0..4 {
        store
            .save("sid", &format!("{{\"round\":{round}}}"), in_secs(60))
            .await
            .expect("a save after the server closed the idle connection");
        // Idle past the server's timeout: wait until it has closed them.
        wait_for("the server to close the idle connections", async || {
            backends(&db, "pgsession").await == 0
        })
        .await;
    }
    assert!(
        store.pool_status().opened_total >= opened_before + 3,
        "the server's closes were not seen: {:?}",
        store.pool_status()
    );
    let warnings: Vec<String> = capture
        .text()
        .lines()
        .filter(|l| l.contains(" WARN "))
        .map(str::to_owned)
        .collect();
    assert!(warnings.is_empty(), "{warnings:#?}");
    store.close().await;
}
