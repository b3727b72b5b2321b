//! `/dashboard` in a real headless Chromium, end to end, and the Grafana
//! dashboard shipped in `docs/`.
//!
//! A throwaway PostgreSQL, a fault proxy in front of it, and `pgsession
//! serve` through the proxy (health check every second, short breaker
//! cool-down); then `node e2e/dashboard.mjs <url>` (playwright-core driving
//! the system's Chromium) loads the page and asks this test, over its
//! stdio, for each step when the page is ready for it:
//!
//! - `load`: bounded `POST /counter` loops start, and one more session is
//!   made for the conflict below; the page must show the request count,
//!   rates, acquire and query times moving;
//! - `fault`: the proxy refuses new connections and resets open ones; the
//!   page must show the breaker `open` and the "Database health" card
//!   failing, not green;
//! - `conflict`: that session is written during the outage (answered from
//!   the journal), then changed in the database directly: its write-back
//!   will be a conflict, kept as a dead letter. The script then opens a
//!   second page in the middle of the outage, which must draw the history
//!   before it (load, breaker closed then open) at its first poll, and show
//!   the outage and the folded probes;
//! - `heal`: the proxy is back to normal; the page must show `closed`, one
//!   outage entry with start, end and duration, the probes folded, the
//!   write-back, and the conflict and dead letter pointing at `pgsession
//!   journal list`, which this test then runs on the server's journal.
//!
//! Screenshots go to `target/tmp/dashboard-screenshots/` on every run, and
//! replace `docs/dashboard-*.png` only with `PGSESSION_UPDATE_SCREENSHOTS=1`.
//!
//! Needs `node` (>= 20.9), `npm` and Chromium (`/usr/bin/chromium`, or
//! `CHROMIUM`): the test fails, never skips, when one is missing.
//! `e2e/node_modules` is installed with `npm ci` when it is missing or older
//! than `e2e/package-lock.json`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use pgsession_testkit::{FaultProxy, TestDb};
use tokio::sync::mpsc;

use crate::common::{run, sid_of, ServeProcess};

/// The whole browser session, from launch to the breaker closed again.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);
/// `npm ci` of playwright-core (one package, no browser download).
const NPM_CI_TIMEOUT: Duration = Duration::from_secs(300);
/// Requests per load worker at most ("bounded" loops).
const MAX_REQUESTS_PER_WORKER: u64 = 20_000;
const LOAD_WORKERS: usize = 4;
/// Set to `1` to copy this run's screenshots over `docs/dashboard-*.png`.
const UPDATE_SCREENSHOTS: &str = "PGSESSION_UPDATE_SCREENSHOTS";
const SCREENSHOTS: [&str; 3] = [
    "dashboard-fault.png",
    "dashboard-phone.png",
    "dashboard-recovered.png",
];

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
async fn the_dashboard_tells_an_outage_in_chromium() {
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

    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-screenshots");
    for shot in SCREENSHOTS {
        let _ = std::fs::remove_file(shots.join(shot));
    }
    let mut node = Node::spawn(&serve.url(""), &shots, &browser);
    let load = Load::new(serve.url("/counter"));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("HTTP client");
    // The session whose write-back will conflict: its cookie.
    let mut conflicted: Option<String> = None;
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
                "load" => {
                    load.start();
                    conflicted = Some(new_session(&http, &serve.url("/counter")).await);
                }
                "fault" => {
                    proxy.refuse(true);
                    proxy.reset_all();
                }
                "conflict" => {
                    let cookie = conflicted.as_deref().expect("the load step made a session");
                    write_then_change_behind(&http, &serve.url("/counter"), cookie, &db).await;
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
    assert_eq!(
        steps,
        ["load", "fault", "conflict", "heal"],
        "steps asked for"
    );
    assert!(ok > 0, "no request of the load succeeded ({failed} failed)");
    let summary = summary.unwrap();
    eprintln!("dashboard summary: {summary:#}");

    // What the timeline's hint points at says the same.
    let journal = serve.cwd().join(".pgsession/journal");
    let listed = run(
        &["journal", "list"],
        &[(
            "PGSESSION_JOURNAL_DIR",
            journal.to_str().expect("UTF-8 path"),
        )],
    );
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.status.success() && text.contains("changed") && text.contains("save"),
        "`pgsession journal list` on {} does not show the conflicted save:\n{text}",
        journal.display()
    );

    for shot in SCREENSHOTS {
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
    if std::env::var(UPDATE_SCREENSHOTS).is_ok_and(|v| v == "1") {
        let docs = repo_root().join("docs");
        for shot in SCREENSHOTS {
            std::fs::copy(shots.join(shot), docs.join(shot))
                .unwrap_or_else(|e| panic!("copying {shot} to {}: {e}", docs.display()));
        }
        eprintln!("screenshots copied to {}", docs.display());
    } else {
        eprintln!(
            "screenshots in {} ({UPDATE_SCREENSHOTS}=1 copies them to docs/)",
            shots.display()
        );
    }
}

/// A new session (`POST /counter` without a cookie): its cookie.
async fn new_session(http: &reqwest::Client, url: &str) -> String {
    let response = http.post(url).send().await.expect("POST /counter");
    assert!(response.status().is_success(), "{}", response.status());
    let set = response
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .expect("a session cookie");
    set.split(';').next().expect("cookie").to_owned()
}

/// Writes the session of `cookie` while the database is away (answered
/// from the journal), then changes its row in the database directly, not
/// through the proxy: the write-back will find a document this instance
/// never saw.
async fn write_then_change_behind(http: &reqwest::Client, url: &str, cookie: &str, db: &TestDb) {
    let mut answers = Vec::new();
    let journaled = loop {
        let response = http.post(url).header("cookie", cookie).send().await;
        match response {
            Ok(r) if r.status().is_success() => break true,
            Ok(r) => answers.push(r.status().to_string()),
            Err(e) => answers.push(e.to_string()),
        }
        if answers.len() >= 20 {
            break false;
        }
    };
    assert!(
        journaled,
        "no write of the session was acknowledged during the outage: {answers:?}"
    );
    let sid = sid_of(cookie);
    let client = db.client().await.expect("a direct connection");
    let changed = client
        .execute(
            "UPDATE session_store SET sess = (sess::jsonb || '{\"views\": 1000}')::json WHERE sid = $1",
            &[&sid],
        )
        .await
        .expect("change the row behind the server's back");
    assert_eq!(changed, 1, "the session's row");
}

// ---------------------------------------------------------------------------
// The Grafana dashboard
// ---------------------------------------------------------------------------

/// `docs/grafana-dashboard.json` is a dashboard Grafana imports, with the
/// page's panels, whose queries name only series (and label values) that
/// a running `serve` exposes in `/metrics`.
#[tokio::test]
async fn the_grafana_dashboard_queries_only_metrics_that_exist() {
    let path = repo_root().join("docs/grafana-dashboard.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let dashboard: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    for key in ["title", "uid", "schemaVersion", "panels", "__inputs"] {
        assert!(
            dashboard.get(key).is_some(),
            "no {key:?} in {}",
            path.display()
        );
    }
    let mut panels = Vec::new();
    collect_panels(&dashboard["panels"], &mut panels);
    let mut exprs = Vec::new();
    let mut titles = BTreeSet::new();
    for panel in &panels {
        let title = panel["title"].as_str().unwrap_or_default();
        titles.insert(title.to_owned());
        if panel["type"] == "row" || panel["type"] == "text" {
            continue;
        }
        assert!(
            panel["gridPos"].is_object(),
            "panel {title:?} has no gridPos"
        );
        assert!(
            panel["datasource"].is_object(),
            "panel {title:?} has no datasource"
        );
        let targets = panel["targets"].as_array().cloned().unwrap_or_default();
        assert!(!targets.is_empty(), "panel {title:?} has no query");
        for target in targets {
            let expr = target["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {title:?}: a target without expr"));
            exprs.push((title.to_owned(), expr.to_owned()));
        }
    }

    // The annotations and the instance variable query series too.
    for annotation in dashboard["annotations"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(expr) = annotation["expr"].as_str() {
            exprs.push(("annotation".to_owned(), expr.to_owned()));
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(query) = variable["definition"].as_str() {
            exprs.push(("variable".to_owned(), query.to_owned()));
        }
    }

    // Every panel of the page is there, by title.
    let page = include_str!("../../src/cmd/serve/dashboard.html");
    let mut page_titles = Vec::new();
    for (open, close) in [("<h2>", " <span"), ("<div class=\"label\">", "</div>")] {
        for piece in page.split(open).skip(1) {
            if let Some((title, _)) = piece.split_once(close) {
                page_titles.push(title.trim().to_owned());
            }
        }
    }
    assert!(page_titles.len() >= 14, "{page_titles:?}");
    for title in &page_titles {
        assert!(
            titles.contains(title),
            "the page's panel {title:?} is not in the Grafana dashboard ({titles:?})"
        );
    }

    // Every series a query names, with its label values, is in /metrics.
    let db = crate::common::test_db().await;
    let serve = ServeProcess::start_ready(db.url(), &[]).await;
    let metrics = reqwest::get(serve.url("/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text");
    let exposed = series(&metrics);
    let mut named = BTreeSet::new();
    for (title, expr) in &exprs {
        for (name, matchers) in selectors(expr) {
            let Some(labels) = exposed.get(&name) else {
                panic!("panel {title:?}: {name} is not in /metrics\n  {expr}");
            };
            for (key, value) in matchers {
                assert!(
                    labels.contains(&(key.clone(), value.clone())),
                    "panel {title:?}: no {name}{{{key}=\"{value}\"}} in /metrics\n  {expr}"
                );
            }
            named.insert(name);
        }
    }
    // The page's figures all have their series in Grafana.
    for name in [
        "pgsession_pool_in_use",
        "pgsession_pool_max",
        "pgsession_pool_waiting",
        "pgsession_pool_acquire_seconds_bucket",
        "pgsession_query_seconds_bucket",
        "pgsession_retries_total",
        "pgsession_errors_total",
        "pgsession_http_requests_total",
        "pgsession_operations_total",
        "pgsession_journal_entries",
        "pgsession_breaker_state",
        "pgsession_database_ok",
        "pgsession_database_failing_seconds",
        "pgsession_writeback_conflicts_total",
        "pgsession_dead_letters_total",
    ] {
        assert!(named.contains(name), "no Grafana query uses {name}");
    }
}

fn collect_panels<'a>(panels: &'a serde_json::Value, out: &mut Vec<&'a serde_json::Value>) {
    for panel in panels.as_array().into_iter().flatten() {
        out.push(panel);
        collect_panels(&panel["panels"], out);
    }
}

/// Each series in Prometheus text, with its label pairs.
fn series(text: &str) -> BTreeMap<String, BTreeSet<(String, String)>> {
    let mut out: BTreeMap<String, BTreeSet<(String, String)>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let series = line.rsplit_once(' ').map_or(line, |(s, _)| s);
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let entry = out.entry(name.to_owned()).or_default();
        for pair in labels
            .trim_end_matches('}')
            .split(',')
            .filter(|p| !p.is_empty())
        {
            if let Some((k, v)) = pair.split_once('=') {
                entry.insert((k.to_owned(), v.trim_matches('"').to_owned()));
            }
        }
    }
    out
}

/// The `pgsession_*` series a PromQL expression selects, each with its
/// exact-match label matchers (`k="v"`; regex and negative matchers and
/// dashboard variables are left out).
fn selectors(expr: &str) -> Vec<(String, Vec<(String, String)>)> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("pgsession_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = tail[..end].to_owned();
        let mut matchers = Vec::new();
        let after = &tail[end..];
        if let Some(inner) = after.strip_prefix('{') {
            let close = inner.find('}').expect("a closed selector");
            for matcher in inner[..close].split(',') {
                let matcher = matcher.trim();
                if let Some((k, v)) = matcher.split_once("=\"") {
                    if k.ends_with(['!', '=', '~']) || v.contains('$') {
                        continue;
                    }
                    matchers.push((k.trim().to_owned(), v.trim_end_matches('"').to_owned()));
                }
            }
        }
        out.push((name, matchers));
        rest = &tail[end..];
    }
    out
}

#[test]
fn selectors_are_read_from_promql() {
    let found = selectors(
        r#"sum(rate(pgsession_operations_total{outcome="fallback",instance=~"$instance"}[1m])) / pgsession_pool_max"#,
    );
    assert_eq!(
        found,
        [
            (
                "pgsession_operations_total".to_owned(),
                vec![("outcome".to_owned(), "fallback".to_owned())]
            ),
            ("pgsession_pool_max".to_owned(), vec![]),
        ]
    );
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
