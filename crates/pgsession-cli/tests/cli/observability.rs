//! What `serve` tells an operator: `/metrics` (every series of the design,
//! histograms with buckets), `/health` (the contract's fields and the
//! events), and the dashboard page (self-contained).

use std::time::Duration;

use crate::common::{call, client, closed_port_url, eventually, test_db, ServeProcess};

/// Every series `/metrics` must show from the start, with its type.
const SERIES: &[(&str, &str)] = &[
    ("pgsession_pool_size", "gauge"),
    ("pgsession_pool_idle", "gauge"),
    ("pgsession_pool_in_use", "gauge"),
    ("pgsession_pool_waiting", "gauge"),
    ("pgsession_pool_max", "gauge"),
    ("pgsession_pool_acquire_seconds", "histogram"),
    ("pgsession_query_seconds", "histogram"),
    ("pgsession_operations_total", "counter"),
    ("pgsession_retries_total", "counter"),
    ("pgsession_errors_total", "counter"),
    ("pgsession_breaker_state", "gauge"),
    ("pgsession_journal_entries", "gauge"),
    ("pgsession_health_check_seconds", "gauge"),
    ("pgsession_pool_resizes_total", "counter"),
    ("pgsession_http_requests_total", "counter"),
];

/// The value of the sample `name{labels}` (labels exactly as rendered).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test]
async fn metrics_show_every_series_with_histogram_buckets() {
    let db = test_db().await;
    let serve = ServeProcess::start_ready(
        db.url(),
        &[
            ("PGSESSION_HEALTH_CHECK_INTERVAL", "1s"),
            ("PGSESSION_COOKIE_SECURE", "false"),
        ],
    )
    .await;
    let http = client();
    // A little traffic: a session made, read, written, destroyed.
    let a = call(&http, &serve, "POST", "/counter", None, None).await;
    assert_eq!(a.status, 200, "{a:?}");
    let cookie = a.cookie.clone().expect("session cookie");
    for _ in 0..3 {
        let r = call(&http, &serve, "POST", "/counter", Some(&cookie), None).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    let r = call(&http, &serve, "POST", "/logout", Some(&cookie), None).await;
    assert_eq!(r.status, 204, "{r:?}");
    // At least one health check.
    eventually("a health check", Duration::from_secs(10), || async {
        let h = call(&http, &serve, "GET", "/health", None, None).await;
        h.json()["last_check"]["at"].is_string()
    })
    .await;

    let m = call(&http, &serve, "GET", "/metrics", None, None).await;
    assert_eq!(m.status, 200);
    let text = m.body;
    for (name, kind) in SERIES {
        assert!(
            text.contains(&format!("# TYPE {name} {kind}\n")),
            "no `# TYPE {name} {kind}` in /metrics:\n{text}"
        );
    }
    assert!(
        !text.contains("quantile="),
        "a summary in /metrics:\n{text}"
    );
    for op in ["load", "save", "touch", "destroy", "prune", "health"] {
        for suffix in ["_bucket{op=\"", "_sum{op=\"", "_count{op=\""] {
            let line = format!("pgsession_query_seconds{suffix}{op}\"");
            assert!(text.contains(&line), "no {line} in /metrics:\n{text}");
        }
    }
    for outcome in ["ok", "error", "fallback"] {
        let line = format!("pgsession_operations_total{{op=\"save\",outcome=\"{outcome}\"}}");
        assert!(text.contains(&line), "no {line} in /metrics:\n{text}");
    }
    for line in [
        "pgsession_pool_acquire_seconds_bucket{le=\"+Inf\"}",
        "pgsession_retries_total{op=\"load\"}",
        "pgsession_errors_total{kind=\"connect\"}",
        "pgsession_pool_resizes_total{direction=\"up\"}",
        "pgsession_pool_resizes_total{direction=\"down\"}",
    ] {
        assert!(text.contains(line), "no {line} in /metrics:\n{text}");
    }
    // What happened is counted.
    let saves = sample(
        &text,
        "pgsession_operations_total{op=\"save\",outcome=\"ok\"}",
    )
    .unwrap_or(0.0);
    assert!(saves >= 4.0, "saves counted: {saves}\n{text}");
    let destroys = sample(
        &text,
        "pgsession_operations_total{op=\"destroy\",outcome=\"ok\"}",
    )
    .unwrap_or(0.0);
    assert!(destroys >= 1.0, "destroys counted: {destroys}\n{text}");
    let acquired = sample(&text, "pgsession_pool_acquire_seconds_count").unwrap_or(0.0);
    assert!(acquired >= 5.0, "acquires counted: {acquired}\n{text}");
    let checks = sample(&text, "pgsession_query_seconds_count{op=\"health\"}").unwrap_or(0.0);
    assert!(checks >= 1.0, "health checks timed: {checks}\n{text}");
    let requests = sample(&text, "pgsession_http_requests_total{class=\"2xx\"}").unwrap_or(0.0);
    assert!(requests >= 5.0, "requests counted: {requests}\n{text}");
    assert_eq!(
        sample(&text, "pgsession_breaker_state"),
        Some(0.0),
        "{text}"
    );
    assert!(
        sample(&text, "pgsession_pool_max").is_some_and(|m| m >= 1.0),
        "{text}"
    );
}

#[tokio::test]
async fn health_has_the_contract_fields_and_the_events() {
    let db = test_db().await;
    let serve =
        ServeProcess::start_ready(db.url(), &[("PGSESSION_HEALTH_CHECK_INTERVAL", "1s")]).await;
    let http = client();
    eventually(
        "a health check in /health",
        Duration::from_secs(10),
        || async {
            let h = call(&http, &serve, "GET", "/health", None, None)
                .await
                .json();
            h["last_check"]["at"].is_string()
        },
    )
    .await;
    let h = call(&http, &serve, "GET", "/health", None, None)
        .await
        .json();
    assert_eq!(h["status"], "ok", "{h:#}");
    assert_eq!(h["breaker"], "closed", "{h:#}");
    for key in ["size", "idle", "in_use", "waiting", "max"] {
        assert!(h["pool"][key].is_u64(), "pool.{key} in {h:#}");
    }
    assert!(h["last_check"]["latency_ms"].is_number(), "{h:#}");
    assert_eq!(h["last_check"]["ok"], true, "{h:#}");
    assert_eq!(h["journal"]["entries"], 0, "{h:#}");
    assert!(h["events"].is_array(), "{h:#}");
    assert_eq!(h["store"], "postgres", "{h:#}");
    assert_eq!(h["settings"]["health_check_interval_ms"], 1000.0, "{h:#}");
    assert!(h["server"]["uptime_s"].is_number(), "{h:#}");
}

#[tokio::test]
async fn the_dashboard_is_one_self_contained_page() {
    // No database needed: the store starts degraded and the page is served.
    let serve = ServeProcess::start(Some(&closed_port_url()), &[]).await;
    let response = client()
        .get(serve.url("/dashboard"))
        .send()
        .await
        .expect("GET /dashboard");
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html"),
        "{headers:?}"
    );
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"),
        "{csp}"
    );
    let page = response.text().await.unwrap();
    for external in [
        "src=\"http",
        "href=\"http",
        "url(http",
        "@import",
        "src=\"//",
        "href=\"//",
    ] {
        assert!(!page.contains(external), "the page loads {external}...");
    }
    for id in [
        "breaker-state",
        "requests-total",
        "pool-in-use",
        "pool-max",
        "pool-waiting",
        "acquire-p50",
        "acquire-p99",
        "errors-per-min",
        "retries-per-min",
        "journal-entries",
        "breaker-timeline",
        "events",
    ] {
        assert!(
            page.contains(&format!("data-testid=\"{id}\"")),
            "no data-testid={id}"
        );
    }
    assert!(page.contains("fetch(path"), "the page polls the server");
}
