//! The session table: created when missing, used as is when made by
//! connect-pg-simple, and never named by unchecked text.

use crate::common::*;

/// connect-pg-simple 10's `table.sql`, verbatim.
const CONNECT_PG_SIMPLE_TABLE_SQL: &str = r#"
CREATE TABLE "session" (
  "sid" varchar NOT NULL COLLATE "default",
  "sess" json NOT NULL,
  "expire" timestamp(6) NOT NULL
)
WITH (OIDS=FALSE);

ALTER TABLE "session" ADD CONSTRAINT "session_pkey" PRIMARY KEY ("sid") NOT DEFERRABLE INITIALLY IMMEDIATE;

CREATE INDEX "IDX_session_expire" ON "session" ("expire");
"#;

async fn index_count(db: &pgsession_testkit::TestDb, table: &str) -> i64 {
    scalar(
        db,
        &format!("SELECT count(*) FROM pg_indexes WHERE tablename = '{table}'"),
    )
    .await
}

#[tokio::test]
async fn creates_the_table_and_index() {
    let db = test_db().await;
    let store = store(&db).await;
    let columns: String = scalar(
        &db,
        "SELECT string_agg(column_name || ' ' || data_type, ', ' ORDER BY ordinal_position) \
         FROM information_schema.columns WHERE table_name = 'session_store'",
    )
    .await;
    assert_eq!(
        columns,
        "sid character varying, sess json, expire timestamp without time zone"
    );
    let expire_indexed: bool = scalar(
        &db,
        "SELECT EXISTS (SELECT 1 FROM pg_indexes WHERE tablename = 'session_store' \
         AND indexdef LIKE '%(expire)%')",
    )
    .await;
    assert!(expire_indexed);
    assert_eq!(
        index_count(&db, "session_store").await,
        2,
        "primary key and expire"
    );
    store.close().await;
}

#[tokio::test]
async fn a_table_made_by_connect_pg_simple_is_used_as_is() {
    let db = test_db().await;
    db.client()
        .await
        .unwrap()
        .batch_execute(CONNECT_PG_SIMPLE_TABLE_SQL)
        .await
        .unwrap();
    let store = store_with(config(db.url()).table("session")).await;

    store
        .save("sid", r#"{"cookie":{},"user":"alice"}"#, in_secs(60))
        .await
        .unwrap();
    assert!(store
        .load("sid")
        .await
        .unwrap()
        .unwrap()
        .json
        .contains("alice"));
    // Nothing added to it: still its own two indexes.
    assert_eq!(index_count(&db, "session").await, 2);
    let other_tables: i64 = scalar(
        &db,
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'session'",
    )
    .await;
    assert_eq!(other_tables, 0);
    store.close().await;
}

#[tokio::test]
async fn ten_stores_starting_at_once_all_succeed() {
    let db = test_db().await;
    let url = db.url().to_owned();
    let starts = (0..10).map(|_| {
        let url = url.clone();
        tokio::spawn(async move {
            let store = pgsession::Store::new(config(&url).build().unwrap()).unwrap();
            let ready = store.ready().await;
            let saved = store
                .save(&format!("{:p}", &store), "{}", in_secs(60))
                .await;
            store.close().await;
            (ready, saved)
        })
    });
    for result in futures_join(starts).await {
        let (ready, saved) = result.expect("task");
        ready.expect("every store becomes ready");
        saved.expect("every store can write");
    }
    assert_eq!(index_count(&db, "session_store").await, 2);
}

async fn futures_join<T>(
    handles: impl Iterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<Result<T, tokio::task::JoinError>> {
    let mut results = Vec::new();
    for handle in handles.collect::<Vec<_>>() {
        results.push(handle.await);
    }
    results
}

#[tokio::test]
async fn a_schema_of_its_own_is_created() {
    let db = test_db().await;
    let store = store_with(config(db.url()).schema("auth").table("web_sessions")).await;
    store.save("sid", "{}", in_secs(60)).await.unwrap();
    let rows: i64 = scalar(&db, "SELECT count(*) FROM auth.web_sessions").await;
    assert_eq!(rows, 1);
    store.close().await;
}

#[tokio::test]
async fn injection_in_a_table_name_is_refused() {
    let db = test_db().await;
    for name in [
        "session; DROP TABLE victim",
        "x\" ; DROP TABLE victim; --",
        "a.b",
        "victim--",
    ] {
        let err = config(db.url()).table(name).build().unwrap_err();
        assert!(err.to_string().contains("table"), "{err}");
        let err = config(db.url()).schema(name).build().unwrap_err();
        assert!(err.to_string().contains("schema"), "{err}");
    }
}

#[tokio::test]
async fn a_missing_table_is_an_error_when_creation_is_off() {
    let db = test_db().await;
    let store =
        pgsession::Store::new(config(db.url()).create_table(false).build().unwrap()).unwrap();
    let err = store.ready().await.unwrap_err();
    assert!(err.to_string().contains("create_table"), "{err}");
    store.close().await;
}
