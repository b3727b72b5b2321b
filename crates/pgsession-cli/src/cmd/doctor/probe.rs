//! The connection probes of `doctor`, one step each: the name resolved, a
//! TCP connection, TLS negotiated and the certificate checked, then the
//! login. The first three open a connection of their own to the URL's
//! first host, so that a failure names the layer it happened in and gets
//! that layer's hint. The login, which decides whether the store can
//! connect, is the pool's own ([`pgsession::connect_one`]: its TLS
//! connector, channel binding included, and every host of a multi-host URL
//! in turn, so a first host that is down is only a warning there).

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgsession::SslMode;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::config::Host;
use tokio_postgres::Client;

use super::hints::{dns_hint, login_hint, tcp_hint, tls_hint};
use super::report::Verdict;
use super::{ssl_mode_name, Doctor, AUTH, DNS, TCP, TLS};

/// Where the probes connect: the first host of the URL.
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

impl Target {
    fn of(pg: &tokio_postgres::Config) -> Target {
        let port = pg.get_ports().first().copied().unwrap_or(5432);
        let addr = pg.get_hostaddrs().first().copied();
        match (pg.get_hosts().first(), addr) {
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
        }
    }
}

impl Doctor {
    /// The probes, then the login; the logged-in client, if it worked.
    pub(super) async fn connect(&mut self) -> Option<Client> {
        let deadline = Instant::now() + self.connect_timeout();
        let reachable = match Target::of(self.config.postgres()) {
            Target::Unix { path, port } => self.unix(&path, port, deadline).await,
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
                match addrs {
                    Some(addrs) => match self.tcp(&addrs, deadline).await {
                        Some(stream) => {
                            let local = addrs.iter().all(|a| a.ip().is_loopback());
                            self.negotiate_tls(stream, &host, local, deadline).await
                        }
                        None => false,
                    },
                    None => false,
                }
            }
        };
        if reachable {
            return self.login().await;
        }
        if self.config.postgres().get_hosts().len() < 2 {
            return None;
        }
        // The pool would go on to the next host: so does the login, and the
        // first host's failure is a warning (the hosts step says more).
        if let Some(step) = self
            .report
            .steps
            .iter_mut()
            .rev()
            .find(|s| s.verdict == Verdict::Fail)
        {
            step.verdict = Verdict::Warn;
            let hint = step.hint.take().unwrap_or_default();
            step.hint = Some(format!(
                "the first host: {hint} The pool goes on to the next host of the URL: see \
                 the login and the hosts step."
            ));
        }
        for name in [DNS, TCP, TLS] {
            if self.report.step(name).is_none() {
                self.report.push(
                    name,
                    Verdict::Skip,
                    None,
                    "not run: the first host did not get this far",
                    None,
                );
            }
        }
        self.login().await
    }

    async fn unix(&mut self, path: &std::path::Path, port: u16, deadline: Instant) -> bool {
        let socket = path.join(format!(".s.PGSQL.{port}"));
        self.report.ok(
            DNS,
            Duration::ZERO,
            format!("Unix socket {}: no name to resolve", socket.display()),
        );
        let started = Instant::now();
        let connect = tokio::net::UnixStream::connect(&socket);
        match tokio::time::timeout_at(deadline.into(), connect).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                self.report.fail(
                    TCP,
                    Some(started.elapsed()),
                    format!("{}: {e}", socket.display()),
                    "no server listens on this socket: is PostgreSQL running, and is \
                     the socket directory (host=) and port right?",
                );
                return false;
            }
            Err(_) => {
                self.connect_timed_out(TCP, started.elapsed(), "connecting the socket");
                return false;
            }
        }
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
        true
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
        self.report.fail(
            TCP,
            Some(started.elapsed()),
            errors.join("; "),
            tcp_hint(refused),
        );
        None
    }

    /// Asks for TLS and checks the certificate as the pool would, saying
    /// what verification found even where the mode does not require it.
    /// True when the login may go on.
    async fn negotiate_tls(
        &mut self,
        mut stream: TcpStream,
        host: &str,
        local: bool,
        deadline: Instant,
    ) -> bool {
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
            return true;
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
                return false;
            }
            Err(_) => {
                self.connect_timed_out(TLS, started.elapsed(), "asking the server for TLS");
                return false;
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
                return true;
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
                return false;
            }
            other => {
                self.report.fail(
                    TLS,
                    Some(started.elapsed()),
                    format!("unexpected answer {other:#04x} to the TLS request"),
                    "something other than PostgreSQL (or a pooler that does not speak TLS) \
                     answers on this port: check the host and port",
                );
                return false;
            }
        }
        let verifier = match RecordingVerifier::new(&tls) {
            Ok(verifier) => Arc::new(verifier),
            Err(e) => {
                let hint = match &tls.root_cert {
                    Some(_) => "point sslrootcert= in DATABASE_URL at a readable PEM file of the \
                                CA that signed the server's certificate (your provider documents it)"
                        .to_owned(),
                    None => format!(
                        "no CA to trust in {}: install the ca-certificates package, or set \
                         sslrootcert=/path/to/ca.pem in DATABASE_URL",
                        pgsession::tls::trust_source(&tls)
                    ),
                };
                self.report.fail(TLS, Some(started.elapsed()), e, hint);
                return false;
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
                return false;
            }
        };
        let Ok(name) = ServerName::try_from(host.to_owned()) else {
            self.report.fail(
                TLS,
                Some(started.elapsed()),
                format!("{host:?} cannot be checked against a certificate"),
                "use a DNS name or an IP address as the host",
            );
            return false;
        };
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
        let handshake = connector.connect(name, stream);
        let stream = match tokio::time::timeout_at(deadline.into(), handshake).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                let hint = tls_hint(&e.to_string(), &tls);
                self.report.fail(
                    TLS,
                    Some(started.elapsed()),
                    format!("TLS handshake failed: {e}"),
                    hint,
                );
                return false;
            }
            Err(_) => {
                self.connect_timed_out(TLS, started.elapsed(), "the TLS handshake");
                return false;
            }
        };
        let (_, session) = stream.get_ref();
        let version = session
            .protocol_version()
            .map(|v| format!("{v:?}").replace('_', "."))
            .unwrap_or_else(|| "TLS".to_owned());
        let trusted = pgsession::tls::trust_source(&tls);
        let took = started.elapsed();
        match (tls.mode, tls.accept_invalid_certs, verifier.outcome()) {
            (SslMode::Prefer, false, Some(Ok(()))) => self.timed_ok(
                TLS,
                took,
                format!(
                    "{version}; certificate valid for {host} by {trusted} (not required by \
                     sslmode=prefer)"
                ),
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
                    } else if tls.root_cert.is_some() {
                        "sslmode=prefer encrypts without checking who answers: use \
                         sslmode=verify-full"
                            .to_owned()
                    } else {
                        "sslmode=prefer encrypts without checking who answers: use \
                         sslmode=verify-full (and sslrootcert= for a CA this machine does not \
                         trust)"
                            .to_owned()
                    }),
                );
            }
            (mode, false, _) => self.timed_ok(
                TLS,
                took,
                format!(
                    "{version}; certificate verified ({}) by {trusted}",
                    if mode == SslMode::VerifyCa {
                        "chain only: sslmode=verify-ca".to_owned()
                    } else {
                        format!("chain and host name {host}")
                    }
                ),
            ),
        }
        true
    }

    /// The login, on a connection of its own opened as the pool opens
    /// one, within the pool's own bound for a new connection.
    async fn login(&mut self) -> Option<Client> {
        let started = Instant::now();
        let config = &self.config;
        let user = config.postgres().get_user().unwrap_or("(none)").to_owned();
        let db = config.postgres().get_dbname().unwrap_or(&user).to_owned();
        let budget = config.connect_budget();
        let tls = config.tls().clone();
        match tokio::time::timeout(budget, pgsession::connect_one(config)).await {
            Ok(Ok(client)) => {
                self.timed_ok(
                    AUTH,
                    started.elapsed(),
                    format!("as {user} on database {db}, as the pool logs in"),
                );
                Some(client)
            }
            Ok(Err(e)) => {
                let hint = login_hint(&e, &user, &db, &tls, self.connect_timeout());
                self.report
                    .fail(AUTH, Some(started.elapsed()), e.to_string(), hint);
                None
            }
            Err(_) => {
                self.connect_timed_out(AUTH, started.elapsed(), "logging in");
                None
            }
        }
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
