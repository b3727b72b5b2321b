//! The store's background work: start-up, pool upkeep, health checks, and
//! the recovery that probes the database while the breaker is open, writes
//! the journal back in order, and closes the breaker; plus the spool file
//! that carries the journal across a restart.

use std::time::{Duration, Instant};

use time::OffsetDateTime;

use super::{Store, StoredSession};
use crate::error::Error;
use crate::health::CheckResult;
use crate::resilience::breaker::BreakerState;
use crate::resilience::fallback::Pending;
use crate::resilience::{retry, spool};
use crate::sizing::{Resize, Sizer};

/// How often the pool is tended (idle connections, warm minimum, size).
const UPKEEP_TICK: Duration = Duration::from_millis(500);

/// How often the recovery looks at the breaker and the journal.
const RECOVERY_TICK: Duration = Duration::from_millis(100);

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
                () = self.inner.shutdown.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
            attempt += 1;
            match self.ensure_schema().await {
                Ok(()) => {
                    // A first health check at once, so `/health` has one.
                    self.run_check().await;
                    return;
                }
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

    /// Pool upkeep: idle connections closed, the warm minimum kept open.
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
                () = self.inner.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.inner.pool.maintain();
            let free = self
                .inner
                .server_free
                .load(std::sync::atomic::Ordering::Relaxed);
            let free = (free != usize::MAX).then_some(free);
            if let Some(resize) = sizer.observe(self.pool_status(), free) {
                self.inner.pool.resize(resize.to());
                metrics::counter!("pgsession_pool_resizes_total", "direction" => resize.direction()).increment(1);
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

    /// Probes the database while the breaker is open, and writes the
    /// journal back; closes the breaker once nothing is left.
    pub(super) async fn recover(self) {
        let mut tick = tokio::time::interval(RECOVERY_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.inner.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let breaker = &self.inner.breaker;
            match breaker.state() {
                BreakerState::Closed if self.journal_len() > 0 => {
                    // Entries from a spool file, or writes whose direct
                    // attempt failed without opening the breaker.
                    if let Err(e) = self.write_back().await {
                        tracing::debug!(target: "session_store", error = %e, "write-back interrupted");
                    }
                }
                BreakerState::Closed => {}
                BreakerState::Open => {
                    let probe = breaker.try_probe(Instant::now());
                    if probe.is_some() {
                        self.breaker_moved(probe);
                        self.probe_and_write_back().await;
                    }
                }
                BreakerState::HalfOpen => self.probe_and_write_back().await,
            }
            if self.journal_len() == 0 {
                self.remove_claimed_spool();
            }
        }
    }

    /// The half-open step: one probe; on success the journal is written
    /// back, then the breaker closes (atomically with the journal being
    /// empty, so no write slips in between).
    async fn probe_and_write_back(&self) {
        let breaker = &self.inner.breaker;
        let probe = self.ping(self.inner.config.connect_budget()).await;
        let written = match probe {
            Ok(()) => self.write_back().await,
            Err(e) => Err(e),
        };
        match written {
            Ok(()) => {
                if let Some(transition) = self.inner.fallback.if_empty(|| breaker.close()) {
                    self.breaker_moved(transition);
                }
            }
            Err(e) => {
                tracing::debug!(target: "session_store", error = %e, "probe failed; the breaker stays open");
                self.breaker_moved(breaker.probe_failed(Instant::now()));
            }
        }
    }

    /// Writes the journal back, oldest first, each entry's latest state.
    /// Stops at the first transient failure (the entry stays).
    async fn write_back(&self) -> Result<(), Error> {
        let deadline = self
            .inner
            .config
            .query_timeout()
            .min(Duration::from_secs(5));
        let fallback = &self.inner.fallback;
        let mut written = 0usize;
        while let Some((seq, sid, write)) = fallback.oldest() {
            let result = match &write {
                Pending::Save { json, expire } => {
                    self.db_save_with(&sid, json, *expire, deadline, true).await
                }
                Pending::Touch { expire } => self
                    .db_touch_with(&sid, *expire, deadline, true)
                    .await
                    .map(drop),
                Pending::Destroy => self.db_destroy_with(&sid, deadline, true).await,
            };
            match result {
                Ok(()) => written += 1,
                Err(e) if e.is_transient() || matches!(e, Error::Closed) => return Err(e),
                Err(e) => tracing::error!(
                    target: "session_store",
                    error = %e,
                    "a journaled write cannot be applied and is dropped"
                ),
            }
            if let Pending::Save { json, expire } = write {
                fallback.remember(&sid, StoredSession { json, expire });
            }
            fallback.written_back(seq, &sid);
            metrics::gauge!("pgsession_journal_entries").set(fallback.journal_len() as f64);
        }
        if written > 0 {
            tracing::info!(target: "session_store", written, "journal written back");
            self.inner.events.push(
                "journal",
                format!("{written} journaled sessions written back"),
            );
        }
        Ok(())
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
                () = self.inner.shutdown.cancelled() => return,
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
            if !self.inner.breaker.is_closed() {
                continue; // the recovery probes instead
            }
            self.run_check().await;
        }
    }

    /// One health check; its result feeds the breaker.
    pub(super) async fn run_check(&self) -> CheckResult {
        let config = &self.inner.config;
        let started = Instant::now();
        let result = self.ping(config.connect_budget()).await;
        let elapsed = started.elapsed();
        metrics::gauge!("pgsession_health_check_seconds").set(elapsed.as_secs_f64());
        metrics::histogram!("pgsession_query_seconds", "op" => "health").record(elapsed);
        let slow = elapsed > config.slow_check_threshold();
        let check = CheckResult {
            at: OffsetDateTime::now_utc(),
            latency_ms: elapsed.as_secs_f64() * 1000.0,
            ok: result.is_ok() && !slow,
        };
        match result {
            Err(e) => {
                tracing::warn!(target: "session_pool", error = %e, latency_ms = check.latency_ms, "health check failed");
                self.inner
                    .events
                    .push("check_failed", format!("health check failed: {e}"));
                self.count_failure(&e);
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
                self.inner.breaker.record_success();
                self.refresh_server_free().await;
            }
        }
        self.inner.events.set_check(check);
        check
    }

    /// Asks the server how many more connections it would accept, for the
    /// self-sizing pool's ceiling.
    pub(super) async fn refresh_server_free(&self) {
        let sql = "SELECT current_setting('max_connections')::int \
                   - current_setting('superuser_reserved_connections')::int \
                   - (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::int";
        let free = self
            .run_db(
                "health",
                self.inner.config.slow_check_threshold(),
                true,
                |conn| async move {
                    let result =
                        async { Ok(conn.query_one(sql, &[]).await?.get::<_, i32>(0)) }.await;
                    (conn, result)
                },
            )
            .await;
        if let Ok(free) = free {
            self.inner
                .server_free
                .store(free.max(0) as usize, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// At start-up: takes back the journal an earlier run spooled.
    pub(super) fn restore_spool(&self) {
        let dir = self.inner.config.spool_dir();
        let (claimed, damaged) = spool::claim_all(dir, &self.inner.sql.lock_name);
        for error in damaged {
            tracing::error!(target: "session_store", "{error}");
            self.inner.events.push("spool", error.to_string());
        }
        let mut paths = self
            .inner
            .claimed_spool
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for file in claimed {
            let count = file.entries.len();
            tracing::info!(
                target: "session_store",
                path = %file.path.display(),
                entries = count,
                "read back a spooled journal; it is written back as soon as the database answers"
            );
            self.inner
                .events
                .push("spool", format!("{count} spooled sessions read back"));
            self.inner.fallback.restore(file.entries);
            paths.push(file.path);
        }
    }

    fn remove_claimed_spool(&self) {
        let mut paths = self
            .inner
            .claimed_spool
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for path in paths.drain(..) {
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(target: "session_store", path = %path.display(), error = %e, "could not remove a written-back spool file");
            }
        }
    }

    /// At shutdown: one last write-back, and whatever is left goes to a
    /// spool file.
    pub(super) async fn flush_or_spool(&self) {
        if self.journal_len() == 0 {
            self.remove_claimed_spool();
            return;
        }
        let attempt = self
            .inner
            .config
            .connect_timeout()
            .min(Duration::from_secs(5));
        if tokio::time::timeout(attempt, self.ping(attempt))
            .await
            .is_ok_and(|r| r.is_ok())
        {
            let _ = tokio::time::timeout(attempt, self.write_back()).await;
        }
        if self.journal_len() == 0 {
            self.remove_claimed_spool();
            return;
        }
        let entries = self.inner.fallback.entries();
        let dir = self.inner.config.spool_dir();
        match spool::write(dir, &self.inner.sql.lock_name, &entries) {
            Ok(path) => {
                tracing::warn!(
                    target: "session_store",
                    path = %path.display(),
                    entries = entries.len(),
                    "the database is away: journal spooled to disk; the next start writes it back"
                );
                // The new file holds everything the claimed ones held.
                self.remove_claimed_spool();
            }
            Err(e) => tracing::error!(
                target: "session_store",
                dir = %dir.display(),
                entries = entries.len(),
                error = %e,
                "could not spool the journal: these session writes are lost"
            ),
        }
    }
}
