//! The session table: checked names, the SQL of every statement, and its
//! creation under an advisory lock.
//!
//! The layout is connect-pg-simple's, so a table made by its `table.sql`
//! works as it is:
//!
//! ```sql
//! sid varchar PRIMARY KEY, sess json NOT NULL, expire timestamp(6) NOT NULL
//! -- and an index on expire
//! ```
//!
//! `expire` has no time zone and holds UTC. The statements compare it with
//! `now() AT TIME ZONE 'UTC'`, so they do not depend on the connection's
//! `TimeZone` (which a transaction pooler may not keep).

use std::fmt;

/// A schema or table name that is safe to put in SQL: 1 to 63 characters,
/// ASCII letters, digits and `_`, not starting with a digit. It is always
/// double-quoted in statements, so case is kept as given.
///
/// ```
/// use pgsession::Identifier;
/// assert!(Identifier::new("session_store").is_ok());
/// assert!(Identifier::new("session\"; DROP TABLE users; --").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Identifier(String);

impl Identifier {
    /// Longest identifier PostgreSQL keeps without truncating it.
    pub const MAX_LEN: usize = 63;

    /// Checks `name`; the error says what is wrong with it.
    pub fn new(name: &str) -> Result<Identifier, String> {
        if name.is_empty() {
            return Err("must not be empty".into());
        }
        if name.len() > Self::MAX_LEN {
            return Err(format!(
                "is {} characters long; PostgreSQL identifiers have at most {}",
                name.len(),
                Self::MAX_LEN
            ));
        }
        if name.starts_with(|c: char| c.is_ascii_digit()) {
            return Err("must not start with a digit".into());
        }
        if let Some(bad) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '_'))
        {
            return Err(format!(
                "contains {bad:?}; only ASCII letters, digits and _ are allowed"
            ));
        }
        Ok(Identifier(name.to_owned()))
    }

    /// The name as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name quoted for SQL. Safe because of the checks in [`new`](Self::new).
    pub fn quoted(&self) -> String {
        format!("\"{}\"", self.0)
    }
}

impl fmt::Debug for Identifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for Identifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `schema.table`, each part quoted: the table as every statement names it.
///
/// ```
/// use pgsession::Identifier;
/// let name = pgsession::schema::qualified(&Identifier::new("auth").unwrap(), &Identifier::new("Sess").unwrap());
/// assert_eq!(name, "\"auth\".\"Sess\"");
/// ```
pub fn qualified(schema: &Identifier, table: &Identifier) -> String {
    format!("{}.{}", schema.quoted(), table.quoted())
}

/// The current time in UTC as a `timestamp` (no time zone), on the server.
const NOW_UTC: &str = "(now() AT TIME ZONE 'UTC')";

/// SHA-256 (hex) of a row's document as stored: `json` keeps its text as
/// written (by this store or by connect-pg-simple), so this is the digest
/// of the exact text the writer sent, which the journal computes the same
/// way.
const DOC_DIGEST: &str = "encode(sha256(convert_to(sess::text, 'UTF8')), 'hex')";

/// Connections the server would still accept from this role in this
/// database (see `Store::refresh_server_free`). `reserved_connections`
/// exists from PostgreSQL 16 on; `LEAST` ignores the limits that are off.
/// Another role's sessions show no `backend_type` to a role without
/// `pg_read_all_stats`: any with a user is counted as a client, which can
/// only make the ceiling lower.
pub(crate) const SERVER_FREE: &str = "\
    WITH me AS (SELECT oid, rolsuper, rolconnlimit FROM pg_roles WHERE rolname = session_user), \
         db AS (SELECT oid, datconnlimit FROM pg_database WHERE datname = current_database()), \
         clients AS (SELECT usesysid, datid FROM pg_stat_activity \
                     WHERE backend_type = 'client backend' \
                        OR (backend_type IS NULL AND usesysid IS NOT NULL)) \
    SELECT LEAST( \
        CASE WHEN me.rolconnlimit >= 0 AND NOT me.rolsuper THEN \
            me.rolconnlimit - (SELECT count(*) FROM clients WHERE usesysid = me.oid) END, \
        CASE WHEN db.datconnlimit >= 0 AND NOT me.rolsuper THEN \
            db.datconnlimit - (SELECT count(*) FROM clients WHERE datid = db.oid) END, \
        current_setting('max_connections')::int \
            - CASE WHEN me.rolsuper THEN 0 ELSE \
                current_setting('superuser_reserved_connections')::int \
                + coalesce(current_setting('reserved_connections', true)::int, 0) END \
            - (SELECT count(*) FROM clients) \
    )::int FROM me, db";

/// The server's version and the settings of the connection (`Store::server_info`).
pub(crate) const SERVER_INFO: &str = "SELECT version(), current_setting('TimeZone'), \
     current_setting('statement_timeout'), pg_is_in_recovery(), pg_backend_pid()";

/// The prune's session-scoped leader lock (`$1`: the key), held over all
/// its batches on a direct connection.
pub(crate) const PRUNE_TRY_LOCK: &str = "SELECT pg_try_advisory_lock(hashtext($1))";
/// Releases [`PRUNE_TRY_LOCK`].
pub(crate) const PRUNE_UNLOCK: &str = "SELECT pg_advisory_unlock(hashtext($1))";
/// The prune's lock behind a transaction pooler, where session locks do
/// not hold: taken again by each batch's transaction.
pub(crate) const PRUNE_TRY_XACT_LOCK: &str = "SELECT pg_try_advisory_xact_lock(hashtext($1))";

/// Every statement the store sends, built once from the table's name.
#[derive(Debug, Clone)]
pub(crate) struct Statements {
    /// `schema.table`, quoted.
    pub(crate) qualified: String,
    /// `schema.table`, unquoted: the key of the advisory locks.
    pub(crate) lock_name: String,
    pub(crate) load: String,
    pub(crate) load_many: String,
    pub(crate) save: String,
    pub(crate) save_many: String,
    /// A new session, only if its id is free: tower-sessions' `create`,
    /// and the write-back of a session created during an outage. Inserts
    /// one row or none.
    pub(crate) insert: String,
    pub(crate) touch: String,
    pub(crate) destroy: String,
    pub(crate) count: String,
    pub(crate) count_expired: String,
    pub(crate) clear: String,
    pub(crate) prune_batch: String,
    /// Write-back of a save: only if the row holds one of the documents
    /// it was based on (SHA-256 in hex, or its first 16 hex digits).
    pub(crate) writeback_update: String,
    /// Write-back of a touch: never shortens an expiry set meanwhile, and
    /// never brings back a destroyed session.
    pub(crate) writeback_touch: String,
    /// The SHA-256 of a row's document, to name a conflict.
    pub(crate) row_digest: String,
    /// Terminates this application's statements that started before a
    /// moment `$1` seconds ago and still run; returns how many there were.
    pub(crate) settle_in_doubt: String,
    pub(crate) table_exists: String,
    pub(crate) create_schema: String,
    pub(crate) create_table: String,
    pub(crate) expire_index_exists: String,
    /// Whether the table's schema exists (`$1`: its name).
    pub(crate) schema_exists: String,
    /// The transaction-scoped advisory lock that serialises table creation
    /// across instances (`$1`: the key).
    pub(crate) creation_lock: String,
    pub(crate) create_index: String,
}

impl Statements {
    pub(crate) fn new(schema: &Identifier, table: &Identifier) -> Statements {
        let t = qualified(schema, table);
        // connect-pg-simple's table.sql names its index IDX_session_expire
        // for the table "session"; following its pattern means an existing
        // table never gets a second index.
        let index = Identifier(
            format!("IDX_{}_expire", table.as_str())
                .chars()
                .take(63)
                .collect(),
        );
        Statements {
            lock_name: format!("{schema}.{table}"),
            load: format!(
                "SELECT sess::text, expire FROM {t} WHERE sid = $1 AND expire >= {NOW_UTC}"
            ),
            load_many: format!(
                "SELECT sid, sess::text, expire FROM {t} WHERE sid = ANY($1) AND expire >= {NOW_UTC}"
            ),
            save_many: format!(
                "INSERT INTO {t} (sid, sess, expire) \
                 SELECT s, j::json, e FROM unnest($1::text[], $2::text[], $3::timestamp[]) AS u(s, j, e) \
                 ON CONFLICT (sid) DO UPDATE SET sess = EXCLUDED.sess, expire = EXCLUDED.expire"
            ),
            save: format!(
                "INSERT INTO {t} (sid, sess, expire) VALUES ($1, $2::text::json, $3) \
                 ON CONFLICT (sid) DO UPDATE SET sess = EXCLUDED.sess, expire = EXCLUDED.expire"
            ),
            insert: format!(
                "INSERT INTO {t} (sid, sess, expire) VALUES ($1, $2::text::json, $3) \
                 ON CONFLICT (sid) DO NOTHING"
            ),
            touch: format!("UPDATE {t} SET expire = $2 WHERE sid = $1"),
            destroy: format!("DELETE FROM {t} WHERE sid = $1"),
            count: format!("SELECT count(*) FROM {t} WHERE expire >= {NOW_UTC}"),
            count_expired: format!("SELECT count(*) FROM {t} WHERE expire < {NOW_UTC}"),
            clear: format!("DELETE FROM {t}"),
            // One bounded batch: short locks, no table-wide DELETE. SKIP
            // LOCKED lets it pass rows a request is writing right now.
            prune_batch: format!(
                "DELETE FROM {t} WHERE sid = ANY(ARRAY(\
                 SELECT sid FROM {t} WHERE expire < {NOW_UTC} LIMIT $1 FOR UPDATE SKIP LOCKED))"
            ),
            writeback_update: format!(
                "UPDATE {t} SET sess = $2::text::json, expire = $3 \
                 WHERE sid = $1 AND ({DOC_DIGEST} = ANY($4::text[]) \
                 OR left({DOC_DIGEST}, 16) = ANY($4::text[]))"
            ),
            writeback_touch: format!(
                "UPDATE {t} SET expire = GREATEST(expire, $2) WHERE sid = $1"
            ),
            row_digest: format!("SELECT {DOC_DIGEST} FROM {t} WHERE sid = $1"),
            // Matching by role, database and application name, not by
            // process id: after a restart or a failover the ids of the
            // statements sent are meaningless, and the start time (on the
            // server's clock, compared with an age measured on ours)
            // keeps today's statements out.
            settle_in_doubt: "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)), count(*) \
                 FROM pg_stat_activity \
                 WHERE pid <> pg_backend_pid() AND usename = current_user \
                 AND datname = current_database() \
                 AND application_name = current_setting('application_name') \
                 AND state = 'active' \
                 AND query_start <= now() - make_interval(secs => $1)"
                .into(),
            table_exists: "SELECT to_regclass($1) IS NOT NULL".into(),
            schema_exists: "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)".into(),
            creation_lock: "SELECT pg_advisory_xact_lock(hashtext($1))".into(),
            create_schema: format!("CREATE SCHEMA IF NOT EXISTS {}", schema.quoted()),
            create_table: format!(
                "CREATE TABLE IF NOT EXISTS {t} (\
                 sid varchar NOT NULL COLLATE \"default\" PRIMARY KEY, \
                 sess json NOT NULL, \
                 expire timestamp(6) NOT NULL)"
            ),
            expire_index_exists: "SELECT EXISTS (SELECT 1 FROM pg_index i \
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] \
                 WHERE i.indrelid = to_regclass($1) AND a.attname = 'expire')"
                .into(),
            create_index: format!(
                "CREATE INDEX IF NOT EXISTS {} ON {t} (expire)",
                index.quoted()
            ),
            qualified: t,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_checked() {
        for good in [
            "session",
            "session_store",
            "_x",
            "Sessions2",
            &"a".repeat(63),
        ] {
            assert!(Identifier::new(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "1abc",
            "a-b",
            "a b",
            "a\"b",
            "a;b",
            "sessions; DROP TABLE users",
            "é",
            &"a".repeat(64),
        ] {
            assert!(Identifier::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn statements_quote_names() {
        let s = Statements::new(
            &Identifier::new("auth").unwrap(),
            &Identifier::new("Sess").unwrap(),
        );
        assert_eq!(s.qualified, "\"auth\".\"Sess\"");
        assert!(s.load.contains("FROM \"auth\".\"Sess\" WHERE sid = $1"));
        assert!(s.create_index.contains("\"IDX_Sess_expire\""));
    }
}

// ---------------------------------------------------------------------
// The read-only checks of `pgsession doctor`. Appended here so that every
// statement lives in this file; they reuse the store's own statements where
// one exists (the table found by `to_regclass`, live sessions
// `expire >= now`), so that doctor and the store cannot disagree.
// ---------------------------------------------------------------------

/// The catalog and replication queries of `pgsession doctor`: nothing here
/// writes. Parameters are said for each; `$1` of the table queries is
/// [`DoctorQueries::qualified`].
///
/// ```
/// use pgsession::{DoctorQueries, Identifier};
/// let q = DoctorQueries::new(&Identifier::new("public").unwrap(), &Identifier::new("s").unwrap());
/// assert_eq!(q.qualified, "\"public\".\"s\"");
/// assert!(q.live.contains(">="));
/// ```
#[derive(Debug, Clone)]
pub struct DoctorQueries {
    /// `schema.table`, quoted: `$1` of the table queries.
    pub qualified: String,
    /// Whether the table exists, as the store asks (`$1`: qualified).
    pub table_exists: String,
    /// Whether this user may create the table: in its schema if that
    /// exists, else the schema itself in the database (`$1`: the schema).
    pub can_create: String,
    /// Up to five other tables that may hold the sessions: of the same
    /// name in another schema, or connect-pg-simple's `session` (`$1`: the
    /// table's name).
    pub elsewhere: String,
    /// The table's columns, `(name, type)` in order (`$1`: qualified).
    pub columns: String,
    /// The name of an index led by `expire`, if any (`$1`: qualified).
    pub expire_index: String,
    /// Whether this user may read and write the table (`$1`: qualified).
    pub rights: String,
    /// Live sessions, as the store counts them.
    pub live: String,
    /// Expired sessions not yet pruned, as the store counts them.
    pub expired: String,
    /// `server_version`, `server_version_num`, `version()`.
    pub version: String,
    /// One round trip that reads nothing (simple protocol).
    pub round_trip: String,
    /// PgBouncer's setting, which PostgreSQL does not know (simple
    /// protocol): an answer means a pooler is in between.
    pub pool_mode: String,
    /// The server process of this connection: two different answers on
    /// one connection mean a transaction pooler.
    pub backend_pid: String,
    /// Whether the server is a standby (`pg_is_in_recovery()`).
    pub in_recovery: String,
    /// On a standby: the replay lag in seconds (NULL before the first
    /// replayed transaction), the received and replayed WAL positions
    /// (text, NULL when unknown), and the bytes received but not replayed.
    pub standby_lag: String,
    /// On a primary: one row per standby, `(application_name, client
    /// address, state, sync_state, replay_lag in seconds (NULL when idle),
    /// bytes sent but not yet replayed)`.
    pub primary_lag: String,
}

impl DoctorQueries {
    /// The queries for the table `schema.table`.
    pub fn new(schema: &Identifier, table: &Identifier) -> DoctorQueries {
        let store = Statements::new(schema, table);
        DoctorQueries {
            table_exists: store.table_exists,
            can_create: "SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1) \
                 THEN has_schema_privilege($1, 'CREATE') \
                 ELSE has_database_privilege(current_database(), 'CREATE') END"
                .into(),
            elsewhere: "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relkind IN ('r', 'p') AND (c.relname = $1 OR c.relname = 'session') \
                 AND n.nspname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1 LIMIT 5"
                .into(),
            columns: "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute \
                 WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped \
                 ORDER BY attnum"
                .into(),
            expire_index: "SELECT i.indexrelid::regclass::text FROM pg_index i \
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] \
                 WHERE i.indrelid = to_regclass($1) AND a.attname = 'expire' LIMIT 1"
                .into(),
            rights: "SELECT has_table_privilege(to_regclass($1), 'SELECT, INSERT, UPDATE, DELETE')"
                .into(),
            live: store.count,
            expired: store.count_expired,
            version: "SELECT current_setting('server_version'), \
                 current_setting('server_version_num')::int, version()"
                .into(),
            round_trip: "SELECT 1".into(),
            pool_mode: "SHOW pool_mode".into(),
            backend_pid: "SELECT pg_backend_pid()".into(),
            in_recovery: "SELECT pg_is_in_recovery()".into(),
            standby_lag:
                "SELECT extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8, \
                 pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text, \
                 pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())::float8"
                    .into(),
            primary_lag:
                "SELECT coalesce(application_name, ''), coalesce(host(client_addr), 'local'), \
                 coalesce(state, ''), coalesce(sync_state, ''), \
                 extract(epoch FROM replay_lag)::float8, \
                 pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::float8 \
                 FROM pg_stat_replication ORDER BY application_name"
                    .into(),
            qualified: store.qualified,
        }
    }
}
