//! Every operation against a real table.

use crate::common::*;

#[tokio::test]
async fn save_load_touch_destroy_round_trip() {
    let db = test_db().await;
    let store = store(&db).await;

    assert_eq!(store.load("nobody").await.unwrap(), None);

    let json = r#"{"cookie":{"originalMaxAge":null,"path":"/"},"user":"alice"}"#;
    store.save("sid-1", json, in_secs(3600)).await.unwrap();
    let loaded = store
        .load("sid-1")
        .await
        .unwrap()
        .expect("saved session loads");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&loaded.json).unwrap()["user"],
        "alice"
    );
    assert!((loaded.expire - in_secs(3600)).abs() < time::Duration::seconds(5));

    // Save again: an upsert, not a second row.
    store
        .save("sid-1", r#"{"user":"bob"}"#, in_secs(3600))
        .await
        .unwrap();
    assert!(store
        .load("sid-1")
        .await
        .unwrap()
        .unwrap()
        .json
        .contains("bob"));
    assert_eq!(store.count().await.unwrap(), 1);

    assert!(store.touch("sid-1", in_secs(7200)).await.unwrap());
    assert!(!store.touch("missing", in_secs(7200)).await.unwrap());

    store.destroy("sid-1").await.unwrap();
    store.destroy("sid-1").await.unwrap(); // twice is fine
    assert_eq!(store.load("sid-1").await.unwrap(), None);
    assert_eq!(store.count().await.unwrap(), 0);
    store.close().await;
}

#[tokio::test]
async fn expired_sessions_do_not_load_or_count() {
    let db = test_db().await;
    let store = store(&db).await;
    store.save("old", r#"{"n":1}"#, in_secs(-1)).await.unwrap();
    store.save("new", r#"{"n":2}"#, in_secs(60)).await.unwrap();
    assert_eq!(store.load("old").await.unwrap(), None);
    assert!(store.load("new").await.unwrap().is_some());
    assert_eq!(store.count().await.unwrap(), 1);
    assert_eq!(store.count_expired().await.unwrap(), 1);
    // A touch brings an expired row back.
    assert!(store.touch("old", in_secs(60)).await.unwrap());
    assert!(store.load("old").await.unwrap().is_some());
    store.close().await;
}

#[tokio::test]
async fn touch_changes_only_expire() {
    let db = test_db().await;
    let store = store(&db).await;
    let json = r#"{"cookie":{"path":"/"},"views":3}"#;
    store.save("sid", json, in_secs(60)).await.unwrap();
    let before: String = scalar(
        &db,
        "SELECT sess::text FROM session_store WHERE sid = 'sid'",
    )
    .await;
    let expire_before: f64 = scalar(
        &db,
        "SELECT extract(epoch FROM expire)::float8 FROM session_store",
    )
    .await;

    store.touch("sid", in_secs(86_400)).await.unwrap();

    let after: String = scalar(
        &db,
        "SELECT sess::text FROM session_store WHERE sid = 'sid'",
    )
    .await;
    let expire_after: f64 = scalar(
        &db,
        "SELECT extract(epoch FROM expire)::float8 FROM session_store",
    )
    .await;
    assert_eq!(
        before, after,
        "the document must be untouched, byte for byte"
    );
    assert!(
        expire_after - expire_before > 86_000.0,
        "{expire_before} -> {expire_after}"
    );
    store.close().await;
}

#[tokio::test]
async fn expire_is_stored_in_utc() {
    let db = test_db().await;
    let store = store(&db).await;
    let at = time::macros::datetime!(2030-01-02 03:04:05.678 +02:00);
    store.save("sid", "{}", at).await.unwrap();
    let stored: String = scalar(
        &db,
        "SELECT to_char(expire, 'YYYY-MM-DD HH24:MI:SS.MS') FROM session_store",
    )
    .await;
    assert_eq!(stored, "2030-01-02 01:04:05.678");
    store.close().await;
}

#[tokio::test]
async fn clear_removes_everything() {
    let db = test_db().await;
    let store = store(&db).await;
    for i in 0..5 {
        store
            .save(&format!("s{i}"), "{}", in_secs(60))
            .await
            .unwrap();
    }
    assert_eq!(store.clear().await.unwrap(), 5);
    assert_eq!(store.count().await.unwrap(), 0);
    store.close().await;
}

#[tokio::test]
async fn oversized_sessions_are_refused_before_reaching_the_database() {
    let db = test_db().await;
    let store = store_with(config(db.url()).max_session_bytes(1024)).await;
    let big = format!(r#"{{"blob":"{}"}}"#, "x".repeat(2000));
    let err = store.save("big", &big, in_secs(60)).await.unwrap_err();
    assert!(
        matches!(err, pgsession::Error::TooLarge { limit: 1024, .. }),
        "{err}"
    );
    assert!(!err.is_transient());
    assert_eq!(store.count().await.unwrap(), 0);
    store.close().await;
}

#[tokio::test]
async fn permanent_errors_are_not_retried() {
    let db = test_db().await;
    let store = store(&db).await;
    // Not JSON: the server refuses the cast; retrying cannot help. Had it
    // been retried, the error would be the deadline's, not the server's.
    let err = store
        .save("bad", "{not json", in_secs(60))
        .await
        .unwrap_err();
    assert_eq!(err.sql_state(), Some("22P02"), "{err}");
    assert!(!err.is_transient());
    // The connection is still good for the next operation.
    store.save("good", "{}", in_secs(60)).await.unwrap();
    store.close().await;
}

#[tokio::test]
async fn closed_store_refuses_operations() {
    let db = test_db().await;
    let store = store(&db).await;
    store.close().await;
    let err = store.load("x").await.unwrap_err();
    assert!(matches!(err, pgsession::Error::StoreClosed), "{err}");
}
