//! `/metrics`: everything recorded through the `metrics` facade (the
//! library's pool gauges, per-operation timings, retries, errors, breaker,
//! journal, health-check latency; the server's own counters and gauges),
//! rendered as Prometheus text by `metrics-exporter-prometheus`, without its
//! HTTP listener. Installing the recorder is the program's job, not the
//! library's, so it happens here.
//!
//! Every histogram has buckets (never a summary), so that a scraper, and the
//! dashboard, can aggregate them and estimate quantiles over any window.
//! Every series the library may emit is described and registered at zero at
//! start, so that a counter that has not happened yet (no retry, no error,
//! no resize) is still there: a rate over it is 0, not "no data".

use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use std::time::Duration;

use metrics::Unit;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use super::health;
use super::AppState;

/// Histogram buckets, in seconds, for the query and other `*_seconds`
/// histograms: from a local round trip to a query timeout.
const BUCKETS: &[f64] = &[
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Buckets of `pgsession_pool_acquire_seconds`: a checkout from a warm pool
/// takes microseconds, a starved one up to the acquire timeout, a new
/// connection up to the connect timeout.
const ACQUIRE_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
];

/// `pgsession_http_requests_total{class}`: session requests by status class.
pub(crate) const HTTP_CLASSES: &[&str] = &["2xx", "3xx", "4xx", "5xx"];

/// The process's recorder, installed once (`None` when another recorder
/// was installed first).
static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder (once per process), describes and
/// registers every series, and returns its handle.
pub(crate) fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets(BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("pgsession_pool_acquire_seconds".into()),
                        ACQUIRE_BUCKETS,
                    )
                })
                .ok()?;
            match builder.install_recorder() {
                Ok(handle) => {
                    describe();
                    register_at_zero();
                    Some(handle)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot install the metrics recorder; /metrics will be nearly empty");
                    None
                }
            }
        })
        .clone()
}

/// `# HELP` lines for every series: the library's from its own list
/// (`pgsession::metrics`), then the server's.
fn describe() {
    use metrics::describe_gauge;
    pgsession::metrics::describe();
    metrics::describe_counter!(
        "pgsession_http_requests_total",
        Unit::Count,
        "Session requests served by `pgsession serve`, by status class"
    );
    describe_gauge!("pgsession_up", "1 while the server runs");
    describe_gauge!(
        "pgsession_ready",
        "1 when the store can serve (the session table exists)"
    );
    describe_gauge!(
        "pgsession_http_requests_in_flight",
        Unit::Count,
        "HTTP requests being served now"
    );
    describe_gauge!(
        "pgsession_database_ok",
        "1 when the latest contact with the database (a health check, a breaker probe or an operation) succeeded, else 0"
    );
    describe_gauge!(
        "pgsession_database_failing_seconds",
        Unit::Seconds,
        "How long every contact with the database has been failing (0 while the latest succeeded)"
    );
}

/// Registers every series the library and the server may emit, without
/// changing a value already recorded (`increment(0)`), so that each name
/// and label combination is in `/metrics` from the start.
fn register_at_zero() {
    pgsession::metrics::register_at_zero();
    for name in [
        "pgsession_database_ok",
        "pgsession_database_failing_seconds",
    ] {
        metrics::gauge!(name).increment(0.0);
    }
    for &class in HTTP_CLASSES {
        metrics::counter!("pgsession_http_requests_total", "class" => class).increment(0);
    }
}

/// Counts one session request by the class of its status (`2xx`...).
pub(crate) fn count_request(status: u16) {
    let class = match status {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    metrics::counter!("pgsession_http_requests_total", "class" => class).increment(1);
}

/// Drains the histograms' buffers now and then (the exporter's upkeep,
/// normally done by its HTTP listener), until `stop`.
pub(crate) fn spawn_upkeep(stop: CancellationToken) {
    let Some(handle) = install() else { return };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => handle.run_upkeep(),
            }
        }
    });
}

/// The Prometheus text of `/metrics`.
pub(crate) fn render_metrics(state: &AppState) -> String {
    let handle = install();
    if let Some(store) = &state.store {
        store.publish_metrics();
    }
    metrics::gauge!("pgsession_up").set(1.0);
    metrics::gauge!("pgsession_ready").set(f64::from(u8::from(health::is_ready(state))));
    metrics::gauge!("pgsession_http_requests_in_flight")
        .set(state.in_flight.load(Ordering::Relaxed) as f64);
    let (ok, failing) = database_evidence(state);
    metrics::gauge!("pgsession_database_ok").set(ok);
    metrics::gauge!("pgsession_database_failing_seconds").set(failing);
    let mut text = String::from("# pgsession metrics\n");
    match handle {
        Some(handle) => text.push_str(&handle.render()),
        None => text.push_str("# (no metrics recorder: another one was installed first)\n"),
    }
    text
}

/// The latest evidence about the database as two gauges: whether it is ok
/// (and not stale), and for how long it has been failing.
fn database_evidence(state: &AppState) -> (f64, f64) {
    let Some(store) = &state.store else {
        return (1.0, 0.0);
    };
    let Some(check) = store.health().last_check else {
        return (0.0, 0.0);
    };
    let now = time::OffsetDateTime::now_utc();
    if check.ok {
        let fresh = (now - check.at) <= health::stale_after(store.config());
        return (f64::from(u8::from(fresh)), 0.0);
    }
    let since = check.failing_since.unwrap_or(check.at);
    (0.0, (now - since).as_seconds_f64().max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory_state() -> AppState {
        AppState {
            store: None,
            kind: super::super::StoreKind::Memory,
            in_flight: Default::default(),
        }
    }

    #[test]
    fn renders_the_server_gauges() {
        let state = memory_state();
        let text = render_metrics(&state);
        assert!(text.starts_with("# pgsession metrics\n"), "{text}");
        assert!(text.contains("pgsession_up 1"), "{text}");
        assert!(text.contains("pgsession_ready 1"), "{text}");
        metrics::histogram!("pgsession_test_seconds").record(0.003);
        let text = render_metrics(&state);
        assert!(
            text.contains("pgsession_test_seconds_bucket{le=\"0.005\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn every_series_is_there_before_it_happens() {
        let text = render_metrics(&memory_state());
        for line in [
            "# TYPE pgsession_pool_acquire_seconds histogram",
            "# TYPE pgsession_query_seconds histogram",
            "pgsession_pool_acquire_seconds_bucket{le=\"0.00001\"}",
            "pgsession_query_seconds_bucket{op=\"prune\",le=\"+Inf\"}",
            "pgsession_operations_total{op=\"touch\",outcome=\"fallback\"}",
            "pgsession_retries_total{op=\"save\"}",
            "pgsession_errors_total{kind=\"unavailable\"}",
            "pgsession_pool_resizes_total{direction=\"up\"}",
            "pgsession_http_requests_total{class=\"5xx\"}",
            "# TYPE pgsession_breaker_state gauge",
            "# HELP pgsession_pool_waiting",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
        assert!(!text.contains("quantile="), "a summary slipped in:\n{text}");
    }

    #[test]
    fn registering_does_not_reset_a_counter() {
        install();
        metrics::counter!("pgsession_retries_total", "op" => "destroy").increment(3);
        register_at_zero();
        let text = render_metrics(&memory_state());
        assert!(
            text.contains("pgsession_retries_total{op=\"destroy\"} 3"),
            "{text}"
        );
    }

    #[test]
    fn requests_are_counted_by_class() {
        install();
        count_request(404);
        count_request(404);
        let text = render_metrics(&memory_state());
        let line = text
            .lines()
            .find(|l| l.starts_with("pgsession_http_requests_total{class=\"4xx\"}"))
            .unwrap_or_else(|| panic!("{text}"));
        let n: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(n >= 2, "{line}");
    }

    /// The library times and counts a whole prune (the library side of
    /// `pgsession_query_seconds{op="prune"}`).
    #[tokio::test]
    async fn a_prune_is_timed_and_counted() {
        install();
        let db = pgsession_testkit::TestDb::new()
            .await
            .unwrap_or_else(|e| panic!("no test database: {e}"));
        let config = pgsession::Config::builder().url(db.url()).build().unwrap();
        let store = pgsession::Store::new(config).unwrap();
        let count = |text: &str| -> u64 {
            text.lines()
                .find(|l| {
                    l.starts_with("pgsession_operations_total{")
                        && l.contains("op=\"prune\"")
                        && l.contains("outcome=\"ok\"")
                })
                .and_then(|l| l.rsplit(' ').next()?.parse().ok())
                .unwrap_or(0)
        };
        let state = memory_state();
        let before = count(&render_metrics(&state));
        store.prune().await.unwrap();
        let text = render_metrics(&state);
        store.close().await;
        assert_eq!(count(&text), before + 1, "{text}");
        let histogram_count = text
            .lines()
            .find(|l| l.starts_with("pgsession_query_seconds_count{op=\"prune\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0);
        assert!(histogram_count >= 1, "{text}");
    }
}
