//! What `/health` says: the library's own health report
//! ([`pgsession::Store::health`]: status, readiness, breaker, pool, the
//! latest evidence about the database, journal), plus what only the server
//! knows (which store it runs on, requests in flight, its version and
//! uptime), the settings the dashboard draws against (health-check interval,
//! slow-check threshold, pool bounds, breaker), the store's recent events
//! and its incident timeline. The in-memory store has no database to check:
//! it reports itself `ok`, with an empty pool.
//!
//! The contract's fields (`status`, `breaker`, `pool.{size,idle,in_use,
//! waiting,max}`, `last_check.{at,latency_ms,ok}`, `journal.entries`,
//! `config_error`) are always there; `last_check`'s are `null` before the
//! first contact with the database, `config_error` is `null` unless the
//! database reported a configuration error (then the setting to change and
//! the error; the status is `degraded` meanwhile).
//!
//! `last_check` is the latest evidence, from every contact with the
//! database: a health check, a probe of the open breaker, an operation
//! (`source`); when it is not ok, `error` says why and `failing_since`
//! since when. It is never a stale success: a success older than
//! [`stale_after`] (twice the longest of the check interval and the
//! breaker's longest cool-down, plus the connect budget) is reported
//! `ok: false, stale: true`, and the status `degraded`.

use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::AppState;

/// Events shown by `/health`, newest last.
const EVENTS_SHOWN: usize = 20;
/// Timeline entries shown by `/health` (and so by the dashboard), newest
/// last.
const TIMELINE_SHOWN: usize = 40;

/// When the server started (first call), for `uptime_s`.
static STARTED: OnceLock<(Instant, OffsetDateTime)> = OnceLock::new();

/// Marks the start of the server; later calls change nothing.
pub(crate) fn mark_started() {
    started();
}

/// When the server started: as marked, or now when it was not.
fn started() -> (Instant, OffsetDateTime) {
    *STARTED.get_or_init(|| (Instant::now(), OffsetDateTime::now_utc()))
}

/// The body of `/health`.
pub(crate) fn health_json(state: &AppState) -> Value {
    let mut body = match &state.store {
        Some(store) => {
            let mut body = serde_json::to_value(store.health()).unwrap_or_else(
                |e| json!({ "status": "degraded", "error": format!("health report: {e}") }),
            );
            let events = store.recent_events();
            let skip = events.len().saturating_sub(EVENTS_SHOWN);
            body["events"] = json!(events[skip..]);
            let timeline = store.timeline();
            let skip = timeline.len().saturating_sub(TIMELINE_SHOWN);
            body["timeline"] = json!(timeline[skip..]);
            body["settings"] = settings(store.config());
            never_stale(&mut body, stale_after(store.config()));
            body
        }
        None => memory_health(),
    };
    // The contract's shape, also before the first check.
    if body["last_check"].is_null() {
        body["last_check"] = json!({ "at": null, "latency_ms": null, "ok": null });
    }
    if body.get("config_error").is_none() {
        body["config_error"] = Value::Null;
    }
    body["store"] = json!(state.kind.as_str());
    body["requests_in_flight"] = json!(state.in_flight.load(Ordering::Relaxed));
    let (started, started_at) = started();
    body["server"] = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "started_at": rfc3339(started_at),
        "uptime_s": started.elapsed().as_secs_f64().floor(),
        "now": rfc3339(OffsetDateTime::now_utc()),
    });
    body
}

/// Whether `/readyz` answers 200: the store knows its table exists (always
/// for memory).
pub(crate) fn is_ready(state: &AppState) -> bool {
    state.store.as_ref().is_none_or(|store| store.is_ready())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).unwrap_or_default()
}

/// How old a successful contact may be before it says nothing of the
/// database now: twice the longest wait between two contacts the store
/// makes by itself (a health check, or a probe of the open breaker), plus
/// the connect budget and the slow-check threshold.
pub(crate) fn stale_after(config: &pgsession::Config) -> Duration {
    2 * config
        .health_check_interval()
        .max(config.breaker_max_cool_down())
        + config.connect_budget()
        + config.slow_check_threshold()
}

/// Adds `last_check.stale` and `last_check.age_ms`; a success older than
/// `stale_after` is reported `ok: false` (and the status `degraded`).
fn never_stale(body: &mut Value, stale_after: Duration) {
    let check = &mut body["last_check"];
    let Some(at) = check["at"]
        .as_str()
        .and_then(|at| OffsetDateTime::parse(at, &Rfc3339).ok())
    else {
        return;
    };
    let age = (OffsetDateTime::now_utc() - at).max(time::Duration::ZERO);
    check["age_ms"] = json!((age.as_seconds_f64() * 1000.0).round());
    let stale = check["ok"] == true && age > stale_after;
    check["stale"] = json!(stale);
    if stale {
        check["ok"] = json!(false);
        check["error"] = json!("stale");
        if body["status"] == "ok" {
            body["status"] = json!("degraded");
        }
    }
}

/// The settings the dashboard annotates its charts with.
fn settings(config: &pgsession::Config) -> Value {
    json!({
        "pool_size": config.pool_size(),
        "pool_max_size": config.pool_max_size(),
        "acquire_timeout_ms": ms(config.acquire_timeout()),
        "connect_timeout_ms": ms(config.connect_timeout()),
        "query_timeout_ms": ms(config.query_timeout()),
        "health_check_interval_ms": ms(config.health_check_interval()),
        "slow_check_threshold_ms": ms(config.slow_check_threshold()),
        "breaker_threshold": config.breaker_threshold(),
        "breaker_cool_down_ms": ms(config.breaker_cool_down()),
        "breaker_max_cool_down_ms": ms(config.breaker_max_cool_down()),
        "stale_after_ms": ms(stale_after(config)),
        "journal_max_bytes": config.journal_max_bytes(),
        "target": config.target(),
    })
}

fn memory_health() -> Value {
    json!({
        "status": "ok",
        "ready": true,
        "breaker": "closed",
        "pool": { "size": 0, "idle": 0, "in_use": 0, "waiting": 0, "max": 0 },
        "last_check": {
            "at": rfc3339(OffsetDateTime::now_utc()), "latency_ms": 0.0, "ok": true,
            "source": "memory", "error": null, "failing_since": null, "failures": 0,
            "stale": false, "age_ms": 0.0
        },
        "journal": {
            "entries": 0, "bytes": 0, "max_bytes": 0, "fallback": false, "dir": null,
            "broken": null, "conflicts": 0, "dead_letters": 0
        },
        "config_error": null,
        "events": [],
        "timeline": [],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_store_reports_the_contract_shape() {
        let state = AppState {
            store: None,
            kind: super::super::StoreKind::Memory,
            in_flight: Default::default(),
        };
        let h = health_json(&state);
        assert_eq!(h["status"], "ok");
        assert_eq!(h["store"], "memory");
        assert_eq!(h["breaker"], "closed");
        assert_eq!(h["last_check"]["ok"], true);
        assert!(h["last_check"]["at"].is_string());
        for key in ["size", "idle", "in_use", "waiting", "max"] {
            assert_eq!(h["pool"][key], 0, "{key}");
        }
        assert_eq!(h["journal"]["entries"], 0);
        assert!(h["config_error"].is_null(), "{h}");
        assert!(h["events"].as_array().is_some_and(Vec::is_empty));
        assert!(h["timeline"].as_array().is_some_and(Vec::is_empty));
        assert_eq!(h["server"]["version"], env!("CARGO_PKG_VERSION"));
        assert!(h["server"]["uptime_s"].as_f64().is_some());
        assert!(is_ready(&state));
    }

    #[test]
    fn an_old_success_is_reported_stale_never_ok() {
        let old = OffsetDateTime::now_utc() - time::Duration::seconds(100);
        let mut body = json!({
            "status": "ok",
            "last_check": { "at": rfc3339(old), "latency_ms": 1.0, "ok": true },
        });
        never_stale(&mut body, Duration::from_secs(120));
        assert_eq!(body["last_check"]["ok"], true, "{body}");
        assert_eq!(body["last_check"]["stale"], false);
        never_stale(&mut body, Duration::from_secs(60));
        assert_eq!(body["last_check"]["ok"], false, "{body}");
        assert_eq!(body["last_check"]["stale"], true);
        assert_eq!(body["last_check"]["error"], "stale");
        assert_eq!(body["status"], "degraded");
        assert!(body["last_check"]["age_ms"].as_f64().unwrap() >= 100_000.0);
    }

    #[tokio::test]
    async fn a_store_reports_its_settings_and_events() {
        let db = pgsession_testkit::TestDb::new()
            .await
            .unwrap_or_else(|e| panic!("no test database: {e}"));
        let config = pgsession::Config::builder()
            .url(db.url())
            .health_check_interval(Duration::from_secs(7))
            .build()
            .unwrap();
        let store = pgsession::Store::new(config).unwrap();
        store.ready().await.unwrap();
        let state = AppState {
            store: Some(store.clone()),
            kind: super::super::StoreKind::Postgres,
            in_flight: Default::default(),
        };
        let h = health_json(&state);
        store.close().await;
        assert_eq!(h["store"], "postgres");
        assert_eq!(h["breaker"], "closed");
        assert!(h["status"] == "ok" || h["status"] == "degraded", "{h}");
        assert!(h["last_check"].get("at").is_some(), "{h}");
        assert!(h["pool"]["max"].as_u64().is_some_and(|m| m >= 1), "{h}");
        assert!(h["events"].is_array(), "{h}");
        assert!(h["timeline"].is_array(), "{h}");
        assert!(h["config_error"].is_null(), "{h}");
        if h["last_check"]["at"].is_string() {
            assert!(h["last_check"]["source"].is_string(), "{h}");
            assert_eq!(h["last_check"]["stale"], false, "{h}");
        }
        assert_eq!(h["settings"]["health_check_interval_ms"], 7000.0);
        assert!(!h.to_string().contains("password"), "{h}");
    }
}
