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

/// The operations of `pgsession_query_seconds{op}` and
/// `pgsession_operations_total{op}`.
pub(crate) const QUERY_OPS: &[&str] = &["load", "save", "touch", "destroy", "prune", "health"];
/// The session operations counted by `pgsession_operations_total` (the
/// health check is timed, not counted).
const COUNTED_OPS: &[&str] = &["load", "save", "touch", "destroy", "prune"];
/// How an operation ended.
const OUTCOMES: &[&str] = &["ok", "error", "fallback"];
/// The operations that retry (`pgsession_retries_total{op}`).
const RETRIED_OPS: &[&str] = &["load", "save", "touch", "destroy", "health"];
/// `pgsession_errors_total{kind}`: the labels of `pgsession::ErrorKind`.
const ERROR_KINDS: &[&str] = &[
    "config",
    "acquire",
    "connect",
    "timeout",
    "closed",
    "database",
    "store_closed",
    "unavailable",
    "too_large",
    "journal",
];
/// `pgsession_writeback_conflicts_total{kind}` and
/// `pgsession_dead_letters_total{kind}`: the labels of
/// `pgsession::dead_letter::Conflict`.
const CONFLICT_KINDS: &[&str] = &["changed", "destroyed", "id_taken", "duplicate", "failed"];
/// `pgsession_pool_resizes_total{direction}`.
const RESIZE_DIRECTIONS: &[&str] = &["up", "down"];
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

/// `# HELP` lines for every series.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        "pgsession_pool_size",
        Unit::Count,
        "Connections open in the session pool"
    );
    describe_gauge!(
        "pgsession_pool_idle",
        Unit::Count,
        "Open session-pool connections not in use"
    );
    describe_gauge!(
        "pgsession_pool_in_use",
        Unit::Count,
        "Session-pool connections handed out"
    );
    describe_gauge!(
        "pgsession_pool_waiting",
        Unit::Count,
        "Callers waiting for a session-pool connection"
    );
    describe_gauge!(
        "pgsession_pool_max",
        Unit::Count,
        "Current maximum size of the session pool (it resizes itself under load)"
    );
    describe_histogram!(
        "pgsession_pool_acquire_seconds",
        Unit::Seconds,
        "Time to get a connection from the session pool, a new connection included"
    );
    describe_histogram!(
        "pgsession_query_seconds",
        Unit::Seconds,
        "Duration of a store operation, retries included, by operation"
    );
    describe_counter!(
        "pgsession_operations_total",
        Unit::Count,
        "Store operations by operation and outcome (ok, error, fallback: served by the cache or journal)"
    );
    describe_counter!(
        "pgsession_retries_total",
        Unit::Count,
        "Attempts retried after a transient error, by operation"
    );
    describe_counter!(
        "pgsession_errors_total",
        Unit::Count,
        "Failed store operations by error kind"
    );
    describe_gauge!(
        "pgsession_breaker_state",
        "Circuit breaker: 0 closed, 1 half-open, 2 open"
    );
    describe_gauge!(
        "pgsession_journal_entries",
        Unit::Count,
        "Sessions whose writes wait in the journal for the database"
    );
    describe_gauge!(
        "pgsession_journal_bytes",
        Unit::Bytes,
        "Bytes the journal's waiting writes take on disk (limit: journal_max_bytes)"
    );
    describe_counter!(
        "pgsession_journal_fsyncs_total",
        Unit::Count,
        "fsync calls of the journal (one serves every write waiting: group commit)"
    );
    describe_counter!(
        "pgsession_writeback_conflicts_total",
        Unit::Count,
        "Journaled writes that found the row changed, destroyed or taken at write-back, by kind"
    );
    describe_counter!(
        "pgsession_dead_letters_total",
        Unit::Count,
        "Journaled writes kept aside in dead-letters.jsonl (pgsession journal list), by kind"
    );
    describe_gauge!(
        "pgsession_health_check_seconds",
        Unit::Seconds,
        "Duration of the last health check"
    );
    describe_counter!(
        "pgsession_pool_resizes_total",
        Unit::Count,
        "Resizes of the self-sizing pool, by direction (up, down)"
    );
    describe_counter!(
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
}

/// Registers every series the library and the server may emit, without
/// changing a value already recorded (`increment(0)`), so that each name
/// and label combination is in `/metrics` from the start.
fn register_at_zero() {
    for name in [
        "pgsession_pool_size",
        "pgsession_pool_idle",
        "pgsession_pool_in_use",
        "pgsession_pool_waiting",
        "pgsession_pool_max",
        "pgsession_breaker_state",
        "pgsession_journal_entries",
        "pgsession_journal_bytes",
        "pgsession_health_check_seconds",
    ] {
        metrics::gauge!(name).increment(0.0);
    }
    // Registering a histogram makes the exporter render it, buckets at 0.
    let _ = metrics::histogram!("pgsession_pool_acquire_seconds");
    for &op in QUERY_OPS {
        let _ = metrics::histogram!("pgsession_query_seconds", "op" => op);
    }
    for &op in COUNTED_OPS {
        for &outcome in OUTCOMES {
            metrics::counter!("pgsession_operations_total", "op" => op, "outcome" => outcome)
                .increment(0);
        }
    }
    for &op in RETRIED_OPS {
        metrics::counter!("pgsession_retries_total", "op" => op).increment(0);
    }
    for &kind in ERROR_KINDS {
        metrics::counter!("pgsession_errors_total", "kind" => kind).increment(0);
    }
    metrics::counter!("pgsession_journal_fsyncs_total").increment(0);
    for &kind in CONFLICT_KINDS {
        metrics::counter!("pgsession_writeback_conflicts_total", "kind" => kind).increment(0);
        metrics::counter!("pgsession_dead_letters_total", "kind" => kind).increment(0);
    }
    for &direction in RESIZE_DIRECTIONS {
        metrics::counter!("pgsession_pool_resizes_total", "direction" => direction).increment(0);
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
    let mut text = String::from("# pgsession metrics\n");
    match handle {
        Some(handle) => text.push_str(&handle.render()),
        None => text.push_str("# (no metrics recorder: another one was installed first)\n"),
    }
    text
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
