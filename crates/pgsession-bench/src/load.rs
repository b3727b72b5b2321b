//! The HTTP load generator: a fixed number of keep-alive HTTP/1.1
//! connections (hyper's low-level client, one TCP connection each), each
//! with its own session cookie, sending its next request as soon as the
//! previous answer is read (a closed loop, as `wrk` does).
//!
//! Each connection first logs in (`POST /login`) and counts `i + 1` times
//! (`POST /counter`, connection `i`), so that its session exists and holds
//! a count no other connection's holds; then it runs the workload for the
//! warm-up and for one or more measured windows. Only requests that
//! complete inside a measured window count; a request in flight when the
//! window closes is not counted.
//!
//! Every answer is checked against the connection's own session: `views`
//! for the counter (the count it holds, one more after a write), `user`
//! for a login. A 2xx with the wrong body (another session's, or none)
//! counts as an error.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
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
    /// Of those, answers other than 2xx, 2xx answers with a body that is
    /// not the connection's session's ([`LoadResult::wrong_bodies`]), plus
    /// transport errors (failed connects, resets, broken bodies) inside the
    /// windows.
    pub(crate) errors: u64,
    /// Of the errors, 2xx answers whose body was not the one the
    /// connection's own session gives.
    pub(crate) wrong_bodies: u64,
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
        self.wrong_bodies += other.wrong_bodies;
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
    /// Each connection and what its session holds.
    clients: Vec<(Client, Expected)>,
    setup_errors: u64,
}

/// What a connection's session holds, so that each answer can be checked.
#[derive(Debug, Clone)]
struct Expected {
    /// The user it logged in as.
    user: String,
    /// Its `views`.
    views: u64,
}

impl Expected {
    /// Whether `body` is the answer this session gives to `workload`'s
    /// request; moves the expected count on after a write. After a wrong
    /// count the expectation follows the answer, so that one wrong answer
    /// is counted once.
    fn check(&mut self, workload: Workload, body: &[u8]) -> bool {
        let Ok(body) = serde_json::from_slice::<Value>(body) else {
            return false;
        };
        match workload {
            Workload::Login => body.get("user").and_then(Value::as_str) == Some(&self.user),
            Workload::Read | Workload::Rolling | Workload::Write => {
                let wanted = self.views + u64::from(workload == Workload::Write);
                let got = body.get("views").and_then(Value::as_u64);
                if let Some(got) = got {
                    self.views = got;
                }
                got == Some(wanted)
            }
        }
    }
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
    /// Opens `connections` connections to `addr`; with `sessions`, each
    /// (the `i`th) logs in and counts `i + 1` times, so that its session
    /// exists and holds its own count. Without (a server with no session
    /// store), each expects `{"views":1}`.
    pub(crate) async fn connect(
        addr: SocketAddr,
        workload: Workload,
        connections: usize,
        sessions: bool,
    ) -> anyhow::Result<Driver> {
        let mut clients = Vec::with_capacity(connections);
        let mut setup_errors = 0;
        for i in 0..connections {
            let user = format!("bench-{i}");
            let mut client = Client::connect(addr)
                .await
                .with_context(|| format!("connecting to {addr}"))?;
            let mut expected = Expected {
                user: user.clone(),
                views: 1,
            };
            if sessions {
                expected.views = 0;
                let login = client.send(Method::POST, "/login", login_body(&user)).await;
                if !login.is_ok_and(|(status, body)| {
                    status.is_success() && expected.check(Workload::Login, &body)
                }) {
                    setup_errors += 1;
                }
                for _ in 0..=i {
                    let count = client.send(Method::POST, "/counter", Bytes::new()).await;
                    if !count.is_ok_and(|(status, body)| {
                        status.is_success() && expected.check(Workload::Write, &body)
                    }) {
                        setup_errors += 1;
                    }
                }
            }
            clients.push((client, expected));
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
            .map(|(client, expected)| {
                let workload = self.workload;
                tokio::spawn(drive(client, workload, expected, measure_from, until))
            })
            .collect();
        let mut result = LoadResult {
            setup_errors: std::mem::take(&mut self.setup_errors),
            window: duration,
            ..LoadResult::default()
        };
        for task in tasks {
            let (client, expected, part) = task.await.context("a load connection panicked")?;
            self.clients.push((client, expected));
            result.requests += part.requests;
            result.errors += part.errors;
            result.wrong_bodies += part.wrong_bodies;
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
    mut expected: Expected,
    measure_from: Instant,
    until: Instant,
) -> (Client, Expected, LoadResult) {
    let (method, path, body) = workload.request(&expected.user);
    let mut part = LoadResult::default();
    loop {
        let started = Instant::now();
        if started >= until {
            return (client, expected, part);
        }
        let outcome = client.send(method.clone(), path, body.clone()).await;
        let done = Instant::now();
        let counted = done >= measure_from && done <= until;
        if counted {
            part.requests += 1;
            part.latencies.push(done - started);
        }
        match outcome {
            Ok((status, answer)) if status.is_success() => {
                if !expected.check(workload, &answer) {
                    part.errors += u64::from(counted);
                    part.wrong_bodies += u64::from(counted);
                }
            }
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

    /// Sends one request, reads the whole answer, keeps any new cookie;
    /// the status and the body.
    async fn send(
        &mut self,
        method: Method,
        path: &'static str,
        body: Bytes,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
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
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
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
    .is_ok_and(|(status, _)| status == StatusCode::OK)
}
