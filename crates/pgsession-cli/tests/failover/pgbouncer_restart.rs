//! PgBouncer in transaction mode between `pgsession serve` and PostgreSQL, restarted twice under
//! load: once straight away (stop, start), once after being away for 3 s. The server is not told
//! about the pooler: it detects it from PgBouncer's refusal of the `options` startup parameter.
//! Logged-in users keep being served, and nothing acknowledged is lost.

use std::time::{Duration, Instant};

use pgsession_testkit::PgBouncer;

use crate::common::ServeProcess;
use crate::support::{
    base, breaker_not_closed, check_stored, http, is_2xx, login_users, ms, ms_after, settled,
    spawn_counter_load, tail, wait_settled, Figures, Monitor, Rig,
};

const USERS: usize = 8;
const BEFORE: Duration = Duration::from_secs(3);
/// Between the two restarts.
const BETWEEN: Duration = Duration::from_secs(4);
/// How long PgBouncer stays away the second time.
const DOWN: Duration = Duration::from_secs(3);
const RECOVERY_BOUND: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbouncer_restarted_under_load() {
    let rig = Rig::new().await;
    let bouncer = PgBouncer::start(rig.cluster().socket_addr())
        .await
        .unwrap_or_else(|e| panic!("this scenario needs pgbouncer: {e}"));
    let serve = ServeProcess::start_ready(&bouncer.url(rig.db.name()), &[]).await;
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
        BEFORE + BETWEEN + DOWN + RECOVERY_BOUND + Duration::from_secs(10),
    );

    tokio::time::sleep_until((t0 + BEFORE).into()).await;
    let restart_at = t0.elapsed();
    bouncer.restart().await.expect("restart PgBouncer");
    let restarted_at = t0.elapsed();
    tokio::time::sleep_until((t0 + restarted_at + BETWEEN).into()).await;
    let down_at = t0.elapsed();
    bouncer.stop().await.expect("stop PgBouncer");
    tokio::time::sleep_until((t0 + down_at + DOWN).into()).await;
    bouncer.start_again().await.expect("start PgBouncer");
    let back_at = t0.elapsed();
    let recovered_at = monitor.wait_for(back_at, RECOVERY_BOUND, settled).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.stop();
    let report = load.await.expect("load");
    let settle = wait_settled(&http, &serve, Duration::from_secs(60)).await;
    let opened_at = monitor.first_after(down_at, breaker_not_closed);
    let history = monitor.breaker_history();
    let samples = monitor.finish().await;
    let journal_peak = samples.iter().filter_map(|s| s.journal).max().unwrap_or(0);
    // Read directly, not through PgBouncer.
    let stored = check_stored(&rig.db, &report.users).await;

    let window = |from: Duration, to: Duration| {
        let during: Vec<_> = report
            .samples
            .iter()
            .filter(|s| s.at >= from && s.at < to)
            .collect();
        let ok = during.iter().filter(|s| is_2xx(s.status)).count();
        (during.len(), ok)
    };
    let (restart_requests, restart_ok) = window(restart_at, restart_at + Duration::from_secs(1));
    let (down_requests, down_ok) = window(down_at, back_at);
    Figures::new("pgbouncer_restart")
        .set("users", USERS)
        .set("restart_took_ms", ms(restarted_at - restart_at))
        .set("down_s", DOWN.as_secs())
        .load(&report)
        .set("first_second_after_restart_requests", restart_requests)
        .set("first_second_after_restart_2xx", restart_ok)
        .set("while_down_requests", down_requests)
        .set("while_down_2xx", down_ok)
        .set("breaker_open_after_ms", ms_after(opened_at, down_at))
        .set("recovery_ms", ms_after(recovered_at, back_at))
        .set("journal_peak", journal_peak)
        .set("breaker_history", history)
        .set("settle_ms", ms(settle))
        .stored(&stored)
        .print();

    let logs = serve.stderr();
    assert!(
        logs.contains("refused startup options"),
        "the server did not detect the pooler\n{}",
        tail(&logs, 40)
    );
    assert!(
        report.failures().is_empty(),
        "logged-in users were refused: {:?}\n{}",
        report.failures(),
        tail(&logs, 60)
    );
    assert!(
        recovered_at.is_some(),
        "not settled within {RECOVERY_BOUND:?} of PgBouncer's return"
    );
    assert!(report.mismatches.is_empty(), "{:#?}", report.mismatches);
    assert!(report.replaced.is_empty(), "{:#?}", report.replaced);
    stored.assert_nothing_lost(&logs);
}
