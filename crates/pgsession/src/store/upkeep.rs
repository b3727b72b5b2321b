//! The store's routine background work while the database answers: the
//! start-up sequence (table creation, retried with backoff), pool upkeep
//! (idle connections, warm minimum, self-sizing under the server's
//! connection limit) and the periodic health check. What runs while it is
//! away is the recovery's (`recovery.rs`).

use std::time::{Duration, Instant};

use super::guard::on_conn;
use super::{Startup, Store};
use crate::health::CheckResult;
use crate::resilience::retry;
use crate::sizing::{Resize, Sizer};

/// How often the pool is tended (idle connections, warm minimum, size).
const UPKEEP_TICK: Duration = Duration::from_millis(500);

impl Store {
    /// The start-up sequence: a first attempt, the start-up retries, then
    /// slower attempts until the table exists or the store closes.
    pub(super) async fn initialize_in_background(self) {
        let config = &self.inner.config;
        let delays = retry::startup_backoff(config.startup_backoff(), config.startup_retries())
            .chain(retry::background_backoff(config.startup_backoff() * 2));
        let total = config.startup_retries() + 1;
        let mut attempt = 0;
        for delay in std::iter::once(Duration::ZERO).chain(delays) {
            tokio::select! {
                () = self.inner.life.shutdown.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
            attempt += 1;
            let result = self.ensure_schema().await;
            // Waiters (`Store::wait_ready`) learn the outcome of the start-up
            // sequence: ready, or its retries spent (or an error that
            // waiting does not mend); later attempts go on regardless.
            let settled = match &result {
                Ok(()) => Some(Startup::Ready),
                Err(e) if attempt >= total || !e.is_transient() => Some(Startup::Degraded),
                Err(_) => None,
            };
            if let Some(state) = settled {
                self.inner.life.startup.send_if_modified(|now| {
                    let changed = *now != state;
                    *now = state;
                    changed
                });
            }
            match result {
                Ok(()) => {
                    // A first health check at once, so `/health` has one.
                    self.run_check().await;
                    return;
                }
                // Logged at ERROR, once, by `ensure_schema`: the database
                // answered, and said the configuration is wrong.
                Err(e) if e.config_hint().is_some() => tracing::debug!(
                    target: "session_store",
                    attempt, error = %e,
                    "start-up met a configuration error; retrying in case it is mended"
                ),
                Err(e) if attempt < total => tracing::warn!(
                    target: "session_store",
                    attempt, of = total, error = %e,
                    "database not reachable yet; retrying"
                ),
                Err(e) if attempt == total => tracing::warn!(
                    target: "session_store",
                    error = %e,
                    "database still not reachable after {total} attempts; the store runs degraded \
                     and keeps retrying in the background"
                ),
                Err(e) => {
                    tracing::debug!(target: "session_store", attempt, error = %e, "still not reachable")
                }
            }
        }
    }

    /// Pool upkeep: idle connections closed, the warm minimum kept open,
    /// the size adjusted (see [`Sizer`]). After the server refused a
    /// connection for lack of slots, it is taken to have none free until a
    /// health check counts them again, so the pool does not grow back into
    /// the limit it just met.
    pub(super) async fn upkeep(self) {
        let config = &self.inner.config;
        let period = UPKEEP_TICK;
        let mut sizer = Sizer::new(
            config.pool_size(),
            config.pool_max_size(),
            config.idle_timeout(),
            period,
        );
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.inner.life.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.inner.db.pool.maintain();
            if self.inner.db.pool.take_refused() {
                self.inner.db.note_server_full();
            }
            if let Some(kept) = self.inner.db.pool.take_announcement() {
                self.inner.events.push(
                    "pool_limit",
                    format!(
                        "the server refuses more connections (53300): the pool keeps to {kept}; \
                         lower the pool size or raise the limit"
                    ),
                );
            }
            let free = self.inner.db.server_free();
            if let Some(resize) = sizer.observe(self.pool_status(), free) {
                let (Resize::Grow { from, to } | Resize::Shrink { from, to }) = resize;
                if !self.inner.db.pool.resize(from, to) {
                    continue; // a refusal lowered it meanwhile
                }
                metrics::counter!(crate::metrics::POOL_RESIZES, "direction" => resize.direction())
                    .increment(1);
                let message = match resize {
                    Resize::Grow { from, to } => {
                        format!("pool grown from {from} to {to}: callers kept waiting")
                    }
                    Resize::Shrink { from, to } => {
                        format!("pool shrunk from {from} to {to}: connections stayed idle")
                    }
                };
                tracing::info!(target: "session_pool", "{message}");
                self.inner.events.push("pool_resized", message);
            }
        }
    }

    /// Every health-check interval: a timed `SELECT 1`, pool statistics,
    /// and a warning when the check is slow or fails or callers wait.
    pub(super) async fn check_health(self) {
        let config = &self.inner.config;
        // The first check one interval after start: start-up itself has
        // just shown whether the database answers.
        let period = config.health_check_interval();
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.inner.life.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.publish_metrics();
            let pool = self.pool_status();
            tracing::debug!(
                target: "session_pool",
                size = pool.size, idle = pool.idle, in_use = pool.in_use,
                waiting = pool.waiting, max = pool.max,
                "pool statistics"
            );
            if pool.waiting > 0 {
                tracing::warn!(target: "session_pool", waiting = pool.waiting, max = pool.max, "requests are waiting for a session-pool connection");
            }
            if !self.inner.recovery.breaker.is_closed() {
                continue; // the recovery probes instead
            }
            self.run_check().await;
        }
    }

    /// One health check; its result feeds the breaker (one failure event
    /// at most, judged as an operation's, see [`Store::count_failure`]),
    /// and a success clears a configuration error.
    pub(super) async fn run_check(&self) -> CheckResult {
        let config = &self.inner.config;
        let started = Instant::now();
        let progress = crate::pool::Progress::default();
        let contact = self.inner.events.contact(
            crate::health::CheckSource::Check,
            config.slow_check_threshold(),
        );
        let result = self.ping_tracked(config.connect_budget(), &progress).await;
        let elapsed = started.elapsed();
        metrics::gauge!(crate::metrics::HEALTH_CHECK_SECONDS).set(elapsed.as_secs_f64());
        metrics::histogram!(crate::metrics::QUERY_SECONDS, "op" => "health").record(elapsed);
        let slow = elapsed > config.slow_check_threshold();
        // The evidence (`ok` unless it failed or was slow), for `/health`.
        let check: CheckResult = contact.finish(result.as_ref().err());
        if result.is_ok() {
            self.inner.config_problem.clear();
        }
        match result {
            Err(e) => {
                tracing::warn!(target: "session_pool", error = %e, latency_ms = check.latency_ms, "health check failed");
                self.inner
                    .events
                    .push("check_failed", format!("health check failed: {e}"));
                let stage = progress.stage();
                self.count_failure(&e, stage);
                if stage == crate::pool::Stage::Reused && e.kind() == crate::ErrorKind::Timeout {
                    self.probe_after_timeout();
                }
            }
            Ok(()) if slow => {
                tracing::warn!(
                    target: "session_pool",
                    latency_ms = check.latency_ms,
                    threshold_ms = config.slow_check_threshold().as_millis() as u64,
                    "slow health check"
                );
                self.inner.events.push(
                    "slow_check",
                    format!("health check took {:.0} ms", check.latency_ms),
                );
            }
            Ok(()) => {
                self.inner.recovery.breaker.record_success();
                self.refresh_server_free().await;
            }
        }
        check
    }

    /// Asks the server how many more connections it would accept, for the
    /// self-sizing pool's ceiling (see [`crate::schema::SERVER_FREE`]).
    async fn refresh_server_free(&self) {
        let db = &self.inner.db;
        let deadline = self.inner.config.slow_check_threshold();
        let _ = self
            .run_db(
                "health",
                deadline,
                true,
                on_conn!(|conn| db.refresh_server_free(conn)),
            )
            .await;
    }
}
