//! High availability on the engine operators run: a PostgreSQL cluster managed by Patroni (with
//! one etcd member), from the test kit's `patroni` module, under the load of the fault suite
//! (`pgsession serve` run as a process, 8 users each looping `POST /counter`; the suite's helpers
//! are shared). The leader is killed, switched over, comes back as a replica; replication is
//! synchronous, then asynchronous; and once, the production shape: three servers behind
//! PgBouncer, which is re-pointed at each new leader. Each scenario asserts what it promises and
//! prints one `FIGURES <scenario> k=v ...` line (see RELIABILITY.md, "High availability"):
//!
//! ```text
//! cargo test -p pgsession-cli --test ha -- --nocapture
//! ```
//!
//! They need Debian's `patroni` and `etcd-server` (and `pgbouncer` for the production shape)
//! besides the PostgreSQL binaries, and fail, never skip, without them.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use pgsession_testkit::patroni::{PatroniCluster, PatroniOptions};
use pgsession_testkit::TestDb;

#[path = "../common/mod.rs"]
mod common;
// The fault suite's load, monitor, "nothing lost" check and figures; not every helper is used.
#[allow(dead_code)]
#[path = "../faults/support.rs"]
mod support;

// The leader's PostgreSQL and Patroni killed under load, synchronous replication.
mod leader_crash;
// `patronictl switchover` under load.
mod switchover;
// The killed leader started again: it returns as a replica, and nothing is written to it.
mod old_leader_returns;
// The leader killed under load with asynchronous replication: PostgreSQL's own window.
mod async_crash;
// Three servers behind PgBouncer, re-pointed at the new leader, through a leader crash.
mod production;

/// Users of every scenario, as in the fault suite.
pub(crate) const USERS: usize = 8;
/// How long an election, a rejoin or a write-back may take before a scenario fails.
pub(crate) const BOUND: Duration = Duration::from_secs(60);

/// A Patroni cluster of `nodes`, or a failure that says what is missing.
pub(crate) async fn patroni(nodes: usize, synchronous_mode: bool) -> PatroniCluster {
    patroni_with(PatroniOptions {
        nodes,
        synchronous_mode,
        ..PatroniOptions::default()
    })
    .await
}

/// A Patroni cluster set up as `options` says, or a failure that says what is missing.
pub(crate) async fn patroni_with(options: PatroniOptions) -> PatroniCluster {
    PatroniCluster::start(options)
        .await
        .unwrap_or_else(|e| panic!("this scenario needs Patroni, etcd and PostgreSQL: {e}"))
}

/// The cluster's database through its multi-host URL: on whichever node leads.
pub(crate) fn on_leader(cluster: &PatroniCluster) -> TestDb {
    TestDb::existing(cluster.url(), cluster.database())
}

/// A connection to node `i` alone (a standby answers reads).
pub(crate) async fn on_node(cluster: &PatroniCluster, i: usize) -> tokio_postgres::Client {
    TestDb::existing(cluster.node(i).url(cluster.database()), cluster.database())
        .client()
        .await
        .unwrap_or_else(|e| panic!("connect to {}: {e}", cluster.node(i).name()))
}

/// `sess->>'views'` of every session, by id.
pub(crate) async fn views_by_sid(db: &tokio_postgres::Client) -> BTreeMap<String, i64> {
    db.query(
        "SELECT sid, coalesce((sess->>'views')::bigint, 0) FROM session_store",
        &[],
    )
    .await
    .expect("read the views")
    .into_iter()
    .map(|row| (row.get(0), row.get(1)))
    .collect()
}

/// Every increment in the table.
pub(crate) async fn views_sum(db: &tokio_postgres::Client) -> i64 {
    views_by_sid(db).await.values().sum()
}

/// Waits (bounded) until a standby whose primary is gone has replayed all it received, so that
/// its table is what it will be promoted with.
pub(crate) async fn wait_replayed(standby: &tokio_postgres::Client) {
    let deadline = Instant::now() + BOUND;
    loop {
        let replayed: bool = standby
            .query_one(
                "SELECT coalesce(pg_last_wal_replay_lsn() >= pg_last_wal_receive_lsn(), true)",
                &[],
            )
            .await
            .expect("replay position")
            .get(0);
        if replayed {
            return;
        }
        assert!(Instant::now() < deadline, "the standby did not replay");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits (at most [`BOUND`]) until the table on `db` holds more than `baseline` increments;
/// returns when (since `t0`), or `None`.
pub(crate) async fn first_write_above(
    db: &tokio_postgres::Client,
    baseline: i64,
    t0: Instant,
) -> Option<Duration> {
    let deadline = Instant::now() + BOUND;
    while Instant::now() < deadline {
        // The new leader may still be restarting its connections: an error is "not yet".
        let sum: Option<i64> = db
            .query_one(
                "SELECT coalesce(sum((sess->>'views')::bigint), 0)::bigint FROM session_store",
                &[],
            )
            .await
            .ok()
            .map(|row| row.get(0));
        if sum.is_some_and(|sum| sum > baseline) {
            return Some(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Whether node `i` is a standby (in recovery).
pub(crate) async fn in_recovery(db: &tokio_postgres::Client) -> bool {
    db.query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .expect("pg_is_in_recovery")
        .get(0)
}
