//! Retry with exponential backoff and jitter (backon), for transient errors
//! only, inside a deadline.

use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};

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
pub(crate) async fn retry_within<T, F, Fut>(
    op: &'static str,
    deadline: Duration,
    on_error: impl Fn(&Error),
    attempt: F,
) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    let give_up = tokio::time::Instant::now() + deadline;
    let retried = attempt
        .retry(operation_backoff())
        .sleep(tokio::time::sleep)
        .adjust(move |_: &Error, delay: Option<Duration>| {
            delay.filter(|d| tokio::time::Instant::now() + *d < give_up)
        })
        .when(|error: &Error| {
            on_error(error);
            // An acquire timeout is not retried: the pool is saturated, and
            // waiting again would only make the caller wait longer than the
            // acquire timeout promises (the fallback or a 503 answers).
            error.is_transient() && !matches!(error, Error::Unavailable | Error::AcquireTimeout(_))
        })
        .notify(|error: &Error, delay: Duration| {
            metrics::counter!(crate::metrics::RETRIES, "op" => op).increment(1);
            tracing::debug!(
                target: "session_store",
                op,
                error = %error,
                retry_in_ms = delay.as_millis() as u64,
                "transient error; retrying"
            );
        });
    bounded(op, deadline, retried).await
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
