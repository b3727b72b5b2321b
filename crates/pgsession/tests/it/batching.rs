//! Concurrent loads and saves are combined into one statement when they
//! queue, with the same results as one statement each.

use pgsession_testkit::{ClusterOptions, TestCluster};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_operations_share_statements_and_keep_their_own_results() {
    let cluster = TestCluster::start_with(ClusterOptions {
        log_statements: true,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("no throwaway PostgreSQL: {e}"));
    cluster.create_database("batching").await.unwrap();
    let url = cluster.url("batching");
    // One connection: every concurrent caller queues behind it.
    let store = store_with(config(&url).pool_size(1).pool_max_size(1)).await;

    let saves = (0..64).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            // Sessions 0..8 are written twice: the later write must win.
            let sid = format!("sid-{}", i % 56);
            let json = format!(r#"{{"n":{i}}}"#);
            store
                .save(&sid, &json, in_secs(60))
                .await
                .map(|()| (sid, i))
        })
    });
    for save in saves.collect::<Vec<_>>() {
        save.await.unwrap().expect("every save succeeds");
    }
    let loads = (0..56).map(|i| {
        let store = store.clone();
        tokio::spawn(async move { (i, store.load(&format!("sid-{i}")).await) })
    });
    for load in loads.collect::<Vec<_>>() {
        let (i, loaded) = load.await.unwrap();
        let json = loaded.expect("load succeeds").expect("saved session").json;
        let n: i64 = serde_json::from_str::<serde_json::Value>(&json).unwrap()["n"]
            .as_i64()
            .unwrap();
        // A session written twice holds one of its two writes (concurrent
        // writes have no order), never another session's.
        assert_eq!(n % 56, i as i64, "sid-{i} holds {json}");
    }
    assert!(store.load("sid-missing").await.unwrap().is_none());
    assert_eq!(store.count().await.unwrap(), 56);

    let log = cluster.read_log().unwrap();
    let batched_saves = log
        .lines()
        .filter(|l| l.contains("execute") && l.contains("unnest("))
        .count();
    let batched_loads = log
        .lines()
        .filter(|l| l.contains("execute") && l.contains("= ANY($1)"))
        .count();
    assert!(batched_saves > 0, "concurrent saves were combined");
    assert!(batched_loads > 0, "concurrent loads were combined");
    let statements = log
        .lines()
        .filter(|l| l.contains("execute") && l.contains("session_store"))
        .count();
    assert!(
        statements < 64 + 56,
        "fewer statements than operations: {statements}"
    );
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_loaded_by_many_callers_at_once_reaches_each_of_them() {
    let db = test_db().await;
    // One connection: the concurrent loads queue and share statements.
    let store = store_with(config(db.url()).pool_size(1).pool_max_size(1)).await;
    store
        .save("shared", r#"{"n":1}"#, in_secs(60))
        .await
        .unwrap();
    let loads = (0..40).map(|i| {
        let store = store.clone();
        let sid = if i % 2 == 0 { "shared" } else { "missing" };
        tokio::spawn(async move { (sid, store.load(sid).await) })
    });
    for load in loads.collect::<Vec<_>>() {
        let (sid, loaded) = load.await.unwrap();
        let loaded = loaded.expect("load succeeds");
        match sid {
            "shared" => assert_eq!(loaded.expect("saved session").json, r#"{"n":1}"#),
            _ => assert!(loaded.is_none(), "{loaded:?}"),
        }
    }
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_session_over_the_limit_is_no_session_batched_or_not() {
    let db = test_db().await;
    let store = store_with(
        config(db.url())
            .max_session_bytes(1024)
            .pool_size(1)
            .pool_max_size(1),
    )
    .await;
    store
        .save("small", r#"{"n":1}"#, in_secs(60))
        .await
        .unwrap();
    // Written by another program: this store refuses to save it.
    let big = format!(r#"{{"blob":"{}"}}"#, "x".repeat(2000));
    db.client()
        .await
        .unwrap()
        .execute(
            "INSERT INTO session_store (sid, sess, expire) \
             VALUES ('big', $1::text::json, (now() AT TIME ZONE 'UTC') + interval '1 hour')",
            &[&big],
        )
        .await
        .unwrap();

    assert!(store.load("big").await.unwrap().is_none(), "alone");
    let loads = (0..40).map(|i| {
        let store = store.clone();
        let sid = if i % 2 == 0 { "big" } else { "small" };
        tokio::spawn(async move { (sid, store.load(sid).await) })
    });
    for load in loads.collect::<Vec<_>>() {
        let (sid, loaded) = load.await.unwrap();
        let loaded = loaded.expect("load succeeds");
        match sid {
            "big" => assert!(loaded.is_none(), "batched: {loaded:?}"),
            _ => assert_eq!(loaded.expect("saved session").json, r#"{"n":1}"#),
        }
    }
    store.close().await;
}
