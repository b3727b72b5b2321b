//! Combining concurrent operations into one statement.
//!
//! Callers queue their request; a caller that finds fewer than `limit`
//! batches running becomes a runner, takes everything queued (its own
//! request included), runs it as one statement and answers each request.
//! Callers still queued when a runner ends are woken so that one of them
//! runs the queue next. With no contention a caller runs its request at
//! once, alone: batching adds no latency, it only appears when there is a
//! queue.
//!
//! Written here rather than taken from a crate: the batching crates found
//! run a timer-driven collector task, which adds latency to every call.

use std::future::Future;
use std::sync::Mutex;

use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

type Reply<T> = oneshot::Sender<T>;

/// A queued request, its caller's reply channel, and when it was queued.
type Entry<R, T> = (R, Reply<T>, Instant);

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
    /// Signalled whenever a runner gives its slot back; only callers whose
    /// request is still queued listen.
    slot_freed: Notify,
}

#[derive(Debug)]
struct State<R, T> {
    queue: Vec<Entry<R, T>>,
    running: usize,
    /// Requests queued so far; a request's ticket is its number.
    queued: u64,
    /// Tickets up to this one are in a batch: runners take the whole queue,
    /// so the requests taken are always a prefix.
    taken: u64,
}

impl<R, T> Batcher<R, T> {
    /// At most `limit` batches run at once.
    pub(crate) fn new(limit: usize) -> Batcher<R, T> {
        Batcher {
            limit: limit.max(1),
            state: Mutex::new(State {
                queue: Vec::new(),
                running: 0,
                queued: 0,
                taken: 0,
            }),
            slot_freed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<R, T>> {
        // Pushes and swaps only: a panic elsewhere cannot tear the state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `request` and returns its result. `run` executes one batch
    /// and returns one result per request, in order; it is also told when
    /// the oldest request of the batch was queued, so that time spent
    /// queueing counts against the batch's deadline. A caller waits for a
    /// batch slot at most until `wait_until`; once its request is in a
    /// batch, it waits for that batch's answer. A runner runs one batch
    /// (its own request's) and returns: no caller is held to serve others.
    pub(crate) async fn submit<F, Fut>(
        &self,
        request: R,
        wait_until: Instant,
        run: F,
    ) -> Submitted<T>
    where
        F: Fn(Vec<R>, Instant) -> Fut,
        Fut: Future<Output = Vec<T>>,
    {
        let queued = {
            let mut state = self.lock();
            state.queued += 1;
            if state.running == 0 && state.queue.is_empty() {
                // Nothing runs and nothing waits: no batch to join or to
                // grow, so the request runs at once, without a queue entry,
                // a reply channel or a yield (the lone caller's path, most
                // requests on a lightly loaded instance).
                state.running = 1;
                state.taken = state.queued;
                Err(request)
            } else {
                let (reply, answer) = oneshot::channel();
                state.queue.push((request, reply, Instant::now()));
                Ok((state.queued, answer))
            }
        };
        let (ticket, mut answer) = match queued {
            Ok(queued) => queued,
            Err(request) => {
                let _slot = Running(self);
                let results = Box::pin(run(vec![request], Instant::now())).await;
                return results
                    .into_iter()
                    .next()
                    .map_or(Submitted::RunAlone, Submitted::Done);
            }
        };
        let deadline = tokio::time::sleep_until(wait_until);
        tokio::pin!(deadline);
        loop {
            let freed = self.slot_freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let (taken, claimed) = {
                let mut state = self.lock();
                let taken = ticket <= state.taken;
                let claimed = !taken && state.running < self.limit;
                state.running += usize::from(claimed);
                (taken, claimed)
            };
            if taken {
                // Its runner answers, or drops the reply if it goes away.
                return outcome(answer.await);
            }
            if claimed {
                // Gives the slot back even if this future is dropped midway.
                let _slot = Running(self);
                // Lets the callers already woken (those of the batch that
                // just ended) queue first, so that they join this batch
                // rather than each starting one of a single request. Alone,
                // this task is polled again at once.
                tokio::task::yield_now().await;
                let Some(batch) = self.take_queue_with(ticket) else {
                    // Another runner took this request meanwhile: the slot
                    // goes back, and the answer comes from that batch.
                    continue;
                };
                let oldest = batch.first().map_or_else(Instant::now, |entry| entry.2);
                let (requests, replies): (Vec<R>, Vec<Reply<T>>) = batch
                    .into_iter()
                    .map(|(request, reply, _)| (request, reply))
                    .unzip();
                // Boxed: only runners need the batch's (large) future, so
                // the waiting callers' futures stay small and cheap to move.
                let results = Box::pin(run(requests, oldest)).await;
                if results.len() == replies.len() {
                    for (reply, result) in replies.into_iter().zip(results) {
                        let _ = reply.send(result);
                    }
                }
                // This request was in the batch: answered, or the promise
                // broke.
                return outcome(answer.try_recv());
            }
            tokio::select! {
                result = &mut answer => return outcome(result),
                () = &mut freed => {}
                () = &mut deadline => {
                    let taken = {
                        let state = self.lock();
                        if ticket > state.taken {
                            // Withdrawn under the lock: no runner takes it now.
                            answer.close();
                        }
                        ticket <= state.taken
                    };
                    if taken {
                        return outcome(answer.await);
                    }
                    return Submitted::TimedOut;
                }
            }
        }
    }

    /// Everything queued, less the requests whose callers gave up, if the
    /// request `ticket` is still among them; `None` if a runner took it.
    fn take_queue_with(&self, ticket: u64) -> Option<Vec<Entry<R, T>>> {
        let mut state = self.lock();
        if ticket <= state.taken {
            return None;
        }
        state.taken = state.queued;
        state.queue.retain(|(_, reply, _)| !reply.is_closed());
        Some(std::mem::take(&mut state.queue))
    }
}

/// A request's answer; none (its runner dropped the reply) sends the
/// caller to run its request alone.
fn outcome<T, E>(answer: Result<T, E>) -> Submitted<T> {
    answer.map_or(Submitted::RunAlone, Submitted::Done)
}

/// Releases a runner's slot when the runner finishes or is dropped, and
/// wakes the callers still queued so that one of them runs the queue.
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
            busy.submit(1, far(), |batch: Vec<i32>, _| {
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
                .submit(2, deadline, |b: Vec<i32>, _| async move { b })
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
            .submit(7, far(), |batch: Vec<i32>, _| {
                sizes.lock().unwrap().push(batch.len());
                async move { batch.iter().map(|n| n * 2).collect() }
            })
            .await;
        assert_eq!(result, Submitted::Done(14));
        assert_eq!(*sizes.lock().unwrap(), vec![1]);
        let state = batcher.lock();
        assert_eq!(state.running, 0, "the slot is given back");
        assert_eq!(state.taken, state.queued, "no request is left queued");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_caller_arriving_while_a_batch_runs_joins_the_next_one() {
        let batcher = Arc::new(Batcher::new(1));
        let (started, wait_started) = oneshot::channel();
        let (release, released) = oneshot::channel::<()>();
        let hooks = Arc::new(Mutex::new(Some((started, released))));
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let run = {
            let (hooks, sizes) = (hooks.clone(), sizes.clone());
            move |batch: Vec<i32>, _| {
                sizes.lock().unwrap().push(batch.len());
                let hooks = hooks.lock().unwrap().take();
                async move {
                    if let Some((started, released)) = hooks {
                        let _ = started.send(());
                        let _ = released.await;
                    }
                    batch
                }
            }
        };
        let first = tokio::spawn({
            let (batcher, run) = (batcher.clone(), run.clone());
            async move { batcher.submit(1, far(), run).await }
        });
        let _ = wait_started.await;
        let later: Vec<_> = (2..5)
            .map(|i| {
                let (batcher, run) = (batcher.clone(), run.clone());
                tokio::spawn(async move { batcher.submit(i, far(), run).await })
            })
            .collect();
        while batcher.lock().queue.len() < 3 {
            tokio::task::yield_now().await;
        }
        let _ = release.send(());
        assert_eq!(first.await.unwrap(), Submitted::Done(1));
        for (i, call) in (2..5).zip(later) {
            assert_eq!(call.await.unwrap(), Submitted::Done(i));
        }
        assert_eq!(
            *sizes.lock().unwrap(),
            vec![1, 3],
            "the queued callers shared one batch"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_calls_share_batches_and_each_gets_its_own_result() {
        let batcher = Arc::new(Batcher::new(1));
        let statements = Arc::new(AtomicUsize::new(0));
        let calls = (0..50).map(|i| {
            let (batcher, statements) = (batcher.clone(), statements.clone());
            tokio::spawn(async move {
                batcher
                    .submit(i, far(), |batch: Vec<i32>, _| {
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_runner_returns_after_its_own_batch_and_leaves_the_queue_to_others() {
        let batcher = Arc::new(Batcher::new(1));
        let (first_started, wait_first_started) = oneshot::channel();
        let (release_first, first_released) = oneshot::channel::<()>();
        let first_hooks = Arc::new(Mutex::new(Some((first_started, first_released))));
        let run = {
            let first_hooks = first_hooks.clone();
            move |batch: Vec<i32>, _| {
                let hooks = first_hooks.lock().unwrap().take();
                async move {
                    if let Some((started, released)) = hooks {
                        let _ = started.send(());
                        let _ = released.await;
                    } else {
                        // Every later batch stalls: a runner held to run
                        // one would never come back.
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                    }
                    batch
                }
            }
        };
        let first = tokio::spawn({
            let (batcher, run) = (batcher.clone(), run.clone());
            async move { batcher.submit(1, far(), run).await }
        });
        let _ = wait_first_started.await;
        let queued = tokio::spawn({
            let batcher = batcher.clone();
            async move { batcher.submit(2, far(), run).await }
        });
        // The second request is queued behind the running batch.
        while batcher.lock().queue.is_empty() {
            tokio::task::yield_now().await;
        }
        let _ = release_first.send(());
        let first = tokio::time::timeout(Duration::from_secs(10), first)
            .await
            .expect("the first runner came back without running the queued batch");
        assert_eq!(first.unwrap(), Submitted::Done(1));
        queued.abort();
    }

    #[tokio::test]
    async fn a_broken_promise_sends_the_caller_back_to_run_alone() {
        let batcher = Batcher::new(1);
        let result = batcher
            .submit(1, far(), |_batch: Vec<i32>, _| async { Vec::<i32>::new() })
            .await;
        assert_eq!(result, Submitted::RunAlone);
        assert_eq!(batcher.lock().running, 0, "the slot is given back");
    }
}
