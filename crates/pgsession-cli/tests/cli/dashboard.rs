//! `/dashboard` in a real headless Chromium, end to end.
//!
//! A throwaway PostgreSQL, a fault proxy in front of it, and `pgsession
//! serve` through the proxy (health check every second, short breaker
//! cool-down); then `node e2e/dashboard.mjs <url>` (playwright-core driving
//! the system's Chromium) loads the page and asks this test, over its
//! stdio, for each step when the page is ready for it:
//!
//! - `load`: bounded `POST /counter` loops start; the page must show the
//!   request count, rates, acquire and query times moving;
//! - `fault`: the proxy refuses new connections and resets open ones; the
//!   page must show the breaker `open` (and the event); the script saves
//!   `docs/dashboard-fault.png` and `docs/dashboard-phone.png` (390×844);
//! - `heal`: the proxy is back to normal; the page must show `closed`.
//!
//! Needs `node` (>= 20.9), `npm` and Chromium (`/usr/bin/chromium`, or
//! `CHROMIUM`): the test fails, never skips, when one is missing.
//! `e2e/node_modules` is installed with `npm ci` when it is missing or older
//! than `e2e/package-lock.json`.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use pgsession_testkit::{FaultProxy, TestDb};
use tokio::sync::mpsc;

use crate::common::ServeProcess;

/// The whole browser session, from launch to the breaker closed again.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(240);
/// `npm ci` of playwright-core (one package, no browser download).
const NPM_CI_TIMEOUT: Duration = Duration::from_secs(300);
/// Requests per load worker at most ("bounded" loops).
const MAX_REQUESTS_PER_WORKER: u64 = 20_000;
const LOAD_WORKERS: usize = 4;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn e2e_dir() -> PathBuf {
    repo_root().join("e2e")
}

/// The Chromium to drive: `CHROMIUM`, else `/usr/bin/chromium`.
fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_load_and_a_database_outage_in_chromium() {
    let browser = chromium();
    assert!(
        browser.exists(),
        "the dashboard test needs Chromium at {} (apt-get install -y chromium, or set CHROMIUM=/path/to/chromium)",
        browser.display()
    );
    ensure_node_modules(&e2e_dir());

    let db = TestDb::throwaway()
        .await
        .unwrap_or_else(|e| panic!("no throwaway PostgreSQL: {e}"));
    let cluster = db.cluster().expect("a throwaway database has a cluster");
    let proxy = FaultProxy::start(cluster.socket_addr())
        .await
        .expect("fault proxy");
    let serve = ServeProcess::start_ready(
        &proxy.url_for(db.name()),
        &[
            ("PGSESSION_HEALTH_CHECK_INTERVAL", "1s"),
            ("PGSESSION_BREAKER_THRESHOLD", "3"),
            ("PGSESSION_BREAKER_COOL_DOWN", "500ms"),
            ("PGSESSION_BREAKER_MAX_COOL_DOWN", "2s"),
            ("PGSESSION_CONNECT_TIMEOUT", "2s"),
            ("PGSESSION_QUERY_TIMEOUT", "3s"),
            ("PGSESSION_COOKIE_SECURE", "false"),
            ("RUST_LOG", "info"),
        ],
    )
    .await;

    let shots = repo_root().join("docs");
    let mut node = Node::spawn(&serve.url(""), &shots, &browser);
    let load = Load::new(serve.url("/counter"));
    let deadline = Instant::now() + SCRIPT_TIMEOUT;
    let mut summary = None;
    let mut steps = Vec::new();
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let line = match tokio::time::timeout(remaining, node.lines.recv()).await {
            Ok(Some(line)) => line,
            Ok(None) => break, // the script ended
            Err(_) => panic!(
                "the dashboard script did not finish within {SCRIPT_TIMEOUT:?}\n{}\n--- serve stderr\n{}",
                node.report(),
                serve.stderr()
            ),
        };
        let Some(control) = line.strip_prefix("@@ ") else {
            continue;
        };
        if let Some(step) = control.strip_prefix("want ") {
            match step {
                "load" => load.start(),
                "fault" => {
                    proxy.refuse(true);
                    proxy.reset_all();
                }
                "heal" => proxy.heal(),
                other => panic!("the dashboard script asked for an unknown step {other:?}"),
            }
            steps.push(step.to_owned());
            node.reply(&format!("ok {step}"));
        } else if let Some(json) = control.strip_prefix("done ") {
            summary = Some(
                serde_json::from_str::<serde_json::Value>(json)
                    .unwrap_or_else(|e| panic!("bad summary from the script ({e}): {json}")),
            );
        }
    }
    let status = node.wait(Duration::from_secs(30));
    let (ok, failed) = load.stop().await;
    assert!(
        status.is_some_and(|s| s.success()) && summary.is_some(),
        "the dashboard script failed ({status:?})\n{}\n--- serve stderr\n{}",
        node.report(),
        serve.stderr()
    );
    eprintln!("{}", node.report());
    assert_eq!(steps, ["load", "fault", "heal"], "steps asked for");
    assert!(ok > 0, "no request of the load succeeded ({failed} failed)");

    let summary = summary.unwrap();
    eprintln!("dashboard summary: {summary:#}");
    for shot in ["dashboard-fault.png", "dashboard-phone.png"] {
        let path = shots.join(shot);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
            "{} is not a PNG",
            path.display()
        );
        assert!(
            bytes.len() < 1024 * 1024,
            "{} is {} bytes: too big to commit",
            path.display(),
            bytes.len()
        );
    }
}

// ---------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------

/// `POST /counter` loops, each with its own session, until stopped or
/// [`MAX_REQUESTS_PER_WORKER`].
struct Load {
    url: String,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    workers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Load {
    fn new(url: String) -> Load {
        Load {
            url,
            stop: Arc::default(),
            ok: Arc::default(),
            failed: Arc::default(),
            workers: Mutex::default(),
        }
    }

    fn start(&self) {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("HTTP client");
        let mut workers = self.workers.lock().unwrap();
        for _ in 0..LOAD_WORKERS {
            let (http, url) = (http.clone(), self.url.clone());
            let (stop, ok, failed) = (self.stop.clone(), self.ok.clone(), self.failed.clone());
            workers.push(tokio::spawn(async move {
                let mut cookie: Option<String> = None;
                for _ in 0..MAX_REQUESTS_PER_WORKER {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let mut request = http.post(&url);
                    if let Some(cookie) = &cookie {
                        request = request.header("cookie", cookie);
                    }
                    match request.send().await {
                        Ok(response) if response.status().is_success() => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            if let Some(set) = response
                                .headers()
                                .get("set-cookie")
                                .and_then(|v| v.to_str().ok())
                            {
                                cookie = set.split(';').next().map(str::to_owned);
                            }
                        }
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(15)).await;
                }
            }));
        }
    }

    /// Stops the workers; `(succeeded, failed)` requests.
    async fn stop(&self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let workers = std::mem::take(&mut *self.workers.lock().unwrap());
        for worker in workers {
            let _ = worker.await;
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

// ---------------------------------------------------------------------------
// The node script
// ---------------------------------------------------------------------------

/// `node e2e/dashboard.mjs`, its stdout as lines on a channel (and kept),
/// its stderr kept; killed on drop.
struct Node {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::UnboundedReceiver<String>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Node {
    fn spawn(base: &str, shots: &Path, chromium: &Path) -> Node {
        let mut command = Command::new("node");
        command
            .arg(e2e_dir().join("dashboard.mjs"))
            .arg(base)
            .current_dir(e2e_dir())
            .env("SCREENSHOT_DIR", shots)
            .env("CHROMIUM", chromium)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().unwrap_or_else(|e| {
            panic!("cannot start node ({e}): the dashboard test needs Node.js")
        });
        let stdin = child.stdin.take();
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, lines) = mpsc::unbounded_channel();
        let out = child.stdout.take().expect("stdout");
        let kept = stdout.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                kept.lock().unwrap().push_str(&format!("{line}\n"));
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut err = child.stderr.take().expect("stderr");
        let kept = stderr.clone();
        std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            while let Ok(n) = err.read(&mut buffer) {
                if n == 0 {
                    break;
                }
                kept.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buffer[..n]));
            }
        });
        Node {
            child,
            stdin,
            lines,
            stdout,
            stderr,
        }
    }

    fn reply(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| {
                panic!(
                    "cannot answer the dashboard script ({e})\n{}",
                    self.report()
                )
            });
    }

    /// Waits for the exit (killing it after `timeout`); `None` if killed.
    fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.stdin.take();
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(100)); // drain the pipes
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn report(&self) -> String {
        format!(
            "--- dashboard.mjs stdout\n{}--- dashboard.mjs stderr\n{}",
            self.stdout.lock().unwrap(),
            self.stderr.lock().unwrap()
        )
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// Node and its packages
// ---------------------------------------------------------------------------

/// Checks `node` and `npm`, and runs `npm ci` in `dir` when `node_modules`
/// is missing or older than `package-lock.json` (under a lock directory,
/// against other test processes).
fn ensure_node_modules(dir: &Path) {
    for tool in ["node", "npm"] {
        let output = Command::new(tool).arg("--version").output();
        assert!(
            output.as_ref().is_ok_and(|o| o.status.success()),
            "`{tool} --version` failed ({output:?}): the dashboard test needs Node.js >= 20.9 and \
             npm on PATH (apt-get install nodejs npm)"
        );
    }
    if !stale(dir) {
        return;
    }
    let lock = dir.join(".npm-ci.lock");
    let deadline = Instant::now() + NPM_CI_TIMEOUT;
    loop {
        match std::fs::create_dir(&lock) {
            Ok(()) => break,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let age = lock
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok());
                if age.is_some_and(|age| age > NPM_CI_TIMEOUT) {
                    let _ = std::fs::remove_dir(&lock);
                    continue;
                }
                assert!(
                    Instant::now() < deadline,
                    "waited {NPM_CI_TIMEOUT:?} for {} (another npm ci?)",
                    lock.display()
                );
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("creating {}: {e}", lock.display()),
        }
    }
    struct Unlock(PathBuf);
    impl Drop for Unlock {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _unlock = Unlock(lock);
    if !stale(dir) {
        return;
    }
    let output = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run npm ci in {}: {e}", dir.display()));
    assert!(
        output.status.success(),
        "`npm ci` in {} failed ({}):\n{}{}",
        dir.display(),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        !stale(dir),
        "`npm ci` succeeded but {} is still missing",
        dir.join("node_modules/.package-lock.json").display()
    );
}

/// npm writes `node_modules/.package-lock.json` last, on every install.
fn stale(dir: &Path) -> bool {
    let modified = |path: PathBuf| -> Option<SystemTime> { path.metadata().ok()?.modified().ok() };
    let lock = modified(dir.join("package-lock.json"))
        .unwrap_or_else(|| panic!("{} has no package-lock.json", dir.display()));
    match modified(dir.join("node_modules/.package-lock.json")) {
        Some(installed) => installed < lock,
        None => true,
    }
}
