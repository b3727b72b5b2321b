//! Statements counted on the server: `pg_stat_statements` in the bench's
//! database, reset before each server's slice and read after it, so that
//! each server's SQL per request is what PostgreSQL saw, not what the
//! server says it sent.
//!
//! The cluster must load the module (`shared_preload_libraries =
//! 'pg_stat_statements'`); the bench's throwaway clusters do. On a server
//! named by `--database-url` without it, the counts are left out.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::Context as _;
use tokio_postgres::Client;

/// Calls per statement kind (see [`kind`]), and the rows they touched.
#[derive(Debug, Clone, Default)]
pub(crate) struct Counts {
    /// Kind → (calls, rows).
    pub(crate) by_kind: BTreeMap<&'static str, (u64, u64)>,
}

impl Counts {
    /// Adds `other`'s calls and rows to these.
    pub(crate) fn merge(&mut self, other: &Counts) {
        for (kind, (calls, rows)) in &other.by_kind {
            let entry = self.by_kind.entry(kind).or_default();
            entry.0 += calls;
            entry.1 += rows;
        }
    }

    /// All calls: round trips to the server.
    pub(crate) fn calls(&self) -> u64 {
        self.by_kind.values().map(|(calls, _)| calls).sum()
    }

    /// `select 1.00 + upsert 1.00 = 2.00`: calls per request of each kind
    /// seen at least once per 200 requests, and their sum.
    pub(crate) fn per_request(&self, requests: u64) -> String {
        if requests == 0 || self.calls() == 0 {
            return "-".into();
        }
        let per = |calls: u64| calls as f64 / requests as f64;
        let mut out = String::new();
        for (kind, (calls, _)) in &self.by_kind {
            if per(*calls) >= 0.005 {
                if !out.is_empty() {
                    out.push_str(" + ");
                }
                let _ = write!(out, "{kind} {:.2}", per(*calls));
            }
        }
        let _ = write!(out, " = {:.2}", per(self.calls()));
        out
    }
}

/// The kind of a statement, by its first keyword: `select` (of a session
/// table), `upsert` (`INSERT … ON CONFLICT … DO UPDATE`), `insert`,
/// `update`, `delete`, `tx` (`BEGIN`, `COMMIT`, `ROLLBACK`) or `other`
/// (the pool's checks, the store's connection-limit query, ...).
pub(crate) fn kind(query: &str) -> &'static str {
    let query = query.trim_start().to_ascii_lowercase();
    let session_table = query.contains("session_store") || query.contains("tower_sessions");
    match query.split_whitespace().next().unwrap_or("") {
        "select" if session_table => "select",
        "insert" if query.contains("do update") => "upsert",
        "insert" => "insert",
        "update" => "update",
        "delete" => "delete",
        "begin" | "commit" | "rollback" | "start" => "tx",
        _ => "other",
    }
}

/// A connection to the bench's database that resets and reads
/// `pg_stat_statements`.
pub(crate) struct StatementCounter {
    client: Client,
}

impl std::fmt::Debug for StatementCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatementCounter").finish_non_exhaustive()
    }
}

impl StatementCounter {
    /// Creates the extension in the database at `url`; fails when the
    /// server does not load the module.
    pub(crate) async fn connect(url: &str) -> anyhow::Result<StatementCounter> {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        client
            .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .await
            .context("creating extension pg_stat_statements")?;
        let counter = StatementCounter { client };
        counter
            .reset()
            .await
            .context("pg_stat_statements is not loaded (shared_preload_libraries)")?;
        Ok(counter)
    }

    /// Forgets every statement counted so far.
    pub(crate) async fn reset(&self) -> anyhow::Result<()> {
        self.client
            .batch_execute("SELECT pg_stat_statements_reset()")
            .await?;
        Ok(())
    }

    /// The statements run in this database since the last reset, by kind;
    /// the counter's own are left out.
    pub(crate) async fn read(&self) -> anyhow::Result<Counts> {
        let rows = self
            .client
            .query(
                "SELECT query, calls, rows FROM pg_stat_statements \
                 WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                   AND query NOT LIKE '%pg_stat_statements%'",
                &[],
            )
            .await?;
        let mut counts = Counts::default();
        for row in rows {
            let query: &str = row.get(0);
            let entry = counts.by_kind.entry(kind(query)).or_default();
            entry.0 += row.get::<_, i64>(1) as u64;
            entry.1 += row.get::<_, i64>(2) as u64;
        }
        Ok(counts)
    }
}
