//! Every setting of `Config` reaches what it configures: one test per
//! setting, each with a value the default would not satisfy, watched where
//! it acts (the pool, the server's connection, the breaker, the pruner,
//! the cache, the journal).
//!
//! Not here: `keepalive_idle` and the driver's side of `connect_timeout`
//! are checked on the driver's configuration (unit tests of `config.rs`);
//! `lifetime` reaches the HTTP layer, and is tested with it.

use std::path::Path;
use std::time::{Duration, Instant};

use pgsession::{BreakerState, Error, ErrorKind, PoolerMode, PruneOutcome, Store};
use pgsession_testkit::{FaultProxy, TestDb};

use crate::common::*;

/// Polls `condition` every 20 ms until it holds; fails after `within`.
async fn wait_for(what: &str, within: Duration, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Connections of the server with this application name.
async fn backends(db: &TestDb, app: &str) -> i64 {
    let sql = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1";
    let client = db.client().await.unwrap();
    client.query_one(sql, &[&app]).await.unwrap().get(0)
}

/// Connections of the server with this application name waiting on a lock.
async fn blocked(db: &TestDb, app: &str) -> i64 {
    let sql = "SELECT count(*) FROM pg_stat_activity \
               WHERE application_name = $1 AND wait_event_type = 'Lock'";
    let client = db.client().await.unwrap();
    client.query_one(sql, &[&app]).await.unwrap().get(0)
}

/// A connection holding the session table locked until it commits.
async fn lock_table(db: &TestDb) -> tokio_postgres::Client {
    let locker = db.client().await.unwrap();
    locker
        .batch_execute("BEGIN; LOCK TABLE session_store IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    locker
}

/// `db`'s URL with an application name, to count the store's connections.
fn named(db: &TestDb, app: &str) -> String {
    format!("{}?application_name={app}", db.url())
}

/// A throwaway cluster behind a fault proxy, to take the database away.
struct Rig {
    db: TestDb,
    proxy: FaultProxy,
}

impl Rig {
    async fn new() -> Rig {
        let db = throwaway_db().await;
        let upstream = db.cluster().expect("throwaway cluster").socket_addr();
        let proxy = FaultProxy::start(upstream).await.expect("fault proxy");
        Rig { db, proxy }
    }

    fn url(&self) -> String {
        self.proxy.url_for(self.db.name())
    }

    /// New connections refused, open ones reset.
    fn away(&self) {
        self.proxy.refuse(true);
        self.proxy.reset_all();
    }

    /// Takes the database away and opens the breaker (set to open at the
    /// first counted failure) with a failed operation.
    async fn away_with_breaker_open(&self, store: &Store) {
        self.away();
        let _ = store.count().await;
        wait_for("the breaker to open", Duration::from_secs(10), async || {
            store.breaker_state() != BreakerState::Closed
        })
        .await;
    }
}

/// A document of `len` bytes.
fn doc(len: usize) -> String {
    let filler = "x".repeat(len - r#"{"x":""}"#.len());
    format!(r#"{{"x":"{filler}"}}"#)
}

#[tokio::test]
async fn pool_size_is_the_pools_size() {
    let db = test_db().await;
    let store = store_with(config(db.url()).pool_size(3)).await;
    assert_eq!(store.pool_status().max, 3);
    store.close().await;
}

#[tokio::test]
async fn pool_max_size_is_the_ceiling_the_pool_grows_to() {
    let db = test_db().await;
    let url = named(&db, "ceiling");
    let store = store_with(
        config(&url)
            .pool_size(2)
            .pool_max_size(3)
            .idle_timeout(Duration::from_secs(60)),
    )
    .await;
    let locker = lock_table(&db).await;
    // Counts (unlike loads) are not batched: each waiting one wants a
    // connection of its own.
    let counts: Vec<_> = (0..6)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.count().await })
        })
        .collect();
    // The pool grows by two connections at a time while callers wait:
    // from 2 to 4 (twice pool_size, the default ceiling), here to 3.
    wait_for("a third connection", Duration::from_secs(30), async || {
        blocked(&db, "ceiling").await >= 3
    })
    .await;
    assert_eq!(store.pool_status().max, 3);
    locker.batch_execute("COMMIT").await.unwrap();
    for count in counts {
        count.await.unwrap().expect("count once the lock is gone");
    }
    store.close().await;
}

#[tokio::test]
async fn min_idle_connections_are_opened_without_traffic() {
    let db = test_db().await;
    let url = named(&db, "warm");
    let store = store_with(config(&url).pool_size(4).min_idle(3)).await;
    // Three idle ones: a fourth may be open while a check holds one.
    wait_for(
        "three warm connections",
        Duration::from_secs(30),
        async || store.pool_status().size >= 3 && backends(&db, "warm").await >= 3,
    )
    .await;
    store.close().await;
}

#[tokio::test]
async fn idle_timeout_closes_idle_connections() {
    let db = test_db().await;
    let url = named(&db, "idle");
    let store = store_with(
        config(&url)
            .min_idle(0)
            .idle_timeout(Duration::from_millis(200)),
    )
    .await;
    assert!(store.pool_status().opened_total >= 1, "start-up connected");
    // Far sooner than the default (30 s) would close it.
    wait_for(
        "the idle connection to close",
        Duration::from_secs(10),
        async || store.pool_status().size == 0 && backends(&db, "idle").await == 0,
    )
    .await;
    store.close().await;
}

#[tokio::test]
async fn connect_timeout_bounds_opening_a_connection() {
    let rig = Rig::new().await;
    // Connections are accepted and never answered, as by a host that
    // does not finish waking up.
    rig.proxy.blackhole(true);
    let store = Store::new(
        config(&rig.url())
            .connect_timeout(Duration::from_millis(300))
            .startup_backoff(Duration::from_secs(3600))
            .build()
            .unwrap(),
    )
    .unwrap();
    let started = Instant::now();
    let err = store.ready().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connect, "{err}");
    assert!(err.to_string().contains("300ms"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    store.close().await;
}

#[tokio::test]
async fn acquire_timeout_bounds_the_wait_for_a_busy_pool() {
    let db = test_db().await;
    let url = named(&db, "acquire");
    let store = store_with(
        config(&url)
            .pool_size(1)
            .pool_max_size(1)
            .acquire_timeout(Duration::from_millis(300)),
    )
    .await;
    let locker = lock_table(&db).await;
    let holder = tokio::spawn({
        let store = store.clone();
        async move { store.count().await }
    });
    wait_for(
        "the only connection to wait on the lock",
        Duration::from_secs(30),
        async || blocked(&db, "acquire").await == 1,
    )
    .await;
    let started = Instant::now();
    let err = store.count().await.unwrap_err();
    assert!(
        matches!(err, Error::AcquireTimeout(d) if d == Duration::from_millis(300)),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    locker.batch_execute("COMMIT").await.unwrap();
    holder.await.unwrap().expect("the holder's count");
    store.close().await;
}

#[tokio::test]
async fn statement_timeout_is_the_connections_statement_timeout() {
    let db = test_db().await;
    let store = store_with(config(db.url()).statement_timeout(Duration::from_secs(7))).await;
    assert_eq!(store.server_info().await.unwrap().statement_timeout, "7s");
    assert!(store.server_statement_timeout());
    store.close().await;
}

#[tokio::test]
async fn query_timeout_ends_an_operation_and_says_when() {
    let db = test_db().await;
    let store = store_with(config(db.url()).query_timeout(Duration::from_secs(1))).await;
    let locker = lock_table(&db).await;
    let started = Instant::now();
    let err = store.count().await.unwrap_err();
    let elapsed = started.elapsed();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(err.to_string().contains("1s"), "{err}");
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(5),
        "{elapsed:?}"
    );
    locker.batch_execute("COMMIT").await.unwrap();
    store.close().await;
}

#[tokio::test]
async fn max_uses_replaces_a_connection() {
    let db = test_db().await;
    let store = store_with(config(db.url()).pool_size(1).min_idle(0).max_uses(2)).await;
    let mut uses = std::collections::HashMap::new();
    for _ in 0..8 {
        let pid = store.server_info().await.unwrap().backend_pid;
        *uses.entry(pid).or_insert(0) += 1;
    }
    // Start-up and checks take uses too: none serves more than two, so
    // eight take at least four connections.
    assert!(uses.values().all(|&n| n <= 2), "{uses:?}");
    assert!(uses.len() >= 4, "{uses:?}");
    store.close().await;
}

#[tokio::test]
async fn startup_retries_end_the_start_up_sequence() {
    let rig = Rig::new().await;
    rig.away();
    // No retries: the sequence ends with the first failed attempt, though
    // the next would only come in an hour (the default, 3 retries, would
    // wait for it).
    let store = Store::new(
        config(&rig.url())
            .startup_retries(0)
            .startup_backoff(Duration::from_secs(3600))
            .build()
            .unwrap(),
    )
    .unwrap();
    let settled = tokio::time::timeout(Duration::from_secs(10), store.wait_ready()).await;
    let err = settled.expect("the start-up sequence ends").unwrap_err();
    assert!(err.is_outage(), "{err}");
    store.close().await;
}

#[tokio::test]
async fn startup_backoff_spaces_the_start_up_attempts() {
    let rig = Rig::new().await;
    rig.away();
    let store = Store::new(
        config(&rig.url())
            .startup_retries(1)
            .startup_backoff(Duration::from_secs(3))
            .build()
            .unwrap(),
    )
    .unwrap();
    let started = Instant::now();
    let err = store.wait_ready().await.unwrap_err();
    let elapsed = started.elapsed();
    // One retry, 3 s after the first attempt (plus jitter); the default
    // (1 s, jitter included at most 2 s) would end sooner.
    assert!(err.is_outage(), "{err}");
    assert!(
        elapsed >= Duration::from_millis(2900) && elapsed < Duration::from_secs(15),
        "{elapsed:?}"
    );
    store.close().await;
}

#[tokio::test]
async fn schema_holds_the_table() {
    let db = test_db().await;
    let store = store_with(config(db.url()).schema("auth")).await;
    store.save("sid", "{}", in_secs(60)).await.unwrap();
    let rows: i64 = scalar(&db, "SELECT count(*) FROM auth.session_store").await;
    assert_eq!(rows, 1);
    store.close().await;
}

#[tokio::test]
async fn table_is_the_table_written() {
    let db = test_db().await;
    let store = store_with(config(db.url()).table("web_sessions")).await;
    store.save("sid", "{}", in_secs(60)).await.unwrap();
    let rows: i64 = scalar(&db, "SELECT count(*) FROM public.web_sessions").await;
    assert_eq!(rows, 1);
    store.close().await;
}

#[tokio::test]
async fn create_table_off_leaves_a_missing_table_missing() {
    let db = test_db().await;
    let store = Store::new(config(db.url()).create_table(false).build().unwrap()).unwrap();
    let err = store.ready().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("create_table"), "{err}");
    let table: bool = scalar(
        &db,
        "SELECT to_regclass('public.session_store') IS NOT NULL",
    )
    .await;
    assert!(!table);
    store.close().await;
}

#[tokio::test]
async fn prune_interval_paces_the_pruner() {
    let db = test_db().await;
    let store = store_with(config(db.url()).prune_interval(Duration::from_millis(200))).await;
    db.client()
        .await
        .unwrap()
        .batch_execute(
            "INSERT INTO session_store (sid, sess, expire) \
             SELECT 'old' || g, '{}', (now() AT TIME ZONE 'UTC') - interval '1 hour' \
             FROM generate_series(1, 5) g",
        )
        .await
        .unwrap();
    // Far sooner than the default interval (15 min) would prune.
    wait_for(
        "the pruner to delete the expired rows",
        Duration::from_secs(10),
        async || scalar::<i64>(&db, "SELECT count(*) FROM session_store").await == 0,
    )
    .await;
    store.close().await;
}

#[tokio::test]
async fn prune_batch_size_is_the_rows_per_statement() {
    let db = test_db().await;
    let store = store_with(config(db.url()).prune_batch_size(10)).await;
    db.client()
        .await
        .unwrap()
        .batch_execute(
            "INSERT INTO session_store (sid, sess, expire) \
             SELECT 'old' || g, '{}', (now() AT TIME ZONE 'UTC') - interval '1 hour' \
             FROM generate_series(1, 25) g",
        )
        .await
        .unwrap();
    let mut progress = Vec::new();
    let outcome = store
        .prune_with_progress(|n| progress.push(n))
        .await
        .unwrap();
    assert_eq!(
        outcome,
        PruneOutcome::Pruned {
            deleted: 25,
            batches: 3
        }
    );
    assert_eq!(progress, [10, 20, 25]);
    store.close().await;
}

#[tokio::test]
async fn pooler_transaction_sends_no_startup_options() {
    let db = test_db().await;
    let timeout = Duration::from_secs(7);
    let direct = store_with(config(db.url()).statement_timeout(timeout)).await;
    assert_eq!(direct.server_info().await.unwrap().statement_timeout, "7s");
    let pooled = store_with(
        config(db.url())
            .statement_timeout(timeout)
            .pooler(PoolerMode::Transaction),
    )
    .await;
    // A transaction pooler would refuse the options: none are sent, and
    // the statement timeout is the client's alone.
    assert!(!pooled.server_statement_timeout());
    assert_ne!(pooled.server_info().await.unwrap().statement_timeout, "7s");
    direct.close().await;
    pooled.close().await;
}

#[tokio::test]
async fn max_session_bytes_refuses_a_larger_document() {
    let db = test_db().await;
    let store = store_with(config(db.url()).max_session_bytes(100)).await;
    store.save("fits", &doc(100), in_secs(60)).await.unwrap();
    let err = store.save("big", &doc(101), in_secs(60)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TooLarge, "{err}");
    store.close().await;
}

#[tokio::test]
async fn health_check_interval_paces_the_health_checks() {
    let db = test_db().await;
    let store =
        store_with(config(db.url()).health_check_interval(Duration::from_millis(200))).await;
    // No operations: each new result is a health check's. The default
    // interval (30 s) would give none but start-up's within the wait.
    let mut seen = std::collections::HashSet::new();
    wait_for("three health checks", Duration::from_secs(10), async || {
        if let Some(check) = store.health().last_check {
            seen.insert(check.at);
        }
        seen.len() >= 3
    })
    .await;
    store.close().await;
}

#[tokio::test]
async fn slow_check_threshold_judges_the_health_check() {
    let db = test_db().await;
    let store = store_with(config(db.url()).slow_check_threshold(Duration::from_nanos(1))).await;
    // Every check takes more than a nanosecond: each is slow, so not ok.
    wait_for(
        "a health check judged slow",
        Duration::from_secs(10),
        async || store.health().last_check.is_some_and(|c| !c.ok),
    )
    .await;
    store.close().await;
}

#[tokio::test]
async fn breaker_threshold_is_the_failures_that_open_the_breaker() {
    let rig = Rig::new().await;
    let patient = store_with(
        config(&rig.url())
            .min_idle(0)
            .query_timeout(Duration::from_secs(1))
            .breaker_threshold(1000),
    )
    .await;
    let quick = store_with(
        config(&rig.url())
            .min_idle(0)
            .query_timeout(Duration::from_secs(1))
            .breaker_threshold(1),
    )
    .await;
    rig.away();
    for _ in 0..3 {
        assert!(patient.count().await.is_err());
    }
    assert_eq!(patient.breaker_state(), BreakerState::Closed);
    assert!(quick.count().await.is_err());
    assert_ne!(quick.breaker_state(), BreakerState::Closed);
    patient.close().await;
    quick.close().await;
}

#[tokio::test]
async fn breaker_cool_down_is_the_wait_before_a_probe() {
    let rig = Rig::new().await;
    let store = store_with(
        config(&rig.url())
            .min_idle(0)
            .query_timeout(Duration::from_secs(1))
            .breaker_threshold(1)
            .breaker_cool_down(Duration::from_secs(3)),
    )
    .await;
    rig.away_with_breaker_open(&store).await;
    let opened = Instant::now();
    rig.proxy.heal();
    wait_for(
        "the breaker to close",
        Duration::from_secs(15),
        async || store.breaker_state() == BreakerState::Closed,
    )
    .await;
    // The first probe waits the cool-down (the default, 1 s, would close
    // it sooner).
    assert!(
        opened.elapsed() >= Duration::from_millis(2500),
        "{:?}",
        opened.elapsed()
    );
    store.close().await;
}

#[tokio::test]
async fn breaker_max_cool_down_caps_the_wait_between_probes() {
    let rig = Rig::new().await;
    let store = store_with(
        config(&rig.url())
            .min_idle(0)
            .query_timeout(Duration::from_secs(1))
            .breaker_threshold(1)
            .breaker_cool_down(Duration::from_millis(100))
            .breaker_max_cool_down(Duration::from_millis(200)),
    )
    .await;
    rig.away_with_breaker_open(&store).await;
    // A refused probe every 0.1, 0.2, 0.2, ... s (on 0.1 s ticks): six
    // within 2 s. Doubling without the cap (0.1, 0.2, 0.4, 0.8, 1.6, 3.2 s)
    // would take more than 6 s.
    let before = rig.proxy.total_connections();
    wait_for(
        "six refused probes",
        Duration::from_millis(4500),
        async || rig.proxy.total_connections() >= before + 6,
    )
    .await;
    rig.proxy.heal();
    wait_for(
        "the breaker to close",
        Duration::from_secs(10),
        async || store.breaker_state() == BreakerState::Closed,
    )
    .await;
    store.close().await;
}

#[tokio::test]
async fn cache_max_entries_bounds_the_fallback_cache() {
    let rig = Rig::new().await;
    let store = store_with(
        config(&rig.url())
            .min_idle(0)
            .query_timeout(Duration::from_secs(1))
            .breaker_threshold(1)
            .breaker_cool_down(Duration::from_secs(20))
            .cache_max_entries(1),
    )
    .await;
    store.save("first", "{}", in_secs(60)).await.unwrap();
    store.save("second", "{}", in_secs(60)).await.unwrap();
    rig.away_with_breaker_open(&store).await;
    assert!(
        store.load("second").await.unwrap().is_some(),
        "the one kept"
    );
    let err = store.load("first").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    store.close().await;
}

#[tokio::test]
async fn cache_max_bytes_bounds_the_fallback_cache() {
    let rig = Rig::new().await;
    let store = store_with(
        config(&rig.url())
            .min_idle(0)
            .query_timeout(Duration::from_secs(1))
            .breaker_threshold(1)
            .breaker_cool_down(Duration::from_secs(20))
            .cache_max_bytes(1500),
    )
    .await;
    store.save("first", &doc(1000), in_secs(60)).await.unwrap();
    store.save("second", &doc(1000), in_secs(60)).await.unwrap();
    rig.away_with_breaker_open(&store).await;
    assert!(
        store.load("second").await.unwrap().is_some(),
        "the one kept"
    );
    let err = store.load("first").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    store.close().await;
}

#[tokio::test]
async fn journal_max_bytes_bounds_the_journal() {
    let rig = Rig::new().await;
    let limit = 4096;
    let store = store_with(
        config(&rig.url())
            .min_idle(0)
            .query_timeout(Duration::from_secs(1))
            .breaker_threshold(1)
            .breaker_cool_down(Duration::from_secs(20))
            .journal_max_bytes(limit),
    )
    .await;
    rig.away_with_breaker_open(&store).await;
    let mut refused = None;
    for i in 0..10 {
        if let Err(e) = store
            .save(&format!("sid{i}"), &doc(1000), in_secs(60))
            .await
        {
            refused = Some((i, e));
            break;
        }
    }
    let (i, err) = refused.expect("a full journal refuses a write");
    assert!(i >= 1, "the first write fits: {err}");
    assert_eq!(err.kind(), ErrorKind::Journal, "{err}");
    assert!(
        store.journal_bytes() <= limit as u64,
        "{}",
        store.journal_bytes()
    );
    store.close().await;
}

#[tokio::test]
async fn journal_dir_holds_the_journal() {
    let db = test_db().await;
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("nested").join("journal");
    let store = store_with(config(db.url()).journal_dir(&dir)).await;
    assert!(has_files(&dir), "no journal file in {}", dir.display());
    let shown = store.health().journal.dir.expect("a journal directory");
    assert!(shown.contains(&*dir.to_string_lossy()), "{shown}");
    store.close().await;
}

#[tokio::test]
async fn fallback_off_answers_an_outage_with_an_error() {
    let rig = Rig::new().await;
    let base = config(&rig.url())
        .min_idle(0)
        .query_timeout(Duration::from_secs(1))
        .breaker_threshold(1)
        .breaker_cool_down(Duration::from_secs(20));
    let parent = tempfile::tempdir().unwrap();

    let off_dir = parent.path().join("off");
    let off = store_with(base.clone().fallback(false).journal_dir(&off_dir)).await;
    rig.away_with_breaker_open(&off).await;
    assert!(off.save("sid", "{}", in_secs(60)).await.is_err());
    assert_eq!(off.journal_len(), 0);
    assert!(
        !off_dir.exists(),
        "no journal directory without the fallback"
    );
    off.close().await;

    rig.proxy.heal();
    let on_dir = parent.path().join("on");
    let on = store_with(base.fallback(true).journal_dir(&on_dir)).await;
    rig.away_with_breaker_open(&on).await;
    on.save("sid", "{}", in_secs(60)).await.expect("journaled");
    assert_eq!(on.journal_len(), 1);
    assert!(has_files(&on_dir));
    on.close().await;
}

fn has_files(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some())
}

#[tokio::test]
async fn prune_off_leaves_expired_rows_to_a_scheduled_prune() {
    let db = test_db().await;
    let store = store_with(
        config(db.url())
            .prune(false)
            .prune_interval(Duration::from_millis(50)),
    )
    .await;
    db.client()
        .await
        .unwrap()
        .batch_execute(
            "INSERT INTO session_store (sid, sess, expire) \
             SELECT 'old' || g, '{}', (now() AT TIME ZONE 'UTC') - interval '1 hour' \
             FROM generate_series(1, 5) g",
        )
        .await
        .unwrap();
    // Twenty prune intervals: with the pruner on, the rows go within the
    // first few (`prune_interval_paces_the_pruner`). A window of
    // observation, not a wait for something to happen.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        scalar::<i64>(&db, "SELECT count(*) FROM session_store").await,
        5,
        "no pruner runs with prune off"
    );
    // The explicit prune (`pgsession prune`, a cron job) still works.
    store.prune().await.unwrap();
    assert_eq!(
        scalar::<i64>(&db, "SELECT count(*) FROM session_store").await,
        0
    );
    store.close().await;
}
