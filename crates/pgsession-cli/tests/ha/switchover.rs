//! A planned switchover under load (`patronictl switchover --force`, as an operator does before
//! maintenance of the leader's machine): Patroni stops the leader cleanly, promotes the
//! synchronous standby, and starts the old leader again as its replica. The targets: 0 non-2xx
//! answers and 0 acknowledged writes lost. Measured: how long the switchover took, and the first
//! write on the new leader.

use std::time::{Duration, Instant};

use crate::common::ServeProcess;
use crate::support::{
    base, breaker_not_closed, check_stored, http, login_users, ms_after, settled,
    spawn_counter_load, tail, wait_settled, Figures, Monitor,
};
use crate::{first_write_above, in_recovery, on_leader, on_node, patroni, views_sum, BOUND, USERS};

const BEFORE: Duration = Duration::from_secs(2);
const AFTER: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_under_load() {
    let cluster = patroni(2, true).await;
    let serve = ServeProcess::start_ready(&cluster.url(), &[]).await;
    let http = http();
    let base = base(&serve);
    let users = login_users(&http, &base, USERS).await;

    let t0 = Instant::now();
    let monitor = Monitor::start(&http, &base, t0);
    let (stop, load) = spawn_counter_load(&http, &base, users, t0, BEFORE + 3 * BOUND);
    tokio::time::sleep_until((t0 + BEFORE).into()).await;

    let old = cluster.leader().await.expect("a leader");
    let candidate = 1 - old;
    let switch_at = t0.elapsed();
    let new = cluster
        .switchover(Some(candidate))
        .await
        .expect("patronictl switchover");
    let switched_at = t0.elapsed();
    assert_eq!(new, candidate);
    let on_new = on_node(&cluster, new).await;
    // Promoted: from then on, only `serve` writes there.
    let deadline = Instant::now() + BOUND;
    while in_recovery(&on_new).await {
        assert!(Instant::now() < deadline, "the candidate was not promoted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let promoted_at = t0.elapsed();
    let baseline = views_sum(&on_new).await;
    let first_write_at = first_write_above(&on_new, baseline, t0).await;
    let recovered_at = monitor
        .wait_for(first_write_at.unwrap_or(promoted_at), BOUND, settled)
        .await;
    // The old leader is back, as a replica.
    cluster
        .wait_replica(old, BOUND)
        .await
        .expect("the old leader streams again");
    let old_back_at = t0.elapsed();
    tokio::time::sleep(AFTER).await;
    stop.stop();
    let report = load.await.expect("load");
    let settle = wait_settled(&http, &serve, BOUND).await;
    let opened_at = monitor.first_after(switch_at, breaker_not_closed);
    let history = monitor.breaker_history();
    let samples = monitor.finish().await;
    let journal_peak = samples.iter().filter_map(|s| s.journal).max().unwrap_or(0);
    let stored = check_stored(&on_leader(&cluster), &report.users).await;

    Figures::new("ha_switchover")
        .set("nodes", 2)
        .set("synchronous_mode", true)
        .set("users", USERS)
        .set("switchover_took_ms", ms_after(Some(switched_at), switch_at))
        .set(
            "new_leader_promoted_after_start_ms",
            ms_after(Some(promoted_at), switch_at),
        )
        .set(
            "first_new_leader_write_after_start_ms",
            ms_after(first_write_at, switch_at),
        )
        .set(
            "breaker_open_after_start_ms",
            ms_after(opened_at, switch_at),
        )
        .set("recovery_after_start_ms", ms_after(recovered_at, switch_at))
        .set(
            "old_leader_replica_after_start_ms",
            ms_after(Some(old_back_at), switch_at),
        )
        .load(&report)
        .set("journal_peak", journal_peak)
        .set("breaker_history", history)
        .set("settle_ms", settle.as_millis())
        .stored(&stored)
        .print();

    let logs = serve.stderr();
    assert!(
        first_write_at.is_some(),
        "no write reached the new leader\n{}",
        tail(&logs, 60)
    );
    assert!(
        recovered_at.is_some(),
        "the server did not settle on the new leader within {BOUND:?}"
    );
    let refused = report.failures();
    assert!(
        refused.is_empty(),
        "a planned switchover answered other than 2xx: {refused:?}\n{}",
        tail(&logs, 60)
    );
    assert!(report.mismatches.is_empty(), "{:#?}", report.mismatches);
    assert!(report.replaced.is_empty(), "{:#?}", report.replaced);
    stored.assert_nothing_lost(&logs);
}
