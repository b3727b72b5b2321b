//! A blackhole: for 20 s the proxy forwards nothing either way, while the
//! sockets stay open. With a query timeout of 3 s, no request waits longer
//! than 4 s (the timeout plus one second), and nothing acknowledged is
//! lost.

use std::time::{Duration, Instant};

use crate::common::ServeProcess;
use crate::support::{
    base, breaker_not_closed, check_stored, http, login_users, ms, ms_after, settled,
    spawn_counter_load, wait_settled, Figures, Monitor, Rig,
};

const USERS: usize = 8;
const QUERY_TIMEOUT: Duration = Duration::from_secs(3);
const BLACKHOLE: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackhole_20s() {
    let rig = Rig::new().await;
    let serve =
        ServeProcess::start_ready(&rig.proxied_url(), &[("PGSESSION_QUERY_TIMEOUT", "3s")]).await;
    let http = http();
    let base = base(&serve);
    let users = login_users(&http, &base, USERS).await;

    let t0 = Instant::now();
    let monitor = Monitor::start(&http, &base, t0);
    let (stop, load) = spawn_counter_load(&http, &base, users, t0, Duration::from_secs(120));
    tokio::time::sleep_until((t0 + Duration::from_secs(3)).into()).await;
    let fault_at = t0.elapsed();
    rig.proxy.blackhole(true);
    tokio::time::sleep_until((t0 + fault_at + BLACKHOLE).into()).await;
    rig.proxy.blackhole(false);
    let healed_at = t0.elapsed();
    let recovered_at = monitor
        .wait_for(healed_at, Duration::from_secs(60), settled)
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.stop();
    let report = load.await.expect("load");
    let settle = wait_settled(&http, &serve, Duration::from_secs(60)).await;
    let opened_at = monitor.first_after(fault_at, breaker_not_closed);
    let history = monitor.breaker_history();
    monitor.finish().await;
    let stored = check_stored(&rig.db, &report.users).await;

    let bound = QUERY_TIMEOUT + Duration::from_secs(1);
    let over: Vec<_> = report
        .samples
        .iter()
        .filter(|s| s.latency > bound)
        .collect();
    let over_timeout = report
        .samples
        .iter()
        .filter(|s| s.latency > QUERY_TIMEOUT)
        .count();
    Figures::new("blackhole")
        .set("users", USERS)
        .set("blackhole_s", BLACKHOLE.as_secs())
        .set("query_timeout_ms", ms(QUERY_TIMEOUT))
        .load(&report)
        .set("over_query_timeout", over_timeout)
        .set("over_bound", over.len())
        .set("breaker_open_after_ms", ms_after(opened_at, fault_at))
        .set("recovery_ms", ms_after(recovered_at, healed_at))
        .set("breaker_history", history)
        .set("settle_ms", ms(settle))
        .stored(&stored)
        .print();

    assert!(
        over.is_empty(),
        "{} requests waited longer than {bound:?}, the slowest: {:?}\n{}",
        over.len(),
        report.slowest(10),
        crate::support::tail(&serve.stderr(), 40)
    );
    assert!(report.mismatches.is_empty(), "{:#?}", report.mismatches);
    assert!(report.replaced.is_empty(), "{:#?}", report.replaced);
    stored.assert_nothing_lost(&serve.stderr());
}
