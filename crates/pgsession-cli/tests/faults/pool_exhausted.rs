//! The session pool exhausted: its two connections are held (their queries
//! wait on a table lock the test holds), and requests that need a
//! connection get an answer within the acquire timeout (1 s) plus slack:
//! the fallback's 2xx, or 503 with `Retry-After`; none hangs. Beside it, an
//! application pool of the test's own, exhausted by the test, does not slow
//! the session pool (session latency compared with its own baseline in the
//! same run: a ratio, not a wall-clock threshold).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, Semaphore};

use crate::common::{answer, ServeProcess};
use crate::support::{
    base, check_stored, http, login_users, login_users_named, ms, quantile, wait_settled, Figures,
    Rig, User,
};

const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(1);
/// Slack on top of the acquire timeout for an answer to count as prompt.
const SLACK: Duration = Duration::from_secs(1);
/// Bounds the holders: their queries are cancelled after this.
const QUERY_TIMEOUT: Duration = Duration::from_secs(8);
/// Session requests per latency phase.
const SAMPLES: usize = 150;
/// The session latency beside an exhausted application pool, as a multiple
/// of its baseline (p50), may not exceed this.
const MAX_SLOWDOWN: f64 = 3.0;
const APP_POOL: usize = 8;
const APP_TASKS: usize = 24;

/// Status, latency, and whether a 503 carried `Retry-After`.
type Outcome = (u16, Duration, bool);

/// One `POST /counter` for `user`. Counts the increment when acknowledged.
async fn counter(http: &reqwest::Client, base: &str, user: &mut User) -> Outcome {
    let sent = Instant::now();
    let mut request = http.post(format!("{base}/counter"));
    if let Some(cookie) = &user.cookie {
        request = request.header("cookie", cookie);
    }
    let Ok(response) = request.send().await else {
        return (0, sent.elapsed(), false);
    };
    let retry_after = response.headers().contains_key("retry-after");
    let a = answer(response).await;
    let latency = sent.elapsed();
    if (200..300).contains(&a.status) {
        assert_eq!(
            a.json()["views"].as_u64(),
            Some(user.acked() + 1),
            "{}: stale read",
            user.name
        );
        user.sessions.last_mut().expect("logged in").1 += 1;
    }
    (a.status, latency, retry_after)
}

/// Holds `session_store` locked (ACCESS EXCLUSIVE) in an open transaction.
async fn lock_table(db: &pgsession_testkit::TestDb) -> tokio_postgres::Client {
    let locker = db.client().await.expect("locker connection");
    locker
        .batch_execute("BEGIN; LOCK TABLE session_store IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock the table");
    locker
}

/// Waits until `n` queries wait on a lock.
async fn wait_lock_waiters(watcher: &tokio_postgres::Client, n: i64) {
    let sql = "SELECT count(*) FROM pg_stat_activity \
               WHERE datname = current_database() AND wait_event_type = 'Lock'";
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = watcher.query_one(sql, &[]).await.expect("count").get(0);
        if waiting >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{waiting} queries wait on the lock, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A request that must be answered promptly while the pool is held.
#[derive(Debug)]
struct Prompt {
    who: &'static str,
    status: u16,
    latency: Duration,
    retry_after: bool,
}

impl Prompt {
    fn fine(&self) -> bool {
        let answered =
            (200..300).contains(&self.status) || (self.status == 503 && self.retry_after);
        answered && self.latency <= ACQUIRE_TIMEOUT + SLACK
    }
}

/// The table locked and two holders' requests waiting on the lock, holding
/// both session-pool connections.
struct Held {
    locker: tokio_postgres::Client,
    holders: Vec<tokio::task::JoinHandle<(User, Outcome)>>,
    taken: Instant,
}

impl Held {
    async fn take(rig: &Rig, http: &reqwest::Client, base: &str, holders: &[User]) -> Held {
        let locker = lock_table(&rig.db).await;
        let watcher = rig.db.client().await.expect("watcher connection");
        // One holder at a time, each sent once the previous one's statement
        // waits on the lock: requests sent together may share one batched
        // statement (one connection), while a request that finds a batch
        // already running starts its own on another connection. So `n`
        // waiting statements mean `n` connections held.
        let mut tasks = Vec::new();
        for (held, user) in holders.iter().enumerate() {
            let (http, base, mut user) = (http.clone(), base.to_owned(), user.clone());
            tasks.push(tokio::spawn(async move {
                let r = counter(&http, &base, &mut user).await;
                (user, r)
            }));
            wait_lock_waiters(&watcher, held as i64 + 1).await;
        }
        Held {
            locker,
            holders: tasks,
            taken: Instant::now(),
        }
    }

    /// Unlocks; returns the holders once answered, and what each got
    /// (`holder:status@latency`, and how long the lock was held).
    async fn release(self) -> (Vec<User>, Vec<String>, Vec<Duration>) {
        let held_for = self.taken.elapsed();
        self.locker.batch_execute("COMMIT").await.expect("unlock");
        let (mut users, mut described, mut latencies) = (Vec::new(), Vec::new(), Vec::new());
        for task in self.holders {
            let (user, (status, latency, _)) = task.await.expect("holder");
            described.push(format!(
                "holder:{status}@{}ms(lock_held_{}ms)",
                latency.as_millis(),
                held_for.as_millis()
            ));
            latencies.push(latency);
            users.push(user);
        }
        (users, described, latencies)
    }
}

/// A server whose session pool has two connections and a 1 s acquire
/// timeout.
async fn small_pool_server(rig: &Rig) -> ServeProcess {
    ServeProcess::start_ready(
        rig.direct_url(),
        &[
            ("PGSESSION_POOL_SIZE", "2"),
            ("PGSESSION_POOL_MAX_SIZE", "2"),
            ("PGSESSION_ACQUIRE_TIMEOUT", "1s"),
            ("PGSESSION_QUERY_TIMEOUT", "8s"), // QUERY_TIMEOUT
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_exhausted_session_pool_held() {
    let rig = Rig::new().await;
    let serve = small_pool_server(&rig).await;
    let http = http();
    let base = base(&serve);
    let cached = login_users(&http, &base, 8).await;
    // Sessions this server has never seen (so not in its cache): logged in
    // on another server of the same database.
    let mut unknown = {
        let other = ServeProcess::start_ready(rig.direct_url(), &[]).await;
        login_users_named(&http, &other.url(""), "foreign", 6).await
    };

    // 1. One request at a time while both connections are held.
    let (holders, mut rest) = (cached[..2].to_vec(), cached[2..].to_vec());
    let held = Held::take(&rig, &http, &base, &holders).await;
    let mut single = Vec::new();
    for (who, user) in [("unknown", &mut unknown[0]), ("cached", &mut rest[0])] {
        let (status, latency, retry_after) = counter(&http, &base, user).await;
        single.push(Prompt {
            who,
            status,
            latency,
            retry_after,
        });
    }
    let (holders, holders_single, mut holder_latencies) = held.release().await;
    let settle_single = wait_settled(&http, &serve, Duration::from_secs(60)).await;

    // 2. A burst of concurrent requests while both connections are held.
    let held = Held::take(&rig, &http, &base, &holders).await;
    let tasks: Vec<_> = rest[1..]
        .iter()
        .chain(&unknown[1..])
        .cloned()
        .map(|mut user| {
            let (http, base) = (http.clone(), base.clone());
            tokio::spawn(async move {
                let r = counter(&http, &base, &mut user).await;
                (user, r)
            })
        })
        .collect();
    let (mut burst, mut burst_users) = (Vec::new(), Vec::new());
    for task in tasks {
        let (user, (status, latency, retry_after)) = task.await.expect("burst");
        let who = if user.name.starts_with("foreign") {
            "unknown"
        } else {
            "cached"
        };
        burst.push(Prompt {
            who,
            status,
            latency,
            retry_after,
        });
        burst_users.push(user);
    }
    let (holders, holders_burst, latencies) = held.release().await;
    holder_latencies.extend(latencies);
    let settle_burst = wait_settled(&http, &serve, Duration::from_secs(60)).await;

    // Everyone's acknowledged increments are stored.
    let mut everyone: Vec<User> = holders;
    everyone.push(rest[0].clone());
    everyone.push(unknown[0].clone());
    everyone.extend(burst_users);
    let stored = check_stored(&rig.db, &everyone).await;

    let describe = |prompts: &[Prompt]| {
        prompts
            .iter()
            .map(|p| format!("{}:{}@{}ms", p.who, p.status, p.latency.as_millis()))
            .collect::<Vec<_>>()
            .join(",")
    };
    let all: Vec<&Prompt> = single.iter().chain(&burst).collect();
    let max_wait = all.iter().map(|p| p.latency).max().unwrap_or_default();
    Figures::new("pool_exhausted_session_pool_held")
        .set("pool", 2)
        .set("acquire_timeout_ms", ms(ACQUIRE_TIMEOUT))
        .set("query_timeout_ms", ms(QUERY_TIMEOUT))
        .set("single", describe(&single))
        .set("holders_single", holders_single.join(","))
        .set("burst", describe(&burst))
        .set("holders_burst", holders_burst.join(","))
        .set("max_wait_ms", ms(max_wait))
        .set("late", all.iter().filter(|p| !p.fine()).count())
        .set("settle_single_ms", ms(settle_single))
        .set("settle_burst_ms", ms(settle_burst))
        .stored(&stored)
        .print();

    let late: Vec<_> = all.iter().filter(|p| !p.fine()).collect();
    assert!(
        late.is_empty(),
        "with the session pool held, these requests were not answered (2xx, or 503 with \
         Retry-After) within the acquire timeout {ACQUIRE_TIMEOUT:?} + {SLACK:?}: {late:?}\n{}",
        crate::support::tail(&serve.stderr(), 40)
    );
    let hung: Vec<_> = holder_latencies
        .iter()
        .filter(|l| **l > QUERY_TIMEOUT + SLACK)
        .collect();
    assert!(
        hung.is_empty(),
        "requests holding a connection waited longer than the query timeout {QUERY_TIMEOUT:?} \
         + {SLACK:?}: {hung:?}\n{}",
        crate::support::tail(&serve.stderr(), 60)
    );
    stored.assert_nothing_lost(&serve.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_exhausted_application_pool_beside() {
    let rig = Rig::new().await;
    let serve = small_pool_server(&rig).await;
    let http = http();
    let base = base(&serve);
    let mut probe = login_users(&http, &base, 1).await.pop().expect("a user");

    // Session latency alone, then beside an exhausted application pool.
    let mut baseline = Vec::new();
    for _ in 0..SAMPLES {
        let (status, latency, _) = counter(&http, &base, &mut probe).await;
        assert_eq!(status, 200);
        baseline.push(latency);
    }
    let app = AppPool::exhaust(&rig.db).await;
    let mut beside = Vec::new();
    let mut app_waiting_max = 0;
    for _ in 0..SAMPLES {
        app_waiting_max = app_waiting_max.max(app.waiting());
        let (status, latency, _) = counter(&http, &base, &mut probe).await;
        assert_eq!(status, 200);
        beside.push(latency);
    }
    let app_figures = app.stop().await;
    let (base_p50, beside_p50) = (quantile(baseline, 0.5), quantile(beside.clone(), 0.5));
    let slowdown = beside_p50.as_secs_f64() / base_p50.as_secs_f64().max(1e-6);
    let stored = check_stored(&rig.db, std::slice::from_ref(&probe)).await;

    Figures::new("pool_exhausted_application_pool_beside")
        .set("session_pool", 2)
        .set("app_pool", APP_POOL)
        .set("app_tasks", APP_TASKS)
        .set("samples", SAMPLES)
        .set(
            "baseline_p50_ms",
            format!("{:.2}", base_p50.as_secs_f64() * 1e3),
        )
        .set(
            "beside_app_p50_ms",
            format!("{:.2}", beside_p50.as_secs_f64() * 1e3),
        )
        .set("beside_app_max_ms", ms(quantile(beside, 1.0)))
        .set("slowdown", format!("{slowdown:.2}"))
        .set("app_waiting_max", app_waiting_max)
        .set("app_acquire_p50_ms", ms(app_figures.acquire_p50))
        .set("app_queries", app_figures.queries)
        .stored(&stored)
        .print();

    assert!(
        app_waiting_max > 0 && app_figures.acquire_p50 > Duration::from_millis(50),
        "the application pool was not exhausted: {app_waiting_max} waiting, acquire p50 {:?}",
        app_figures.acquire_p50
    );
    assert!(
        slowdown <= MAX_SLOWDOWN,
        "session requests were {slowdown:.2}x slower beside the exhausted application pool \
         (p50 {beside_p50:?} against {base_p50:?})"
    );
    stored.assert_nothing_lost(&serve.stderr());
}

/// The application's own pool, in the test: `APP_POOL` connections behind
/// a semaphore, and `APP_TASKS` tasks each running `pg_sleep(0.2)` in a
/// loop, so that callers always wait for a connection.
struct AppPool {
    stop: crate::support::Stop,
    waiting: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<(usize, Vec<Duration>)>>,
}

struct AppFigures {
    queries: usize,
    acquire_p50: Duration,
}

impl AppPool {
    async fn exhaust(db: &pgsession_testkit::TestDb) -> AppPool {
        let mut clients = Vec::new();
        for _ in 0..APP_POOL {
            clients.push(db.client().await.expect("application connection"));
        }
        let clients = Arc::new(Mutex::new(clients));
        let permits = Arc::new(Semaphore::new(APP_POOL));
        let waiting = Arc::new(AtomicUsize::new(0));
        let stop = crate::support::Stop::default();
        let started = Instant::now();
        let tasks = (0..APP_TASKS)
            .map(|_| {
                let (clients, permits, waiting, stop) = (
                    clients.clone(),
                    permits.clone(),
                    waiting.clone(),
                    stop.clone(),
                );
                tokio::spawn(async move {
                    let (mut queries, mut waits) = (0, Vec::new());
                    // Bounded: stops when told, or after 60 s.
                    while !stop.stopped() && started.elapsed() < Duration::from_secs(60) {
                        let asked = Instant::now();
                        waiting.fetch_add(1, Ordering::SeqCst);
                        let permit = permits.acquire().await.expect("semaphore");
                        waiting.fetch_sub(1, Ordering::SeqCst);
                        waits.push(asked.elapsed());
                        let client = clients.lock().await.pop().expect("a connection per permit");
                        client
                            .simple_query("SELECT pg_sleep(0.2)")
                            .await
                            .expect("application query");
                        clients.lock().await.push(client);
                        drop(permit);
                        queries += 1;
                    }
                    (queries, waits)
                })
            })
            .collect();
        // Filled up: every connection busy, the other tasks waiting for one.
        let deadline = Instant::now() + Duration::from_secs(10);
        while waiting.load(Ordering::SeqCst) < APP_TASKS - APP_POOL {
            assert!(
                Instant::now() < deadline,
                "the application pool never filled up"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        AppPool {
            stop,
            waiting,
            tasks,
        }
    }

    fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    async fn stop(self) -> AppFigures {
        self.stop.stop();
        let (mut queries, mut waits) = (0, Vec::new());
        for task in self.tasks {
            let (q, w) = task.await.expect("application task");
            queries += q;
            waits.extend(w);
        }
        AppFigures {
            queries,
            acquire_p50: quantile(waits, 0.5),
        }
    }
}
