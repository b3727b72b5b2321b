//! A primary and a synchronous standby (the test kit's `ReplicaPair`): a URL with both hosts and
//! `target_session_attrs=read-write` reaches the primary whatever the order; a write that lands
//! on a read-only server (SQLSTATE 25006) is a transient failure whose connection is thrown
//! away, so that once the standby is promoted the same store writes to it.
//!
//! The failover under load, with its figures, is in the command's suite
//! (`crates/pgsession-cli/tests/failover`).

use std::time::Duration;

use pgsession::{BreakerState, Store};
use pgsession_testkit::{FaultProxy, ReplicaPair, TestDb};
use tokio_postgres::config::TargetSessionAttrs;

use crate::common::*;

async fn replica_pair() -> ReplicaPair {
    ReplicaPair::start()
        .await
        .unwrap_or_else(|e| panic!("no primary and standby: {e}"))
}

/// Creates the session table on the primary and waits until the standby has it.
async fn create_table(pair: &ReplicaPair) {
    let store = store_with(config(&pair.primary_url())).await;
    store.close().await;
    pair.wait_caught_up().await.unwrap();
}

/// Both hosts, the standby first, with `target_session_attrs` if given.
fn standby_first(pair: &ReplicaPair, attrs: Option<&str>) -> String {
    let mut url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{}",
        pair.standby().port(),
        pair.primary().port(),
        pair.database()
    );
    if let Some(attrs) = attrs {
        url.push_str(&format!("?target_session_attrs={attrs}"));
    }
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_host_url_with_read_write_reaches_the_primary() {
    let pair = replica_pair().await;
    create_table(&pair).await;

    let url = standby_first(&pair, Some("read-write"));
    let store = store_with(config(&url)).await;
    let pg = store.config().postgres();
    assert_eq!(pg.get_hosts().len(), 2);
    assert_eq!(pg.get_target_session_attrs(), TargetSessionAttrs::ReadWrite);
    assert!(store
        .config()
        .target()
        .contains(&pair.standby().port().to_string()));
    let info = store.server_info().await.unwrap();
    assert!(!info.in_recovery, "connected to the standby");
    store.save("sid", r#"{"n":1}"#, in_secs(60)).await.unwrap();
    assert_eq!(store.journal_len(), 0);
    let on_primary = TestDb::existing(pair.primary_url(), pair.database());
    let stored: i64 = scalar(&on_primary, "SELECT count(*) FROM session_store").await;
    assert_eq!(stored, 1);
    store.close().await;

    // Without the parameter, the first host answers, standby or not: it is what selects.
    let any = store_with(config(&standby_first(&pair, None))).await;
    assert!(any.server_info().await.unwrap().in_recovery);
    any.close().await;

    // The same through the environment, as `pgsession serve` reads it.
    let from_env = pgsession::Config::builder()
        .vars([("DATABASE_URL", url.as_str())])
        .unwrap()
        .build()
        .unwrap();
    assert_eq!(
        from_env.postgres().get_target_session_attrs(),
        TargetSessionAttrs::ReadWrite
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_a_read_only_server_is_transient_and_discards_its_connection() {
    let pair = replica_pair().await;
    create_table(&pair).await;

    // The standby alone, one connection, a breaker that does not open: each failed attempt
    // shows in the pool's figures.
    let store = store_with(
        config(&pair.standby_url())
            .pool_size(1)
            .min_idle(0)
            .breaker_threshold(1_000)
            .query_timeout(Duration::from_secs(2)),
    )
    .await;
    let reader = store.server_info().await.unwrap();
    assert!(reader.in_recovery);
    assert_eq!(store.count().await.unwrap(), 0, "reads work on a standby");

    // Without retries, the server's answer as it is.
    let refused = store.prune().await.unwrap_err();
    assert_eq!(refused.sql_state(), Some("25006"), "{refused}");
    assert!(refused.is_transient(), "{refused}");

    // With retries: each attempt's connection is thrown away, and a new one opened.
    let opened = store.pool_status().opened_total;
    let failed = store.clear().await.unwrap_err();
    assert!(failed.is_transient(), "{failed}");
    let attempts = store.pool_status().opened_total - opened;
    assert!(
        attempts >= 2,
        "after a write on a read-only server the connection went back to the pool \
         ({attempts} opened during the retries)"
    );
    assert_ne!(
        store.server_info().await.unwrap().backend_pid,
        reader.backend_pid,
        "the connection that met 25006 was reused"
    );

    // A session write is accepted into the journal meanwhile.
    store.save("sid", r#"{"n":1}"#, in_secs(60)).await.unwrap();
    assert_eq!(store.journal_len(), 1);

    pair.stop_primary().await.unwrap();
    pair.promote_standby().await.unwrap();

    // The same store, no new configuration: the journal is written back, and writes succeed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while store.journal_len() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the journal was never written back to the promoted standby"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let promoted = TestDb::existing(pair.standby_url(), pair.database());
    let n: Option<String> = scalar(
        &promoted,
        "SELECT sess->>'n' FROM session_store WHERE sid = 'sid'",
    )
    .await;
    assert_eq!(n.as_deref(), Some("1"));
    store.save("sid", r#"{"n":2}"#, in_secs(60)).await.unwrap();
    assert_eq!(store.journal_len(), 0, "the write went to the journal");
    let n: Option<String> = scalar(
        &promoted,
        "SELECT sess->>'n' FROM session_store WHERE sid = 'sid'",
    )
    .await;
    assert_eq!(n.as_deref(), Some("2"));
    assert_eq!(store.clear().await.unwrap(), 1);
    assert!(!store.server_info().await.unwrap().in_recovery);
    assert_eq!(store.breaker_state(), BreakerState::Closed);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_the_store_finds_the_new_primary_by_itself() {
    let pair = replica_pair().await;
    let store: Store = store_with(
        config(&pair.url())
            .connect_timeout(Duration::from_secs(2))
            .query_timeout(Duration::from_secs(3)),
    )
    .await;
    store
        .save("before", r#"{"n":1}"#, in_secs(600))
        .await
        .unwrap();
    assert_eq!(store.journal_len(), 0);

    pair.stop_primary().await.unwrap();
    // No writable server: writes wait in the journal.
    store
        .save("during", r#"{"n":2}"#, in_secs(600))
        .await
        .unwrap();
    assert!(store.journal_len() >= 1);
    // An acknowledged write survived on the standby.
    assert_eq!(
        store
            .load("before")
            .await
            .unwrap()
            .expect("cached or read")
            .json,
        r#"{"n":1}"#
    );

    pair.promote_standby().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while store.journal_len() > 0 || store.breaker_state() != BreakerState::Closed {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never recovered: journal {}, breaker {:?}",
            store.journal_len(),
            store.breaker_state()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let promoted = TestDb::existing(pair.standby_url(), pair.database());
    let stored: Vec<String> = promoted
        .client()
        .await
        .unwrap()
        .query(
            "SELECT sid || '=' || (sess->>'n') FROM session_store ORDER BY sid",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(stored, ["before=1", "during=2"]);
    store
        .save("after", r#"{"n":3}"#, in_secs(600))
        .await
        .unwrap();
    assert_eq!(store.journal_len(), 0);
    assert!(!store.server_info().await.unwrap().in_recovery);
    store.close().await;
}

/// The failover a dead machine causes: the old primary, first in the URL, does not answer at
/// all (a fault proxy in front of it swallows everything, as a vanished host or a partition
/// does), and the standby, second, is promoted. A new connection must give up on the first
/// host in time to try the second.
///
/// tokio-postgres alone tries the hosts one after the other and bounds only the TCP connect
/// of each, not the start-up handshake; the pool gives each host the connect timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_first_host_does_not_hide_the_promoted_second() {
    let pair = replica_pair().await;
    let proxy = FaultProxy::start(pair.primary().socket_addr())
        .await
        .unwrap();
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{}?target_session_attrs=read-write",
        proxy.port(),
        pair.standby().port(),
        pair.database()
    );
    let store = store_with(
        config(&url)
            .connect_timeout(Duration::from_secs(3))
            .query_timeout(Duration::from_secs(5)),
    )
    .await;
    store
        .save("before", r#"{"n":1}"#, in_secs(600))
        .await
        .unwrap();
    assert_eq!(store.journal_len(), 0);

    // The primary's machine goes silent; its pooled connections are gone.
    proxy.blackhole(true);
    proxy.reset_all();
    pair.stop_primary().await.unwrap();
    pair.promote_standby().await.unwrap();
    let promoted_at = tokio::time::Instant::now();
    store
        .save("after", r#"{"n":2}"#, in_secs(600))
        .await
        .unwrap();

    // A few connect timeouts are plenty to get past the first host.
    let promoted = TestDb::existing(pair.standby_url(), pair.database());
    let deadline = promoted_at + Duration::from_secs(20);
    loop {
        let stored: i64 = scalar(
            &promoted,
            "SELECT count(*) FROM session_store WHERE sid = 'after'",
        )
        .await;
        if stored == 1 {
            eprintln!(
                "behind a silent first host, a write reached the promoted standby {:?} after \
                 the promotion (connect timeout 3 s)",
                promoted_at.elapsed()
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the store never reached the promoted standby behind the silent first host \
             (journal {}, breaker {:?}, pool {:?})",
            store.journal_len(),
            store.breaker_state(),
            store.pool_status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    store.close().await;
}

/// After a failover behind a silent first host, the pool keeps opening connections (it grows
/// under load, replaces used-up ones): each must not pay the connect timeout on the silent host
/// again, or requests stall for that long, long after the failover (with the default connect
/// timeout of 20 s, for 20 s each time).
///
/// FAILS at the time of writing (library issue, reported): every new connection tries the
/// hosts in the URL's order, so each waits out the connect timeout on the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_new_connections_do_not_wait_on_the_silent_host() {
    let pair = replica_pair().await;
    let proxy = FaultProxy::start(pair.primary().socket_addr())
        .await
        .unwrap();
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{}?target_session_attrs=read-write",
        proxy.port(),
        pair.standby().port(),
        pair.database()
    );
    let connect_timeout = Duration::from_secs(3);
    let store = store_with(
        config(&url)
            .pool_size(5)
            .min_idle(1)
            .connect_timeout(connect_timeout)
            .query_timeout(Duration::from_secs(10)),
    )
    .await;
    proxy.blackhole(true);
    proxy.reset_all();
    pair.stop_primary().await.unwrap();
    pair.promote_standby().await.unwrap();
    // The first connection to the new primary (it waits out the silent host once).
    store.wait_ready().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while store.server_info().await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "never reconnected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Five operations at once, each holding a connection for a moment: the pool opens more.
    let opened = store.pool_status().opened_total;
    let started = tokio::time::Instant::now();
    let busy = (0..5).map(|_| {
        let store = store.clone();
        async move { store.server_info().await.map(drop) }
    });
    for result in futures_util::future::join_all(busy).await {
        result.unwrap();
    }
    let took = started.elapsed();
    assert!(
        store.pool_status().opened_total > opened,
        "no new connection was needed"
    );
    assert!(
        took < connect_timeout / 2,
        "new connections waited {took:?} (the connect timeout is {connect_timeout:?}): \
         each tried the silent host first"
    );
    store.close().await;
}

/// The breaker's probe must be able to get past a silent first host too: with no warm
/// connection kept (`min_idle` 0), it is the only way the store finds the promoted standby
/// once the breaker is open.
///
/// FAILS at the time of writing (library issue, reported): the probe
/// (`Store::probe_and_write_back`, and the health check) is bounded by the connect timeout,
/// while a new connection now takes the connect timeout on each silent host before the next:
/// every probe times out, the breaker never closes, the journal is never written back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_probe_gets_past_a_silent_first_host() {
    let pair = replica_pair().await;
    let proxy = FaultProxy::start(pair.primary().socket_addr())
        .await
        .unwrap();
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{}?target_session_attrs=read-write",
        proxy.port(),
        pair.standby().port(),
        pair.database()
    );
    let store = store_with(
        config(&url)
            .min_idle(0)
            .breaker_threshold(1)
            .connect_timeout(Duration::from_secs(2))
            .query_timeout(Duration::from_secs(3)),
    )
    .await;
    proxy.blackhole(true);
    proxy.reset_all();
    pair.stop_primary().await.unwrap();
    // Times out on the silent host: journaled, and the breaker opens.
    store
        .save("during", r#"{"n":1}"#, in_secs(600))
        .await
        .unwrap();
    assert_eq!(store.journal_len(), 1);
    assert_ne!(store.breaker_state(), BreakerState::Closed);
    pair.promote_standby().await.unwrap();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while store.journal_len() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the journal was never written back to the promoted standby (breaker {:?}, \
             pool {:?})",
            store.breaker_state(),
            store.pool_status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let promoted = TestDb::existing(pair.standby_url(), pair.database());
    let n: Option<String> = scalar(
        &promoted,
        "SELECT sess->>'n' FROM session_store WHERE sid = 'during'",
    )
    .await;
    assert_eq!(n.as_deref(), Some("1"));
    store.close().await;
}

/// A server error keeps the server's message: an operator reading the log learns that the
/// server is read-only, not just that there was "db error".
///
/// (The driver's own text for a server error is only "db error"; the server's message is
/// its `source`.)
#[tokio::test]
async fn a_server_error_keeps_the_servers_message() {
    let db = test_db().await;
    let store = store(&db).await; // creates the table
    store.close().await;
    db.client()
        .await
        .unwrap()
        .batch_execute(&format!(
            "ALTER DATABASE {} SET default_transaction_read_only = on",
            db.name()
        ))
        .await
        .unwrap();
    let store = store_with(config(db.url())).await;
    let refused = store.prune().await.unwrap_err();
    assert_eq!(refused.sql_state(), Some("25006"), "{refused}");
    let mut text = refused.to_string();
    let mut source = std::error::Error::source(&refused);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    assert!(
        text.contains("read-only transaction"),
        "the message lost the server's words: {text:?}"
    );
    store.close().await;
}
