//! Retry with exponential backoff and jitter (backon), for transient errors
//! only, inside a deadline.

use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::error::Error;

/// Backoff between attempts of one operation: 50 ms doubling to 1 s, with
/// jitter. The operation's deadline, not a count, ends the retries.
pub(crate) fn operation_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(1))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
}

/// Backoff of the start-up sequence: `first`, then doubling (1 s, 2 s,
/// 4 s by default), with jitter, `retries` times.
pub(crate) fn startup_backoff(first: Duration, retries: usize) -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(first)
        .with_max_delay(first.saturating_mul(64))
        .with_factor(2.0)
        .with_jitter()
        .with_max_times(retries)
        .build()
}

/// Backoff once start-up retries are spent: keeps trying, at most every 10 s
/// (a degraded store should notice a returning database soon).
pub(crate) fn background_backoff(first: Duration) -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(first)
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Runs `attempt` until it succeeds, fails permanently, or `deadline`
/// passes. When the deadline would pass during the wait before the next
/// attempt, the last attempt's own error is returned at once: it was
/// answered, and it says what the database is (away, busy). Only an attempt
/// still in flight at the deadline ends in [`Error::QueryTimeout`] (its
/// query cancelled by dropping its checkout): that one may still commit.
///
/// `on_error` sees every failed attempt. [`Error::Unavailable`] (the breaker
/// opened meanwhile) and [`Error::AcquireTimeout`] end the retries at once.
///
/// The loop is written out rather than left to backon's `Retryable`: the
/// first attempt, which almost always succeeds, then costs no backoff state
/// and no extra future (measured: about 1 % of `serve`'s CPU per request,
/// BENCHMARKS.md). The delays are still backon's ([`operation_backoff`]).
pub(crate) async fn retry_within<T, F, Fut>(
    op: &'static str,
    deadline: Duration,
    on_error: impl Fn(&Error),
    mut attempt: F,
) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    let give_up = tokio::time::Instant::now() + deadline;
    let mut delays = None;
    loop {
        let error = match tokio::time::timeout_at(give_up, attempt()).await {
            Ok(Ok(done)) => return Ok(done),
            Ok(Err(error)) => error,
            Err(_) => {
                return Err(Error::QueryTimeout {
                    op,
                    after: deadline,
                })
            }
        };
        on_error(&error);
        // An acquire timeout is not retried: the pool is saturated, and
        // waiting again would only make the caller wait longer than the
        // acquire timeout promises (the fallback or a 503 answers).
        if !error.is_transient() || matches!(error, Error::Unavailable | Error::AcquireTimeout(_)) {
            return Err(error);
        }
        let delay = delays
            .get_or_insert_with(|| operation_backoff().build())
            .next()
            .filter(|d| tokio::time::Instant::now() + *d < give_up);
        let Some(delay) = delay else {
            return Err(error);
        };
        metrics::counter!(crate::metrics::RETRIES, "op" => op).increment(1);
        tracing::debug!(
            target: "session_store",
            op,
            error = %error,
            retry_in_ms = delay.as_millis() as u64,
            "transient error; retrying"
        );
        tokio::time::sleep(delay).await;
    }
}

/// Bounds one step by `deadline`.
pub(crate) async fn bounded<T>(
    op: &'static str,
    deadline: Duration,
    step: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::time::timeout(deadline, step)
        .await
        .unwrap_or(Err(Error::QueryTimeout {
            op,
            after: deadline,
        }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const DEADLINE: Duration = Duration::from_secs(4);

    fn transient() -> Error {
        Error::ConnectTimeout(Duration::from_millis(1))
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_until_one_succeeds() {
        let (attempts, seen) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let result = retry_within(
            "test",
            DEADLINE,
            |_| {
                seen.fetch_add(1, Ordering::SeqCst);
            },
            || async {
                match attempts.fetch_add(1, Ordering::SeqCst) {
                    0 | 1 => Err(transient()),
                    n => Ok(n),
                }
            },
        )
        .await;
        assert_eq!(result.unwrap(), 2);
        assert_eq!(seen.load(Ordering::SeqCst), 2, "on_error saw each failure");
    }

    #[tokio::test(start_paused = true)]
    async fn a_permanent_error_an_open_breaker_or_a_saturated_pool_ends_at_once() {
        for error in [
            || Error::StoreClosed,
            || Error::Unavailable,
            || Error::AcquireTimeout(Duration::from_secs(1)),
        ] {
            let attempts = AtomicUsize::new(0);
            let result: Result<(), Error> = retry_within(
                "test",
                DEADLINE,
                |_| {},
                || async {
                    attempts.fetch_add(1, Ordering::SeqCst);
                    Err(error())
                },
            )
            .await;
            assert_eq!(result.unwrap_err().kind(), error().kind());
            assert_eq!(attempts.load(Ordering::SeqCst), 1);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_answered_error_is_returned_when_no_retry_fits_the_deadline() {
        let attempts = AtomicUsize::new(0);
        let started = tokio::time::Instant::now();
        let result: Result<(), Error> = retry_within(
            "test",
            DEADLINE,
            |_| {},
            || async {
                attempts.fetch_add(1, Ordering::SeqCst);
                Err(transient())
            },
        )
        .await;
        assert!(
            matches!(result, Err(Error::ConnectTimeout(_))),
            "{result:?}"
        );
        assert!(attempts.load(Ordering::SeqCst) > 2);
        assert!(started.elapsed() < DEADLINE, "no wait past the deadline");
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_in_flight_at_the_deadline_is_a_query_timeout() {
        let result: Result<(), Error> = retry_within(
            "test",
            DEADLINE,
            |_| {},
            || async {
                std::future::pending::<()>().await;
                Ok(())
            },
        )
        .await;
        assert!(
            matches!(result, Err(Error::QueryTimeout { op: "test", after }) if after == DEADLINE),
            "{result:?}"
        );
    }
}
