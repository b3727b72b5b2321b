//! `/metrics`: everything recorded through the `metrics` facade (the
//! library's pool gauges, per-operation timings, retries, errors, breaker,
//! journal, health-check latency; the server's own gauges), rendered as
//! Prometheus text by `metrics-exporter-prometheus`, without its HTTP
//! listener. Installing the recorder is the program's job, not the
//! library's, so it happens here.

use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use super::health;
use super::AppState;

/// Histogram buckets, in seconds, for every `*_seconds` histogram: from a
/// local round trip to a query timeout.
const BUCKETS: &[f64] = &[
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The process's recorder, installed once (`None` when another recorder
/// was installed first).
static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder (once per process) and returns its
/// handle.
pub(crate) fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
                .ok()?;
            match builder.install_recorder() {
                Ok(handle) => Some(handle),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot install the metrics recorder; /metrics will be nearly empty");
                    None
                }
            }
        })
        .clone()
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

    #[test]
    fn renders_the_server_gauges() {
        let state = AppState {
            store: None,
            kind: super::super::StoreKind::Memory,
            in_flight: Default::default(),
        };
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
}
