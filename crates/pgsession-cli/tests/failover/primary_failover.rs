//! A primary and its synchronous standby behind one URL (`host1,host2` with
//! `target_session_attrs=read-write`); under load the primary goes away, and 2 s later (a
//! failover manager's detection time) the standby is promoted. The server finds the new primary
//! by itself; the breaker and the fallback carry the requests in between; nothing acknowledged
//! is lost. Measured: the time from losing the primary to the first write that reaches the new
//! primary.
//!
//! Two ways to lose it: stopped (`pg_ctl stop -m fast`: connections closed, new ones refused),
//! or its machine gone silent (a fault proxy in front of it swallows everything from then on,
//! and the server behind is stopped): then each new connection must give up on the first host
//! (connect timeout, 3 s here, as an operator who counts on failover would set it) before it
//! tries the second.

use std::time::{Duration, Instant};

use pgsession_testkit::{FaultProxy, ReplicaPair, TestDb};

use crate::common::ServeProcess;
use crate::support::{
    base, breaker_not_closed, check_stored, http, is_2xx, login_users, ms, settled,
    spawn_counter_load, tail, wait_settled, Figures, Monitor,
};

const USERS: usize = 8;
const BEFORE: Duration = Duration::from_secs(3);
/// From stopping the primary to promoting the standby.
const PROMOTE_AFTER: Duration = Duration::from_secs(2);
const RECOVERY_BOUND: Duration = Duration::from_secs(60);

/// Every acknowledged increment in the table, as the server `db` sees it.
async fn views(db: &tokio_postgres::Client) -> i64 {
    db.query_one(
        "SELECT coalesce(sum((sess->>'views')::bigint), 0)::bigint FROM session_store",
        &[],
    )
    .await
    .expect("sum the views")
    .get(0)
}

/// How the primary goes away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loss {
    Stopped,
    Silent,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_stopped_and_standby_promoted_under_load() {
    failover("primary_failover", Loss::Stopped).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_gone_silent_and_standby_promoted_under_load() {
    failover("primary_failover_silent", Loss::Silent).await;
}

async fn failover(scenario: &'static str, loss: Loss) {
    let pair = ReplicaPair::start()
        .await
        .unwrap_or_else(|e| panic!("this scenario needs a primary and a standby: {e}"));
    // The way to the primary's machine.
    let proxy = FaultProxy::start(pair.primary().socket_addr())
        .await
        .expect("fault proxy");
    let (url, env): (String, &[(&str, &str)]) = match loss {
        Loss::Stopped => (pair.url(), &[]),
        Loss::Silent => (
            format!(
                "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{}?target_session_attrs=read-write",
                proxy.port(),
                pair.standby().port(),
                pair.database()
            ),
            &[
                ("PGSESSION_CONNECT_TIMEOUT", "3s"),
                ("PGSESSION_QUERY_TIMEOUT", "3s"),
            ],
        ),
    };
    let serve = ServeProcess::start_ready(&url, env).await;
    let http = http();
    let base = base(&serve);
    let users = login_users(&http, &base, USERS).await;
    let standby = TestDb::existing(pair.standby_url(), pair.database());
    let on_standby = standby.client().await.expect("connect to the standby");

    let t0 = Instant::now();
    let monitor = Monitor::start(&http, &base, t0);
    let (stop, load) = spawn_counter_load(
        &http,
        &base,
        users,
        t0,
        BEFORE + PROMOTE_AFTER + RECOVERY_BOUND + Duration::from_secs(10),
    );

    tokio::time::sleep_until((t0 + BEFORE).into()).await;
    let stop_at = t0.elapsed();
    if loss == Loss::Silent {
        proxy.blackhole(true);
    }
    pair.stop_primary().await.expect("stop the primary");
    let stopped_at = t0.elapsed();
    // Once the standby has replayed all it received, its table is what the primary acknowledged;
    // it cannot change until the promotion.
    for _ in 0..600 {
        let replayed: bool = on_standby
            .query_one(
                "SELECT pg_last_wal_replay_lsn() >= pg_last_wal_receive_lsn()",
                &[],
            )
            .await
            .expect("replay position")
            .get(0);
        if replayed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before_promotion = views(&on_standby).await;
    tokio::time::sleep_until((t0 + stop_at + PROMOTE_AFTER).into()).await;
    let promote_at = t0.elapsed();
    pair.promote_standby().await.expect("promote the standby");
    let promoted_at = t0.elapsed();
    let mut first_write_at = None;
    for _ in 0..3_000 {
        if views(&on_standby).await > before_promotion {
            first_write_at = Some(t0.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Settled (breaker closed, journal empty) once a write reached the new primary.
    let recovered_at = monitor
        .wait_for(
            first_write_at.unwrap_or(promoted_at),
            RECOVERY_BOUND,
            settled,
        )
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.stop();
    let report = load.await.expect("load");
    let settle = wait_settled(&http, &serve, Duration::from_secs(60)).await;
    let opened_at = monitor.first_after(stop_at, breaker_not_closed);
    let history = monitor.breaker_history();
    let samples = monitor.finish().await;
    let journal_peak = samples.iter().filter_map(|s| s.journal).max().unwrap_or(0);
    // After the first settling: did the breaker open again, and did requests stall?
    let recovered = recovered_at.unwrap_or(Duration::MAX);
    let mut reopened = 0;
    let mut last = "closed".to_owned();
    for s in samples.iter().filter(|s| s.at >= recovered) {
        let now = s.breaker.clone().unwrap_or_default();
        if last == "closed" && now != "closed" {
            reopened += 1;
        }
        last = now;
    }
    let late: Vec<Duration> = report
        .samples
        .iter()
        .filter(|s| s.at >= recovered)
        .map(|s| s.latency)
        .collect();
    let late_stalls = late.iter().filter(|l| **l > Duration::from_secs(1)).count();
    let late_max = late.iter().max().copied().unwrap_or_default();
    let stored = check_stored(&standby, &report.users).await;

    let without_primary: Vec<_> = report
        .samples
        .iter()
        .filter(|s| s.at >= stop_at && s.at < promoted_at)
        .collect();
    let without_primary_ok = without_primary.iter().filter(|s| is_2xx(s.status)).count();
    let after = |at: Option<Duration>, from: Duration| {
        at.map_or("never".to_owned(), |at| {
            ms(at.saturating_sub(from)).to_string()
        })
    };
    Figures::new(scenario)
        .set("users", USERS)
        .set("stop_took_ms", ms(stopped_at - stop_at))
        .set("promote_after_ms", ms(promote_at - stop_at))
        .set("promote_took_ms", ms(promoted_at - promote_at))
        .load(&report)
        .set("without_primary_requests", without_primary.len())
        .set("without_primary_2xx", without_primary_ok)
        .set(
            "first_new_primary_write_after_stop_ms",
            after(first_write_at, stop_at),
        )
        .set(
            "first_new_primary_write_after_promotion_ms",
            after(first_write_at, promoted_at),
        )
        .set("breaker_open_after_ms", after(opened_at, stop_at))
        .set("recovery_after_stop_ms", after(recovered_at, stop_at))
        .set("breaker_reopened_after_recovery", reopened)
        .set("requests_over_1s_after_recovery", late_stalls)
        .set("max_ms_after_recovery", ms(late_max))
        .set("journal_peak", journal_peak)
        .set("breaker_history", history)
        .set("settle_ms", ms(settle))
        .stored(&stored)
        .print();

    let logs = serve.stderr();
    assert!(
        first_write_at.is_some(),
        "no write reached the promoted standby\n{}",
        tail(&logs, 60)
    );
    let refused = report.failures();
    match loss {
        Loss::Stopped => assert!(
            refused.is_empty(),
            "logged-in users were refused: {refused:?}\n{}",
            tail(&logs, 60)
        ),
        // A silent primary first shows as query timeouts, which with the
        // breaker still closed mean "busy": 503 with Retry-After, nothing
        // journaled (RELIABILITY.md, "Which errors journal"). Once the
        // timeouts open the breaker, the fallback serves.
        Loss::Silent => assert!(
            refused.keys().all(|status| *status == 503),
            "logged-in users got other than 503: {refused:?}\n{}",
            tail(&logs, 60)
        ),
    }
    assert!(
        recovered_at.is_some(),
        "not settled within {RECOVERY_BOUND:?} of the promotion"
    );
    assert!(report.mismatches.is_empty(), "{:#?}", report.mismatches);
    assert!(report.replaced.is_empty(), "{:#?}", report.replaced);
    stored.assert_nothing_lost(&logs);
}
