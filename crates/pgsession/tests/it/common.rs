//! Shared helpers: a store on a fresh database, with test-friendly timings.

use std::time::Duration;

use pgsession::{Config, ConfigBuilder, Store};
use pgsession_testkit::TestDb;
use time::OffsetDateTime;

/// A fresh database; panics with the test kit's message when none can be had.
pub(crate) async fn test_db() -> TestDb {
    TestDb::new()
        .await
        .unwrap_or_else(|e| panic!("no test database: {e}"))
}

/// A throwaway cluster (for tests that stop or restart it).
pub(crate) async fn throwaway_db() -> TestDb {
    TestDb::throwaway()
        .await
        .unwrap_or_else(|e| panic!("no throwaway PostgreSQL: {e}"))
}

/// A builder on `url` with short timings, so failures show quickly.
pub(crate) fn config(url: &str) -> ConfigBuilder {
    Config::builder()
        .url(url)
        .connect_timeout(Duration::from_secs(5))
        .query_timeout(Duration::from_secs(10))
        .startup_backoff(Duration::from_millis(100))
        // Each store its own spool directory: a journal spooled by one test
        // must not be written back into another test's database.
        .journal_dir(tempfile::tempdir().expect("temp dir").keep())
}

/// A ready store on `db`.
pub(crate) async fn store(db: &TestDb) -> Store {
    store_with(config(db.url())).await
}

/// A ready store from `builder`.
pub(crate) async fn store_with(builder: ConfigBuilder) -> Store {
    let store = Store::new(builder.build().expect("valid config")).expect("store");
    store.ready().await.expect("store ready");
    store
}

/// `now + seconds`.
pub(crate) fn in_secs(seconds: i64) -> OffsetDateTime {
    OffsetDateTime::now_utc() + time::Duration::seconds(seconds)
}

/// A query's single value, through a plain connection of the test's own.
pub(crate) async fn scalar<T>(db: &TestDb, sql: &str) -> T
where
    T: for<'a> tokio_postgres::types::FromSql<'a>,
{
    let client = db.client().await.expect("test connection");
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}
