//! Behind PgBouncer in transaction mode (Debian's `pgbouncer`, started by the test kit): no
//! session state survives a transaction, so no named prepared statements (PgBouncer before
//! 1.21), no startup `options`, no session advisory locks. Every operation, the table's creation
//! and pruning work there, whether the pooler mode is configured (`PGSESSION_POOLER`) or
//! detected from PgBouncer's refusal of the `options` startup parameter; and two pruners never
//! run at once.
//!
//! PgBouncer keeps 4 server connections per database here and the store up to 5 client
//! connections, so consecutive transactions of one client connection run on different server
//! connections: a named statement prepared on one is missing on the next.

use std::time::Duration;

use pgsession::{PoolerMode, PruneOutcome, Store};
use pgsession_testkit::{PgBouncer, PgBouncerOptions, TestDb};

use crate::common::*;

/// Far from UTC, so that a statement depending on the connection's `TimeZone` (which the
/// store cannot set behind a transaction pooler) would be hours off.
const SERVER_TIME_ZONE: &str = "Pacific/Kiritimati";

/// A throwaway database, and PgBouncer in front of its cluster.
struct Bounced {
    db: TestDb,
    bouncer: PgBouncer,
}

impl Bounced {
    async fn start(options: PgBouncerOptions) -> Bounced {
        let db = throwaway_db().await;
        let cluster = db.cluster().expect("throwaway cluster");
        db.client()
            .await
            .unwrap()
            .batch_execute(&format!(
                "ALTER DATABASE {} SET timezone = '{SERVER_TIME_ZONE}'",
                db.name()
            ))
            .await
            .unwrap();
        let bouncer = PgBouncer::start_with(cluster.socket_addr(), options)
            .await
            .unwrap_or_else(|e| panic!("the pooler tests need pgbouncer: {e}"));
        Bounced { db, bouncer }
    }

    /// The test database through PgBouncer.
    fn url(&self) -> String {
        self.bouncer.url(self.db.name())
    }
}

/// What the table holds, read directly (not through PgBouncer).
async fn rows(db: &TestDb) -> i64 {
    scalar(db, "SELECT count(*) FROM session_store").await
}

/// Every operation once, then many at once; each must reach the table.
async fn exercise(store: &Store, db: &TestDb) {
    let json = r#"{"cookie":{"originalMaxAge":null,"path":"/"},"user":"alice"}"#;
    assert_eq!(store.load("nobody").await.unwrap(), None);
    store.save("sid-1", json, in_secs(3600)).await.unwrap();
    let loaded = store.load("sid-1").await.unwrap().expect("saved session");
    assert_eq!(loaded.json, json);
    assert!((loaded.expire - in_secs(3600)).abs() < time::Duration::seconds(5));
    assert!(store.touch("sid-1", in_secs(7200)).await.unwrap());
    assert!(!store.touch("missing", in_secs(7200)).await.unwrap());
    let touched = store.load("sid-1").await.unwrap().expect("touched session");
    assert!((touched.expire - in_secs(7200)).abs() < time::Duration::seconds(5));

    // Expiry is compared in UTC whatever the server's time zone.
    store.save("old", "{}", in_secs(-60)).await.unwrap();
    assert_eq!(store.load("old").await.unwrap(), None, "an expired session");
    assert_eq!(store.count().await.unwrap(), 1);
    assert_eq!(store.count_expired().await.unwrap(), 1);
    assert_eq!(
        store.prune().await.unwrap(),
        PruneOutcome::Pruned {
            deleted: 1,
            batches: 1
        }
    );
    store.destroy("sid-1").await.unwrap();
    store.destroy("sid-1").await.unwrap();
    assert_eq!(store.load("sid-1").await.unwrap(), None);
    assert_eq!(rows(db).await, 0);

    // Many at once: the store's connections take turns on PgBouncer's server connections.
    let tasks: Vec<_> = (0..20)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                let sid = format!("busy-{t}");
                for n in 0..20 {
                    let json = format!(r#"{{"n":{n}}}"#);
                    store.save(&sid, &json, in_secs(600)).await.unwrap();
                    let got = store.load(&sid).await.unwrap().expect("just saved");
                    assert_eq!(got.json, json, "{sid}");
                    assert!(store.touch(&sid, in_secs(900)).await.unwrap(), "{sid}");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("no operation failed");
    }
    // Nothing was carried by the fallback: every write is in the table.
    assert_eq!(store.journal_len(), 0);
    assert_eq!(store.breaker_state(), pgsession::BreakerState::Closed);
    let last: i64 = scalar(
        db,
        "SELECT count(*) FROM session_store WHERE sess->>'n' = '19' \
         AND expire > (now() AT TIME ZONE 'UTC') + interval '800 seconds'",
    )
    .await;
    assert_eq!(last, 20);
    assert_eq!(store.count().await.unwrap(), 20);
    assert_eq!(store.clear().await.unwrap(), 20);
}

/// Whether the table and its index on `expire` exist, read directly.
async fn table_and_index(db: &TestDb) -> (bool, i64) {
    let table = scalar(db, "SELECT to_regclass('public.session_store') IS NOT NULL").await;
    let indexes = scalar(
        db,
        "SELECT count(*) FROM pg_indexes WHERE tablename = 'session_store' \
         AND indexdef LIKE '%(expire)%'",
    )
    .await;
    (table, indexes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_works_through_pgbouncer_with_pooler_transaction() {
    let rig = Bounced::start(PgBouncerOptions::default()).await;
    assert_eq!(table_and_index(&rig.db).await, (false, 0));
    let builder = config(&rig.url())
        .vars([("PGSESSION_POOLER", "transaction")])
        .unwrap();
    let store = store_with(builder).await;
    assert_eq!(store.config().pooler(), PoolerMode::Transaction);
    // Created through PgBouncer.
    assert_eq!(table_and_index(&rig.db).await, (true, 1));
    // No startup options were sent: the server's own settings are in force.
    assert!(!store.server_statement_timeout());
    let info = store.server_info().await.unwrap();
    assert_eq!(
        (info.time_zone.as_str(), info.statement_timeout.as_str()),
        (SERVER_TIME_ZONE, "0")
    );
    exercise(&store, &rig.db).await;
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_detects_pgbouncer_from_its_refusal_of_startup_options() {
    let rig = Bounced::start(PgBouncerOptions::default()).await;
    // Not told about the pooler.
    let store = store_with(config(&rig.url())).await;
    assert_eq!(store.config().pooler(), PoolerMode::Direct);
    assert!(
        !store.server_statement_timeout(),
        "the pool kept sending the options PgBouncer refuses"
    );
    assert_eq!(table_and_index(&rig.db).await, (true, 1));
    exercise(&store, &rig.db).await;
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_options_ignored_by_pgbouncer_the_configured_mode_works() {
    // PgBouncer drops `options` silently: nothing to detect, the operator says it.
    let rig = Bounced::start(PgBouncerOptions {
        ignore_startup_parameters: vec!["options".into()],
        ..PgBouncerOptions::default()
    })
    .await;
    let store = store_with(config(&rig.url()).pooler(PoolerMode::Transaction)).await;
    exercise(&store, &rig.db).await;
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_starting_together_through_pgbouncer_create_the_table_once() {
    let rig = Bounced::start(PgBouncerOptions::default()).await;
    let url = rig.url();
    let starts = (0..4).map(|i| {
        let mode = if i % 2 == 0 {
            PoolerMode::Transaction
        } else {
            PoolerMode::Direct // detected
        };
        store_with(config(&url).pooler(mode))
    });
    let stores = futures_util::future::join_all(starts).await;
    assert_eq!(table_and_index(&rig.db).await, (true, 1));
    for (i, store) in stores.iter().enumerate() {
        store
            .save(&format!("sid-{i}"), "{}", in_secs(60))
            .await
            .unwrap();
        store.close().await;
    }
    assert_eq!(rows(&rig.db).await, 4);
}

/// `n` expired rows.
async fn fill_expired(client: &tokio_postgres::Client, n: i32) {
    client
        .execute(
            "INSERT INTO session_store (sid, sess, expire) \
             SELECT 'old' || g, '{}', (now() AT TIME ZONE 'UTC') - interval '1 hour' \
             FROM generate_series(1, $1::int) g",
            &[&n],
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pruners_through_pgbouncer_never_run_at_once() {
    let rig = Bounced::start(PgBouncerOptions::default()).await;
    let a = store_with(config(&rig.url()).prune_batch_size(20)).await;
    let b = store_with(
        config(&rig.url())
            .prune_batch_size(20)
            .pooler(PoolerMode::Transaction),
    )
    .await;
    // Every DELETE statement records when it ran, in which transaction; each takes a
    // millisecond at least, so that two running at once would overlap.
    let direct = rig.db.client().await.unwrap();
    direct
        .batch_execute(
            "CREATE TABLE prune_log (xid bigint, started timestamptz, ended timestamptz);
             CREATE FUNCTION prune_started() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               INSERT INTO prune_log VALUES (txid_current(), clock_timestamp(), NULL);
               PERFORM pg_sleep(0.001);
               RETURN NULL;
             END $$;
             CREATE FUNCTION prune_ended() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               UPDATE prune_log SET ended = clock_timestamp() WHERE xid = txid_current();
               RETURN NULL;
             END $$;
             CREATE TRIGGER prune_started BEFORE DELETE ON session_store
               FOR EACH STATEMENT EXECUTE FUNCTION prune_started();
             CREATE TRIGGER prune_ended AFTER DELETE ON session_store
               FOR EACH STATEMENT EXECUTE FUNCTION prune_ended();",
        )
        .await
        .unwrap();
    fill_expired(&direct, 2000).await;

    // Started together, then the second a little after the first, then the other way round.
    let mut outcomes = Vec::new();
    for (round, stagger_a, stagger_b) in [(1, 0, 0), (2, 0, 30), (3, 30, 0)] {
        if round > 1 {
            fill_expired(&direct, 1000).await;
        }
        let later = |ms| tokio::time::sleep(Duration::from_millis(ms));
        let (ra, rb) = tokio::join!(
            async {
                later(stagger_a).await;
                a.prune().await
            },
            async {
                later(stagger_b).await;
                b.prune().await
            }
        );
        let round_outcomes = [ra.unwrap(), rb.unwrap()];
        let deleted: u64 = round_outcomes
            .iter()
            .map(|o| match o {
                PruneOutcome::Pruned { deleted, .. } => *deleted,
                PruneOutcome::Skipped => 0,
            })
            .sum();
        assert_eq!(
            deleted,
            if round == 1 { 2000 } else { 1000 },
            "{round_outcomes:?}"
        );
        assert_eq!(rows(&rig.db).await, 0);
        outcomes.push(round_outcomes);
    }

    // Behind a transaction pooler each batch is a transaction holding the lock: a pruner stops
    // when it finds the lock taken, so the two may take turns, but never overlap.
    let overlaps: i64 = scalar(
        &rig.db,
        "SELECT count(*) FROM prune_log x JOIN prune_log y ON x.xid < y.xid \
         AND tstzrange(x.started, x.ended) && tstzrange(y.started, y.ended)",
    )
    .await;
    let statements: i64 = scalar(&rig.db, "SELECT count(*) FROM prune_log").await;
    let unfinished: i64 = scalar(
        &rig.db,
        "SELECT count(*) FROM prune_log WHERE ended IS NULL",
    )
    .await;
    assert_eq!((overlaps, unfinished), (0, 0), "{outcomes:?}");
    assert!(statements >= 3 * 51, "{statements} DELETE statements");
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pgbouncer_restart_is_a_transient_failure_the_store_rides_out() {
    let rig = Bounced::start(PgBouncerOptions::default()).await;
    let store = store_with(config(&rig.url()).pooler(PoolerMode::Transaction)).await;
    store.save("sid", r#"{"n":1}"#, in_secs(60)).await.unwrap();
    rig.bouncer.restart().await.unwrap();
    // The pooled connections were cut: the next operations reconnect by themselves.
    store.save("sid", r#"{"n":2}"#, in_secs(60)).await.unwrap();
    assert_eq!(
        store.load("sid").await.unwrap().expect("saved").json,
        r#"{"n":2}"#
    );
    rig.bouncer.stop().await.unwrap();
    let write = store.save("sid", r#"{"n":3}"#, in_secs(60));
    // Accepted into the journal while PgBouncer is away, written back once it returns.
    tokio::time::timeout(Duration::from_secs(30), write)
        .await
        .expect("a write waited for PgBouncer")
        .unwrap();
    rig.bouncer.start_again().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let n: Option<String> = scalar(
            &rig.db,
            "SELECT max(sess->>'n') FROM session_store WHERE sid = 'sid'",
        )
        .await;
        if n.as_deref() == Some("3") && store.journal_len() == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the journaled write never reached the table (n = {n:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    store.close().await;
}

/// A PgBouncer configured with `ignore_startup_parameters = options` (common advice for
/// drivers that send it) accepts the startup options and drops them: there is no refusal to
/// detect, and named prepared statements meet "prepared statement \"sN\" does not exist"
/// (26000) on the next server connection, a permanent error, on every operation.
///
/// The pool notices that its options did not take effect (a marker setting it sends is
/// missing) and switches to unnamed statements, as after a refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pgbouncer_that_ignores_startup_options_is_detected_too() {
    let rig = Bounced::start(PgBouncerOptions {
        ignore_startup_parameters: vec!["options".into()],
        ..PgBouncerOptions::default()
    })
    .await;
    let store = store_with(config(&rig.url())).await;
    // A few operations from several tasks at once, so that the store's connections take turns
    // on PgBouncer's server connections.
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                let sid = format!("sid-{t}");
                let mut errors = Vec::new();
                for n in 0..10 {
                    let json = format!(r#"{{"n":{n}}}"#);
                    if let Err(e) = store.save(&sid, &json, in_secs(60)).await {
                        errors.push(format!("save: {e}"));
                    }
                    if let Err(e) = store.load(&sid).await {
                        errors.push(format!("load: {e}"));
                    }
                }
                errors
            })
        })
        .collect();
    let mut errors = Vec::new();
    for task in tasks {
        errors.extend(task.await.unwrap());
    }
    assert!(
        errors.is_empty(),
        "{} of 160 operations failed, e.g. {:?}",
        errors.len(),
        &errors[..errors.len().min(3)]
    );
    assert!(
        !store.server_statement_timeout(),
        "the store believes the server enforces its statement timeout"
    );
    assert_eq!(store.clear().await.unwrap(), 8);
    exercise(&store, &rig.db).await;
    store.close().await;
}
