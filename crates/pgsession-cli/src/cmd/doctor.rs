//! `pgsession doctor`: checks a database connection the way the session
//! pool makes it, one step at a time, and says for each step how long it
//! took, whether it worked, and, when it did not, the likely cause and the
//! setting to change.
//!
//! The steps: the URL parsed (printed with the password hidden), the host
//! name resolved, a TCP connection, TLS negotiated and the certificate
//! verified (when TLS is in use), the login, the server's version, a first
//! query, the session table and its index, the sessions in it (live and
//! expired), and the settings in force on a connection of the session pool
//! itself ([`pgsession::Store::server_info`]: TimeZone, statement timeout,
//! standby or not) next to the pool's configuration. It also tells a direct
//! connection from one through a pooler.
//!
//! [`diagnose`] does the work and returns a [`Report`]; [`run`] prints it.
//! Nothing is changed in the database: the table is not created (the pool
//! step runs with `create_table` off), no spool file is read or written.
//!
//! Connecting (TCP, TLS, login) shares one deadline, the connect timeout,
//! as a connection of the pool does.

use std::fmt::{self, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgsession::{Config, SslMode};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::config::Host;
use tokio_postgres::{Client, NoTls};

use crate::args::{DoctorArgs, StoreArgs};
use crate::cmd::table_name;

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
const STEPS: [&str; 10] = [
    URL, DNS, TCP, TLS, AUTH, VERSION, QUERY, TABLE, SESSIONS, POOL,
];

/// How a step went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Fine.
    Ok,
    /// Works, but something deserves a look (slow, unverified, unusual).
    Warn,
    /// Does not work: the session store would fail here.
    Fail,
    /// Not run, because an earlier step failed.
    Skip,
}

impl Verdict {
    fn label(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "skip",
        }
    }
}

/// One step of the report.
#[derive(Debug, Clone)]
pub(crate) struct Step {
    pub(crate) name: &'static str,
    pub(crate) verdict: Verdict,
    pub(crate) took: Option<Duration>,
    /// What was found.
    pub(crate) detail: String,
    /// For a warning or a failure: the likely cause and what to change.
    pub(crate) hint: Option<String>,
}

/// What `doctor` found.
#[derive(Debug, Clone, Default)]
pub(crate) struct Report {
    /// The database, password hidden.
    pub(crate) target: String,
    pub(crate) steps: Vec<Step>,
    /// Direct connection or behind a pooler, when it could be told.
    pub(crate) mode: Option<String>,
}

impl Report {
    /// The step called `name`, if it was reported.
    pub(crate) fn step(&self, name: &str) -> Option<&Step> {
        self.steps.iter().find(|s| s.name == name)
    }

    /// Steps that failed.
    pub(crate) fn failures(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| s.verdict == Verdict::Fail)
            .count()
    }

    fn warnings(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| s.verdict == Verdict::Warn)
            .count()
    }

    fn push(
        &mut self,
        name: &'static str,
        verdict: Verdict,
        took: Option<Duration>,
        detail: impl Into<String>,
        hint: Option<String>,
    ) {
        self.steps.push(Step {
            name,
            verdict,
            took,
            detail: detail.into(),
            hint,
        });
    }

    fn ok(&mut self, name: &'static str, took: Duration, detail: impl Into<String>) {
        self.push(name, Verdict::Ok, Some(took), detail, None);
    }

    fn fail(
        &mut self,
        name: &'static str,
        took: Option<Duration>,
        detail: impl Into<String>,
        hint: impl Into<String>,
    ) {
        self.push(name, Verdict::Fail, took, detail, Some(hint.into()));
    }

    /// Marks every step after the last one reported as not run.
    fn skip_rest(&mut self) {
        let failed = self
            .steps
            .iter()
            .rev()
            .find(|s| s.verdict == Verdict::Fail)
            .map_or("an earlier step", |s| s.name);
        let done = self.steps.len();
        for name in &STEPS[done.min(STEPS.len())..] {
            self.push(
                name,
                Verdict::Skip,
                None,
                format!("not run: {failed} failed"),
                None,
            );
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "pgsession doctor: {}", self.target)?;
        writeln!(f)?;
        let width = STEPS.iter().map(|s| s.len()).max().unwrap_or(0);
        for step in &self.steps {
            let took = step.took.map(format_duration).unwrap_or_default();
            writeln!(
                f,
                "  {:<4}  {:<width$}  {:>9}  {}",
                step.verdict.label(),
                step.name,
                took,
                step.detail
            )?;
            if let Some(hint) = &step.hint {
                let label = match step.verdict {
                    Verdict::Ok => "note",
                    _ => "hint",
                };
                writeln!(f, "  {:<4}  {:<width$}  {:>9}  {label}: {hint}", "", "", "")?;
            }
        }
        writeln!(f)?;
        if let Some(mode) = &self.mode {
            writeln!(f, "mode: {mode}")?;
        }
        let (failures, warnings) = (self.failures(), self.warnings());
        let checks = self
            .steps
            .iter()
            .filter(|s| s.verdict != Verdict::Skip)
            .count();
        if failures > 0 {
            writeln!(
                f,
                "result: FAILED: {failures} of {checks} checks failed{}",
                plural_warnings(warnings)
            )
        } else {
            writeln!(
                f,
                "result: ok: {checks} checks passed{}",
                plural_warnings(warnings)
            )
        }
    }
}

fn plural_warnings(n: usize) -> String {
    match n {
        0 => String::new(),
        1 => ", 1 warning".to_owned(),
        n => format!(", {n} warnings"),
    }
}

/// `12.3 ms`, `3.02 s`.
pub(crate) fn format_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 0.999_95 {
        format!("{:.1} ms", s * 1000.0)
    } else {
        format!("{s:.2} s")
    }
}

/// The command: diagnose, print, fail when a step failed.
pub(crate) async fn run(args: DoctorArgs) -> anyhow::Result<()> {
    let report = diagnose(&args.store).await;
    print!("{report}");
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
                format!(" ({hosts} hosts: checking the first)")
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
    doctor.connect_and_check().await;
    let mut report = doctor.report;
    if report.steps.len() < STEPS.len() {
        report.skip_rest();
    }
    report
}

struct Doctor {
    /// The settings `config` was built from, for the pool step's own.
    builder: pgsession::ConfigBuilder,
    config: Config,
    report: Report,
    server_version: Option<String>,
}

/// Where to connect.
enum Target {
    /// `host` is resolved (unless `addr`, libpq's `hostaddr`, is given) and
    /// is the name the certificate must carry.
    Tcp {
        host: String,
        addr: Option<IpAddr>,
        port: u16,
    },
    Unix {
        path: std::path::PathBuf,
        port: u16,
    },
}

impl Doctor {
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

    async fn connect_and_check(&mut self) {
        let pg = self.config.postgres().clone();
        let port = pg.get_ports().first().copied().unwrap_or(5432);
        let addr = pg.get_hostaddrs().first().copied();
        let target = match (pg.get_hosts().first(), addr) {
            (Some(Host::Tcp(host)), addr) => Target::Tcp {
                host: host.clone(),
                addr,
                port,
            },
            (Some(Host::Unix(path)), None) => Target::Unix {
                path: path.clone(),
                port,
            },
            (_, Some(addr)) => Target::Tcp {
                host: addr.to_string(),
                addr: Some(addr),
                port,
            },
            (None, None) => Target::Tcp {
                host: "localhost".to_owned(),
                addr: None,
                port,
            },
        };
        let deadline = Instant::now() + self.connect_timeout();
        let client = match target {
            Target::Unix { path, port } => {
                let socket = path.join(format!(".s.PGSQL.{port}"));
                self.report.ok(
                    DNS,
                    Duration::ZERO,
                    format!("Unix socket {}: no name to resolve", socket.display()),
                );
                let started = Instant::now();
                let stream = match tokio::time::timeout_at(
                    deadline.into(),
                    tokio::net::UnixStream::connect(&socket),
                )
                .await
                {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        self.report.fail(
                            TCP,
                            Some(started.elapsed()),
                            format!("{}: {e}", socket.display()),
                            "no server listens on this socket: is PostgreSQL running, and is \
                             the socket directory (host=) and port right?",
                        );
                        return;
                    }
                    Err(_) => {
                        self.connect_timed_out(TCP, started.elapsed(), "connecting the socket");
                        return;
                    }
                };
                self.timed_ok(
                    TCP,
                    started.elapsed(),
                    format!("{} (Unix socket)", socket.display()),
                );
                self.report.ok(
                    TLS,
                    Duration::ZERO,
                    "not used over a Unix socket (local link)",
                );
                self.authenticate(stream, deadline).await
            }
            Target::Tcp { host, addr, port } => {
                let addrs = match addr {
                    Some(ip) => {
                        self.report.ok(
                            DNS,
                            Duration::ZERO,
                            format!("hostaddr {ip} given: nothing to resolve"),
                        );
                        Some(vec![SocketAddr::new(ip, port)])
                    }
                    None => self.resolve(&host, port, deadline).await,
                };
                let Some(addrs) = addrs else {
                    return;
                };
                let Some(stream) = self.tcp(&addrs, deadline).await else {
                    return;
                };
                let local = addrs.iter().all(|a| a.ip().is_loopback());
                match self.negotiate_tls(stream, &host, local, deadline).await {
                    Negotiated::Plain(stream) => self.authenticate(stream, deadline).await,
                    Negotiated::Tls(stream) => self.authenticate(*stream, deadline).await,
                    Negotiated::Failed => return,
                }
            }
        };
        let Some(client) = client else { return };
        if !self.server(&client).await {
            return;
        }
        let table_ok = self.table(&client).await;
        if table_ok {
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

    async fn resolve(
        &mut self,
        host: &str,
        port: u16,
        deadline: Instant,
    ) -> Option<Vec<SocketAddr>> {
        let started = Instant::now();
        if let Ok(ip) = host.parse::<IpAddr>() {
            self.report.ok(
                DNS,
                started.elapsed(),
                format!("{ip} is an IP address: nothing to resolve"),
            );
            return Some(vec![SocketAddr::new(ip, port)]);
        }
        let lookup = tokio::net::lookup_host((host, port));
        match tokio::time::timeout_at(deadline.into(), lookup).await {
            Ok(Ok(addrs)) => {
                let addrs: Vec<SocketAddr> = addrs.collect();
                if addrs.is_empty() {
                    self.report.fail(
                        DNS,
                        Some(started.elapsed()),
                        format!("{host} has no address"),
                        dns_hint(host),
                    );
                    return None;
                }
                let shown: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
                self.timed_ok(
                    DNS,
                    started.elapsed(),
                    format!("{host} -> {}", shown.join(", ")),
                );
                Some(addrs)
            }
            Ok(Err(e)) => {
                self.report.fail(
                    DNS,
                    Some(started.elapsed()),
                    format!("{host}: {e}"),
                    dns_hint(host),
                );
                None
            }
            Err(_) => {
                self.connect_timed_out(DNS, started.elapsed(), &format!("resolving {host}"));
                None
            }
        }
    }

    /// Connects to each address in turn, as libpq does.
    async fn tcp(&mut self, addrs: &[SocketAddr], deadline: Instant) -> Option<TcpStream> {
        let started = Instant::now();
        let mut errors = Vec::new();
        let mut refused = false;
        for addr in addrs {
            match tokio::time::timeout_at(deadline.into(), TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    self.timed_ok(TCP, started.elapsed(), addr.to_string());
                    return Some(stream);
                }
                Ok(Err(e)) => {
                    refused |= e.kind() == std::io::ErrorKind::ConnectionRefused;
                    errors.push(format!("{addr}: {e}"));
                }
                Err(_) => {
                    errors.push(format!("{addr}: no answer"));
                    let what = errors.join("; ");
                    self.connect_timed_out(TCP, started.elapsed(), &what);
                    return None;
                }
            }
        }
        let hint = if refused {
            "connection refused: nothing listens there. The database is stopped or \
             restarting, the host or port in DATABASE_URL is wrong, or a firewall rejects \
             the connection."
        } else {
            "no route to the database: check the host and port in DATABASE_URL, this \
             machine's network, and the firewall or security group in front of the database."
        };
        self.report
            .fail(TCP, Some(started.elapsed()), errors.join("; "), hint);
        None
    }

    async fn negotiate_tls(
        &mut self,
        mut stream: TcpStream,
        host: &str,
        local: bool,
        deadline: Instant,
    ) -> Negotiated {
        let tls = self.config.tls().clone();
        let started = Instant::now();
        if tls.mode == SslMode::Disable {
            if local {
                self.report.ok(
                    TLS,
                    Duration::ZERO,
                    "not used (sslmode=disable, local link)",
                );
            } else {
                self.report.push(
                    TLS,
                    Verdict::Warn,
                    Some(Duration::ZERO),
                    "not used (sslmode=disable)",
                    Some(
                        "the password and the sessions cross the network in clear: use \
                         sslmode=verify-full (with sslrootcert= when the CA is not a public one)"
                            .to_owned(),
                    ),
                );
            }
            return Negotiated::Plain(stream);
        }
        // SSLRequest: length 8, code 80877103.
        let request = async {
            stream
                .write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
                .await?;
            let mut answer = [0u8; 1];
            stream.read_exact(&mut answer).await?;
            Ok::<u8, std::io::Error>(answer[0])
        };
        let answer = match tokio::time::timeout_at(deadline.into(), request).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                self.report.fail(
                    TLS,
                    Some(started.elapsed()),
                    format!("the server closed the connection when asked for TLS: {e}"),
                    "something other than PostgreSQL answers on this port, or a proxy in \
                     between drops the connection: check the host and port",
                );
                return Negotiated::Failed;
            }
            Err(_) => {
                self.connect_timed_out(TLS, started.elapsed(), "asking the server for TLS");
                return Negotiated::Failed;
            }
        };
        match answer {
            b'S' => {}
            b'N' if tls.mode == SslMode::Prefer => {
                let detail = "not in use: the server does not offer TLS (sslmode=prefer)";
                if local {
                    self.timed_ok(TLS, started.elapsed(), detail.to_owned());
                } else {
                    self.report.push(
                        TLS,
                        Verdict::Warn,
                        Some(started.elapsed()),
                        detail,
                        Some(
                            "the link is not encrypted: enable ssl on the server and use \
                             sslmode=verify-full"
                                .to_owned(),
                        ),
                    );
                }
                return Negotiated::Plain(stream);
            }
            b'N' => {
                self.report.fail(
                    TLS,
                    Some(started.elapsed()),
                    format!(
                        "the server does not offer TLS, and sslmode={} requires it",
                        ssl_mode_name(tls.mode)
                    ),
                    "enable ssl on the server (ssl = on, a certificate and key), or, on a \
                     trusted network only, set sslmode=prefer or disable in DATABASE_URL",
                );
                return Negotiated::Failed;
            }
            other => {
                self.report.fail(
                    TLS,
                    Some(started.elapsed()),
                    format!("unexpected answer {other:#04x} to the TLS request"),
                    "something other than PostgreSQL (or a pooler that does not speak TLS) \
                     answers on this port: check the host and port",
                );
                return Negotiated::Failed;
            }
        }
        let verifier = match RecordingVerifier::new(&tls) {
            Ok(verifier) => Arc::new(verifier),
            Err(e) => {
                self.report.fail(
                    TLS,
                    Some(started.elapsed()),
                    e,
                    "point sslrootcert= in DATABASE_URL at a readable PEM file of the CA that \
                     signed the server's certificate (your provider documents it)",
                );
                return Negotiated::Failed;
            }
        };
        let client_config = match pgsession::tls::client_config(&tls, verifier.clone()) {
            Ok(config) => config,
            Err(e) => {
                self.report.fail(
                    TLS,
                    Some(started.elapsed()),
                    format!("cannot set up TLS: {e}"),
                    "a bug: please report it",
                );
                return Negotiated::Failed;
            }
        };
        let Ok(name) = ServerName::try_from(host.to_owned()) else {
            self.report.fail(
                TLS,
                Some(started.elapsed()),
                format!("{host:?} cannot be checked against a certificate"),
                "use a DNS name or an IP address as the host",
            );
            return Negotiated::Failed;
        };
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
        let handshake = connector.connect(name, stream);
        let stream = match tokio::time::timeout_at(deadline.into(), handshake).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                let hint = tls_hint(&e, tls.mode);
                self.report.fail(
                    TLS,
                    Some(started.elapsed()),
                    format!("TLS handshake failed: {e}"),
                    hint,
                );
                return Negotiated::Failed;
            }
            Err(_) => {
                self.connect_timed_out(TLS, started.elapsed(), "the TLS handshake");
                return Negotiated::Failed;
            }
        };
        let (_, session) = stream.get_ref();
        let version = session
            .protocol_version()
            .map(|v| format!("{v:?}").replace('_', "."))
            .unwrap_or_else(|| "TLS".to_owned());
        let verified = verifier.outcome();
        let took = started.elapsed();
        match (tls.mode, tls.accept_invalid_certs, verified) {
            (SslMode::Prefer, false, Some(Ok(()))) => self.timed_ok(
                TLS,
                took,
                format!("{version}; certificate valid for {host} (not required by sslmode=prefer)"),
            ),
            (SslMode::Prefer, false, outcome) | (_, true, outcome) => {
                let why = match outcome {
                    Some(Err(e)) => format!(" (it would fail verification: {e})"),
                    _ => String::new(),
                };
                self.report.push(
                    TLS,
                    Verdict::Warn,
                    Some(took),
                    format!("{version}; certificate NOT verified{why}"),
                    Some(if tls.accept_invalid_certs {
                        "PGSESSION_TLS_INSECURE is on: anyone on the path can impersonate the \
                         database. Turn it off outside tests."
                            .to_owned()
                    } else {
                        "sslmode=prefer encrypts without checking who answers: use \
                         sslmode=verify-full (and sslrootcert= for a private CA)"
                            .to_owned()
                    }),
                );
            }
            (mode, false, _) => self.timed_ok(
                TLS,
                took,
                format!(
                    "{version}; certificate verified ({})",
                    if mode == SslMode::VerifyCa {
                        "chain only: sslmode=verify-ca".to_owned()
                    } else {
                        format!("chain and host name {host}")
                    }
                ),
            ),
        }
        Negotiated::Tls(Box::new(stream))
    }

    /// The login, on the stream already open (and encrypted, if it is).
    async fn authenticate<S>(&mut self, stream: S, deadline: Instant) -> Option<Client>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let started = Instant::now();
        let mut pg = self.config.postgres().clone();
        pg.ssl_mode(tokio_postgres::config::SslMode::Disable);
        if pg.get_application_name().is_none() {
            pg.application_name("pgsession doctor");
        }
        let user = pg.get_user().unwrap_or("(none)").to_owned();
        let db = pg.get_dbname().unwrap_or(&user).to_owned();
        match tokio::time::timeout_at(deadline.into(), pg.connect_raw(stream, NoTls)).await {
            Ok(Ok((client, connection))) => {
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                self.timed_ok(
                    AUTH,
                    started.elapsed(),
                    format!("as {user} on database {db}"),
                );
                Some(client)
            }
            Ok(Err(e)) => {
                let (detail, hint) = describe_pg_error(&e, &user, &db, self.connect_timeout());
                self.report
                    .fail(AUTH, Some(started.elapsed()), detail, hint);
                None
            }
            Err(_) => {
                self.connect_timed_out(AUTH, started.elapsed(), "logging in");
                None
            }
        }
    }

    /// The version, a first query, and whether a pooler is in between.
    /// False when a step failed.
    async fn server(&mut self, client: &Client) -> bool {
        let started = Instant::now();
        let version = async {
            let row = client
                .query_one(
                    "SELECT current_setting('server_version'), \
                     current_setting('server_version_num')::int, version()",
                    &[],
                )
                .await?;
            Ok::<_, tokio_postgres::Error>((
                row.get::<_, String>(0),
                row.get::<_, i32>(1),
                row.get::<_, String>(2),
            ))
        };
        let late = |t: String| format!("no answer within the query timeout ({t})");
        match self.query_step(VERSION, started, late, version).await {
            Some((short, num, long)) => {
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
            }
            None => return false,
        }

        let started = Instant::now();
        let late = |t: String| format!("SELECT 1: no answer within {t}");
        let select = client.simple_query("SELECT 1");
        let Some(_) = self.query_step(QUERY, started, late, select).await else {
            return false;
        };
        self.timed_ok(QUERY, started.elapsed(), "SELECT 1: one round trip".into());
        self.report.mode = Some(self.detect_pooler(client).await);
        true
    }

    /// A direct connection, or a pooler: `SHOW pool_mode` is unknown to
    /// PostgreSQL; a transaction pooler changes the server process between
    /// two statements of one client connection.
    async fn detect_pooler(&self, client: &Client) -> String {
        let configured = self.config.pooler();
        let pool_mode = match client.simple_query("SHOW pool_mode").await {
            Ok(messages) => messages.iter().find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
                _ => None,
            }),
            Err(_) => None,
        };
        let pid = || async {
            client
                .query_one("SELECT pg_backend_pid()", &[])
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
    async fn table(&mut self, client: &Client) -> bool {
        let started = Instant::now();
        let schema = self.config.schema().as_str().to_owned();
        let table = self.config.table().as_str().to_owned();
        let qualified = table_name(&self.config);
        let found = async {
            let oid: Option<u32> = client
                .query_opt(
                    "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                    &[&schema, &table],
                )
                .await?
                .map(|r| r.get(0));
            let Some(oid) = oid else {
                let can_create: bool = client
                    .query_one(
                        "SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1) \
                         THEN has_schema_privilege($1, 'CREATE') \
                         ELSE has_database_privilege(current_database(), 'CREATE') END",
                        &[&schema],
                    )
                    .await?
                    .get(0);
                let elsewhere: Vec<String> = client
                    .query(
                        "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
                         JOIN pg_namespace n ON n.oid = c.relnamespace \
                         WHERE c.relkind IN ('r', 'p') AND (c.relname = $1 OR c.relname = 'session') \
                         AND n.nspname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1 LIMIT 5",
                        &[&table],
                    )
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                return Ok::<_, tokio_postgres::Error>(TableFound::Missing {
                    can_create,
                    elsewhere,
                });
            };
            let columns: Vec<(String, String)> = client
                .query(
                    "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute \
                     WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                    &[&oid],
                )
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            let index: Option<String> = client
                .query_opt(
                    "SELECT i.indexrelid::regclass::text FROM pg_index i \
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] \
                     WHERE i.indrelid = $1 AND a.attname = 'expire' LIMIT 1",
                    &[&oid],
                )
                .await?
                .map(|r| r.get(0));
            let rights: bool = client
                .query_one(
                    "SELECT has_table_privilege($1::oid, 'SELECT, INSERT, UPDATE, DELETE')",
                    &[&oid],
                )
                .await?
                .get(0);
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
            } => {
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
        }
    }

    async fn sessions(&mut self, client: &Client) {
        let started = Instant::now();
        let qualified = table_name(&self.config);
        let sql = format!(
            "SELECT count(*) FILTER (WHERE expire > (now() AT TIME ZONE 'UTC')), \
             count(*) FILTER (WHERE expire <= (now() AT TIME ZONE 'UTC')) FROM {qualified}"
        );
        let late = |t: String| format!("counting did not finish within {t}");
        let count = client.query_one(&sql, &[]);
        let Some(row) = self.query_step(SESSIONS, started, late, count).await else {
            return;
        };
        let (live, expired): (i64, i64) = (row.get(0), row.get(1));
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
                let (detail, hint) = query_error(&e);
                self.report
                    .fail(name, Some(started.elapsed()), detail, hint);
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

    /// The settings in force on a connection of the session pool itself.
    async fn pool(&mut self) {
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

enum Negotiated {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Failed,
}

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

fn hosts_of(config: &Config) -> String {
    let pg = config.postgres();
    let ports = pg.get_ports();
    pg.get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            match host {
                Host::Tcp(name) if name.contains(':') => format!("[{name}]:{port}"),
                Host::Tcp(name) => format!("{name}:{port}"),
                Host::Unix(path) => format!("{}:{port}", path.display()),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The URL as the operator should see it: the password hidden.
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
    url.push_str(&hosts_of(config));
    url.push('/');
    url.push_str(pg.get_dbname().unwrap_or(""));
    let _ = write!(url, "?sslmode={}", ssl_mode_name(config.tls().mode));
    if let Some(root) = &config.tls().root_cert {
        let _ = write!(url, "&sslrootcert={}", root.display());
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

/// `1s`, `500ms`, `2m`: as the settings are written.
fn humantime(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        "0".to_owned()
    } else if ms.is_multiple_of(86_400_000) {
        format!("{}d", ms / 86_400_000)
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// A duration as PostgreSQL shows one (`30s`, `1min`, `500ms`, `0`), with
/// the library's parser.
fn parse_pg_duration(text: &str) -> Option<Duration> {
    pgsession::config::parse_duration("statement_timeout", text.trim()).ok()
}

fn connect_timeout_hint(timeout: Duration) -> String {
    format!(
        "connection timeout: a serverless database waking from suspension can take up to ~15 s \
         (cold start); raise PGSESSION_CONNECT_TIMEOUT (--connect-timeout, now {}) above its \
         wake-up time. If it never answers, a firewall or security group drops the connection \
         silently, or the host or port is wrong.",
        humantime(timeout)
    )
}

fn query_timeout_hint(timeout: Duration) -> String {
    format!(
        "the server is overloaded, a lock blocks the query, or the link is very slow; \
         PGSESSION_QUERY_TIMEOUT (now {}) bounds every operation",
        humantime(timeout)
    )
}

fn dns_hint(host: &str) -> String {
    format!(
        "the host name {host} does not resolve: check its spelling in DATABASE_URL, this \
         machine's DNS, and (for a private database) that this machine is on its network or VPN"
    )
}

/// What the SQLSTATE of a failed login means, and what to change.
fn sqlstate_hint(code: &str, user: &str, db: &str) -> Option<String> {
    Some(match code {
        "28P01" => format!(
            "password authentication failed for {user}: check the password in DATABASE_URL \
             (percent-encode @ : / # ? in it: @ is %40)"
        ),
        "28000" => format!(
            "the server refuses {user} from this address (pg_hba.conf), or requires TLS: add a \
             pg_hba.conf entry for this client, or try sslmode=require"
        ),
        "3D000" => {
            format!("database {db} does not exist: check the name at the end of DATABASE_URL")
        }
        "53300" => "too many clients: the server's max_connections is reached. Lower \
                    PGSESSION_POOL_SIZE and PGSESSION_POOL_MAX_SIZE (times the number of \
                    instances), raise max_connections, or put a pooler (PgBouncer) in front"
            .to_owned(),
        "57P03" => "the database is starting up, shutting down or in recovery: try again in a \
                    moment; a waking database needs PGSESSION_CONNECT_TIMEOUT above its start time"
            .to_owned(),
        "42501" => format!("{user} lacks a privilege: see the message above, and GRANT it"),
        c if c.starts_with("08") => "the connection failed at the protocol level: check sslmode \
                                     and that this port is PostgreSQL (or a pooler that accepts \
                                     this user and database)"
            .to_owned(),
        _ => return None,
    })
}

fn describe_pg_error(
    e: &tokio_postgres::Error,
    user: &str,
    db: &str,
    connect_timeout: Duration,
) -> (String, String) {
    if let Some(db_error) = e.as_db_error() {
        let code = db_error.code().code();
        let detail = format!("{} {code}: {}", db_error.severity(), db_error.message());
        let hint = sqlstate_hint(code, user, db)
            .unwrap_or_else(|| "see the server's message above".to_owned());
        return (detail, hint);
    }
    let text = error_chain(e);
    let hint = if text.contains("password missing") {
        format!("the server asks {user} for a password: put it in DATABASE_URL")
    } else if e.is_closed() || text.contains("closed") || text.contains("reset") {
        "the server closed the connection during the login: a pooler or proxy refused it, or \
         the server is restarting; check sslmode, the user and the database"
            .to_owned()
    } else if text.contains("timed out") {
        connect_timeout_hint(connect_timeout)
    } else {
        "see the error above".to_owned()
    };
    (text, hint)
}

/// An error and its causes, "a: b: c", each cause once.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

fn query_error(e: &tokio_postgres::Error) -> (String, String) {
    match e.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            (
                format!("{} {code}: {}", db.severity(), db.message()),
                sqlstate_hint(code, "this user", "this database")
                    .unwrap_or_else(|| "see the server's message above".to_owned()),
            )
        }
        None => (
            error_chain(e),
            "the connection broke: the server restarted, or a proxy cut the link".to_owned(),
        ),
    }
}

fn store_error_hint(e: &pgsession::Error, connect_timeout: Duration) -> String {
    if let Some(code) = e.sql_state() {
        if let Some(hint) = sqlstate_hint(code, "the user", "the database") {
            return hint;
        }
    }
    match e.kind() {
        pgsession::ErrorKind::Connect | pgsession::ErrorKind::ConnectionClosed => {
            connect_timeout_hint(connect_timeout)
        }
        pgsession::ErrorKind::Acquire => "no pool connection became free: raise \
                                          PGSESSION_ACQUIRE_TIMEOUT or PGSESSION_POOL_SIZE"
            .to_owned(),
        pgsession::ErrorKind::Timeout => query_timeout_hint(Duration::ZERO),
        pgsession::ErrorKind::Config => "fix the setting named above".to_owned(),
        _ => "see the error above".to_owned(),
    }
}

fn tls_hint(e: &std::io::Error, mode: SslMode) -> String {
    let text = e.to_string();
    if text.contains("UnknownIssuer") || text.contains("unknown issuer") {
        "the certificate is not signed by a CA this machine trusts: set sslrootcert=/path/to/ca.pem \
         in DATABASE_URL (your provider's CA bundle)"
            .to_owned()
    } else if text.contains("NotValidForName") || text.contains("not valid for name") {
        "the certificate does not name this host: connect with the name it was issued for, or use \
         sslmode=verify-ca to check the chain only"
            .to_owned()
    } else if text.contains("CaUsedAsEndEntity") {
        "the server presents a CA certificate as its own (self-signed): give the server a \
         certificate signed by a CA, and trust that CA with sslrootcert="
            .to_owned()
    } else if text.contains("Expired") || text.contains("expired") {
        "the server's certificate has expired: renew it on the server".to_owned()
    } else if mode == SslMode::Prefer {
        "the server offered TLS but the handshake failed: set sslmode=disable to try without, and \
         check the server's ssl settings"
            .to_owned()
    } else {
        "check the server's certificate and sslrootcert; PGSESSION_TLS_INSECURE=true skips \
         verification (tests only)"
            .to_owned()
    }
}

/// Verifies the server's certificate as the pool would, and remembers the
/// outcome: under `sslmode=prefer` (or the insecure opt-in) the handshake
/// goes on whatever it is, and the report says what verification would
/// have said.
#[derive(Debug)]
struct RecordingVerifier {
    signatures: pgsession::tls::HandshakeSignatures,
    /// The library's own check for this mode; `None` when it could not be
    /// built (a bad `sslrootcert`) and need not be (`prefer`).
    strict: Option<Arc<dyn ServerCertVerifier>>,
    accept_any: bool,
    outcome: Mutex<Option<Result<(), String>>>,
}

impl RecordingVerifier {
    fn new(tls: &pgsession::TlsConfig) -> Result<RecordingVerifier, String> {
        let accept_any = tls.accept_invalid_certs || tls.mode == SslMode::Prefer;
        let strict = match pgsession::tls::certificate_verifier(tls) {
            Ok(verifier) => Some(verifier),
            // Prefer does not verify: a bad sslrootcert only matters when it must.
            Err(_) if accept_any => None,
            Err(e) => return Err(e.to_string()),
        };
        Ok(RecordingVerifier {
            signatures: Default::default(),
            strict,
            accept_any,
            outcome: Mutex::new(None),
        })
    }

    fn outcome(&self) -> Option<Result<(), String>> {
        self.outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = match &self.strict {
            Some(strict) => {
                strict.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
            }
            None => Err(rustls::Error::General("no trusted roots".into())),
        };
        *self.outcome.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(verified.as_ref().map(drop).map_err(|e| e.to_string()));
        if self.accept_any {
            Ok(ServerCertVerified::assertion())
        } else {
            verified
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.supported_schemes()
    }
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

    #[test]
    fn hints_name_the_setting_to_change() {
        let too_many = sqlstate_hint("53300", "app", "db").unwrap();
        assert!(too_many.contains("PGSESSION_POOL_SIZE") && too_many.contains("max_connections"));
        let auth = sqlstate_hint("28P01", "app", "db").unwrap();
        assert!(auth.contains("password"), "{auth}");
        let timeout = connect_timeout_hint(Duration::from_secs(1));
        assert!(
            timeout.contains("PGSESSION_CONNECT_TIMEOUT") && timeout.contains("now 1s"),
            "{timeout}"
        );
        assert!(sqlstate_hint("23505", "app", "db").is_none());
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

        let report = diagnose(&args(&[("url", db.url())])).await;
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
