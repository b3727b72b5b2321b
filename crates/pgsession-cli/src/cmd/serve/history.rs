//! The dashboard's history, kept by the server: one [`Sample`] a second in
//! a ring of [`CAPACITY`] (16 minutes), so that a page opened at any moment,
//! in the middle of an incident too, draws the past 15 minutes at once
//! (`GET /history`).
//!
//! A background task takes the samples, never a request: every second it
//! renders `/metrics` as a scraper would, turns the counters into rates and
//! the histogram buckets into quantiles over the trailing 10 s (as
//! `rate()` and `histogram_quantile` do), and adds what `/health` says of
//! the pool, the journal, the breaker and the database. The same series stay
//! in `/metrics`, so Prometheus and Grafana see what the page sees.
//!
//! Memory: [`BYTES_PER_SAMPLE`] × [`CAPACITY`] = 84,480 bytes (82.5 KiB),
//! allocated once, plus the 10 s window of cumulative figures the rates are
//! taken over (11 snapshots of some 120 buckets each, about 21 KiB).

use std::collections::VecDeque;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::metrics as server_metrics;
use super::AppState;

/// One sample a second.
pub(crate) const INTERVAL: Duration = Duration::from_secs(1);
/// Samples kept: 16 minutes at one a second (the page draws 15).
pub(crate) const CAPACITY: usize = 960;
/// The size of one [`Sample`] in memory.
pub(crate) const BYTES_PER_SAMPLE: usize = 88;
/// Rates and quantiles are taken over this trailing window.
const RATE_WINDOW: Duration = Duration::from_secs(10);
/// The operations of `pgsession_query_seconds{op}`, in the order of
/// [`Sample::query_p99`].
pub(crate) const OPS: [&str; 6] = ["load", "save", "touch", "destroy", "prune", "health"];

/// What the dashboard draws for one second. Rates are `NaN` until there is
/// a baseline, quantiles `NaN` when nothing was observed in the window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Sample {
    /// When, in Unix milliseconds.
    pub(crate) at_ms: i64,
    /// Session requests per second.
    pub(crate) requests: f32,
    /// Store operations per second.
    pub(crate) operations: f32,
    /// Operations served by the fallback (cache or journal), per minute.
    pub(crate) fallback: f32,
    /// Retried attempts per minute.
    pub(crate) retries: f32,
    /// Failed operations per minute.
    pub(crate) errors: f32,
    /// HTTP 5xx answers per minute.
    pub(crate) http_5xx: f32,
    /// Pool acquire time, p50 and p99, in seconds.
    pub(crate) acquire_p50: f32,
    pub(crate) acquire_p99: f32,
    /// Query time p99 per operation ([`OPS`]), in seconds.
    pub(crate) query_p99: [f32; 6],
    /// Sessions waiting in the journal.
    pub(crate) journal: u32,
    /// Callers waiting for a pool connection.
    pub(crate) waiting: u32,
    /// The pool: in use, maximum, open, idle.
    pub(crate) in_use: u16,
    pub(crate) max: u16,
    pub(crate) size: u16,
    pub(crate) idle: u16,
    /// 0 closed, 1 half-open, 2 open.
    pub(crate) breaker: u8,
    /// The latest evidence about the database: 0 none, 1 ok, 2 failing
    /// (or slow, or no answer).
    pub(crate) database: u8,
    /// 0 ok, 1 degraded, 2 down.
    pub(crate) status: u8,
}

/// The ring of samples, and the totals of the latest one.
#[derive(Debug)]
pub(crate) struct History {
    ring: Mutex<Ring>,
}

#[derive(Debug)]
struct Ring {
    samples: VecDeque<Sample>,
    /// Requests and operations counted since start, as of the latest sample.
    totals: (f64, f64),
}

impl History {
    pub(crate) fn new() -> History {
        History {
            ring: Mutex::new(Ring {
                samples: VecDeque::with_capacity(CAPACITY),
                totals: (0.0, 0.0),
            }),
        }
    }

    fn push(&self, sample: Sample, totals: (f64, f64)) {
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        if ring.samples.len() == CAPACITY {
            ring.samples.pop_front();
        }
        ring.samples.push_back(sample);
        ring.totals = totals;
    }

    /// The samples after `since_ms` (all without), oldest first, and the
    /// totals.
    fn after(&self, since_ms: Option<i64>) -> (Vec<Sample>, (f64, f64)) {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let since = since_ms.unwrap_or(i64::MIN);
        let first = ring.samples.partition_point(|s| s.at_ms <= since);
        (ring.samples.range(first..).copied().collect(), ring.totals)
    }

    /// The body of `GET /history[?since=MS]`: the samples as columns.
    pub(crate) fn json(&self, since_ms: Option<i64>) -> Value {
        let (samples, (requests, operations)) = self.after(since_ms);
        let column = |get: &dyn Fn(&Sample) -> Value| -> Value {
            Value::Array(samples.iter().map(get).collect())
        };
        let mut query = serde_json::Map::new();
        for (i, op) in OPS.iter().enumerate() {
            query.insert((*op).to_owned(), column(&|s: &Sample| secs(s.query_p99[i])));
        }
        json!({
            "interval_ms": INTERVAL.as_millis() as u64,
            "capacity": CAPACITY,
            "bytes_per_sample": BYTES_PER_SAMPLE,
            "memory_bytes": CAPACITY * BYTES_PER_SAMPLE,
            "now_ms": unix_ms(OffsetDateTime::now_utc()),
            "totals": { "requests": requests, "operations": operations },
            "samples": {
                "t": column(&|s: &Sample| json!(s.at_ms)),
                "requests": column(&|s: &Sample| rate(s.requests)),
                "operations": column(&|s: &Sample| rate(s.operations)),
                "fallback": column(&|s: &Sample| rate(s.fallback)),
                "retries": column(&|s: &Sample| rate(s.retries)),
                "errors": column(&|s: &Sample| rate(s.errors)),
                "http_5xx": column(&|s: &Sample| rate(s.http_5xx)),
                "acquire_p50": column(&|s: &Sample| secs(s.acquire_p50)),
                "acquire_p99": column(&|s: &Sample| secs(s.acquire_p99)),
                "query_p99": query,
                "journal": column(&|s: &Sample| json!(s.journal)),
                "waiting": column(&|s: &Sample| json!(s.waiting)),
                "in_use": column(&|s: &Sample| json!(s.in_use)),
                "max": column(&|s: &Sample| json!(s.max)),
                "size": column(&|s: &Sample| json!(s.size)),
                "idle": column(&|s: &Sample| json!(s.idle)),
                "breaker": column(&|s: &Sample| json!(s.breaker)),
                "database": column(&|s: &Sample| json!(s.database)),
                "status": column(&|s: &Sample| json!(s.status)),
            },
        })
    }
}

/// A rate, to the hundredth; `null` when unknown.
fn rate(v: f32) -> Value {
    if v.is_finite() {
        json!((f64::from(v) * 100.0).round() / 100.0)
    } else {
        Value::Null
    }
}

/// Seconds, to the tenth of a microsecond; `null` when unknown.
fn secs(v: f32) -> Value {
    if v.is_finite() {
        json!((f64::from(v) * 1e7).round() / 1e7)
    } else {
        Value::Null
    }
}

fn unix_ms(at: OffsetDateTime) -> i64 {
    (at.unix_timestamp_nanos() / 1_000_000) as i64
}

/// The server's history (one per process).
pub(crate) fn history() -> &'static History {
    static HISTORY: OnceLock<History> = OnceLock::new();
    HISTORY.get_or_init(History::new)
}

/// Starts the sampler: one sample a second until `stop`.
pub(crate) fn spawn(state: AppState, stop: CancellationToken) {
    tokio::spawn(async move {
        let mut sampler = Sampler::default();
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let text = server_metrics::render_metrics(&state);
            let (sample, totals) = sampler.sample(&text, Instant::now(), &state);
            history().push(sample, totals);
        }
    });
}

// ---------------------------------------------------------------------------
// From cumulative figures to a sample
// ---------------------------------------------------------------------------

/// Cumulative buckets `(le, count)`, ascending.
type Buckets = Vec<(f64, f64)>;

/// What one rendering of `/metrics` says, cumulatively.
#[derive(Debug, Clone, Default)]
struct Cumulative {
    at: Option<Instant>,
    requests: f64,
    http_5xx: f64,
    operations: f64,
    fallback: f64,
    retries: f64,
    errors: f64,
    acquire: Buckets,
    query: [Buckets; 6],
}

impl Cumulative {
    /// Reads the series the dashboard draws from Prometheus text.
    fn parse(text: &str, at: Instant) -> Cumulative {
        let mut c = Cumulative {
            at: Some(at),
            ..Cumulative::default()
        };
        for line in text.lines() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.trim_end_matches('}')),
                None => (series, ""),
            };
            let label = |key: &str| label(labels, key);
            match name {
                "pgsession_http_requests_total" => {
                    c.requests += value;
                    if label("class") == Some("5xx") {
                        c.http_5xx += value;
                    }
                }
                "pgsession_operations_total" => {
                    c.operations += value;
                    if label("outcome") == Some("fallback") {
                        c.fallback += value;
                    }
                }
                "pgsession_retries_total" => c.retries += value,
                "pgsession_errors_total" => c.errors += value,
                "pgsession_pool_acquire_seconds_bucket" => {
                    if let Some(le) = label("le").and_then(parse_le) {
                        add_bucket(&mut c.acquire, le, value);
                    }
                }
                "pgsession_query_seconds_bucket" => {
                    let op = label("op").and_then(|op| OPS.iter().position(|o| *o == op));
                    if let (Some(op), Some(le)) = (op, label("le").and_then(parse_le)) {
                        add_bucket(&mut c.query[op], le, value);
                    }
                }
                _ => {}
            }
        }
        c.acquire.sort_by(|a, b| a.0.total_cmp(&b.0));
        for buckets in &mut c.query {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        c
    }
}

/// The value of `key` in `a="x",b="y"` (values here hold no quotes).
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    labels.split(',').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"'))
    })
}

fn parse_le(le: &str) -> Option<f64> {
    if le == "+Inf" {
        Some(f64::INFINITY)
    } else {
        le.parse().ok()
    }
}

fn add_bucket(buckets: &mut Buckets, le: f64, count: f64) {
    match buckets.iter_mut().find(|(l, _)| *l == le) {
        Some((_, c)) => *c += count,
        None => buckets.push((le, count)),
    }
}

/// The `q`-quantile of what was observed between two cumulative bucket
/// lists, linear within a bucket, as `histogram_quantile` estimates it;
/// `NaN` when nothing was observed.
fn quantile(q: f64, now: &Buckets, before: Option<&Buckets>) -> f64 {
    let previous = |le: f64| -> f64 {
        before
            .and_then(|b| b.iter().find(|(l, _)| *l == le))
            .map_or(0.0, |(_, c)| *c)
    };
    let delta: Vec<(f64, f64)> = now
        .iter()
        .map(|&(le, c)| (le, (c - previous(le)).max(0.0)))
        .collect();
    let Some(&(_, count)) = delta.last() else {
        return f64::NAN;
    };
    if count <= 0.0 {
        return f64::NAN;
    }
    let rank = q * count;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(le, c) in &delta {
        if c >= rank {
            if le.is_infinite() {
                return lower;
            }
            let in_bucket = c - below;
            return if in_bucket > 0.0 {
                lower + (le - lower) * ((rank - below) / in_bucket)
            } else {
                le
            };
        }
        if le.is_finite() {
            lower = le;
        }
        below = c;
    }
    lower
}

/// Keeps the cumulative figures of the last [`RATE_WINDOW`] and makes each
/// second's sample from the newest and the one a window older.
#[derive(Debug, Default)]
struct Sampler {
    window: VecDeque<Cumulative>,
}

impl Sampler {
    fn sample(&mut self, text: &str, at: Instant, state: &AppState) -> (Sample, (f64, f64)) {
        let now = Cumulative::parse(text, at);
        let mut sample = self.rates(&now);
        sample.at_ms = unix_ms(OffsetDateTime::now_utc());
        let totals = (now.requests, now.operations);
        self.window.push_back(now);
        while self.window.len() > 2
            && self.window[1]
                .at
                .is_some_and(|t| at.duration_since(t) >= RATE_WINDOW)
        {
            self.window.pop_front();
        }
        if let Some(store) = &state.store {
            let health = store.health();
            let pool = health.pool;
            let small = |n: usize| n.min(u16::MAX as usize) as u16;
            sample.in_use = small(pool.in_use);
            sample.max = small(pool.max);
            sample.size = small(pool.size);
            sample.idle = small(pool.idle);
            sample.waiting = pool.waiting.min(u32::MAX as usize) as u32;
            sample.journal = health.journal.entries.min(u32::MAX as usize) as u32;
            sample.breaker = match health.breaker {
                pgsession::BreakerState::Closed => 0,
                pgsession::BreakerState::HalfOpen => 1,
                pgsession::BreakerState::Open => 2,
            };
            sample.database = match health.last_check {
                None => 0,
                Some(c) if c.ok => 1,
                Some(_) => 2,
            };
            sample.status = match health.status {
                pgsession::HealthStatus::Ok => 0,
                pgsession::HealthStatus::Degraded => 1,
                pgsession::HealthStatus::Down => 2,
            };
        } else {
            sample.database = 1;
        }
        (sample, totals)
    }

    /// Rates and quantiles from the newest figures against the latest ones
    /// at least a window older (else the oldest kept).
    fn rates(&self, now: &Cumulative) -> Sample {
        let mut sample = Sample::empty();
        let (Some(at), Some(base)) = (
            now.at,
            self.window
                .iter()
                .rev()
                .find(|c| {
                    c.at.zip(now.at)
                        .is_some_and(|(t, n)| n.duration_since(t) >= RATE_WINDOW)
                })
                .or(self.window.front()),
        ) else {
            return sample;
        };
        let dt = base.at.map_or(0.0, |t| at.duration_since(t).as_secs_f64());
        if dt <= 0.0 {
            return sample;
        }
        let per_s = |now: f64, then: f64| ((now - then).max(0.0) / dt) as f32;
        sample.requests = per_s(now.requests, base.requests);
        sample.operations = per_s(now.operations, base.operations);
        sample.fallback = per_s(now.fallback, base.fallback) * 60.0;
        sample.retries = per_s(now.retries, base.retries) * 60.0;
        sample.errors = per_s(now.errors, base.errors) * 60.0;
        sample.http_5xx = per_s(now.http_5xx, base.http_5xx) * 60.0;
        sample.acquire_p50 = quantile(0.5, &now.acquire, Some(&base.acquire)) as f32;
        sample.acquire_p99 = quantile(0.99, &now.acquire, Some(&base.acquire)) as f32;
        for (i, buckets) in now.query.iter().enumerate() {
            sample.query_p99[i] = quantile(0.99, buckets, Some(&base.query[i])) as f32;
        }
        sample
    }
}

impl Sample {
    fn empty() -> Sample {
        Sample {
            at_ms: 0,
            requests: f32::NAN,
            operations: f32::NAN,
            fallback: f32::NAN,
            retries: f32::NAN,
            errors: f32::NAN,
            http_5xx: f32::NAN,
            acquire_p50: f32::NAN,
            acquire_p99: f32::NAN,
            query_p99: [f32::NAN; 6],
            journal: 0,
            waiting: 0,
            in_use: 0,
            max: 0,
            size: 0,
            idle: 0,
            breaker: 0,
            database: 0,
            status: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The memory the ring takes, as stated in the module's docs and in
    /// docs/observability.md: 88 bytes a sample, 960 samples, allocated
    /// once, and no more however many samples come.
    #[test]
    fn the_ring_holds_16_minutes_in_82_5_kib() {
        assert_eq!(std::mem::size_of::<Sample>(), BYTES_PER_SAMPLE);
        assert!(
            CAPACITY as u64 * INTERVAL.as_secs() >= 15 * 60,
            "15 minutes at least"
        );
        assert_eq!(CAPACITY * BYTES_PER_SAMPLE, 84_480);
        let history = History::new();
        let allocated = history.ring.lock().unwrap().samples.capacity();
        assert!(allocated >= CAPACITY);
        assert!(
            allocated * BYTES_PER_SAMPLE <= 88 * 1024,
            "{allocated} samples allocated"
        );
        let mut sample = Sample::empty();
        for i in 0..(3 * CAPACITY as i64) {
            sample.at_ms = i;
            history.push(sample, (0.0, 0.0));
        }
        let ring = history.ring.lock().unwrap();
        assert_eq!(ring.samples.len(), CAPACITY);
        assert_eq!(ring.samples.capacity(), allocated, "the ring never grows");
        assert_eq!(ring.samples.front().unwrap().at_ms, 2 * CAPACITY as i64);
    }

    #[test]
    fn since_returns_only_newer_samples_as_columns() {
        let history = History::new();
        let mut sample = Sample::empty();
        for i in 1..=5 {
            sample.at_ms = i * 1000;
            sample.requests = i as f32 * 1.5;
            sample.query_p99[1] = 0.002_5;
            history.push(sample, (10.0, 20.0));
        }
        let all = history.json(None);
        assert_eq!(all["samples"]["t"].as_array().unwrap().len(), 5);
        assert_eq!(all["samples"]["requests"][1], 3.0);
        assert_eq!(all["samples"]["query_p99"]["save"][0], 0.0025);
        assert!(all["samples"]["query_p99"]["load"][0].is_null());
        assert_eq!(all["totals"]["operations"], 20.0);
        assert_eq!(all["memory_bytes"], 84_480);
        let newer = history.json(Some(3000));
        assert_eq!(newer["samples"]["t"], json!([4000, 5000]));
    }

    #[test]
    fn the_operations_are_those_of_the_metrics() {
        assert!(OPS
            .iter()
            .all(|op| pgsession::metrics::QUERY_OPS.contains(op)));
    }

    const TEXT_0: &str = "\
# TYPE pgsession_http_requests_total counter
pgsession_http_requests_total{class=\"2xx\"} 100
pgsession_http_requests_total{class=\"5xx\"} 0
pgsession_operations_total{op=\"load\",outcome=\"ok\"} 50
pgsession_operations_total{op=\"save\",outcome=\"fallback\"} 0
pgsession_retries_total{op=\"save\"} 0
pgsession_errors_total{kind=\"connect\"} 0
pgsession_pool_acquire_seconds_bucket{le=\"0.001\"} 0
pgsession_pool_acquire_seconds_bucket{le=\"0.01\"} 0
pgsession_pool_acquire_seconds_bucket{le=\"+Inf\"} 0
pgsession_query_seconds_bucket{op=\"save\",le=\"0.001\"} 0
pgsession_query_seconds_bucket{op=\"save\",le=\"0.01\"} 0
pgsession_query_seconds_bucket{op=\"save\",le=\"+Inf\"} 0
";

    const TEXT_10: &str = "\
pgsession_http_requests_total{class=\"2xx\"} 290
pgsession_http_requests_total{class=\"5xx\"} 10
pgsession_operations_total{op=\"load\",outcome=\"ok\"} 250
pgsession_operations_total{op=\"save\",outcome=\"fallback\"} 100
pgsession_retries_total{op=\"save\"} 5
pgsession_errors_total{kind=\"connect\"} 2
pgsession_pool_acquire_seconds_bucket{le=\"0.001\"} 50
pgsession_pool_acquire_seconds_bucket{le=\"0.01\"} 100
pgsession_pool_acquire_seconds_bucket{le=\"+Inf\"} 100
pgsession_query_seconds_bucket{op=\"save\",le=\"0.001\"} 0
pgsession_query_seconds_bucket{op=\"save\",le=\"0.01\"} 100
pgsession_query_seconds_bucket{op=\"save\",le=\"+Inf\"} 100
";

    #[test]
    fn rates_and_quantiles_over_the_window() {
        let state = AppState {
            store: None,
            kind: super::super::StoreKind::Memory,
            in_flight: Default::default(),
        };
        let mut sampler = Sampler::default();
        let t0 = Instant::now();
        let (first, _) = sampler.sample(TEXT_0, t0, &state);
        assert!(first.requests.is_nan(), "no baseline yet");
        let (s, totals) = sampler.sample(TEXT_10, t0 + Duration::from_secs(10), &state);
        assert_eq!(totals, (300.0, 350.0));
        assert_eq!(s.requests, 20.0);
        assert_eq!(s.operations, 30.0);
        assert_eq!(s.fallback, 600.0, "per minute");
        assert_eq!(s.http_5xx, 60.0);
        assert_eq!(s.retries, 30.0);
        assert_eq!(s.errors, 12.0);
        assert_eq!(s.acquire_p50, 0.001);
        assert!((s.acquire_p99 - 0.009_82).abs() < 1e-6, "{}", s.acquire_p99);
        assert!(
            (s.query_p99[1] - 0.009_91).abs() < 1e-6,
            "{}",
            s.query_p99[1]
        );
        assert!(s.query_p99[0].is_nan(), "no load timed");
    }
}
