//! The HTTP load generator: a fixed number of keep-alive HTTP/1.1
//! connections (hyper's low-level client, one TCP connection each), each
//! with its own session cookie, sending its next request as soon as the
//! previous answer is read (a closed loop, as `wrk` does).
//!
//! Each connection first logs in (`POST /login`) and counts once
//! (`POST /counter`), so that its session exists; then it runs the workload
//! for the warm-up and for one or more measured windows. Only requests that
//! complete inside a measured window count; a request in flight when the
//! window closes is not counted.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// What each connection does over and over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Workload {
    /// `GET /counter` on an existing session.
    Read,
    /// `GET /counter` with rolling expiry on in the server.
    Rolling,
    /// `POST /counter`.
    Write,
    /// `POST /login`: a new session each time (the connection's previous
    /// session is destroyed, as `cycle_id`/`regenerate` do).
    Login,
}

impl Workload {
    /// Its name in tables.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Workload::Read => "read",
            Workload::Rolling => "rolling",
            Workload::Write => "write",
            Workload::Login => "login",
        }
    }

    /// The request it repeats: method, path and body.
    fn request(self, user: &str) -> (Method, &'static str, Bytes) {
        match self {
            Workload::Read | Workload::Rolling => (Method::GET, "/counter", Bytes::new()),
            Workload::Write => (Method::POST, "/counter", Bytes::new()),
            Workload::Login => (Method::POST, "/login", login_body(user)),
        }
    }
}

fn login_body(user: &str) -> Bytes {
    Bytes::from(serde_json::json!({ "user": user }).to_string())
}

/// What one or more runs measured.
#[derive(Debug, Clone, Default)]
pub(crate) struct LoadResult {
    /// Requests completed (any status) inside the measured windows.
    pub(crate) requests: u64,
    /// Of those, answers other than 2xx, plus transport errors (failed
    /// connects, resets, broken bodies) inside the windows.
    pub(crate) errors: u64,
    /// Requests that failed while the connections set up their sessions.
    pub(crate) setup_errors: u64,
    /// The measured time, all windows together.
    pub(crate) window: Duration,
    /// Latencies of the requests completed inside the windows (sorted by
    /// [`LoadResult::merge`]).
    pub(crate) latencies: Vec<Duration>,
}

impl LoadResult {
    /// Adds `other`'s figures to these, keeping the latencies sorted.
    pub(crate) fn merge(&mut self, other: LoadResult) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.setup_errors += other.setup_errors;
        self.window += other.window;
        self.latencies.extend(other.latencies);
        self.latencies.sort_unstable();
    }

    /// Requests per second.
    pub(crate) fn rate(&self) -> f64 {
        self.requests as f64 / self.window.as_secs_f64().max(f64::EPSILON)
    }

    /// The latency at quantile `q` (0..=1), nearest rank.
    pub(crate) fn quantile(&self, q: f64) -> Option<Duration> {
        if self.latencies.is_empty() {
            return None;
        }
        let rank = (q * self.latencies.len() as f64).ceil() as usize;
        Some(self.latencies[rank.clamp(1, self.latencies.len()) - 1])
    }
}

/// The connections to one server, logged in, ready to run a workload in
/// as many windows as asked.
pub(crate) struct Driver {
    workload: Workload,
    /// Each connection and its user name.
    clients: Vec<(Client, String)>,
    setup_errors: u64,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("workload", &self.workload)
            .field("connections", &self.clients.len())
            .finish()
    }
}

impl Driver {
    /// Opens `connections` connections to `addr`; each logs in and counts
    /// once, so that its session exists.
    pub(crate) async fn connect(
        addr: SocketAddr,
        workload: Workload,
        connections: usize,
    ) -> anyhow::Result<Driver> {
        let mut clients = Vec::with_capacity(connections);
        let mut setup_errors = 0;
        for i in 0..connections {
            let user = format!("bench-{i}");
            let mut client = Client::connect(addr)
                .await
                .with_context(|| format!("connecting to {addr}"))?;
            for (method, path, body) in [
                (Method::POST, "/login", login_body(&user)),
                (Method::POST, "/counter", Bytes::new()),
            ] {
                match client.send(method, path, body).await {
                    Ok(status) if status.is_success() => {}
                    _ => setup_errors += 1,
                }
            }
            clients.push((client, user));
        }
        Ok(Driver {
            workload,
            clients,
            setup_errors,
        })
    }

    /// Sends the workload on every connection for `warmup` (not measured),
    /// then for `duration` (measured), and waits for the answers in flight.
    pub(crate) async fn run(
        &mut self,
        warmup: Duration,
        duration: Duration,
    ) -> anyhow::Result<LoadResult> {
        let measure_from = Instant::now() + warmup;
        let until = measure_from + duration;
        let tasks: Vec<_> = std::mem::take(&mut self.clients)
            .into_iter()
            .map(|(client, user)| {
                let workload = self.workload;
                tokio::spawn(drive(client, workload, user, measure_from, until))
            })
            .collect();
        let mut result = LoadResult {
            setup_errors: std::mem::take(&mut self.setup_errors),
            window: duration,
            ..LoadResult::default()
        };
        for task in tasks {
            let (client, user, part) = task.await.context("a load connection panicked")?;
            self.clients.push((client, user));
            result.requests += part.requests;
            result.errors += part.errors;
            result.latencies.extend(part.latencies);
        }
        result.latencies.sort_unstable();
        Ok(result)
    }
}

/// One connection's loop.
async fn drive(
    mut client: Client,
    workload: Workload,
    user: String,
    measure_from: Instant,
    until: Instant,
) -> (Client, String, LoadResult) {
    let (method, path, body) = workload.request(&user);
    let mut part = LoadResult::default();
    loop {
        let started = Instant::now();
        if started >= until {
            return (client, user, part);
        }
        let outcome = client.send(method.clone(), path, body.clone()).await;
        let done = Instant::now();
        let counted = done >= measure_from && done <= until;
        if counted {
            part.requests += 1;
            part.latencies.push(done - started);
        }
        match outcome {
            Ok(status) if status.is_success() => {}
            Ok(_) => part.errors += u64::from(counted),
            Err(_) => {
                part.errors += u64::from(counted);
                // Start again on a new connection, keeping the cookie.
                while Instant::now() < until {
                    match client.reconnect().await {
                        Ok(()) => break,
                        Err(_) => {
                            if Instant::now() >= measure_from {
                                part.errors += 1;
                            }
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
            }
        }
    }
}

/// One keep-alive connection and the session cookie it carries.
struct Client {
    addr: SocketAddr,
    host: HeaderValue,
    sender: SendRequest<Full<Bytes>>,
    /// `name=value` of the last `Set-Cookie` seen.
    cookie: Option<HeaderValue>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> anyhow::Result<Client> {
        Ok(Client {
            addr,
            host: HeaderValue::from_str(&addr.to_string())?,
            sender: open(addr).await?,
            cookie: None,
        })
    }

    async fn reconnect(&mut self) -> anyhow::Result<()> {
        self.sender = open(self.addr).await?;
        Ok(())
    }

    /// Sends one request, reads the whole answer, keeps any new cookie.
    async fn send(
        &mut self,
        method: Method,
        path: &'static str,
        body: Bytes,
    ) -> anyhow::Result<StatusCode> {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.host.clone());
        if !body.is_empty() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        if let Some(cookie) = &self.cookie {
            request = request.header(header::COOKIE, cookie.clone());
        }
        let request = request.body(Full::new(body))?;
        self.sender.ready().await?;
        let response = self.sender.send_request(request).await?;
        let status = response.status();
        if let Some(set) = response.headers().get(header::SET_COOKIE) {
            let pair = set.as_bytes().split(|b| *b == b';').next().unwrap_or(b"");
            self.cookie = Some(HeaderValue::from_bytes(pair)?);
        }
        response.into_body().collect().await?;
        Ok(status)
    }
}

/// Opens a connection and spawns its driver task.
async fn open(addr: SocketAddr) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// Whether `GET /healthz` answers 200 now.
pub(crate) async fn healthy(addr: SocketAddr) -> bool {
    async {
        let mut client = Client::connect(addr).await?;
        client.send(Method::GET, "/healthz", Bytes::new()).await
    }
    .await
    .is_ok_and(|status| status == StatusCode::OK)
}
