//! The steps of `doctor` that ask the server, on the logged-in connection:
//! its version and a first query (and whether a pooler is in between),
//! the session table (columns, index on `expire`, this user's rights), and
//! the sessions in it. Every statement is the library's
//! ([`pgsession::DoctorQueries`], in `schema.rs`), so doctor finds the
//! table and counts live sessions exactly as the store does.

use std::fmt::Write as _;
use std::time::Instant;

use pgsession::DoctorQueries;
use tokio_postgres::Client;

use super::report::{humantime, Verdict};
use super::{Doctor, QUERY, SESSIONS, TABLE, VERSION};

/// What the table step found.
enum TableFound {
    Missing {
        can_create: bool,
        elsewhere: Vec<String>,
    },
    Present {
        columns: Vec<(String, String)>,
        index: Option<String>,
        rights: bool,
    },
}

impl Doctor {
    pub(super) fn queries(&self) -> DoctorQueries {
        DoctorQueries::new(self.config.schema(), self.config.table())
    }

    /// The version, a first query, and whether a pooler is in between.
    /// False when a step failed.
    pub(super) async fn server(&mut self, client: &Client) -> bool {
        let started = Instant::now();
        let q = self.queries();
        let version = async {
            let row = client.query_one(&q.version, &[]).await?;
            Ok::<_, tokio_postgres::Error>((
                row.get::<_, String>(0),
                row.get::<_, i32>(1),
                row.get::<_, String>(2),
            ))
        };
        let late = |t: String| format!("no answer within the query timeout ({t})");
        let Some((short, num, long)) = self.query_step(VERSION, started, late, version).await
        else {
            return false;
        };
        let platform = long
            .split_once(" on ")
            .map(|(_, p)| format!(" on {}", p.split(',').next().unwrap_or(p)))
            .unwrap_or_default();
        let detail = format!("PostgreSQL {short}{platform}");
        self.server_version = Some(short);
        if num < 100_000 {
            self.report.push(
                VERSION,
                Verdict::Warn,
                Some(started.elapsed()),
                detail,
                Some("PostgreSQL older than 10 is not supported: upgrade".to_owned()),
            );
        } else {
            self.timed_ok(VERSION, started.elapsed(), detail);
        }

        let started = Instant::now();
        let late = |t: String| format!("SELECT 1: no answer within {t}");
        let select = client.simple_query(&q.round_trip);
        if self
            .query_step(QUERY, started, late, select)
            .await
            .is_none()
        {
            return false;
        }
        self.timed_ok(QUERY, started.elapsed(), "SELECT 1: one round trip".into());
        self.report.mode = Some(self.detect_pooler(client).await);
        true
    }

    /// A direct connection, or a pooler: `SHOW pool_mode` is unknown to
    /// PostgreSQL; a transaction pooler changes the server process between
    /// two statements of one client connection.
    async fn detect_pooler(&self, client: &Client) -> String {
        let configured = self.config.pooler();
        let q = self.queries();
        let pool_mode = match client.simple_query(&q.pool_mode).await {
            Ok(messages) => messages.iter().find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
                _ => None,
            }),
            Err(_) => None,
        };
        let pid = || async {
            client
                .query_one(&q.backend_pid, &[])
                .await
                .ok()
                .map(|r| r.get::<_, i32>(0))
        };
        let (first, second) = (pid().await, pid().await);
        let mode = if let Some(pool_mode) = pool_mode {
            format!("behind a pooler (pool_mode={pool_mode})")
        } else if first.is_some() && second.is_some() && first != second {
            "behind a transaction pooler (the server process changed between two statements)"
                .to_owned()
        } else {
            "direct connection (no pooler detected)".to_owned()
        };
        let pooled = !mode.starts_with("direct");
        match (pooled, configured) {
            (true, pgsession::PoolerMode::Direct) if mode.contains("transaction") => format!(
                "{mode}; set PGSESSION_POOLER=transaction so that the store does without session \
                 state"
            ),
            (false, pgsession::PoolerMode::Transaction) => {
                format!("{mode}; PGSESSION_POOLER=transaction is set, which is safe but not needed")
            }
            _ => mode,
        }
    }

    /// The table, its columns, its index on expire, and our rights on it.
    /// True when the sessions can be counted.
    pub(super) async fn table(&mut self, client: &Client) -> bool {
        let started = Instant::now();
        let schema = self.config.schema().as_str().to_owned();
        let table = self.config.table().as_str().to_owned();
        let q = self.queries();
        let qualified = q.qualified.clone();
        let found = async {
            let exists: bool = client
                .query_one(&q.table_exists, &[&qualified])
                .await?
                .get(0);
            if !exists {
                let can_create: bool = client.query_one(&q.can_create, &[&schema]).await?.get(0);
                let elsewhere: Vec<String> = client
                    .query(&q.elsewhere, &[&table])
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                return Ok::<_, tokio_postgres::Error>(TableFound::Missing {
                    can_create,
                    elsewhere,
                });
            }
            let columns: Vec<(String, String)> = client
                .query(&q.columns, &[&qualified])
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            let index: Option<String> = client
                .query_opt(&q.expire_index, &[&qualified])
                .await?
                .map(|r| r.get(0));
            let rights: bool = client.query_one(&q.rights, &[&qualified]).await?.get(0);
            Ok(TableFound::Present {
                columns,
                index,
                rights,
            })
        };
        let late = |t: String| format!("no answer within {t}");
        let Some(found) = self.query_step(TABLE, started, late, found).await else {
            return false;
        };
        let took = started.elapsed();
        match found {
            TableFound::Missing {
                can_create,
                elsewhere,
            } => {
                let mut hint = if !self.config.create_table() {
                    "PGSESSION_CREATE_TABLE is false: run `pgsession migrate` (as a user that may \
                     create tables) before starting the application"
                        .to_owned()
                } else if can_create {
                    "the store creates it at start (create_table is on), or run `pgsession \
                     migrate` now"
                        .to_owned()
                } else {
                    format!(
                        "this user may not create it in schema {schema}: run `pgsession migrate` \
                         as the owner, or GRANT CREATE ON SCHEMA {} TO the application's user",
                        self.config.schema().quoted()
                    )
                };
                if !elsewhere.is_empty() {
                    let _ = write!(
                        hint,
                        ". Found instead: {} (if sessions are there, set PGSESSION_SCHEMA / \
                         PGSESSION_TABLE to it; connect-pg-simple calls its table \"session\")",
                        elsewhere.join(", ")
                    );
                }
                let verdict = if self.config.create_table() && can_create {
                    Verdict::Warn
                } else {
                    Verdict::Fail
                };
                self.report.push(
                    TABLE,
                    verdict,
                    Some(took),
                    format!("{qualified} does not exist"),
                    Some(hint),
                );
                false
            }
            TableFound::Present {
                columns,
                index,
                rights,
            } => self.table_present(&qualified, took, &columns, index, rights),
        }
    }

    fn table_present(
        &mut self,
        qualified: &str,
        took: std::time::Duration,
        columns: &[(String, String)],
        index: Option<String>,
        rights: bool,
    ) -> bool {
        let type_of = |name: &str| {
            columns
                .iter()
                .find(|(c, _)| c == name)
                .map(|(_, t)| t.as_str())
        };
        let missing: Vec<&str> = ["sid", "sess", "expire"]
            .into_iter()
            .filter(|c| type_of(c).is_none())
            .collect();
        let shown: Vec<String> = columns.iter().map(|(c, t)| format!("{c} {t}")).collect();
        let detail = format!(
            "{qualified} ({}); index on expire: {}",
            shown.join(", "),
            index.as_deref().unwrap_or("none")
        );
        if !missing.is_empty() {
            self.report.fail(
                TABLE,
                Some(took),
                detail,
                format!(
                    "the table lacks {}: it is not a session table of this layout (sid \
                     varchar PRIMARY KEY, sess json, expire timestamp). Point \
                     PGSESSION_SCHEMA / PGSESSION_TABLE at another name, and let the \
                     store or `pgsession migrate` create it",
                    missing.join(", ")
                ),
            );
            return false;
        }
        if !rights {
            self.report.fail(
                TABLE,
                Some(took),
                detail,
                format!(
                    "this user may not read and write it: GRANT SELECT, INSERT, UPDATE, \
                     DELETE ON {qualified} TO the application's user"
                ),
            );
            return false;
        }
        let mut warnings = Vec::new();
        if index.is_none() {
            warnings.push(
                "no index on expire: every prune scans the whole table; run `pgsession \
                 migrate` to create it"
                    .to_owned(),
            );
        }
        if type_of("expire").is_some_and(|t| t.contains("with time zone")) {
            warnings.push(
                "expire is a timestamp WITH time zone: it works, but connect-pg-simple \
                 and pgsession expect timestamp(6) without one, holding UTC"
                    .to_owned(),
            );
        }
        if warnings.is_empty() {
            self.timed_ok(TABLE, took, detail);
        } else {
            self.report.push(
                TABLE,
                Verdict::Warn,
                Some(took),
                detail,
                Some(warnings.join("; ")),
            );
        }
        true
    }

    /// Live and expired sessions, counted as the store counts them.
    pub(super) async fn sessions(&mut self, client: &Client) {
        let started = Instant::now();
        let q = self.queries();
        let late = |t: String| format!("counting did not finish within {t}");
        let count = async {
            let live: i64 = client.query_one(&q.live, &[]).await?.get(0);
            let expired: i64 = client.query_one(&q.expired, &[]).await?.get(0);
            Ok::<_, tokio_postgres::Error>((live, expired))
        };
        let Some((live, expired)) = self.query_step(SESSIONS, started, late, count).await else {
            return;
        };
        let detail = format!("{live} live, {expired} expired");
        let took = started.elapsed();
        if expired > 1000 && expired > live {
            self.report.push(
                SESSIONS,
                Verdict::Warn,
                Some(took),
                detail,
                Some(format!(
                    "expired sessions pile up: is a pruner running? `pgsession serve` \
                     prunes every PGSESSION_PRUNE_INTERVAL (now {}); otherwise run \
                     `pgsession prune` from cron",
                    humantime(self.config.prune_interval())
                )),
            );
        } else if live == 0 {
            self.report.push(
                SESSIONS,
                Verdict::Ok,
                Some(took),
                detail,
                Some(
                    "no live session. If users are logged out at every request: a \
                     cookie marked Secure is never sent back over plain HTTP \
                     (PGSESSION_COOKIE_SECURE=auto or false when not behind HTTPS); the \
                     application may use another table (PGSESSION_SCHEMA, \
                     PGSESSION_TABLE); expire must be written in UTC (see TimeZone in \
                     the pool settings)"
                        .to_owned(),
                ),
            );
        } else {
            self.timed_ok(SESSIONS, took, detail);
        }
    }
}
