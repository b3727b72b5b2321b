//! Failures that do not mean the database is away, with PostgreSQL up: the
//! circuit breaker stays closed and nothing goes to the journal.
//!
//! - Backends terminated under load (`pg_terminate_backend`): a statement
//!   on a dead reused connection is run again at once on a fresh one; the
//!   breaker counts failure events that meet the opening of a connection
//!   or a connection just opened, so it never hears of these.
//! - A role at its `CONNECTION LIMIT` (53300): the pool keeps to the
//!   connections it holds, warns once, and a caller that gets none in time
//!   gets an acquire timeout (a 503), never the fallback. (Concurrent loads
//!   and saves share statements, and so connections: touches make the pool
//!   want more than two.)
//! - Configuration errors (a missing database, a wrong password): not
//!   retried, not counted, shown in `/health` until an operation succeeds,
//!   logged once. The unknown CA is in `tls.rs`.
//!
//! Each test opens the breaker at the first counted failure
//! (`breaker_threshold(1)`), so that any failure counted shows.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgsession::{BreakerState, ErrorKind, HealthStatus, Store};
use pgsession_testkit::{ClusterOptions, TestCluster};

use crate::common::*;
use crate::security::Capture;

/// Polls `condition` until it holds; fails after a minute.
async fn wait_for(what: &str, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Watches a store while a test runs: whether its breaker ever left
/// Closed, and the longest its journal got.
struct Watch {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(Vec<BreakerState>, usize)>,
}

impl Watch {
    fn start(store: &Store) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let (store, stopped) = (store.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let (mut states, mut journal) = (Vec::new(), 0);
            while !stopped.load(Ordering::Relaxed) {
                let state = store.breaker_state();
                if state != BreakerState::Closed && states.last() != Some(&state) {
                    states.push(state);
                }
                journal = journal.max(store.journal_len());
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (states, journal)
        });
        Watch { stop, task }
    }

    /// Asserts the breaker stayed closed and the journal empty, also by
    /// the store's own events.
    async fn assert_never_away(self, store: &Store) {
        self.stop.store(true, Ordering::Relaxed);
        let (states, journal) = self.task.await.expect("watch");
        let moves: Vec<_> = store
            .recent_events()
            .into_iter()
            .filter(|e| e.kind == "breaker")
            .map(|e| e.message)
            .collect();
        assert!(
            states.is_empty() && moves.is_empty(),
            "the breaker left Closed: {states:?}, {moves:?}"
        );
        assert_eq!(journal, 0, "writes went to the journal");
        assert_eq!(store.breaker_state(), BreakerState::Closed);
        assert_eq!(store.journal_len(), 0);
    }
}

/// Backends of `application_name` that the server sees.
async fn backends(admin: &tokio_postgres::Client, app: &str) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .await
        .expect("pg_stat_activity")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_backends_are_replaced_at_once_and_never_open_the_breaker() {
    const WRITERS: usize = 16;
    const KILLS: usize = 5;
    /// Saves between kills: a little apart, on the new connections.
    const SAVES_BETWEEN: u64 = 300;

    let db = test_db().await;
    let app = "pgsession-terminated";
    let url = format!("{}?application_name={app}", db.url());
    // The default threshold (5 failures in a row), as users run it: a kill
    // must cost no counted failure per request (16 writers used to open it
    // at the first kill). With a threshold of 1, a kill that lands on a
    // retry's brand-new connection (a real failure of a fresh connection)
    // would open it by chance on a loaded machine.
    let store = store_with(
        config(&url)
            // Health checks meet the dead connections too.
            .health_check_interval(Duration::from_millis(200)),
    )
    .await;
    let admin = db.client().await.expect("admin connection");
    let watch = Watch::start(&store);

    let stop = Arc::new(AtomicBool::new(false));
    let saved = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (store, stop, saved) = (store.clone(), stop.clone(), saved.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let json = format!(r#"{{"n":{n}}}"#);
                    if let Err(e) = store
                        .save(&format!("writer-{w}"), &json, in_secs(600))
                        .await
                    {
                        return Err(format!("writer {w}, save {n}: {e}"));
                    }
                    saved.fetch_add(1, Ordering::Relaxed);
                }
                Ok(n)
            })
        })
        .collect();

    let opened_before = store.pool_status().opened_total;
    let mut kills = Vec::new();
    for _ in 0..=KILLS {
        let mark = saved.load(Ordering::Relaxed);
        wait_for("saves on live connections", async || {
            saved.load(Ordering::Relaxed) >= mark + SAVES_BETWEEN && backends(&admin, app).await > 0
        })
        .await;
        if kills.len() == KILLS {
            break;
        }
        let row = admin
            .query_one(
                "SELECT count(*) FILTER (WHERE state = 'active'), \
                        count(*) FILTER (WHERE pg_terminate_backend(pid)) \
                 FROM pg_stat_activity WHERE application_name = $1",
                &[&app],
            )
            .await
            .expect("pg_terminate_backend");
        let (active, killed): (i64, i64) = (row.get(0), row.get(1));
        assert!(killed > 0, "nothing to terminate");
        kills.push(format!("{killed} ({active} active)"));
    }
    stop.store(true, Ordering::Relaxed);
    let mut last = Vec::new();
    for writer in writers {
        last.push(
            writer
                .await
                .expect("writer")
                .unwrap_or_else(|e| panic!("{e}")),
        );
    }
    eprintln!(
        "terminated backends: {kills:?}; {} saves, {} connections opened",
        saved.load(Ordering::Relaxed),
        store.pool_status().opened_total - opened_before
    );
    watch.assert_never_away(&store).await;
    assert!(
        store.pool_status().opened_total - opened_before >= KILLS as u64,
        "the store did not reconnect after each round"
    );
    // Every writer's last acknowledged save is in the table.
    for (w, n) in last.iter().enumerate() {
        let stored: Option<String> = scalar(
            &db,
            &format!("SELECT sess->>'n' FROM session_store WHERE sid = 'writer-{w}'"),
        )
        .await;
        assert_eq!(stored, Some(n.to_string()), "writer {w}");
    }
    store.close().await;
}

/// Current-thread runtime: the store's tasks log on this thread, where the
/// capture listens.
#[tokio::test]
async fn a_role_at_its_connection_limit_waits_for_its_connections_and_never_uses_the_fallback() {
    const CALLERS: usize = 32;
    const ROUNDS: usize = 25;

    let (capture, _guard) = Capture::start();
    let db = throwaway_db().await;
    // The table, created by the superuser, and a role that may use it
    // over two connections at most.
    store(&db).await.close().await;
    db.client()
        .await
        .expect("admin connection")
        .batch_execute(
            "CREATE ROLE limited LOGIN CONNECTION LIMIT 2; \
             GRANT ALL ON session_store TO limited",
        )
        .await
        .expect("role");
    let url = db
        .url()
        .replacen("postgres://postgres@", "postgres://limited@", 1);
    let store = store_with(
        config(&url)
            .pool_size(5)
            .pool_max_size(10)
            .breaker_threshold(1)
            // The self-sizing pool and the server's free slots are looked
            // at during the load.
            .health_check_interval(Duration::from_millis(200)),
    )
    .await;
    let watch = Watch::start(&store);

    let ok = Arc::new(AtomicUsize::new(0));
    let callers: Vec<_> = (0..CALLERS)
        .map(|c| {
            let (store, ok) = (store.clone(), ok.clone());
            tokio::spawn(async move {
                let sid = format!("caller-{c}");
                let mut failures = Vec::new();
                for round in 0..ROUNDS {
                    let json = format!(r#"{{"round":{round}}}"#);
                    let saved = store.save(&sid, &json, in_secs(600)).await.map(drop);
                    // Touches are not batched: each takes a connection.
                    let touched = store.touch(&sid, in_secs(900)).await.map(drop);
                    let loaded = store.load(&sid).await.map(drop);
                    for result in [saved, touched, loaded] {
                        match result {
                            Ok(()) => drop(ok.fetch_add(1, Ordering::Relaxed)),
                            Err(e) => failures.push(e),
                        }
                    }
                }
                failures
            })
        })
        .collect();
    let mut failures = Vec::new();
    for caller in callers {
        failures.extend(caller.await.expect("caller"));
    }
    let ok = ok.load(Ordering::Relaxed);
    eprintln!(
        "{ok} operations succeeded, {} failed; pool {:?}",
        failures.len(),
        store.pool_status()
    );
    watch.assert_never_away(&store).await;
    let others: Vec<_> = failures
        .iter()
        .filter(|e| e.kind() != ErrorKind::Acquire)
        .map(ToString::to_string)
        .collect();
    assert!(others.is_empty(), "not acquire timeouts: {others:?}");
    assert!(
        ok >= 3 * failures.len(),
        "{ok} succeeded, {} failed",
        failures.len()
    );
    let pool = store.pool_status();
    assert!(pool.max <= 2, "the pool did not learn the limit: {pool:?}");
    // Shown on the dashboard at the pool's next upkeep.
    wait_for("the pool_limit event", async || {
        store.recent_events().iter().any(|e| e.kind == "pool_limit")
    })
    .await;
    store.close().await;

    let text = capture.text();
    let warnings: Vec<_> = text
        .lines()
        .filter(|line| line.contains("refuses more connections"))
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert!(
        warnings[0].contains("WARN")
            && warnings[0].contains("53300")
            && warnings[0].contains("PGSESSION_POOL_SIZE"),
        "{}",
        warnings[0]
    );
}

#[tokio::test]
async fn a_missing_database_is_a_configuration_error_shown_until_mended() {
    let (capture, _guard) = Capture::start();
    let db = test_db().await;
    let missing = format!("{}_missing", db.name());
    let url = db.url().replacen(db.name(), &missing, 1);
    let store =
        Store::new(config(&url).breaker_threshold(1).build().expect("config")).expect("store");
    for _ in 0..3 {
        let saved = store.save("sid", "{}", in_secs(60)).await;
        let loaded = store.load("sid").await.map(drop);
        for error in [saved.unwrap_err(), loaded.unwrap_err()] {
            assert_eq!(error.sql_state(), Some("3D000"), "{error}");
            let hint = error
                .config_hint()
                .unwrap_or_else(|| panic!("no hint: {error}"));
            assert!(hint.contains("DATABASE_URL"), "{hint}");
            assert!(!error.is_outage() && !error.is_transient(), "{error}");
        }
    }
    assert_eq!(store.breaker_state(), BreakerState::Closed);
    assert_eq!(store.journal_len(), 0);
    let health = store.health();
    assert_eq!(health.status, HealthStatus::Degraded);
    let shown = health.config_error.expect("config_error in /health");
    assert!(shown.contains("does not exist"), "{shown}");
    assert!(
        store
            .recent_events()
            .iter()
            .any(|e| e.kind == "config_error"),
        "{:?}",
        store.recent_events()
    );
    let text = capture.text();
    let logged: Vec<_> = text
        .lines()
        .filter(|line| line.contains("configuration error, not an outage"))
        .collect();
    assert_eq!(logged.len(), 1, "once for six requests: {logged:#?}");
    assert!(logged[0].contains("ERROR"), "{}", logged[0]);

    // Mended: the next operation succeeds and clears it.
    let admin = db.client().await.expect("admin connection");
    admin
        .batch_execute(&format!("CREATE DATABASE \"{missing}\""))
        .await
        .expect("create the database");
    store
        .save("sid", "{}", in_secs(60))
        .await
        .expect("saved once the database exists");
    assert_eq!(store.health().config_error, None);
    assert!(capture.text().contains("the configuration error is gone"));
    store.close().await;
    admin
        .batch_execute(&format!("DROP DATABASE \"{missing}\" WITH (FORCE)"))
        .await
        .expect("drop the database");
}

#[tokio::test]
async fn a_wrong_password_is_a_configuration_error_not_an_outage() {
    // Passwords for every role but the test kit's own.
    let hba = "local all all trust\n\
               host all postgres 127.0.0.1/32 trust\n\
               host all all 127.0.0.1/32 scram-sha-256\n";
    let cluster = TestCluster::start_with(ClusterOptions {
        files: vec![("pg_hba.conf".into(), hba.as_bytes().to_vec(), 0o600)],
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("no throwaway PostgreSQL: {e}"));
    cluster.create_database("pw").await.expect("database");
    let admin = pgsession_testkit::TestDb::existing(cluster.url("pw"), "pw");
    let admin = admin.client().await.expect("admin connection");
    admin
        .batch_execute("CREATE ROLE app LOGIN PASSWORD 'right'; ALTER DATABASE pw OWNER TO app")
        .await
        .expect("role");
    let url = format!("postgres://app:wrong@127.0.0.1:{}/pw", cluster.port());
    let store =
        Store::new(config(&url).breaker_threshold(1).build().expect("config")).expect("store");

    let error = store.save("sid", "{}", in_secs(60)).await.unwrap_err();
    assert_eq!(error.sql_state(), Some("28P01"), "{error}");
    let hint = error
        .config_hint()
        .unwrap_or_else(|| panic!("no hint: {error}"));
    assert!(hint.contains("password"), "{hint}");
    assert!(
        !error.to_string().contains("wrong"),
        "the password leaked: {error}"
    );
    assert_eq!(store.breaker_state(), BreakerState::Closed);
    assert_eq!(store.journal_len(), 0);
    let shown = store
        .health()
        .config_error
        .expect("config_error in /health");
    assert!(shown.contains("password authentication failed"), "{shown}");
    assert!(!shown.contains("wrong"), "the password leaked: {shown}");

    // The password the store has becomes the right one.
    admin
        .batch_execute("ALTER ROLE app PASSWORD 'wrong'")
        .await
        .expect("password");
    store
        .save("sid", "{}", in_secs(60))
        .await
        .expect("saved with the password mended");
    assert_eq!(store.health().config_error, None);
    store.close().await;
}
