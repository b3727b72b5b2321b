//! The last step of `doctor`: a session pool made from the same settings
//! (never creating the table, no journal), its first connection's settings
//! as the server applies them (TimeZone, statement timeout, standby or
//! not), next to the pool's configuration.

use std::time::Instant;

use super::hints::{connect_timeout_hint, store_error_hint};
use super::report::{humantime, Verdict};
use super::{parse_pg_duration, Doctor, POOL};

impl Doctor {
    /// The settings in force on a connection of the session pool itself.
    pub(super) async fn pool(&mut self) {
        let started = Instant::now();
        // The same settings, but never create the table, and no fallback:
        // no journal file of its own, none of a server's adopted.
        let config = self
            .builder
            .clone()
            .create_table(false)
            .fallback(false)
            .prune(false)
            .build();
        let config = match config {
            Ok(config) => config,
            Err(e) => {
                self.report.fail(
                    POOL,
                    None,
                    format!("cannot configure the pool: {e}"),
                    "fix the setting named above",
                );
                return;
            }
        };
        let store = match pgsession::Store::new(config) {
            Ok(store) => store,
            Err(e) => {
                self.report.fail(
                    POOL,
                    Some(started.elapsed()),
                    format!("cannot create the session pool: {e}"),
                    "fix the setting named above",
                );
                return;
            }
        };
        let budget = self.config.connect_timeout() + self.config.query_timeout();
        let info = tokio::time::timeout(budget, store.server_info()).await;
        let startup_options = store.server_statement_timeout();
        let took = started.elapsed();
        store.close().await;
        let c = &self.config;
        let configured = format!(
            "pool size {} (grows to {}), {} kept warm, acquire timeout {}, connect timeout {}, \
             query timeout {}, idle timeout {}, {} uses per connection",
            c.pool_size(),
            c.pool_max_size(),
            c.min_idle(),
            humantime(c.acquire_timeout()),
            humantime(c.connect_timeout()),
            humantime(c.query_timeout()),
            humantime(c.idle_timeout()),
            c.max_uses()
        );
        let info = match info {
            Ok(Ok(info)) => info,
            Ok(Err(e)) => {
                let hint = store_error_hint(&e, c.connect_timeout());
                self.report.fail(
                    POOL,
                    Some(took),
                    format!("a pool connection failed: {e}"),
                    hint,
                );
                return;
            }
            Err(_) => {
                self.report.fail(
                    POOL,
                    Some(took),
                    format!(
                        "a pool connection did not answer within {}",
                        humantime(budget)
                    ),
                    connect_timeout_hint(c.connect_timeout()),
                );
                return;
            }
        };
        let detail = format!(
            "TimeZone {}, statement_timeout {} (asked {}), {}, backend pid {}; {configured}",
            info.time_zone,
            info.statement_timeout,
            humantime(c.statement_timeout()),
            if info.in_recovery {
                "a read-only standby"
            } else {
                "a primary"
            },
            info.backend_pid
        );
        if let Some(short) = &self.server_version {
            if !info.version.contains(short.as_str()) {
                tracing::debug!(pool = %info.version, direct = %short, "pool and direct connection reached different servers");
            }
        }
        let mut failures = Vec::new();
        let mut warnings = Vec::new();
        if info.in_recovery {
            failures.push(
                "the server is a read-only standby: every save fails (25006). Point DATABASE_URL \
                 at the primary (or add target_session_attrs=read-write with several hosts)"
                    .to_owned(),
            );
        }
        if !info.time_zone.eq_ignore_ascii_case("UTC") && info.time_zone != "Etc/UTC" {
            failures.push(format!(
                "TimeZone is {} on pool connections, not UTC: expire holds UTC without a time \
                 zone, so sessions would expire hours early or late (or seem not to persist). A \
                 pooler dropped the TimeZone=UTC startup option: set the default on the server, \
                 ALTER DATABASE ... SET timezone = 'UTC' (or ALTER ROLE)",
                info.time_zone
            ));
        }
        if !startup_options {
            warnings.push(format!(
                "the server refused startup options (a pooler): statement_timeout is the \
                 server's ({}), and queries are bounded by PGSESSION_QUERY_TIMEOUT ({}) on the \
                 client only",
                info.statement_timeout,
                humantime(c.query_timeout())
            ));
            if self
                .report
                .mode
                .as_deref()
                .is_none_or(|m| m.starts_with("direct"))
            {
                let advice = match c.pooler() {
                    pgsession::PoolerMode::Direct => {
                        "; for a transaction-mode pooler (PgBouncer's usual mode), set \
                         PGSESSION_POOLER=transaction"
                    }
                    pgsession::PoolerMode::Transaction => "",
                };
                self.report.mode = Some(format!(
                    "behind a pooler (it refused the pool's startup options){advice}"
                ));
            }
        } else if parse_pg_duration(&info.statement_timeout) != Some(c.statement_timeout()) {
            warnings.push(format!(
                "statement_timeout is {}, PGSESSION_STATEMENT_TIMEOUT asks for {}: something \
                 between (a pooler, a role or database setting) overrides it",
                info.statement_timeout,
                humantime(c.statement_timeout())
            ));
        }
        if !failures.is_empty() {
            failures.extend(warnings);
            self.report
                .fail(POOL, Some(took), detail, failures.join("; "));
        } else if !warnings.is_empty() {
            self.report.push(
                POOL,
                Verdict::Warn,
                Some(took),
                detail,
                Some(warnings.join("; ")),
            );
        } else {
            self.timed_ok(POOL, took, detail);
        }
    }
}
