//! Transient drops: every connection between the server and the database
//! is reset, five times, during 20 s of load. At least 99.9 % of the
//! requests succeed, and nothing acknowledged is lost.

use std::time::{Duration, Instant};

use crate::common::ServeProcess;
use crate::support::{
    base, breaker_not_closed, check_stored, http, login_users, ms, spawn_counter_load,
    wait_settled, Figures, Monitor, Rig,
};

const USERS: usize = 8;
const LOAD: Duration = Duration::from_secs(20);
const RESETS: u32 = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_drop_five_resets() {
    let rig = Rig::new().await;
    let serve = ServeProcess::start_ready(&rig.proxied_url(), &[]).await;
    let http = http();
    let base = base(&serve);
    let users = login_users(&http, &base, USERS).await;

    let t0 = Instant::now();
    let monitor = Monitor::start(&http, &base, t0);
    let (stop, load) = spawn_counter_load(&http, &base, users, t0, LOAD + Duration::from_secs(5));
    // Resets at 2, 6, 10, 14 and 18 s.
    let mut reset_at = Vec::new();
    for i in 0..RESETS {
        let at = Duration::from_secs(2 + 4 * u64::from(i));
        tokio::time::sleep_until((t0 + at).into()).await;
        let open = rig.proxy.connections();
        rig.proxy.reset_all();
        reset_at.push(format!("{}ms/{open}conns", ms(t0.elapsed())));
    }
    tokio::time::sleep_until((t0 + LOAD).into()).await;
    stop.stop();
    let report = load.await.expect("load");
    let settle = wait_settled(&http, &serve, Duration::from_secs(60)).await;
    let samples = monitor.finish().await;
    let breaker_open_samples = samples.iter().filter(|s| breaker_not_closed(s)).count();
    let stored = check_stored(&rig.db, &report.users).await;

    Figures::new("transient_drop")
        .set("users", USERS)
        .set("load_s", LOAD.as_secs())
        .set("resets", reset_at.join(","))
        .load(&report)
        .set(
            "breaker_not_closed_ms",
            breaker_open_samples as u128 * ms(crate::support::HEALTH_POLL),
        )
        .set("settle_ms", ms(settle))
        .set("proxy_connections_total", rig.proxy.total_connections())
        .stored(&stored)
        .print();

    assert!(
        report.ok_pct() >= 99.9,
        "only {:.3} % of {} requests succeeded: {:?}; slowest: {:?}",
        report.ok_pct(),
        report.requests(),
        report.failures(),
        report.slowest(5)
    );
    assert!(report.mismatches.is_empty(), "{:#?}", report.mismatches);
    assert!(report.replaced.is_empty(), "{:#?}", report.replaced);
    stored.assert_nothing_lost(&serve.stderr());
}
