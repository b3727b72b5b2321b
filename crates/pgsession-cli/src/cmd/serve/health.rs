//! What `/health` says: the library's own health report
//! ([`pgsession::Store::health`]: status, readiness, breaker, pool, last
//! health check, journal), plus what only the server knows (which store it
//! runs on, requests in flight) and the store's recent events for the
//! dashboard. The in-memory store has no database to check: it reports
//! itself `ok`, with an empty pool.

use std::sync::atomic::Ordering;

use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::AppState;

/// Events shown by `/health` (and so by the dashboard), newest last.
const EVENTS_SHOWN: usize = 20;

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
            body
        }
        None => memory_health(),
    };
    // The contract's shape, also before the first check.
    if body["last_check"].is_null() {
        body["last_check"] = json!({ "at": null, "latency_ms": null, "ok": null });
    }
    body["store"] = json!(state.kind.as_str());
    body["requests_in_flight"] = json!(state.in_flight.load(Ordering::Relaxed));
    body
}

/// Whether `/readyz` answers 200: the store knows its table exists (always
/// for memory).
pub(crate) fn is_ready(state: &AppState) -> bool {
    state.store.as_ref().is_none_or(|store| store.is_ready())
}

fn memory_health() -> Value {
    let now = OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default();
    json!({
        "status": "ok",
        "ready": true,
        "breaker": "closed",
        "pool": { "size": 0, "idle": 0, "in_use": 0, "waiting": 0, "max": 0 },
        "last_check": { "at": now, "latency_ms": 0.0, "ok": true },
        "journal": { "entries": 0 },
        "events": [],
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
        assert!(is_ready(&state));
    }
}
