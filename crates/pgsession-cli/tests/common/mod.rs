//! Test harness: runs the built `pgsession` binary as a process with a clean
//! environment (no `DATABASE_URL`, no `PGSESSION_*` from the caller, as
//! ripgrep's tests clear `RIPGREP_CONFIG_PATH`), talks HTTP to `serve`, and
//! handles the session cookie by hand.

#![allow(dead_code)] // Each test module uses a part of it.

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgsession_testkit::TestDb;

/// The binary under test.
pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_pgsession");

/// Set to a `RUST_LOG` filter (e.g. `session_store=debug`) to have the
/// servers started by [`ServeProcess`] log with it.
pub(crate) const SERVE_LOG_ENV: &str = "PGSESSION_TEST_SERVE_LOG";

/// The secret the harness signs with unless a test sets another.
pub(crate) const SECRET: &str = "test-secret";

/// A `pgsession` command with no inherited `DATABASE_URL`, `PGSESSION_*` or
/// `RUST_LOG`.
pub(crate) fn pgsession() -> Command {
    let mut command = Command::new(BIN);
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name == "DATABASE_URL" || name == "RUST_LOG" || name.starts_with("PGSESSION_") {
            command.env_remove(&*name);
        }
    }
    command.stdin(Stdio::null());
    command
}

/// Runs `pgsession ARGS` to completion with `env`.
pub(crate) fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = pgsession();
    command.args(args).envs(env.iter().copied());
    let output = command.output().expect("run pgsession");
    eprintln!(
        "pgsession {args:?} -> {}\n--- stdout\n{}--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A fresh database; panics with the test kit's message when none can be had.
pub(crate) async fn test_db() -> TestDb {
    TestDb::new()
        .await
        .unwrap_or_else(|e| panic!("no test database: {e}"))
}

/// A loopback port that was free a moment ago.
pub(crate) fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A URL to a port nothing listens on.
pub(crate) fn closed_port_url() -> String {
    format!("postgres://postgres@127.0.0.1:{}/nothing", free_port())
}

/// A running `pgsession serve`; killed when dropped.
pub(crate) struct ServeProcess {
    child: Child,
    base: String,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    /// The working directory (for the embedded PostgreSQL's `.pgsession`).
    cwd: PathBuf,
    _tempdir: Option<tempfile::TempDir>,
}

impl ServeProcess {
    /// Starts `serve` on a free port with `DATABASE_URL=db_url` (none when
    /// `None`), `PGSESSION_SECRET=test-secret`, then `extra_env`, in a fresh
    /// temporary directory; waits until `/healthz` answers.
    pub(crate) async fn start(db_url: Option<&str>, extra_env: &[(&str, &str)]) -> ServeProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        let cwd = dir.path().to_owned();
        Self::start_in(&cwd, Some(dir), db_url, extra_env).await
    }

    /// Like [`ServeProcess::start`], in `cwd`.
    pub(crate) async fn start_in(
        cwd: &Path,
        tempdir: Option<tempfile::TempDir>,
        db_url: Option<&str>,
        extra_env: &[(&str, &str)],
    ) -> ServeProcess {
        let port = free_port();
        let mut command = pgsession();
        command
            .arg("serve")
            .current_dir(cwd)
            .env("PGSESSION_LISTEN", format!("127.0.0.1:{port}"))
            .env("PGSESSION_SECRET", SECRET)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(url) = db_url {
            command.env("DATABASE_URL", url);
        }
        // A log filter for the servers under test, when debugging them.
        if let Some(filter) = std::env::var_os(SERVE_LOG_ENV).filter(|f| !f.is_empty()) {
            command.env("RUST_LOG", filter);
        }
        command.envs(extra_env.iter().copied());
        let mut child = command.spawn().expect("spawn pgsession serve");
        let stdout = capture(child.stdout.take().expect("stdout"));
        let stderr = capture(child.stderr.take().expect("stderr"));
        let mut serve = ServeProcess {
            child,
            base: format!("http://127.0.0.1:{port}"),
            stdout,
            stderr,
            cwd: cwd.to_owned(),
            _tempdir: tempdir,
        };
        serve.wait_healthy(Duration::from_secs(90)).await;
        serve
    }

    /// [`ServeProcess::start`], then waits until `/readyz` says the store
    /// can serve (the session table exists).
    pub(crate) async fn start_ready(db_url: &str, extra_env: &[(&str, &str)]) -> ServeProcess {
        let serve = Self::start(Some(db_url), extra_env).await;
        serve.wait_ready().await;
        serve
    }

    /// Waits (at most 30 s) until `/readyz` answers 200.
    pub(crate) async fn wait_ready(&self) {
        let http = client();
        eventually("/readyz 200", Duration::from_secs(30), || async {
            http.get(self.url("/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
    }

    async fn wait_healthy(&mut self, timeout: Duration) {
        let client = client();
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(response) = client.get(self.url("/healthz")).send().await {
                assert_eq!(response.status(), 200, "/healthz");
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "pgsession serve exited early with {status}\n{}",
                    self.stderr()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "pgsession serve did not answer /healthz within {timeout:?}\n{}",
                    self.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `http://127.0.0.1:PORT` + `path`.
    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The working directory of the server.
    pub(crate) fn cwd(&self) -> &Path {
        &self.cwd
    }

    /// Sends SIGTERM.
    pub(crate) fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Whether the process has exited.
    pub(crate) fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Waits for the process to exit (at most 60 s).
    pub(crate) async fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // Let the reader threads drain the pipes.
                tokio::time::sleep(Duration::from_millis(100)).await;
                eprintln!("pgsession serve exited with {status}\n{}", self.stderr());
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "pgsession serve did not exit within 60 s\n{}",
                    self.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What the process wrote to stdout so far.
    pub(crate) fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    /// What the process wrote to stderr (its logs) so far.
    pub(crate) fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // Ask nicely first, so an embedded PostgreSQL is stopped.
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(15);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- pgsession serve stderr\n{}", self.stderr());
        }
    }
}

/// Reads a pipe into a buffer on a thread of its own.
fn capture(mut pipe: impl std::io::Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let buffer = Arc::new(Mutex::new(Vec::new()));
    let sink = buffer.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        loop {
            match pipe.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => sink.lock().unwrap().extend_from_slice(&chunk[..n]),
            }
        }
    });
    buffer
}

/// An HTTP client without a cookie store: tests carry cookies by hand.
pub(crate) fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("HTTP client")
}

/// One answer, read whole.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    /// The `connect.sid=...` pair of its `Set-Cookie`, if it set one.
    pub(crate) cookie: Option<String>,
    /// Every `Set-Cookie` header, whole.
    pub(crate) set_cookies: Vec<String>,
    pub(crate) body: String,
}

impl Answer {
    /// The body as JSON.
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }
}

/// Sends `method path` with an optional cookie and JSON body.
pub(crate) async fn call(
    client: &reqwest::Client,
    serve: &ServeProcess,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    body: Option<&str>,
) -> Answer {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut request = client.request(method, serve.url(path));
    if let Some(cookie) = cookie {
        request = request.header("cookie", cookie);
    }
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_owned());
    }
    let response = request.send().await.expect("send request");
    answer(response).await
}

/// Reads a response.
pub(crate) async fn answer(response: reqwest::Response) -> Answer {
    let status = response.status().as_u16();
    let set_cookies: Vec<String> = response
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().expect("ASCII Set-Cookie").to_owned())
        .collect();
    let cookie = set_cookies
        .iter()
        .filter(|c| c.starts_with("connect.sid="))
        .map(|c| c.split(';').next().unwrap_or_default().to_owned())
        .next_back();
    let body = response.text().await.expect("body");
    Answer {
        status,
        cookie,
        set_cookies,
        body,
    }
}

/// The session id in a `connect.sid=s%3A<sid>.<mac>` pair.
pub(crate) fn sid_of(cookie: &str) -> String {
    let value = cookie
        .strip_prefix("connect.sid=")
        .expect("connect.sid cookie");
    let decoded = percent_decode(value);
    let signed = decoded.strip_prefix("s:").expect("signed value");
    let (sid, _mac) = signed.rsplit_once('.').expect("sid.mac");
    sid.to_owned()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).expect("ASCII");
            out.push(u8::from_str_radix(hex, 16).expect("hex escape"));
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).expect("UTF-8")
}

/// Rows of the default session table with this id.
pub(crate) async fn rows_with_sid(db: &TestDb, sid: &str) -> i64 {
    let client = db.client().await.expect("test connection");
    client
        .query_one(
            "SELECT count(*) FROM public.session_store WHERE sid = $1",
            &[&sid],
        )
        .await
        .expect("count rows")
        .get(0)
}

/// A single value from `sql` on the test database.
pub(crate) async fn scalar<T>(db: &TestDb, sql: &str) -> T
where
    T: for<'a> tokio_postgres::types::FromSql<'a>,
{
    let client = db.client().await.expect("test connection");
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .get(0)
}

/// Waits until `check` holds, polling; panics with `what` after `timeout`.
pub(crate) async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
