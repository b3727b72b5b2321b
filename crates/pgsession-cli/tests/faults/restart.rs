//! PostgreSQL restarted (`pg_ctl stop -m fast`, then start) under load:
//! nothing acknowledged is lost.

use std::time::{Duration, Instant};

use crate::common::ServeProcess;
use crate::support::{
    base, breaker_not_closed, check_stored, http, login_users, ms, ms_after, settled,
    spawn_counter_load, wait_settled, Figures, Monitor, Rig,
};

const USERS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_load() {
    let rig = Rig::new().await;
    // Straight to the cluster: the restart is the fault.
    let serve = ServeProcess::start_ready(rig.direct_url(), &[]).await;
    let http = http();
    let base = base(&serve);
    let users = login_users(&http, &base, USERS).await;

    let t0 = Instant::now();
    let monitor = Monitor::start(&http, &base, t0);
    let (stop, load) = spawn_counter_load(&http, &base, users, t0, Duration::from_secs(90));
    tokio::time::sleep_until((t0 + Duration::from_secs(3)).into()).await;
    let restart_at = t0.elapsed();
    rig.cluster().restart().await.expect("restart");
    let restarted_at = t0.elapsed();
    let recovered_at = monitor
        .wait_for(restarted_at, Duration::from_secs(60), settled)
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.stop();
    let report = load.await.expect("load");
    let settle = wait_settled(&http, &serve, Duration::from_secs(60)).await;
    let opened_at = monitor.first_after(restart_at, breaker_not_closed);
    let history = monitor.breaker_history();
    monitor.finish().await;
    let stored = check_stored(&rig.db, &report.users).await;

    Figures::new("postgres_restart")
        .set("users", USERS)
        .set("restart_took_ms", ms(restarted_at - restart_at))
        .load(&report)
        .set("breaker_open_after_ms", ms_after(opened_at, restart_at))
        .set("recovery_ms", ms_after(recovered_at, restarted_at))
        .set("breaker_history", history)
        .set("settle_ms", ms(settle))
        .stored(&stored)
        .print();

    assert!(report.mismatches.is_empty(), "{:#?}", report.mismatches);
    assert!(report.replaced.is_empty(), "{:#?}", report.replaced);
    stored.assert_nothing_lost(&serve.stderr());
}
