//! `pgsession doctor`: checks a database connection the way the session
//! pool makes it, one step at a time, and says for each step how long it
//! took, whether it worked, and, when it did not, the likely cause and the
//! setting to change.
//!
//! The steps, in order ([`STEPS`]): the URL parsed (printed with the
//! password hidden), the host name resolved, a TCP connection, TLS
//! negotiated and the certificate verified (when TLS is in use), the login
//! (the pool's own), the server's version, a first query, the session table
//! and its index, the sessions in it (live and expired), and the settings
//! in force on a connection of the session pool itself
//! ([`pgsession::Store::server_info`]) next to the pool's configuration.
//! For a multi-host URL, a last step looks at every host: which is the
//! primary, which are standbys, and how far behind.
//!
//! This module holds the order of the steps and the command;
//! [`probe`] the connection steps ([`tls`] the TLS one), [`catalog`] the queries on the server,
//! [`settings`] the pool step, [`replication`] the hosts of a multi-host
//! URL, [`hints`] what to change, and [`report`] the result and its text
//! and JSON renderings.
//!
//! Nothing is changed in the database: the table is not created (the pool
//! step runs with `create_table` off), no journal file is read or written.

mod catalog;
mod hints;
mod probe;
mod replication;
mod report;
mod settings;
mod tls;

use std::time::{Duration, Instant};

use pgsession::{Config, SslMode};

use crate::args::{DoctorArgs, StoreArgs};
use hints::{connect_timeout_hint, query_hint, query_timeout_hint};
use report::humantime;
pub(crate) use report::{format_duration, Report, Verdict};

/// The steps, in order.
pub(crate) const URL: &str = "URL parsed";
pub(crate) const DNS: &str = "name resolved";
pub(crate) const TCP: &str = "TCP connected";
pub(crate) const TLS: &str = "TLS negotiated";
pub(crate) const AUTH: &str = "authenticated";
pub(crate) const VERSION: &str = "server version";
pub(crate) const QUERY: &str = "first query";
pub(crate) const TABLE: &str = "table and index";
pub(crate) const SESSIONS: &str = "sessions";
pub(crate) const POOL: &str = "pool settings";
/// Only for a multi-host URL.
pub(crate) const HOSTS: &str = "hosts";
const STEPS: [&str; 10] = [
    URL, DNS, TCP, TLS, AUTH, VERSION, QUERY, TABLE, SESSIONS, POOL,
];

/// The command: diagnose, print (text, or JSON with `--json`), fail when a
/// step failed.
pub(crate) async fn run(args: DoctorArgs) -> anyhow::Result<()> {
    let report = diagnose(&args.store).await;
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{report}");
    }
    match report.failures() {
        0 => Ok(()),
        n => Err(anyhow::anyhow!(
            "doctor: {n} check{} failed",
            if n == 1 { "" } else { "s" }
        )),
    }
}

/// Runs every step it can against the database of `args`.
pub(crate) async fn diagnose(args: &StoreArgs) -> Report {
    let mut report = Report {
        target: "(no database URL)".to_owned(),
        ..Report::default()
    };
    let started = Instant::now();
    if args.database_url().is_none() {
        report.fail(
            URL,
            None,
            "no database URL given",
            "set DATABASE_URL (or pass --database-url), e.g. \
             postgres://user:password@host:5432/dbname?sslmode=verify-full",
        );
        report.skip_rest();
        return report;
    }
    let built = args.builder().map_err(|e| e.to_string()).and_then(|b| {
        let config = b.clone().build().map_err(|e| e.to_string())?;
        Ok((b, config))
    });
    let (builder, config) = match built {
        Ok(built) => built,
        Err(e) => {
            report.target = "(configuration refused)".to_owned();
            let about_the_url = ["`url`", "DATABASE_URL", "sslmode", "sslrootcert"]
                .iter()
                .any(|s| e.contains(s));
            let hint = if about_the_url {
                "fix the URL: it looks like \
                 postgres://user:password@host:5432/dbname?sslmode=verify-full \
                 (percent-encode @ : / in the password)"
            } else {
                "fix the value named above (see `pgsession doctor --help`)"
            };
            report.fail(URL, Some(started.elapsed()), e, hint);
            report.skip_rest();
            return report;
        }
    };
    report.target = redacted_url(&config);
    let hosts = config.postgres().get_hosts().len();
    report.ok(
        URL,
        started.elapsed(),
        format!(
            "{}{}",
            report.target,
            if hosts > 1 {
                format!(" ({hosts} hosts: probing the first, logging in as the pool does)")
            } else {
                String::new()
            }
        ),
    );
    let mut doctor = Doctor {
        builder,
        config,
        report,
        server_version: None,
    };
    doctor.check().await;
    let mut report = doctor.report;
    report.skip_rest();
    report
}

struct Doctor {
    /// The settings `config` was built from, for the pool step's own.
    builder: pgsession::ConfigBuilder,
    config: Config,
    report: Report,
    server_version: Option<String>,
}

impl Doctor {
    /// Every step after the URL, in order; a step that fails stops those
    /// that need it.
    async fn check(&mut self) {
        self.check_the_pools_server().await;
        if self.config.postgres().get_hosts().len() > 1 {
            // After the steps of the server the pool reaches, whatever they
            // found: what each host is.
            self.report.skip_rest();
            self.hosts().await;
        }
    }

    async fn check_the_pools_server(&mut self) {
        let Some(client) = self.connect().await else {
            return;
        };
        if !self.server(&client).await {
            return;
        }
        if self.table(&client).await {
            self.sessions(&client).await;
            self.pool().await;
        } else {
            let reason = match self.report.step(TABLE).map(|s| s.verdict) {
                Some(Verdict::Fail) => "not run: the session table is not usable",
                _ => "not run: the session table does not exist yet",
            };
            for name in [SESSIONS, POOL] {
                self.report.push(name, Verdict::Skip, None, reason, None);
            }
        }
    }

    fn connect_timeout(&self) -> Duration {
        self.config.connect_timeout()
    }

    /// A warning when a step took longer than the slow-check threshold.
    fn timed_ok(&mut self, name: &'static str, took: Duration, detail: String) {
        let slow = self.config.slow_check_threshold();
        if took > slow {
            let hint = format!(
                "slow: {} (over the {} slow-check threshold). A database waking from \
                 suspension answers like this; keep PGSESSION_CONNECT_TIMEOUT (now {}) well \
                 above it. Otherwise the database is far from this machine or overloaded.",
                format_duration(took),
                format_duration(slow),
                humantime(self.connect_timeout())
            );
            self.report
                .push(name, Verdict::Warn, Some(took), detail, Some(hint));
        } else {
            self.report.ok(name, took, detail);
        }
    }

    /// The failure of a connecting step that ran out of time.
    fn connect_timed_out(&mut self, name: &'static str, took: Duration, what: &str) {
        let detail = format!(
            "{what}: no answer within the connect timeout ({})",
            humantime(self.connect_timeout())
        );
        self.report.fail(
            name,
            Some(took),
            detail,
            connect_timeout_hint(self.connect_timeout()),
        );
    }

    /// Runs a query step within the query timeout; on failure reports it
    /// under `name` (`late` gives the detail when the timeout passed, from
    /// the timeout as the settings write it) and returns `None`.
    async fn query_step<T>(
        &mut self,
        name: &'static str,
        started: Instant,
        late: impl FnOnce(String) -> String,
        query: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Option<T> {
        let timeout = self.config.query_timeout();
        match tokio::time::timeout(timeout, query).await {
            Ok(Ok(value)) => Some(value),
            Ok(Err(e)) => {
                let e = pgsession::Error::Postgres(e);
                self.report
                    .fail(name, Some(started.elapsed()), e.to_string(), query_hint(&e));
                None
            }
            Err(_) => {
                self.report.fail(
                    name,
                    Some(started.elapsed()),
                    late(humantime(timeout)),
                    query_timeout_hint(timeout),
                );
                None
            }
        }
    }
}

/// The URL as the operator should see it: the password hidden, the hosts
/// as [`Config::target`] writes them.
pub(crate) fn redacted_url(config: &Config) -> String {
    let pg = config.postgres();
    let mut url = String::from("postgres://");
    if let Some(user) = pg.get_user() {
        url.push_str(user);
        if pg.get_password().is_some() {
            url.push_str(":****");
        }
        url.push('@');
    }
    url.push_str(&config.target());
    url.push_str("?sslmode=");
    url.push_str(ssl_mode_name(config.tls().mode));
    if let Some(root) = &config.tls().root_cert {
        url.push_str("&sslrootcert=");
        url.push_str(&root.display().to_string());
    }
    url
}

fn ssl_mode_name(mode: SslMode) -> &'static str {
    match mode {
        SslMode::Disable => "disable",
        SslMode::Prefer => "prefer",
        SslMode::Require => "require",
        SslMode::VerifyCa => "verify-ca",
        SslMode::VerifyFull => "verify-full",
    }
}

/// A duration as PostgreSQL shows one (`30s`, `1min`, `500ms`, `0`), with
/// the library's parser.
fn parse_pg_duration(text: &str) -> Option<Duration> {
    pgsession::config::parse_duration("statement_timeout", text.trim()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(pairs: &[(&'static str, &str)]) -> StoreArgs {
        StoreArgs::from_pairs(pairs)
    }

    fn verdicts(report: &Report) -> Vec<(&'static str, Verdict)> {
        report.steps.iter().map(|s| (s.name, s.verdict)).collect()
    }

    #[test]
    fn durations_read_as_the_server_writes_them() {
        assert_eq!(parse_pg_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_pg_duration("1min"), Some(Duration::from_secs(60)));
        assert_eq!(parse_pg_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_pg_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_pg_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_pg_duration("soon"), None);
        assert_eq!(humantime(Duration::from_secs(20)), "20s");
        assert_eq!(humantime(Duration::from_millis(1500)), "1500ms");
        assert_eq!(humantime(Duration::from_secs(120)), "2m");
        assert_eq!(format_duration(Duration::from_millis(3020)), "3.02 s");
        assert_eq!(format_duration(Duration::from_micros(1500)), "1.5 ms");
    }

    #[test]
    fn the_password_is_hidden_and_kept() {
        let config = Config::builder()
            .url("postgres://app:s3cr%40t@db.example.com:6543/app?sslmode=verify-full")
            .build()
            .unwrap();
        let shown = redacted_url(&config);
        assert_eq!(
            shown,
            "postgres://app:****@db.example.com:6543/app?sslmode=verify-full"
        );
        assert!(!shown.contains("s3cr"));
    }

    #[tokio::test]
    async fn no_url_fails_the_first_step() {
        let report = diagnose(&args(&[])).await;
        assert_eq!(report.failures(), 1);
        assert_eq!(report.steps.len(), STEPS.len());
        assert_eq!(report.steps[0].verdict, Verdict::Fail);
        assert!(report.steps[1..].iter().all(|s| s.verdict == Verdict::Skip));
    }

    #[tokio::test]
    async fn a_closed_port_fails_at_tcp_with_the_hint() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("postgres://app:hunter2@127.0.0.1:{port}/app");
        let report = diagnose(&args(&[("url", &url)])).await;
        let text = report.to_string();
        assert!(!text.contains("hunter2"), "{text}");
        assert_eq!(
            &verdicts(&report)[..4],
            &[
                (URL, Verdict::Ok),
                (DNS, Verdict::Ok),
                (TCP, Verdict::Fail),
                (TLS, Verdict::Skip)
            ],
            "{text}"
        );
        let hint = report.step(TCP).unwrap().hint.as_deref().unwrap();
        assert!(hint.contains("refused"), "{text}");
    }

    #[tokio::test]
    async fn a_good_database_passes_every_step() {
        let db = pgsession_testkit::TestDb::new()
            .await
            .unwrap_or_else(|e| panic!("no test database: {e}"));
        // The table, with one live and one expired session.
        let store =
            pgsession::Store::new(Config::builder().url(db.url()).build().unwrap()).unwrap();
        store.ready().await.unwrap();
        let now = time::OffsetDateTime::now_utc();
        store
            .save("live", r#"{"cookie":{}}"#, now + time::Duration::hours(1))
            .await
            .unwrap();
        store
            .save("gone", r#"{"cookie":{}}"#, now - time::Duration::hours(1))
            .await
            .unwrap();
        store.close().await;

        // A threshold no step reaches on a loaded machine: the verdicts
        // must not depend on the clock.
        let report = diagnose(&args(&[("url", db.url()), ("slow_check_threshold", "10m")])).await;
        let text = report.to_string();
        for step in &report.steps {
            assert_eq!(step.verdict, Verdict::Ok, "{}: {text}", step.name);
        }
        assert_eq!(report.steps.len(), STEPS.len(), "{text}");
        assert!(
            report
                .step(SESSIONS)
                .unwrap()
                .detail
                .contains("1 live, 1 expired"),
            "{text}"
        );
        let pool = &report.step(POOL).unwrap().detail;
        assert!(
            pool.contains("TimeZone UTC") && pool.contains("pool size 5"),
            "{text}"
        );
        assert!(
            report
                .mode
                .as_deref()
                .is_some_and(|m| m.starts_with("direct")),
            "{text}"
        );
    }
}
