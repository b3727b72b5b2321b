//! The database unavailable for 30 s under load, two ways: the cluster
//! stopped (`pg_ctl stop -m fast`, then started again), and the proxy
//! refusing new connections after resetting the open ones. Logged-in users,
//! whose sessions the server has cached, keep being served (no 5xx); the
//! breaker opens within 2 s of the fault and closes after recovery; nothing
//! acknowledged is lost.

use std::time::{Duration, Instant};

use crate::common::ServeProcess;
use crate::support::{
    base, breaker_not_closed, check_stored, http, login_users, ms, ms_or_never, settled,
    spawn_counter_load, wait_settled, Figures, Monitor, Rig,
};

const USERS: usize = 8;
const BEFORE: Duration = Duration::from_secs(3);
const OUTAGE: Duration = Duration::from_secs(30);
/// The design's promise: the breaker is open within this of the fault.
const OPEN_WITHIN: Duration = Duration::from_secs(2);
/// How long recovery (breaker closed, journal written back) may take.
const RECOVERY_BOUND: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
enum Outage {
    StopCluster,
    ProxyRefuses,
}

async fn unavailable(scenario: &'static str, outage: Outage) {
    let rig = Rig::new().await;
    let serve = ServeProcess::start_ready(&rig.proxied_url(), &[]).await;
    let http = http();
    let base = base(&serve);
    let users = login_users(&http, &base, USERS).await;

    let t0 = Instant::now();
    let monitor = Monitor::start(&http, &base, t0);
    let (stop, load) = spawn_counter_load(
        &http,
        &base,
        users,
        t0,
        BEFORE + OUTAGE + RECOVERY_BOUND + Duration::from_secs(10),
    );

    tokio::time::sleep_until((t0 + BEFORE).into()).await;
    let fault_at = t0.elapsed();
    match outage {
        Outage::StopCluster => rig.cluster().stop().await.expect("stop the cluster"),
        Outage::ProxyRefuses => {
            rig.proxy.refuse(true);
            rig.proxy.reset_all();
        }
    }
    let fault_applied = t0.elapsed() - fault_at;
    tokio::time::sleep_until((t0 + fault_at + OUTAGE).into()).await;
    let heal_begins = t0.elapsed();
    match outage {
        Outage::StopCluster => rig
            .cluster()
            .start_again()
            .await
            .expect("start the cluster"),
        Outage::ProxyRefuses => rig.proxy.heal(),
    }
    let healed_at = t0.elapsed();
    let recovered_at = monitor.wait_for(healed_at, RECOVERY_BOUND, settled).await;
    // A little more load on the recovered server, then stop.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.stop();
    let report = load.await.expect("load");
    let settle = wait_settled(&http, &serve, Duration::from_secs(60)).await;
    let opened_at = monitor.first_after(fault_at, breaker_not_closed);
    let history = monitor.breaker_history();
    let samples = monitor.finish().await;
    let journal_peak = samples.iter().filter_map(|s| s.journal).max().unwrap_or(0);
    let stored = check_stored(&rig.db, &report.users).await;

    let during: Vec<_> = report
        .samples
        .iter()
        .filter(|s| s.at >= fault_at && s.at < healed_at)
        .collect();
    let during_ok = during
        .iter()
        .filter(|s| crate::support::is_2xx(s.status))
        .count();
    let open_latency = opened_at.map(|at| at - fault_at);
    let recovery = recovered_at.map(|at| at - healed_at);
    Figures::new(scenario)
        .set("users", USERS)
        .set("outage_s", OUTAGE.as_secs())
        .set("fault_applied_ms", ms(fault_applied))
        .set("heal_took_ms", ms(healed_at - heal_begins))
        .load(&report)
        .set("during_outage_requests", during.len())
        .set("during_outage_2xx", during_ok)
        .set("breaker_open_after_ms", ms_or_never(open_latency))
        .set("recovery_ms", ms_or_never(recovery))
        .set("journal_peak", journal_peak)
        .set("breaker_history", history)
        .set("settle_ms", ms(settle))
        .stored(&stored)
        .print();

    let logs = serve.stderr();
    assert!(
        report.failures().is_empty(),
        "logged-in users were refused: {:?}; first failures: {:?}\n{}",
        report.failures(),
        report
            .samples
            .iter()
            .filter(|s| !crate::support::is_2xx(s.status))
            .take(10)
            .collect::<Vec<_>>(),
        crate::support::tail(&logs, 60)
    );
    let open_latency = open_latency.expect("the breaker never opened");
    assert!(
        open_latency <= OPEN_WITHIN,
        "the breaker opened {open_latency:?} after the fault (promised within {OPEN_WITHIN:?})"
    );
    assert!(
        recovery.is_some(),
        "the breaker did not close (journal written back) within {RECOVERY_BOUND:?} of the \
         recovery"
    );
    assert!(report.mismatches.is_empty(), "{:#?}", report.mismatches);
    assert!(report.replaced.is_empty(), "{:#?}", report.replaced);
    stored.assert_nothing_lost(&logs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_30s_cluster_stopped() {
    unavailable("unavailable_cluster_stopped", Outage::StopCluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_30s_proxy_refuses() {
    unavailable("unavailable_proxy_refuses", Outage::ProxyRefuses).await;
}
