//! Combining concurrent operations into one statement.
//!
//! Callers queue their request; a caller that finds fewer than `limit`
//! batches running becomes a runner, takes everything queued (its own
//! request included) and runs it as one statement, then takes whatever
//! queued meanwhile, until the queue is empty. With no contention a caller
//! runs its request at once, alone: batching adds no latency, it only
//! appears when there is a queue.
//!
//! Written here rather than taken from a crate: the batching crates found
//! run a timer-driven collector task, which adds latency to every call.

use std::future::Future;
use std::sync::Mutex;

use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

type Reply<T> = oneshot::Sender<T>;

/// How a submitted request ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Submitted<T> {
    /// Its batch ran; its result.
    Done(T),
    /// No batch slot came free before the deadline.
    TimedOut,
    /// The runner holding it went away (its future was dropped) or broke
    /// its promise: the caller runs its request alone.
    RunAlone,
}

#[derive(Debug)]
pub(crate) struct Batcher<R, T> {
    limit: usize,
    state: Mutex<State<R, T>>,
    /// Signalled whenever a runner gives its slot back.
    slot_freed: Notify,
}

#[derive(Debug)]
struct State<R, T> {
    queue: Vec<(R, Reply<T>)>,
    running: usize,
}

impl<R, T> Batcher<R, T> {
    /// At most `limit` batches run at once (the pool's size).
    pub(crate) fn new(limit: usize) -> Batcher<R, T> {
        Batcher {
            limit: limit.max(1),
            state: Mutex::new(State {
                queue: Vec::new(),
                running: 0,
            }),
            slot_freed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<R, T>> {
        // Pushes and swaps only: a panic elsewhere cannot tear the state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `request` and returns its result. `run` executes one batch
    /// and returns one result per request, in order. A caller waits for a
    /// batch slot at most until `wait_until`; a runner runs one batch (its
    /// own request's) and hands the queue on, so no caller is held to
    /// serve others.
    pub(crate) async fn submit<F, Fut>(
        &self,
        request: R,
        wait_until: Instant,
        run: F,
    ) -> Submitted<T>
    where
        F: Fn(Vec<R>) -> Fut,
        Fut: Future<Output = Vec<T>>,
    {
        let (reply, mut answer) = oneshot::channel();
        self.lock().queue.push((request, reply));
        loop {
            let freed = self.slot_freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let batch = {
                let mut state = self.lock();
                // Requests whose callers gave up are not run.
                state.queue.retain(|(_, reply)| !reply.is_closed());
                if state.running < self.limit && !state.queue.is_empty() {
                    state.running += 1;
                    Some(std::mem::take(&mut state.queue))
                } else {
                    None
                }
            };
            if let Some(batch) = batch {
                // Gives the slot back even if this future is dropped midway.
                let _slot = Running(self);
                let (requests, replies): (Vec<R>, Vec<Reply<T>>) = batch.into_iter().unzip();
                let results = run(requests).await;
                if results.len() == replies.len() {
                    for (reply, result) in replies.into_iter().zip(results) {
                        let _ = reply.send(result);
                    }
                }
                continue; // the answer is in `answer` now (or the promise broke)
            }
            tokio::select! {
                result = &mut answer => return result.map_or(Submitted::RunAlone, Submitted::Done),
                () = &mut freed => {}
                () = tokio::time::sleep_until(wait_until) => return Submitted::TimedOut,
            }
        }
    }
}

/// Releases a runner's slot when the runner finishes or is dropped, and
/// wakes the waiting callers so that one of them runs the queue.
struct Running<'a, R, T>(&'a Batcher<R, T>);

impl<R, T> Drop for Running<'_, R, T> {
    fn drop(&mut self) {
        self.0.lock().running -= 1;
        self.0.slot_freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[tokio::test]
    async fn a_caller_waits_for_a_slot_no_longer_than_its_deadline() {
        let batcher = Arc::new(Batcher::new(1));
        let busy = batcher.clone();
        let (started, wait_started) = oneshot::channel();
        let started = Mutex::new(Some(started));
        let holder = tokio::spawn(async move {
            busy.submit(1, far(), |batch: Vec<i32>| {
                if let Some(started) = started.lock().unwrap().take() {
                    let _ = started.send(());
                }
                async move {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    batch
                }
            })
            .await
        });
        let _ = wait_started.await;
        let deadline = Instant::now() + Duration::from_millis(50);
        assert_eq!(
            batcher
                .submit(2, deadline, |b: Vec<i32>| async move { b })
                .await,
            Submitted::TimedOut
        );
        holder.abort();
    }

    #[tokio::test]
    async fn a_lone_call_runs_alone_at_once() {
        let batcher = Batcher::new(2);
        let sizes = Mutex::new(Vec::new());
        let result = batcher
            .submit(7, far(), |batch: Vec<i32>| {
                sizes.lock().unwrap().push(batch.len());
                async move { batch.iter().map(|n| n * 2).collect() }
            })
            .await;
        assert_eq!(result, Submitted::Done(14));
        assert_eq!(*sizes.lock().unwrap(), vec![1]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_calls_share_batches_and_each_gets_its_own_result() {
        let batcher = Arc::new(Batcher::new(1));
        let statements = Arc::new(AtomicUsize::new(0));
        let calls = (0..50).map(|i| {
            let (batcher, statements) = (batcher.clone(), statements.clone());
            tokio::spawn(async move {
                batcher
                    .submit(i, far(), |batch: Vec<i32>| {
                        statements.fetch_add(1, Ordering::SeqCst);
                        async move {
                            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                            batch.iter().map(|n| n + 1000).collect()
                        }
                    })
                    .await
            })
        });
        let calls: Vec<_> = calls.collect();
        for (i, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.unwrap(), Submitted::Done(i as i32 + 1000));
        }
        assert!(
            statements.load(Ordering::SeqCst) < 50,
            "some requests shared a statement"
        );
    }

    #[tokio::test]
    async fn a_broken_promise_sends_the_caller_back_to_run_alone() {
        let batcher = Batcher::new(1);
        let result = batcher
            .submit(1, far(), |_batch: Vec<i32>| async { Vec::<i32>::new() })
            .await;
        assert_eq!(result, Submitted::RunAlone);
        assert_eq!(batcher.lock().running, 0, "the slot is given back");
    }
}
