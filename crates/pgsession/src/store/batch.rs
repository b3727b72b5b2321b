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

use tokio::sync::oneshot;

type Reply<T> = oneshot::Sender<T>;

#[derive(Debug)]
pub(crate) struct Batcher<R, T> {
    limit: usize,
    state: Mutex<State<R, T>>,
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
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<R, T>> {
        // Pushes and swaps only: a panic elsewhere cannot tear the state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `request` and returns its result. `run` executes one batch
    /// and returns one result per request, in order. `None` when the runner
    /// holding this request went away (its future was dropped) or broke
    /// that promise: the caller then runs its request alone.
    pub(crate) async fn submit<F, Fut>(&self, request: R, run: F) -> Option<T>
    where
        F: Fn(Vec<R>) -> Fut,
        Fut: Future<Output = Vec<T>>,
    {
        let (reply, answer) = oneshot::channel();
        let runner = {
            let mut state = self.lock();
            state.queue.push((request, reply));
            let runner = state.running < self.limit;
            if runner {
                state.running += 1;
            }
            runner
        };
        if runner {
            // Runs until the queue is empty; `Running` gives the slot back
            // even if this future is dropped midway.
            let _slot = Running(self);
            loop {
                let batch = std::mem::take(&mut self.lock().queue);
                if batch.is_empty() {
                    break;
                }
                let (requests, replies): (Vec<R>, Vec<Reply<T>>) = batch.into_iter().unzip();
                let results = run(requests).await;
                if results.len() == replies.len() {
                    for (reply, result) in replies.into_iter().zip(results) {
                        let _ = reply.send(result);
                    }
                }
            }
        }
        // A dropped runner drops the replies it held: those callers run alone.
        answer.await.ok()
    }
}

/// Releases a runner's slot when the runner finishes or is dropped.
struct Running<'a, R, T>(&'a Batcher<R, T>);

impl<R, T> Drop for Running<'_, R, T> {
    fn drop(&mut self) {
        self.0.lock().running -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn a_lone_call_runs_alone_at_once() {
        let batcher = Batcher::new(2);
        let sizes = Mutex::new(Vec::new());
        let result = batcher
            .submit(7, |batch: Vec<i32>| {
                sizes.lock().unwrap().push(batch.len());
                async move { batch.iter().map(|n| n * 2).collect() }
            })
            .await;
        assert_eq!(result, Some(14));
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
                    .submit(i, |batch: Vec<i32>| {
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
            assert_eq!(call.await.unwrap(), Some(i as i32 + 1000));
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
            .submit(1, |_batch: Vec<i32>| async { Vec::<i32>::new() })
            .await;
        assert_eq!(result, None);
        assert_eq!(batcher.lock().running, 0, "the slot is given back");
    }
}
