//! What the store says to PostgreSQL, and on which connection: the session
//! pool, one function per statement (the SQL itself is `schema.rs`'s), the
//! table's creation, and the batchers that combine concurrent loads and
//! saves.
//!
//! No policy lives here. Retries, the breaker and health evidence are the
//! guard's (`guard.rs`); the fallback and the write-back are the
//! recovery's (`recovery.rs`, `writeback.rs`). A function here sends one
//! statement on the connection it is given and returns what the server
//! said.

use std::sync::atomic::{AtomicUsize, Ordering};

use time::{OffsetDateTime, PrimitiveDateTime, UtcOffset};
use tokio::sync::OnceCell;
use tokio_postgres::types::{ToSql, Type};

use super::batch::Batcher;
use super::ServerInfo;
use crate::config::Config;
use crate::error::Error;
use crate::pool::{Checkout, Params, Progress, SessionPool};
use crate::record::StoredSession;
use crate::schema::{self, Statements};

/// A save as queued for a batch: id, document, expiry.
pub(super) type SaveRequest = (String, String, OffsetDateTime);

/// A batched request's answer; `None` sends the caller to run it alone.
pub(super) type BatchAnswer<T> = Option<Result<T, Error>>;

/// The database side of the store.
#[derive(Debug)]
pub(super) struct Database {
    pub(super) pool: SessionPool,
    pub(super) sql: Statements,
    /// Concurrent loads and saves, combined into one statement each.
    pub(super) loads: Batcher<String, BatchAnswer<Option<StoredSession>>>,
    pub(super) saves: Batcher<SaveRequest, BatchAnswer<()>>,
    /// Set once the table is known to exist. Failures are never stored.
    schema_ready: OnceCell<()>,
    /// Connections the server would still accept (`usize::MAX`: unknown).
    server_free: AtomicUsize,
    max_session_bytes: usize,
    pool_max_size: usize,
    create_table: bool,
    schema_name: String,
}

impl Database {
    pub(super) fn new(config: &Config) -> Result<Database, Error> {
        // Fewer save batches at once make each one larger: a multi-row
        // upsert costs little more than a single-row one (measured in
        // BENCHMARKS.md: 1.35x pgbench at 32 callers with one batch per
        // connection, 1.9x with half as many).
        let save_batches = (config.pool_size() / 2).max(1);
        Ok(Database {
            pool: SessionPool::new(config)?,
            sql: Statements::new(config.schema(), config.table()),
            loads: Batcher::new(config.pool_max_size()),
            saves: Batcher::new(save_batches),
            schema_ready: OnceCell::new(),
            server_free: AtomicUsize::new(usize::MAX),
            max_session_bytes: config.max_session_bytes(),
            pool_max_size: config.pool_max_size(),
            create_table: config.create_table(),
            schema_name: config.schema().as_str().to_owned(),
        })
    }

    /// Whether the table is known to exist.
    pub(super) fn is_ready(&self) -> bool {
        self.schema_ready.initialized()
    }

    /// One attempt: a connection and the query on it.
    ///
    /// A query that fails on a reused connection because that connection
    /// is dead (its backend terminated, the link closed while idle) is run
    /// again at once on another: each dead one is thrown away, so once the
    /// pool has no more, the next is opened for it. One dead connection
    /// says nothing of the database, and a backoff would only slow the
    /// caller; a failure on a fresh connection goes to the caller's retry.
    ///
    /// `query` gets the checkout and hands it back with its result, so that
    /// a connection the query broke is not returned to the pool.
    pub(super) async fn attempt<T, F, Fut>(
        &self,
        op: &'static str,
        query: &F,
        progress: &Progress,
    ) -> Result<T, Error>
    where
        F: Fn(Checkout) -> Fut,
        Fut: std::future::Future<Output = (Checkout, Result<T, Error>)>,
    {
        let mut dead = 0;
        loop {
            let conn = self.pool.checkout_tracked(progress).await?;
            let fresh = conn.is_fresh();
            let (conn, result) = query(conn).await;
            conn.finish(&result);
            match result {
                Err(e) if self.dead_reused(op, &e, fresh, &mut dead) => {}
                other => return other,
            }
        }
    }

    /// Whether `error`, met on a connection (`fresh` or reused), shows only
    /// that a reused connection was dead: then the caller tries another at
    /// once, up to one per connection the pool may hold.
    pub(super) fn dead_reused(
        &self,
        op: &'static str,
        error: &Error,
        fresh: bool,
        dead: &mut usize,
    ) -> bool {
        if fresh || !error.is_outage() || *dead > self.pool_max_size {
            return false;
        }
        *dead += 1;
        metrics::counter!(crate::metrics::RETRIES, "op" => op).increment(1);
        tracing::debug!(
            target: "session_store",
            op,
            error = %error,
            "a pooled connection was dead; trying again at once on another"
        );
        true
    }

    /// Creates the table unless it is known to exist, bounded by
    /// `deadline`; `progress` tells how far the checkout got.
    pub(super) async fn ensure_schema(
        &self,
        progress: &Progress,
        deadline: std::time::Duration,
    ) -> Result<(), Error> {
        self.schema_ready
            .get_or_try_init(|| async {
                let conn = self.pool.checkout_tracked(progress).await?;
                let result = crate::resilience::retry::bounded(
                    "schema",
                    deadline,
                    self.create_schema(&conn),
                )
                .await;
                if result.is_err() {
                    // It may have failed inside the transaction.
                    conn.discard();
                } else {
                    conn.finish(&result);
                    tracing::info!(
                        target: "session_store",
                        table = %self.sql.lock_name,
                        "session table ready"
                    );
                }
                result
            })
            .await
            .map(|_| ())
    }

    /// Creates the schema, table and index when missing, under an advisory
    /// transaction lock so that instances starting together do not collide.
    async fn create_schema(&self, conn: &Checkout) -> Result<(), Error> {
        let sql = &self.sql;
        let qualified = (&sql.qualified as &(dyn ToSql + Sync), Type::TEXT);
        let table: bool = conn
            .query_one(&sql.table_exists, std::slice::from_ref(&qualified))
            .await?
            .get(0);
        let index: bool = conn
            .query_one(&sql.expire_index_exists, std::slice::from_ref(&qualified))
            .await?
            .get(0);
        if table && index {
            return Ok(());
        }
        if !self.create_table {
            return Err(Error::Config(crate::ConfigError::invalid(
                "create_table",
                format!(
                    "table {} (or its index on expire) is missing and create_table is off",
                    sql.lock_name
                ),
            )));
        }
        let key = format!("pgsession:schema:{}", sql.lock_name);
        let client = conn.client();
        // A transaction-scoped lock: released at commit or when the link
        // drops, and valid behind a transaction pooler too.
        client.batch_execute("BEGIN").await?;
        conn.execute(&sql.creation_lock, &[(&key, Type::TEXT)])
            .await?;
        if self.schema_name != "public" {
            let present: bool = conn
                .query_one(&sql.schema_exists, &[(&self.schema_name, Type::TEXT)])
                .await?
                .get(0);
            if !present {
                client.batch_execute(&sql.create_schema).await?;
            }
        }
        client.batch_execute(&sql.create_table).await?;
        let index: bool = conn
            .query_one(&sql.expire_index_exists, &[qualified])
            .await?
            .get(0);
        if !index {
            client.batch_execute(&sql.create_index).await?;
        }
        client.batch_execute("COMMIT").await?;
        Ok(())
    }

    /// Connections the server would still accept, if known.
    pub(super) fn server_free(&self) -> Option<usize> {
        let free = self.server_free.load(Ordering::Relaxed);
        (free != usize::MAX).then_some(free)
    }

    /// After the server refused a connection for lack of slots, it is
    /// taken to have none free until a health check counts them again.
    pub(super) fn note_server_full(&self) {
        self.server_free.store(0, Ordering::Relaxed);
    }

    /// Asks the server how many more connections it would accept (see
    /// [`schema::SERVER_FREE`]) and remembers it.
    pub(super) async fn refresh_server_free(&self, conn: &Checkout) -> Result<(), Error> {
        let free: i32 = conn.query_one(schema::SERVER_FREE, &[]).await?.get(0);
        self.server_free
            .store(free.max(0) as usize, Ordering::Relaxed);
        Ok(())
    }

    // --- One function per statement --------------------------------------

    pub(super) async fn ping(&self, conn: &Checkout) -> Result<(), Error> {
        conn.client().simple_query("SELECT 1").await?;
        Ok(())
    }

    pub(super) async fn server_info(&self, conn: &Checkout) -> Result<ServerInfo, Error> {
        let row = conn.query_one(schema::SERVER_INFO, &[]).await?;
        Ok(ServerInfo {
            version: row.get(0),
            time_zone: row.get(1),
            statement_timeout: row.get(2),
            in_recovery: row.get(3),
            backend_pid: row.get(4),
        })
    }

    pub(super) async fn load(
        &self,
        conn: &Checkout,
        sid: &str,
    ) -> Result<Option<StoredSession>, Error> {
        let row = conn
            .query_opt(&self.sql.load, &[(&sid, Type::VARCHAR)])
            .await?;
        Ok(row.and_then(|row| self.stored(row.get(0), row.get(1))))
    }

    /// Several sessions in one `sid = ANY($1)`: one answer per id of
    /// `sids`, in order (an id asked for twice gets two copies).
    pub(super) async fn load_many(
        &self,
        conn: &Checkout,
        sids: &[String],
    ) -> Result<Vec<Option<StoredSession>>, Error> {
        let rows = conn
            .query(&self.sql.load_many, &[(&sids, Type::TEXT_ARRAY)])
            .await?;
        // Each found session with the number of requests for it, so that
        // only a session asked for twice is copied.
        let mut found: std::collections::HashMap<String, (StoredSession, usize)> = rows
            .into_iter()
            .filter_map(|row| {
                let session = self.stored(row.get(1), row.get(2))?;
                Some((row.get(0), (session, 0)))
            })
            .collect();
        for sid in sids {
            if let Some((_, wanted)) = found.get_mut(sid) {
                *wanted += 1;
            }
        }
        Ok(sids
            .iter()
            .map(|sid| {
                let (_, wanted) = found.get_mut(sid)?;
                *wanted -= 1;
                if *wanted == 0 {
                    found.remove(sid).map(|(session, _)| session)
                } else {
                    found.get(sid).map(|(session, _)| session.clone())
                }
            })
            .collect())
    }

    /// A stored row as a session. A NULL document (only in a table another
    /// program altered) or one over `max_session_bytes` (this store never
    /// saves one) is not parsed: no session, with a warning.
    fn stored(&self, json: Option<String>, expire: PrimitiveDateTime) -> Option<StoredSession> {
        let limit = self.max_session_bytes;
        match json {
            Some(json) if json.len() > limit => {
                tracing::warn!(
                    target: "session_store",
                    bytes = json.len(),
                    limit,
                    "stored session is over max_session_bytes; treated as no session"
                );
                None
            }
            Some(json) => Some(StoredSession {
                json,
                expire: expire.assume_utc(),
            }),
            None => {
                tracing::warn!(target: "session_store", "stored session has a NULL document; treated as no session");
                None
            }
        }
    }

    /// The plain upsert.
    pub(super) async fn save(
        &self,
        conn: &Checkout,
        sid: &str,
        json: &str,
        expire: OffsetDateTime,
    ) -> Result<(), Error> {
        let expire = to_timestamp(expire);
        let params: &Params = &[
            (&sid, Type::VARCHAR),
            (&json, Type::TEXT),
            (&expire, Type::TIMESTAMP),
        ];
        conn.execute(&self.sql.save, params).await?;
        Ok(())
    }

    /// One multi-row upsert of `unnest`ed arrays, the last write of each
    /// session winning (a row may be upserted once per statement).
    pub(super) async fn save_many(
        &self,
        conn: &Checkout,
        batch: &[SaveRequest],
    ) -> Result<(), Error> {
        // In sid order, so that concurrent batches lock their rows in the
        // same order and cannot deadlock one another; of several writes of
        // one session, the last (sorted first among its equals) is kept.
        let mut keep: Vec<usize> = (0..batch.len()).collect();
        keep.sort_unstable_by(|&a, &b| batch[a].0.cmp(&batch[b].0).then(b.cmp(&a)));
        keep.dedup_by(|later, kept| batch[*later].0 == batch[*kept].0);
        let sids: Vec<&str> = keep.iter().map(|&i| batch[i].0.as_str()).collect();
        let jsons: Vec<&str> = keep.iter().map(|&i| batch[i].1.as_str()).collect();
        let expires: Vec<PrimitiveDateTime> =
            keep.iter().map(|&i| to_timestamp(batch[i].2)).collect();
        let params: [(&(dyn ToSql + Sync), Type); 3] = [
            (&sids, Type::TEXT_ARRAY),
            (&jsons, Type::TEXT_ARRAY),
            (&expires, Type::TIMESTAMP_ARRAY),
        ];
        conn.execute(&self.sql.save_many, &params).await?;
        Ok(())
    }

    /// A new session only if its id is free; whether it inserted a row.
    pub(super) async fn insert(
        &self,
        conn: &Checkout,
        sid: &str,
        json: &str,
        expire: OffsetDateTime,
    ) -> Result<bool, Error> {
        let expire = to_timestamp(expire);
        let params: &Params = &[
            (&sid, Type::VARCHAR),
            (&json, Type::TEXT),
            (&expire, Type::TIMESTAMP),
        ];
        Ok(conn.execute(&self.sql.insert, params).await? == 1)
    }

    /// Moves a session's expiry; whether the row exists.
    pub(super) async fn touch(
        &self,
        conn: &Checkout,
        sid: &str,
        expire: OffsetDateTime,
    ) -> Result<bool, Error> {
        let expire = to_timestamp(expire);
        let params: &Params = &[(&sid, Type::VARCHAR), (&expire, Type::TIMESTAMP)];
        Ok(conn.execute(&self.sql.touch, params).await? > 0)
    }

    pub(super) async fn destroy(&self, conn: &Checkout, sid: &str) -> Result<(), Error> {
        conn.execute(&self.sql.destroy, &[(&sid, Type::VARCHAR)])
            .await?;
        Ok(())
    }

    /// Write-back of a touch: the later expiry wins, and a destroyed
    /// session stays destroyed. Whether the row exists.
    pub(super) async fn writeback_touch(
        &self,
        conn: &Checkout,
        sid: &str,
        expire: OffsetDateTime,
    ) -> Result<bool, Error> {
        let expire = to_timestamp(expire);
        let params: &Params = &[(&sid, Type::VARCHAR), (&expire, Type::TIMESTAMP)];
        Ok(conn.execute(&self.sql.writeback_touch, params).await? > 0)
    }

    /// Write-back of a save: only if the row holds one of `docs` (SHA-256
    /// digests of documents). Whether it landed.
    pub(super) async fn writeback_update(
        &self,
        conn: &Checkout,
        sid: &str,
        json: &str,
        expire: OffsetDateTime,
        docs: &[String],
    ) -> Result<bool, Error> {
        let expire = to_timestamp(expire);
        let params: &Params = &[
            (&sid, Type::VARCHAR),
            (&json, Type::TEXT),
            (&expire, Type::TIMESTAMP),
            (&docs, Type::TEXT_ARRAY),
        ];
        Ok(conn.execute(&self.sql.writeback_update, params).await? == 1)
    }

    /// The SHA-256 of a row's document, if the row exists.
    pub(super) async fn row_digest(
        &self,
        conn: &Checkout,
        sid: &str,
    ) -> Result<Option<String>, Error> {
        Ok(conn
            .query_opt(&self.sql.row_digest, &[(&sid, Type::VARCHAR)])
            .await?
            .map(|row| row.get(0)))
    }

    /// Terminates this application's statements that started at least
    /// `age_secs` ago and still run: (terminated, running).
    pub(super) async fn settle_in_doubt(
        &self,
        conn: &Checkout,
        age_secs: f64,
    ) -> Result<(i64, i64), Error> {
        let row = conn
            .query_one(&self.sql.settle_in_doubt, &[(&age_secs, Type::FLOAT8)])
            .await?;
        Ok((row.get(0), row.get(1)))
    }

    /// Counts unexpired sessions, or expired ones still in the table.
    pub(super) async fn count(&self, conn: &Checkout, expired: bool) -> Result<u64, Error> {
        let sql = if expired {
            &self.sql.count_expired
        } else {
            &self.sql.count
        };
        let n: i64 = conn.query_one(sql, &[]).await?.get(0);
        Ok(n.max(0) as u64)
    }

    pub(super) async fn clear(&self, conn: &Checkout) -> Result<u64, Error> {
        Ok(conn.execute(&self.sql.clear, &[]).await?)
    }
}

/// `expire` is a `timestamp` holding UTC.
pub(super) fn to_timestamp(at: OffsetDateTime) -> PrimitiveDateTime {
    let utc = at.to_offset(UtcOffset::UTC);
    PrimitiveDateTime::new(utc.date(), utc.time())
}
