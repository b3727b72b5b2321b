//! The production shape, end to end: three `serve` instances, PgBouncer in transaction mode in
//! front of a two-node Patroni cluster (synchronous), and the test kit's re-pointing step
//! (`PatroniCluster::follow_leader`: Patroni's REST API polled every 200 ms, PgBouncer's
//! `[databases]` line rewritten and `RELOAD`ed when the leader changes). The servers only know
//! PgBouncer's address. Each user is served by one instance (a load balancer with session
//! affinity; without it, a session's writes journaled by two instances during the outage
//! conflict, see RELIABILITY.md, `two_instances`).
//!
//! The leader crashes under load. Target: 0 acknowledged writes lost. Measured: the election,
//! PgBouncer's re-pointing, the first write on the new leader, and the share of non-2xx.

use std::time::{Duration, Instant};

use pgsession_testkit::{PgBouncer, PgBouncerOptions};

use crate::common::ServeProcess;
use crate::support::{
    base, check_stored, http, is_2xx, login_users_named, ms_after, settled, spawn_counter_load,
    tail, wait_settled, Figures, LoadReport, Monitor,
};
use crate::{
    first_write_above, on_leader, on_node, patroni, views_sum, wait_replayed, BOUND, USERS,
};

const SERVERS: usize = 3;
const BEFORE: Duration = Duration::from_secs(2);
const AFTER: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_behind_pgbouncer_through_a_leader_crash() {
    let cluster = patroni(2, true).await;
    let leader = cluster.leader().await.expect("a leader");
    let bouncer = PgBouncer::start_with(
        cluster.node(leader).socket_addr(),
        PgBouncerOptions {
            default_pool_size: 12,
            ..PgBouncerOptions::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("this scenario needs pgbouncer: {e}"));
    let follower = cluster.follow_leader(&bouncer);
    let url = bouncer.url(cluster.database());
    let mut servers = Vec::new();
    for _ in 0..SERVERS {
        servers.push(ServeProcess::start_ready(&url, &[]).await);
    }
    let bases: Vec<String> = servers.iter().map(base).collect();
    let http = http();

    let t0 = Instant::now();
    let monitors: Vec<Monitor> = bases.iter().map(|b| Monitor::start(&http, b, t0)).collect();
    let mut loads = Vec::new();
    for (k, b) in bases.iter().enumerate() {
        // 8 users over 3 servers: 3, 3 and 2.
        let count = (USERS + SERVERS - 1 - k) / SERVERS;
        let users = login_users_named(&http, b, &format!("s{k}user"), count).await;
        loads.push(spawn_counter_load(&http, b, users, t0, BEFORE + 3 * BOUND));
    }
    tokio::time::sleep_until((t0 + BEFORE).into()).await;

    let kill_at = t0.elapsed();
    let old = cluster.kill_leader().await.expect("kill the leader");
    let candidate = 1 - old;
    let standby = on_node(&cluster, candidate).await;
    wait_replayed(&standby).await;
    let baseline = views_sum(&standby).await;
    cluster
        .wait_new_leader(old, BOUND)
        .await
        .expect("a new leader");
    let elected_at = t0.elapsed();
    let first_write_at = first_write_above(&standby, baseline, t0).await;
    let mut recovered_at = Some(Duration::ZERO);
    for monitor in &monitors {
        let settled_at = monitor
            .wait_for(first_write_at.unwrap_or(elected_at), BOUND, settled)
            .await;
        recovered_at = recovered_at.zip(settled_at).map(|(a, b)| a.max(b));
    }
    tokio::time::sleep(AFTER).await;
    let mut report = LoadReport {
        users: Vec::new(),
        samples: Vec::new(),
        mismatches: Vec::new(),
        replaced: Vec::new(),
        unacked_landed: Vec::new(),
    };
    for (stop, load) in loads {
        stop.stop();
        let part = load.await.expect("load");
        report.users.extend(part.users);
        report.samples.extend(part.samples);
        report.mismatches.extend(part.mismatches);
        report.replaced.extend(part.replaced);
        report.unacked_landed.extend(part.unacked_landed);
    }
    report.samples.sort_by_key(|s| s.at);
    let mut settle = Duration::ZERO;
    for serve in &servers {
        settle = settle.max(wait_settled(&http, serve, BOUND).await);
    }
    let mut journal_peak = 0;
    for monitor in monitors {
        let samples = monitor.finish().await;
        journal_peak += samples.iter().filter_map(|s| s.journal).max().unwrap_or(0);
    }
    let repointed_at = follower
        .repoints()
        .into_iter()
        .map(|(at, node)| (at.saturating_duration_since(t0), node))
        .find(|(at, node)| *at >= kill_at && *node == candidate)
        .map(|(at, _)| at);
    drop(follower);
    let stored = check_stored(&on_leader(&cluster), &report.users).await;
    let during: Vec<_> = report
        .samples
        .iter()
        .filter(|s| s.at >= kill_at && s.at < recovered_at.unwrap_or(Duration::MAX))
        .collect();
    let non_2xx = report.requests() - report.ok();

    Figures::new("ha_production")
        .set("servers", SERVERS)
        .set("pooler", "pgbouncer_transaction")
        .set("nodes", 2)
        .set("synchronous_mode", true)
        .set("users", report.users.len())
        .set(
            "leader_elected_after_kill_ms",
            ms_after(Some(elected_at), kill_at),
        )
        .set(
            "pgbouncer_repointed_after_kill_ms",
            ms_after(repointed_at, kill_at),
        )
        .set(
            "first_new_leader_write_after_kill_ms",
            ms_after(first_write_at, kill_at),
        )
        .set("recovery_after_kill_ms", ms_after(recovered_at, kill_at))
        .set("during_requests", during.len())
        .set(
            "during_2xx",
            during.iter().filter(|s| is_2xx(s.status)).count(),
        )
        .set(
            "non_2xx_pct",
            format!(
                "{:.3}",
                100.0 * non_2xx as f64 / report.requests().max(1) as f64
            ),
        )
        .load(&report)
        .set("journal_peak_sum", journal_peak)
        .set("settle_ms", settle.as_millis())
        .stored(&stored)
        .print();

    let logs: String = servers
        .iter()
        .map(|s| tail(&s.stderr(), 30) + "\n")
        .collect();
    assert!(
        repointed_at.is_some(),
        "PgBouncer was not re-pointed at the new leader\n{}",
        bouncer.read_log().unwrap_or_default()
    );
    assert!(
        first_write_at.is_some(),
        "no write reached the new leader\n{logs}"
    );
    assert!(
        recovered_at.is_some(),
        "not every server settled on the new leader within {BOUND:?}\n{logs}"
    );
    assert!(report.mismatches.is_empty(), "{:#?}", report.mismatches);
    assert!(report.replaced.is_empty(), "{:#?}", report.replaced);
    stored.assert_nothing_lost(&logs);
}
