//! The connection probes of `doctor`, one step each: the name resolved, a
//! TCP connection, TLS negotiated and the certificate checked, then the
//! login. The first three open a connection of their own to the URL's
//! first host, so that a failure names the layer it happened in and gets
//! that layer's hint. The login, which decides whether the store can
//! connect, is the pool's own ([`pgsession::connect_one`]: its TLS
//! connector, channel binding included, and every host of a multi-host URL
//! in turn, so a first host that is down is only a warning there).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio_postgres::config::Host;
use tokio_postgres::Client;

use super::hints::{dns_hint, login_hint, tcp_hint};
use super::report::Verdict;
use super::{Doctor, AUTH, DNS, TCP, TLS};

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
