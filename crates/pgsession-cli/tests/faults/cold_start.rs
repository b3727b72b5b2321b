//! Cold start: every new connection to the database is held for 8 s (a
//! serverless database waking up), and for 25 s with the connect timeout
//! raised to 30 s. Start-up succeeds, the first request succeeds, nothing
//! is logged at ERROR.

use std::time::{Duration, Instant};

use crate::common::ServeProcess;
use crate::support::{
    base, check_stored, http, log_lines, ms, send, tail, wait_settled, Figures, Rig, User,
};

async fn cold_start(scenario: &'static str, delay: Duration, env: &[(&str, &str)]) {
    let rig = Rig::new().await;
    rig.proxy.delay_connect(delay);
    let t0 = Instant::now();
    let serve = ServeProcess::start(Some(&rig.proxied_url()), env).await;
    let started_in = t0.elapsed();
    let http = http();
    let base = base(&serve);

    // The first request, at once: it waits for the database to wake.
    let sent = Instant::now();
    let first = send(&http, &base, "POST", "/counter", None, None)
        .await
        .unwrap_or_else(|e| panic!("the first request got no answer: {e}\n{}", serve.stderr()));
    let first_latency = sent.elapsed();
    assert_eq!(
        first.status,
        200,
        "the first request failed after {first_latency:?}: {}\n{}",
        first.body,
        serve.stderr()
    );
    assert_eq!(first.json()["views"], 1);
    let mut user = User::anonymous("cold".into());
    let cookie = first.cookie.clone().expect("a new session sets a cookie");
    user.sessions.push((crate::common::sid_of(&cookie), 1));

    // The second one finds the pool warm.
    let sent = Instant::now();
    let second = send(&http, &base, "POST", "/counter", Some(&cookie), None)
        .await
        .expect("second request answered");
    let second_latency = sent.elapsed();
    assert_eq!(second.status, 200, "{}", second.body);
    assert_eq!(second.json()["views"], 2);
    user.sessions[0].1 = 2;

    let ready = send(&http, &base, "GET", "/readyz", None, None)
        .await
        .expect("/readyz");
    let health = send(&http, &base, "GET", "/health", None, None)
        .await
        .expect("/health")
        .json();
    // "Nothing lost" is judged after recovery, as in every other scenario:
    // a request that met the acquire timeout while the pool was still
    // opening its first connections is acknowledged from the journal and
    // written back moments later.
    wait_settled(&http, &serve, Duration::from_secs(30)).await;
    let stored = check_stored(&rig.db, &[user]).await;

    let logs = serve.stderr();
    let errors = log_lines(&logs, "ERROR");
    let warnings = log_lines(&logs, "WARN");
    Figures::new(scenario)
        .set("connect_delay_ms", ms(delay))
        .set("healthz_after_ms", ms(started_in))
        .set("first_request_ms", ms(first_latency))
        .set("first_status", first.status)
        .set("second_request_ms", ms(second_latency))
        .set("readyz", ready.status)
        .set("health", health["status"].as_str().unwrap_or("?"))
        .set("error_lines", errors.len())
        .set("warn_lines", warnings.len())
        .stored(&stored)
        .print();

    assert!(
        errors.is_empty(),
        "ERROR logged during a cold start:\n{}",
        errors.join("\n")
    );
    assert_eq!(ready.status, 200, "{}", tail(&logs, 40));
    stored.assert_nothing_lost(&logs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_start_8s() {
    cold_start("cold_start_8s", Duration::from_secs(8), &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_start_25s_connect_timeout_30s() {
    cold_start(
        "cold_start_25s",
        Duration::from_secs(25),
        &[("PGSESSION_CONNECT_TIMEOUT", "30s")],
    )
    .await;
}
