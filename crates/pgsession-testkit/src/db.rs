//! Owns [`TestDb`]: a fresh, empty database for one test, either on the server named by
//! `DATABASE_URL` or in a [`TestCluster`] of its own; plus the connection helpers.

use std::{
    hash::{BuildHasher, RandomState},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, SystemTime},
};

use tokio_postgres::{Client, NoTls};

use crate::{Result, TestCluster, TestkitError};

/// The database a [`TestDb`] creates in its own cluster.
const CLUSTER_DATABASE: &str = "pgsession_test";
/// How long dropping a database on a shared server may take before it is given up.
const DROP_TIMEOUT: Duration = Duration::from_secs(10);

/// A fresh, empty database for one test.
///
/// On a shared server (`DATABASE_URL`, [`TestDb::on_server`]) the database is dropped
/// `WITH (FORCE)` when the `TestDb` is dropped, on a best-effort basis; in a throwaway cluster
/// the whole cluster goes away with the last reference to it.
#[derive(Debug)]
pub struct TestDb {
    url: String,
    name: String,
    cluster: Option<Arc<TestCluster>>,
    /// The URL to connect to when dropping the database; `None` in our own cluster.
    server_url: Option<String>,
}

impl TestDb {
    /// A fresh database on the server in `DATABASE_URL` if that is set, otherwise in a
    /// throwaway cluster (see [`TestDb::throwaway`]).
    pub async fn new() -> Result<Self> {
        match std::env::var("DATABASE_URL") {
            Ok(url) if !url.trim().is_empty() => Self::on_server(&url).await,
            _ => Self::throwaway().await,
        }
    }

    /// Database `pgsession_test` in a new [`TestCluster`], for tests that stop or restart the
    /// server. Fails if the PostgreSQL binaries are missing, whatever `DATABASE_URL` says.
    pub async fn throwaway() -> Result<Self> {
        let cluster = TestCluster::start().await?;
        cluster.create_database(CLUSTER_DATABASE).await?;
        Ok(Self {
            url: cluster.url(CLUSTER_DATABASE),
            name: CLUSTER_DATABASE.to_owned(),
            cluster: Some(Arc::new(cluster)),
            server_url: None,
        })
    }

    /// A uniquely named database (`pgsession_test_<pid>_<counter>_<random>`) on the server
    /// `server_url` points at (a URL or a `key=value` connection string; no TLS).
    pub async fn on_server(server_url: &str) -> Result<Self> {
        let name = unique_name();
        let url = with_database(server_url, &name)?;
        let admin = connect(server_url).await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {}", quote_ident(&name)))
            .await
            .map_err(TestkitError::pg(format!("creating database {name}")))?;
        Ok(Self {
            url,
            name,
            cluster: None,
            server_url: Some(server_url.to_owned()),
        })
    }

    /// A handle on database `name`, which already exists at `url`, for helpers that take a
    /// `TestDb`; nothing is created, and nothing is dropped with it. E.g. the database of a
    /// [`ReplicaPair`](crate::ReplicaPair), through whichever server is the primary:
    /// `TestDb::existing(pair.url(), pair.database())`.
    pub fn existing(url: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            name: name.into(),
            cluster: None,
            server_url: None,
        }
    }

    /// A URL (or connection string) for the test database.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The test database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The throwaway cluster holding the database, if there is one.
    pub fn cluster(&self) -> Option<&Arc<TestCluster>> {
        self.cluster.as_ref()
    }

    /// A new connection to the test database; its connection task is spawned on the current
    /// runtime.
    pub async fn client(&self) -> Result<Client> {
        connect(&self.url).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(server_url) = self.server_url.take() else {
            return;
        };
        let name = self.name.clone();
        // We may be inside a runtime, where blocking on a future panics: use a thread with a
        // runtime of its own, and wait for it so the database is gone when the test ends.
        let dropper = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            let dropping = async {
                tokio::time::timeout(DROP_TIMEOUT, drop_database(&server_url, &name)).await
            };
            match runtime.block_on(dropping) {
                Ok(dropped) => dropped.map_err(|e| e.to_string()),
                Err(_) => Err(format!("timed out after {DROP_TIMEOUT:?}")),
            }
        });
        let name = &self.name;
        match dropper.join() {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, name, "could not drop the test database"),
            Err(_) => tracing::warn!(name, "dropping the test database panicked"),
        }
    }
}

async fn drop_database(server_url: &str, name: &str) -> Result<()> {
    let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_ident(name));
    connect(server_url)
        .await?
        .batch_execute(&sql)
        .await
        .map_err(TestkitError::pg(format!("dropping database {name}")))
}

/// Connects without TLS and spawns the connection task on the current runtime.
pub(crate) async fn connect(url: &str) -> Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(TestkitError::pg(format!("connecting to {url}")))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "test connection ended");
        }
    });
    Ok(client)
}

/// `name` as a quoted SQL identifier.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `pgsession_test_<pid>_<counter>_<random>`.
fn unique_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let counter = COUNTER.fetch_add(1, Ordering::Relaxed);
    let random = RandomState::new().hash_one(SystemTime::now()) as u32;
    format!(
        "pgsession_test_{}_{counter}_{random:08x}",
        std::process::id()
    )
}

/// `url` with its database replaced by `database` (which must need no escaping).
///
/// Handles `postgres://` and `postgresql://` URLs with or without a path and with a query string
/// (a `dbname` parameter is removed), and `key=value` connection strings (where the last
/// `dbname` wins).
pub(crate) fn with_database(url: &str, database: &str) -> Result<String> {
    let url = url.trim();
    let invalid = |reason| TestkitError::InvalidUrl {
        url: url.to_owned(),
        reason,
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        return if url.contains('=') {
            Ok(format!("{url} dbname={database}"))
        } else {
            Err(invalid(
                "expected a postgres:// URL or a key=value connection string",
            ))
        };
    };
    if !matches!(scheme, "postgres" | "postgresql") {
        return Err(invalid("the scheme must be postgres:// or postgresql://"));
    }
    let rest = rest.split_once('#').map_or(rest, |(rest, _fragment)| rest);
    let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
    let authority = before_query
        .split_once('/')
        .map_or(before_query, |(authority, _)| authority);
    let params: Vec<&str> = query
        .split('&')
        .filter(|param| !param.is_empty() && !param.starts_with("dbname="))
        .collect();
    let mut rewritten = format!("{scheme}://{authority}/{database}");
    if !params.is_empty() {
        rewritten = format!("{rewritten}?{}", params.join("&"));
    }
    Ok(rewritten)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_the_database_of_a_url() {
        let cases = [
            (
                "postgres://postgres@127.0.0.1:5432/postgres",
                "postgres://postgres@127.0.0.1:5432/db",
            ),
            (
                "postgres://postgres@127.0.0.1:5432",
                "postgres://postgres@127.0.0.1:5432/db",
            ),
            (
                "postgres://postgres@127.0.0.1:5432/",
                "postgres://postgres@127.0.0.1:5432/db",
            ),
            (
                "postgresql://u:p%2Fw@h/x?sslmode=disable",
                "postgresql://u:p%2Fw@h/db?sslmode=disable",
            ),
            (
                "postgres://h?sslmode=disable&dbname=x&application_name=t",
                "postgres://h/db?sslmode=disable&application_name=t",
            ),
            (
                "postgres://h1:5432,h2:5433/x#frag",
                "postgres://h1:5432,h2:5433/db",
            ),
            ("  postgres://h/x?  ", "postgres://h/db"),
            (
                "host=127.0.0.1 user=postgres dbname=x",
                "host=127.0.0.1 user=postgres dbname=x dbname=db",
            ),
        ];
        for (url, expected) in cases {
            let rewritten = with_database(url, "db").unwrap();
            assert_eq!(rewritten, expected, "rewriting {url:?}");
            let config: tokio_postgres::Config = rewritten.parse().unwrap();
            assert_eq!(config.get_dbname(), Some("db"), "parsing {rewritten:?}");
        }
    }

    #[test]
    fn rejects_other_schemes_and_garbage() {
        assert!(with_database("mysql://h/x", "db").is_err());
        assert!(with_database("nonsense", "db").is_err());
    }

    #[test]
    fn unique_names_are_unique_and_valid_identifiers() {
        let (a, b) = (unique_name(), unique_name());
        assert_ne!(a, b);
        assert!(a.starts_with(&format!("pgsession_test_{}_", std::process::id())));
        assert!(a.len() < 64, "{a} is too long for an identifier");
        assert!(a
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
    }

    #[test]
    fn quotes_identifiers() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
