//! What every fault scenario shares: a throwaway cluster behind a fault
//! proxy, users that hold a session cookie each, a bounded load of
//! sequential `POST /counter` per user, a `/health` monitor polling every
//! 100 ms, the check that the table holds what was acknowledged, and the
//! figures line each scenario prints.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use pgsession_testkit::{FaultProxy, TestCluster, TestDb};
use serde_json::Value;

use crate::common::{answer, sid_of, Answer, ServeProcess};

/// How often the monitor asks `/health`.
pub(crate) const HEALTH_POLL: Duration = Duration::from_millis(100);

/// A database in a cluster of its own, and a fault proxy in front of it.
pub(crate) struct Rig {
    pub(crate) db: TestDb,
    pub(crate) proxy: FaultProxy,
}

impl Rig {
    pub(crate) async fn new() -> Rig {
        let db = TestDb::throwaway()
            .await
            .unwrap_or_else(|e| panic!("the fault suite needs the PostgreSQL binaries: {e}"));
        let proxy = FaultProxy::start(db.cluster().expect("own cluster").socket_addr())
            .await
            .expect("fault proxy");
        Rig { db, proxy }
    }

    pub(crate) fn cluster(&self) -> &TestCluster {
        self.db.cluster().expect("own cluster")
    }

    /// The database through the proxy.
    pub(crate) fn proxied_url(&self) -> String {
        self.proxy.url_for(self.db.name())
    }

    /// The database directly.
    pub(crate) fn direct_url(&self) -> &str {
        self.db.url()
    }
}

/// The HTTP client of the load: no cookie store, and a deadline far above
/// anything a scenario allows, so that a hung request is seen as one.
pub(crate) fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(45))
        .pool_max_idle_per_host(64)
        .build()
        .expect("HTTP client")
}

/// `method base+path` with an optional cookie and JSON body; `Err` when no
/// answer came (refused, reset, or the client's deadline).
pub(crate) async fn send(
    http: &reqwest::Client,
    base: &str,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    body: Option<&str>,
) -> Result<Answer, reqwest::Error> {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut request = http.request(method, format!("{base}{path}"));
    if let Some(cookie) = cookie {
        request = request.header("cookie", cookie);
    }
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_owned());
    }
    Ok(answer(request.send().await?).await)
}

/// The base URL of a server (`http://127.0.0.1:PORT`).
pub(crate) fn base(serve: &ServeProcess) -> String {
    serve.url("")
}

/// `/health` as JSON.
pub(crate) async fn health(http: &reqwest::Client, base: &str) -> Option<Value> {
    let a = send(http, base, "GET", "/health", None, None).await.ok()?;
    (a.status == 200).then(|| a.json())
}

/// One client of the load: a user with a cookie, and for each session id it
/// was given, how many increments were acknowledged (2xx).
#[derive(Debug, Clone)]
pub(crate) struct User {
    pub(crate) name: String,
    pub(crate) cookie: Option<String>,
    /// `(sid, acknowledged increments)`, in the order the ids were given.
    pub(crate) sessions: Vec<(String, u64)>,
    /// Whether `POST /login` was acknowledged (then `user` must be stored).
    pub(crate) logged_in: bool,
    /// Requests of the current session since its last 2xx that got no 2xx
    /// but may still have landed (no answer, or a 5xx): a write is not
    /// undone because its answer was lost (the server was killed) or its
    /// statement outlived a timeout. The table may hold up to this many
    /// increments more than were acknowledged.
    pub(crate) unconfirmed: u64,
}

impl User {
    pub(crate) fn anonymous(name: String) -> User {
        User {
            name,
            cookie: None,
            sessions: Vec::new(),
            logged_in: false,
            unconfirmed: 0,
        }
    }

    /// Takes the cookie of an answer; a new session id starts a new count.
    /// Returns whether the session id changed.
    fn adopt(&mut self, cookie: &str) -> bool {
        let sid = sid_of(cookie);
        self.cookie = Some(cookie.to_owned());
        if self.sessions.last().map(|(s, _)| s) == Some(&sid) {
            return false;
        }
        self.sessions.push((sid, 0));
        self.unconfirmed = 0;
        true
    }

    /// Acknowledged increments of the current session.
    pub(crate) fn acked(&self) -> u64 {
        self.sessions.last().map_or(0, |(_, n)| *n)
    }

    pub(crate) fn sid(&self) -> Option<&str> {
        self.sessions.last().map(|(s, _)| s.as_str())
    }
}

/// `n` users, each logged in on `base` (`POST /login`), each with a session.
pub(crate) async fn login_users(http: &reqwest::Client, base: &str, n: usize) -> Vec<User> {
    login_users_named(http, base, "user", n).await
}

/// `n` users named `<prefix>0`, `<prefix>1`..., each logged in on `base`.
pub(crate) async fn login_users_named(
    http: &reqwest::Client,
    base: &str,
    prefix: &str,
    n: usize,
) -> Vec<User> {
    let mut users = Vec::with_capacity(n);
    for i in 0..n {
        let mut user = User::anonymous(format!("{prefix}{i}"));
        login(http, base, &mut user).await;
        users.push(user);
    }
    users
}

/// `POST /login` for `user`; panics unless it is acknowledged.
pub(crate) async fn login(http: &reqwest::Client, base: &str, user: &mut User) {
    let body = format!(r#"{{"user":"{}"}}"#, user.name);
    let a = send(
        http,
        base,
        "POST",
        "/login",
        user.cookie.as_deref(),
        Some(&body),
    )
    .await
    .expect("login answered");
    assert_eq!(a.status, 200, "login of {}: {}", user.name, a.body);
    user.adopt(a.cookie.as_deref().expect("login sets a cookie"));
    user.logged_in = true;
}

/// Stops a load, or a monitor.
#[derive(Debug, Clone, Default)]
pub(crate) struct Stop(Arc<AtomicBool>);

impl Stop {
    pub(crate) fn stop(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub(crate) fn stopped(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Bounds of a load: it ends at `stop`, after `max_time`, or after
/// `max_per_user` requests per user, whichever comes first.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LoadBounds {
    pub(crate) max_time: Duration,
    pub(crate) max_per_user: usize,
    /// Pause between a user's requests (keeps two cores breathing).
    pub(crate) pause: Duration,
}

impl Default for LoadBounds {
    fn default() -> Self {
        LoadBounds {
            max_time: Duration::from_secs(120),
            max_per_user: 20_000,
            pause: Duration::from_millis(10),
        }
    }
}

/// One request of the load.
#[derive(Debug, Clone, Copy)]
#[allow(dead_code)] // `user` shows in failure messages.
pub(crate) struct Sample {
    /// When it was sent, since the scenario's start.
    pub(crate) at: Duration,
    pub(crate) latency: Duration,
    /// 0 when no answer came.
    pub(crate) status: u16,
    pub(crate) user: usize,
    /// How many times the load's [`Target`] had been switched when it was
    /// sent (0: the first server).
    pub(crate) generation: u32,
}

/// What a load did.
#[derive(Debug)]
pub(crate) struct LoadReport {
    pub(crate) users: Vec<User>,
    pub(crate) samples: Vec<Sample>,
    /// 2xx answers whose `views` was not the user's acknowledged count + 1.
    pub(crate) mismatches: Vec<String>,
    /// 2xx answers that came with a new session id (the session was lost
    /// and replaced: a logged-in user was logged out).
    pub(crate) replaced: Vec<String>,
    /// 2xx answers whose `views` showed that writes of the user's requests
    /// that got no 2xx (no answer, or a 5xx) had landed; the count then
    /// goes on from what the answer said, which the 2xx acknowledges.
    pub(crate) unacked_landed: Vec<String>,
}

impl LoadReport {
    pub(crate) fn requests(&self) -> usize {
        self.samples.len()
    }

    pub(crate) fn ok(&self) -> usize {
        self.samples.iter().filter(|s| is_2xx(s.status)).count()
    }

    pub(crate) fn ok_pct(&self) -> f64 {
        100.0 * self.ok() as f64 / self.requests().max(1) as f64
    }

    /// Status → count, for every answer that was not 2xx (0: no answer).
    pub(crate) fn failures(&self) -> BTreeMap<u16, usize> {
        let mut map = BTreeMap::new();
        for s in self.samples.iter().filter(|s| !is_2xx(s.status)) {
            *map.entry(s.status).or_default() += 1;
        }
        map
    }

    pub(crate) fn max_latency(&self) -> Duration {
        self.samples
            .iter()
            .map(|s| s.latency)
            .max()
            .unwrap_or_default()
    }

    /// The `q` quantile (0..=1) of the latencies.
    pub(crate) fn quantile(&self, q: f64) -> Duration {
        quantile(self.samples.iter().map(|s| s.latency).collect(), q)
    }

    /// The slowest samples, slowest first.
    pub(crate) fn slowest(&self, n: usize) -> Vec<Sample> {
        let mut samples = self.samples.clone();
        samples.sort_by_key(|s| std::cmp::Reverse(s.latency));
        samples.truncate(n);
        samples
    }

    pub(crate) fn acked(&self) -> u64 {
        self.users
            .iter()
            .flat_map(|u| &u.sessions)
            .map(|(_, n)| n)
            .sum()
    }
}

pub(crate) fn is_2xx(status: u16) -> bool {
    (200..300).contains(&status)
}

pub(crate) fn quantile(mut values: Vec<Duration>, q: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    values.sort();
    let i = ((values.len() - 1) as f64 * q).round() as usize;
    values[i.min(values.len() - 1)]
}

/// Where a load sends its requests: fixed servers (in turn), or one that
/// a scenario can switch (a server killed and replaced).
#[derive(Debug, Clone)]
pub(crate) struct Target(Arc<RwLock<(Vec<String>, u32)>>);

impl Target {
    pub(crate) fn new(bases: &[String]) -> Target {
        Target(Arc::new(RwLock::new((bases.to_vec(), 0))))
    }

    /// From now on, requests go to `base` (their samples carry the next
    /// generation).
    pub(crate) fn set(&self, base: &str) {
        let mut target = self.0.write().unwrap();
        *target = (vec![base.to_owned()], target.1 + 1);
    }

    fn pick(&self, i: usize) -> (String, u32) {
        let target = self.0.read().unwrap();
        (target.0[i % target.0.len()].clone(), target.1)
    }
}

/// Every user loops `POST /counter` sequentially on `bases` (in turn, when
/// there are several), until `stop` or the bounds. `t0` is the scenario's
/// start, for the samples' times.
pub(crate) async fn counter_load(
    http: &reqwest::Client,
    bases: &[String],
    users: Vec<User>,
    t0: Instant,
    stop: Stop,
    bounds: LoadBounds,
) -> LoadReport {
    counter_load_on(http, Target::new(bases), users, t0, stop, bounds).await
}

/// [`counter_load`] on a [`Target`].
pub(crate) async fn counter_load_on(
    http: &reqwest::Client,
    target: Target,
    users: Vec<User>,
    t0: Instant,
    stop: Stop,
    bounds: LoadBounds,
) -> LoadReport {
    let started = Instant::now();
    let tasks: Vec<_> = users
        .into_iter()
        .enumerate()
        .map(|(i, mut user)| {
            let http = http.clone();
            let target = target.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut samples = Vec::new();
                let (mut mismatches, mut replaced, mut landed) =
                    (Vec::new(), Vec::new(), Vec::new());
                let mut n = 0usize;
                while !stop.stopped()
                    && started.elapsed() < bounds.max_time
                    && n < bounds.max_per_user
                {
                    let (base, generation) = target.pick(i + n);
                    n += 1;
                    let sent = Instant::now();
                    let result = send(
                        &http,
                        &base,
                        "POST",
                        "/counter",
                        user.cookie.as_deref(),
                        None,
                    )
                    .await;
                    let latency = sent.elapsed();
                    let status = result.as_ref().map_or(0, |a| a.status);
                    samples.push(Sample {
                        at: sent - t0,
                        latency,
                        status,
                        user: i,
                        generation,
                    });
                    match &result {
                        Ok(a) if is_2xx(a.status) => {
                            let had = user.sid().map(str::to_owned);
                            if let Some(cookie) = &a.cookie {
                                if user.adopt(cookie) && had.is_some() {
                                    replaced.push(format!(
                                        "{} at {:?}: session {} replaced by {}",
                                        user.name,
                                        sent - t0,
                                        had.as_deref().unwrap_or("-"),
                                        user.sid().unwrap_or("-")
                                    ));
                                }
                            }
                            let expected = user.acked() + 1;
                            let views = a.json()["views"].as_u64();
                            let mut count = expected;
                            match views {
                                Some(v) if v == expected => {}
                                // Earlier requests that got no 2xx landed.
                                Some(v) if v > expected && v - expected <= user.unconfirmed => {
                                    landed.push(format!(
                                        "{} at {:?} on {base}: views {v}, {} acknowledged \
                                         before; {} requests without a 2xx since",
                                        user.name,
                                        sent - t0,
                                        user.acked(),
                                        user.unconfirmed
                                    ));
                                    count = v;
                                }
                                _ => mismatches.push(format!(
                                    "{} at {:?} on {base}: views {views:?}, expected {expected}",
                                    user.name,
                                    sent - t0
                                )),
                            }
                            if let Some(last) = user.sessions.last_mut() {
                                last.1 = count;
                            }
                            user.unconfirmed = 0;
                        }
                        // A 4xx is a refusal that changed nothing.
                        Ok(a) if (400..500).contains(&a.status) => {}
                        _ => user.unconfirmed += 1,
                    }
                    if !bounds.pause.is_zero() {
                        tokio::time::sleep(bounds.pause).await;
                    }
                }
                (user, samples, mismatches, replaced, landed)
            })
        })
        .collect();
    let mut report = LoadReport {
        users: Vec::new(),
        samples: Vec::new(),
        mismatches: Vec::new(),
        replaced: Vec::new(),
        unacked_landed: Vec::new(),
    };
    for task in tasks {
        let (user, samples, mismatches, replaced, landed) = task.await.expect("load task");
        report.users.push(user);
        report.samples.extend(samples);
        report.mismatches.extend(mismatches);
        report.replaced.extend(replaced);
        report.unacked_landed.extend(landed);
    }
    report.samples.sort_by_key(|s| s.at);
    report
}

/// [`counter_load`] on one server, spawned, bounded by `max_time` (the other bounds by default);
/// returns the [`Stop`] that ends it and the task that yields its report.
pub(crate) fn spawn_counter_load(
    http: &reqwest::Client,
    base: &str,
    users: Vec<User>,
    t0: Instant,
    max_time: Duration,
) -> (Stop, tokio::task::JoinHandle<LoadReport>) {
    let bounds = LoadBounds {
        max_time,
        ..LoadBounds::default()
    };
    spawn_counter_load_on(http, Target::new(&[base.to_owned()]), users, t0, bounds)
}

/// [`counter_load_on`], spawned; returns the [`Stop`] that ends it and the
/// task that yields its report.
pub(crate) fn spawn_counter_load_on(
    http: &reqwest::Client,
    target: Target,
    users: Vec<User>,
    t0: Instant,
    bounds: LoadBounds,
) -> (Stop, tokio::task::JoinHandle<LoadReport>) {
    let stop = Stop::default();
    let load = {
        let (http, stop) = (http.clone(), stop.clone());
        tokio::spawn(async move { counter_load_on(&http, target, users, t0, stop, bounds).await })
    };
    (stop, load)
}

/// One answer of `/health`.
#[derive(Debug, Clone)]
#[allow(dead_code)] // `status` shows in failure messages.
pub(crate) struct HealthSample {
    pub(crate) at: Duration,
    /// `None` when `/health` did not answer.
    pub(crate) breaker: Option<String>,
    pub(crate) status: Option<String>,
    pub(crate) journal: Option<u64>,
}

/// Polls `/health` every 100 ms.
pub(crate) struct Monitor {
    samples: Arc<Mutex<Vec<HealthSample>>>,
    stop: Stop,
    task: tokio::task::JoinHandle<()>,
}

impl Monitor {
    pub(crate) fn start(http: &reqwest::Client, base: &str, t0: Instant) -> Monitor {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Stop::default();
        let task = {
            let (http, base, samples, stop) =
                (http.clone(), base.to_owned(), samples.clone(), stop.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(HEALTH_POLL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                // Bounded: at most 10 minutes of polling.
                for _ in 0..6_000 {
                    tick.tick().await;
                    if stop.stopped() {
                        return;
                    }
                    let at = t0.elapsed();
                    let h = tokio::time::timeout(Duration::from_secs(2), health(&http, &base))
                        .await
                        .ok()
                        .flatten();
                    let text = |v: &Value, key: &str| v[key].as_str().map(str::to_owned);
                    let sample = HealthSample {
                        at,
                        breaker: h.as_ref().and_then(|h| text(h, "breaker")),
                        status: h.as_ref().and_then(|h| text(h, "status")),
                        journal: h.as_ref().and_then(|h| h["journal"]["entries"].as_u64()),
                    };
                    samples.lock().unwrap().push(sample);
                }
            })
        };
        Monitor {
            samples,
            stop,
            task,
        }
    }

    pub(crate) fn samples(&self) -> Vec<HealthSample> {
        self.samples.lock().unwrap().clone()
    }

    /// When, at or after `from`, a sample first satisfied `check`.
    pub(crate) fn first_after(
        &self,
        from: Duration,
        check: impl Fn(&HealthSample) -> bool,
    ) -> Option<Duration> {
        self.samples()
            .into_iter()
            .find(|s| s.at >= from && check(s))
            .map(|s| s.at)
    }

    /// Waits (at most `timeout`) until a sample at or after `from`
    /// satisfies `check`; returns when.
    pub(crate) async fn wait_for(
        &self,
        from: Duration,
        timeout: Duration,
        check: impl Fn(&HealthSample) -> bool,
    ) -> Option<Duration> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(at) = self.first_after(from, &check) {
                return Some(at);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(HEALTH_POLL).await;
        }
    }

    /// The breaker positions seen, in order, without repeats.
    pub(crate) fn breaker_history(&self) -> String {
        let mut out: Vec<String> = Vec::new();
        for s in self.samples() {
            let b = s.breaker.unwrap_or_else(|| "no-answer".into());
            if out.last() != Some(&b) {
                out.push(b);
            }
        }
        out.join(">")
    }

    pub(crate) async fn finish(self) -> Vec<HealthSample> {
        self.stop.stop();
        let samples = self.samples.clone();
        let _ = self.task.await;
        let samples = samples.lock().unwrap().clone();
        samples
    }
}

pub(crate) fn breaker_not_closed(s: &HealthSample) -> bool {
    s.breaker.as_deref().is_some_and(|b| b != "closed")
}

pub(crate) fn settled(s: &HealthSample) -> bool {
    s.breaker.as_deref() == Some("closed") && s.journal == Some(0)
}

/// Waits (at most `timeout`) until the server's breaker is closed and its
/// journal empty; returns how long that took. Panics on timeout.
pub(crate) async fn wait_settled(
    http: &reqwest::Client,
    serve: &ServeProcess,
    timeout: Duration,
) -> Duration {
    let started = Instant::now();
    let mut last = None;
    while started.elapsed() < timeout {
        if let Some(h) = health(http, &base(serve)).await {
            if h["breaker"] == "closed" && h["journal"]["entries"] == 0 {
                return started.elapsed();
            }
            last = Some(h);
        }
        tokio::time::sleep(HEALTH_POLL).await;
    }
    panic!(
        "the server did not settle (breaker closed, journal empty) within {timeout:?}; \
         last /health: {last:?}\n{}",
        serve.stderr()
    );
}

/// What the table holds for the users' sessions, against what they were
/// told.
#[derive(Debug, Default)]
pub(crate) struct StoredCheck {
    pub(crate) sessions: usize,
    pub(crate) acked: u64,
    pub(crate) stored: u64,
    /// Acknowledged increments missing from the table.
    pub(crate) lost: u64,
    /// Increments in the table that no client was told about, beyond the
    /// requests that got no 2xx but may have landed.
    pub(crate) extra: u64,
    /// Increments in the table from requests that got no 2xx (no answer,
    /// or a 5xx) but landed: allowed, counted.
    pub(crate) unconfirmed_landed: u64,
    /// Logged-in sessions whose row lost its `user`.
    pub(crate) users_lost: usize,
    pub(crate) details: Vec<String>,
}

impl StoredCheck {
    pub(crate) fn assert_nothing_lost(&self, serve_logs: &str) {
        assert!(
            self.lost == 0 && self.extra == 0 && self.users_lost == 0,
            "the table does not hold what was acknowledged: lost {} increments, {} extra, {} \
             users lost, over {} sessions\n{}\n--- server log\n{}",
            self.lost,
            self.extra,
            self.users_lost,
            self.sessions,
            self.details.join("\n"),
            tail(serve_logs, 80)
        );
    }
}

/// Compares, for every session a user was given, its acknowledged
/// increments with `sess->>'views'` in the table (read directly, not
/// through the proxy).
pub(crate) async fn check_stored(db: &TestDb, users: &[User]) -> StoredCheck {
    let client = db.client().await.expect("direct connection");
    let mut check = StoredCheck::default();
    for user in users {
        let last = user.sessions.len().saturating_sub(1);
        for (i, (sid, acked)) in user.sessions.iter().enumerate() {
            check.sessions += 1;
            check.acked += acked;
            let row = client
                .query_opt(
                    "SELECT sess->>'views', sess->>'user' FROM session_store WHERE sid = $1",
                    &[sid],
                )
                .await
                .expect("read a session");
            let (views, stored_user) = match &row {
                Some(row) => (
                    row.get::<_, Option<String>>(0)
                        .map_or(0, |v| v.parse::<u64>().expect("views is a number")),
                    row.get::<_, Option<String>>(1),
                ),
                None => (0, None),
            };
            check.stored += views;
            let over = views.saturating_sub(*acked);
            // Requests without a 2xx may have landed (the current session's only).
            let allowed = if i == last {
                over.min(user.unconfirmed)
            } else {
                0
            };
            check.unconfirmed_landed += allowed;
            if views < *acked || over > allowed {
                check.lost += acked.saturating_sub(views);
                check.extra += over - allowed;
                check.details.push(format!(
                    "{} session {sid}: {acked} acknowledged, {views} stored{}",
                    user.name,
                    if row.is_none() { " (no row)" } else { "" }
                ));
            }
            // Only the session the user ended with must still carry `user`.
            if user.logged_in && i == last && stored_user.as_deref() != Some(user.name.as_str()) {
                check.users_lost += 1;
                check.details.push(format!(
                    "{} session {sid}: stored user {stored_user:?}",
                    user.name
                ));
            }
        }
    }
    check
}

/// Lines of a text-format tracing log at `level` (`ERROR`, `WARN`).
pub(crate) fn log_lines(logs: &str, level: &str) -> Vec<String> {
    let marker = format!(" {level} ");
    logs.lines()
        .filter(|l| l.contains(&marker))
        .map(str::to_owned)
        .collect()
}

/// The last `n` lines of `text`.
pub(crate) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Milliseconds, for the figures.
pub(crate) fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// Milliseconds from `from` to `at`, or `never`, for the figures.
pub(crate) fn ms_after(at: Option<Duration>, from: Duration) -> String {
    ms_or_never(at.map(|at| at - from))
}

/// Milliseconds of `d`, or `never`, for the figures.
pub(crate) fn ms_or_never(d: Option<Duration>) -> String {
    d.map_or("never".to_owned(), |d| ms(d).to_string())
}

/// A scenario's figures: printed as one line `FIGURES <scenario> k=v ...`,
/// and appended to the file named by `PGSESSION_FAULTS_FIGURES`, if set.
#[derive(Debug)]
pub(crate) struct Figures {
    scenario: &'static str,
    pairs: Vec<(String, String)>,
}

impl Figures {
    pub(crate) fn new(scenario: &'static str) -> Figures {
        Figures {
            scenario,
            pairs: Vec::new(),
        }
    }

    pub(crate) fn set(&mut self, key: &str, value: impl std::fmt::Display) -> &mut Self {
        self.pairs.push((key.to_owned(), value.to_string()));
        self
    }

    /// The usual figures of a load.
    pub(crate) fn load(&mut self, report: &LoadReport) -> &mut Self {
        let failures: Vec<String> = report
            .failures()
            .iter()
            .map(|(status, n)| format!("{status}:{n}"))
            .collect();
        self.set("requests", report.requests())
            .set("ok_2xx", report.ok())
            .set("ok_pct", format!("{:.3}", report.ok_pct()))
            .set(
                "non_2xx",
                if failures.is_empty() {
                    "none".to_owned()
                } else {
                    failures.join(",")
                },
            )
            .set("p50_ms", ms(report.quantile(0.5)))
            .set("p99_ms", ms(report.quantile(0.99)))
            .set("max_ms", ms(report.max_latency()))
            .set("acked", report.acked())
            .set("stale_reads", report.mismatches.len())
            .set("sessions_replaced", report.replaced.len())
            .set("unacked_landed", report.unacked_landed.len())
    }

    pub(crate) fn stored(&mut self, check: &StoredCheck) -> &mut Self {
        self.set("stored", check.stored)
            .set("lost", check.lost)
            .set("extra", check.extra)
            .set("unconfirmed_landed", check.unconfirmed_landed)
            .set("users_lost", check.users_lost)
    }

    pub(crate) fn line(&self) -> String {
        let mut line = format!("FIGURES {}", self.scenario);
        for (k, v) in &self.pairs {
            let _ = write!(line, " {k}={v}");
        }
        line
    }

    pub(crate) fn print(&self) {
        let line = self.line();
        println!("{line}");
        if let Ok(path) = std::env::var("PGSESSION_FAULTS_FIGURES") {
            if !path.is_empty() {
                use std::io::Write as _;
                if let Ok(mut file) = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                {
                    let _ = writeln!(file, "{line}");
                }
            }
        }
    }
}

/// Kills a server with SIGKILL (no shutdown, no flush: as the OOM killer
/// or a deploy tool out of patience would) and reaps it.
pub(crate) async fn sigkill(serve: &mut ServeProcess) -> std::process::ExitStatus {
    let status = std::process::Command::new("kill")
        .args(["-KILL", &serve.pid().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -KILL failed");
    serve.wait().await
}

/// Waits (at most `timeout`) until `/health` satisfies `check`; returns it.
pub(crate) async fn wait_health(
    http: &reqwest::Client,
    base: &str,
    timeout: Duration,
    poll: Duration,
    check: impl Fn(&Value) -> bool,
) -> Option<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(h) = health(http, base).await {
            if check(&h) {
                return Some(h);
            }
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(poll).await;
    }
}

/// The sum of a metric's series in `/metrics` whose labels contain every
/// one of `labels` (e.g. `op="save"`); `None` when `/metrics` did not
/// answer.
pub(crate) async fn metric(
    http: &reqwest::Client,
    base: &str,
    name: &str,
    labels: &[&str],
) -> Option<f64> {
    let a = send(http, base, "GET", "/metrics", None, None).await.ok()?;
    (a.status == 200).then_some(())?;
    Some(
        a.body
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
                (metric == name && labels.iter().all(|label| rest.contains(label)))
                    .then(|| value.parse::<f64>().ok())
                    .flatten()
            })
            .sum(),
    )
}

/// A journal file (`journal-<pid>-<nanos>.log`) as found on disk.
#[derive(Debug, Clone)]
pub(crate) struct JournalFile {
    pub(crate) name: String,
    /// The pid in its name: the process that wrote it.
    pub(crate) pid: u32,
    /// Its unix permission bits.
    pub(crate) mode: u32,
    /// Sessions with a write not yet written back (the last `put` of a
    /// session not followed by its `done`).
    pub(crate) live: usize,
}

/// The journal files in `dir`, by name.
pub(crate) fn journal_files(dir: &std::path::Path) -> Vec<JournalFile> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(listing) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<JournalFile> = listing
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_owned();
            let pid = name
                .strip_prefix("journal-")?
                .strip_suffix(".log")?
                .split('-')
                .next()?
                .parse()
                .ok()?;
            let mode = e.metadata().ok()?.permissions().mode() & 0o777;
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            Some(JournalFile {
                live: live_entries(&text),
                name,
                pid,
                mode,
            })
        })
        .collect();
    files.sort_by(|a, b| a.name.cmp(&b.name));
    files
}

/// Live entries of a journal file's text: per session, a `put` whose
/// sequence number no later `done` names (records are `<crc> <json>`).
fn live_entries(text: &str) -> usize {
    let mut live: BTreeMap<String, u64> = BTreeMap::new();
    for line in text.lines().skip(1) {
        let Some((_, json)) = line.split_once(' ') else {
            continue;
        };
        let Ok(record) = serde_json::from_str::<Value>(json) else {
            continue; // a torn last line
        };
        let Some(sid) = record["sid"].as_str() else {
            continue;
        };
        if let Some(seq) = record["seq"]
            .as_u64()
            .filter(|_| record.get("put").is_some())
        {
            live.insert(sid.to_owned(), seq);
        } else if let Some(done) = record["done"].as_u64() {
            if live.get(sid) == Some(&done) {
                live.remove(sid);
            }
        }
    }
    live.len()
}
