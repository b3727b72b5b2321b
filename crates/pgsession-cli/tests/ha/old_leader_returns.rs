//! The crashed leader returns: after the election, under load, its Patroni is started again.
//! Patroni sees another node holding the leader lock, rewinds the old data directory
//! (`pg_rewind`: commits that reached the old leader's WAL but were never confirmed by the
//! synchronous standby, so never acknowledged, are undone) and starts it as a replica.
//!
//! Asserted: it is in recovery; no `pgsession` session lives on it (`target_session_attrs=
//! read-write` refuses a read-only server at connect time); once it has replayed, its table is
//! the new leader's, which is exactly what clients were acknowledged. So nothing written to it
//! after the election reached a client.

use std::time::{Duration, Instant};

use crate::leader_crash::{crash_under_load, Crash};
use crate::support::{ms_after, tail};
use crate::{in_recovery, on_node, views_by_sid, BOUND};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_leader_returns_as_a_replica() {
    let mut outcome = crash_under_load(
        "ha_old_leader_returns",
        Crash {
            synchronous_mode: true,
            restart_old: true,
            replication_lag: None,
        },
    )
    .await;
    let cluster = &outcome.cluster;
    let on_old = on_node(cluster, outcome.old).await;
    let on_new = on_node(cluster, outcome.new).await;
    let old_in_recovery = in_recovery(&on_old).await;
    let leader_lsn: String = on_new
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("the leader's WAL position")
        .get(0);
    let deadline = Instant::now() + BOUND;
    loop {
        let replayed: bool = on_old
            .query_one(
                "SELECT coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, false)",
                &[&leader_lsn],
            )
            .await
            .expect("replay position")
            .get(0);
        if replayed {
            break;
        }
        assert!(Instant::now() < deadline, "the old leader did not catch up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let on_old_views = views_by_sid(&on_old).await;
    let on_new_views = views_by_sid(&on_new).await;
    let differ = on_new_views
        .iter()
        .filter(|(sid, v)| on_old_views.get(*sid) != Some(v))
        .count()
        + on_old_views
            .keys()
            .filter(|sid| !on_new_views.contains_key(*sid))
            .count();
    let pgsession_sessions: i64 = on_old
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgsession'",
            &[],
        )
        .await
        .expect("pg_stat_activity")
        .get(0);
    let rejoined_after_kill = ms_after(outcome.rejoined_at, outcome.kill_at);
    outcome
        .figures
        .set("old_leader_streaming_after_kill_ms", rejoined_after_kill)
        .set("old_leader_in_recovery", old_in_recovery)
        .set("pgsession_sessions_on_old_leader", pgsession_sessions)
        .set("rows_differing_old_vs_new", differ)
        .print();

    let logs = outcome.serve.stderr();
    assert!(old_in_recovery, "the old leader came back as a primary");
    assert_eq!(
        pgsession_sessions, 0,
        "pgsession holds connections on a read-only node"
    );
    assert_eq!(
        differ, 0,
        "the old leader's table differs from the new leader's once replayed"
    );
    assert!(
        outcome.recovered_at.is_some(),
        "the server did not settle on the new leader\n{}",
        tail(&logs, 60)
    );
    assert!(
        outcome.report.mismatches.is_empty(),
        "{:#?}",
        outcome.report.mismatches
    );
    outcome.stored.assert_nothing_lost(&logs);
}
