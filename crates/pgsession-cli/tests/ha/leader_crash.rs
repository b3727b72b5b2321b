//! The leader crashes under load: SIGKILL of its Patroni and of its PostgreSQL (the whole
//! process group), as a lost machine would. Patroni elects the synchronous standby once the
//! leader lock expires; `serve`, on the cluster's multi-host URL with
//! `target_session_attrs=read-write`, finds it by itself; the breaker and the journal carry the
//! requests in between. With synchronous replication every acknowledged write is on the new
//! leader: the target is 0 lost. Measured: the election, the first write on the new leader, and
//! the share of 2xx.
//!
//! The run itself ([`crash_under_load`]) is shared with the scenarios of the old leader's return
//! and of asynchronous replication.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use pgsession_testkit::patroni::{PatroniCluster, PatroniOptions};

use crate::common::ServeProcess;
use crate::support::{
    base, breaker_not_closed, check_stored, http, is_2xx, login_users, metric, ms_after, settled,
    spawn_counter_load, tail, wait_settled, Figures, LoadReport, Monitor, StoredCheck,
};
use crate::{
    first_write_above, on_leader, on_node, patroni_with, views_by_sid, wait_replayed, BOUND, USERS,
};

/// Load before the crash.
const BEFORE: Duration = Duration::from_secs(2);
/// Load after the server settled on the new leader.
const AFTER: Duration = Duration::from_secs(2);

/// What a crash run is asked to do.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Crash {
    pub(crate) synchronous_mode: bool,
    /// Start the killed node again once a write reached the new leader, under load.
    pub(crate) restart_old: bool,
    /// Cut replication from the leader (its replication proxy swallows everything) this long
    /// before the crash, as a network that delays replication would: the commits acknowledged
    /// meanwhile never reach the standby.
    pub(crate) replication_lag: Option<Duration>,
}

/// What a crash run saw.
pub(crate) struct Outcome {
    pub(crate) cluster: PatroniCluster,
    pub(crate) serve: ServeProcess,
    pub(crate) report: LoadReport,
    pub(crate) stored: StoredCheck,
    pub(crate) figures: Figures,
    pub(crate) old: usize,
    pub(crate) new: usize,
    /// When the kill of the leader started, and when it was dead (since the load's start).
    pub(crate) kill_at: Duration,
    pub(crate) killed_at: Duration,
    /// The new leader's table once it had replayed all it received from the old one, before its
    /// promotion: what survived the crash.
    pub(crate) survived: BTreeMap<String, i64>,
    pub(crate) first_write_at: Option<Duration>,
    pub(crate) recovered_at: Option<Duration>,
    /// Journaled writes kept aside as dead letters (conflicts of the write-back).
    pub(crate) dead_letters: f64,
    /// When the killed node streamed again, if it was restarted.
    pub(crate) rejoined_at: Option<Duration>,
}

/// A two-node cluster, `serve` on its multi-host URL, 8 users writing; the leader killed.
pub(crate) async fn crash_under_load(scenario: &'static str, crash: Crash) -> Outcome {
    let cluster = patroni_with(PatroniOptions {
        nodes: 2,
        synchronous_mode: crash.synchronous_mode,
        replication_proxies: crash.replication_lag.is_some(),
        ..PatroniOptions::default()
    })
    .await;
    let serve = ServeProcess::start_ready(&cluster.url(), &[]).await;
    let http = http();
    let base = base(&serve);
    let users = login_users(&http, &base, USERS).await;

    let t0 = Instant::now();
    let monitor = Monitor::start(&http, &base, t0);
    let (stop, load) = spawn_counter_load(&http, &base, users, t0, BEFORE + 3 * BOUND);
    tokio::time::sleep_until((t0 + BEFORE).into()).await;

    let old = cluster.leader().await.expect("a leader");
    // With two nodes, the standby is the only candidate; its table, once it replayed what it
    // received, is what survived (it cannot change until the promotion).
    let candidate = 1 - old;
    let standby = on_node(&cluster, candidate).await;
    if let Some(lag) = crash.replication_lag {
        let proxy = cluster.replication_proxy(old).expect("replication proxies");
        proxy.blackhole(true);
        tokio::time::sleep(lag).await;
    }
    let kill_at = t0.elapsed();
    cluster.kill_node(old).await.expect("kill the leader");
    let killed_at = t0.elapsed();
    wait_replayed(&standby).await;
    let survived = views_by_sid(&standby).await;
    let baseline: i64 = survived.values().sum();
    let new = cluster
        .wait_new_leader(old, BOUND)
        .await
        .expect("a new leader");
    let elected_at = t0.elapsed();
    assert_eq!(new, candidate, "the standby is the new leader");
    let first_write_at = first_write_above(&standby, baseline, t0).await;
    let recovered_at = monitor
        .wait_for(first_write_at.unwrap_or(elected_at), BOUND, settled)
        .await;
    let mut rejoined_at = None;
    if crash.restart_old {
        cluster
            .restart_node(old)
            .await
            .expect("the old leader rejoins");
        rejoined_at = Some(t0.elapsed());
    }
    tokio::time::sleep(AFTER).await;
    stop.stop();
    let report = load.await.expect("load");
    let settle = wait_settled(&http, &serve, BOUND).await;
    let opened_at = monitor.first_after(kill_at, breaker_not_closed);
    let history = monitor.breaker_history();
    let samples = monitor.finish().await;
    let journal_peak = samples.iter().filter_map(|s| s.journal).max().unwrap_or(0);
    let dead_letters = metric(&http, &base, "pgsession_dead_letters_total", &[])
        .await
        .unwrap_or(0.0);
    let stored = check_stored(&on_leader(&cluster), &report.users).await;

    let during: Vec<_> = report
        .samples
        .iter()
        .filter(|s| s.at >= kill_at && Some(s.at) < recovered_at.or(Some(Duration::MAX)))
        .collect();
    let mut figures = Figures::new(scenario);
    figures
        .set("nodes", 2)
        .set("synchronous_mode", crash.synchronous_mode)
        .set("users", USERS)
        .set("kill_took_ms", ms_after(Some(killed_at), kill_at))
        .set(
            "leader_elected_after_kill_ms",
            ms_after(Some(elected_at), kill_at),
        )
        .set(
            "first_new_leader_write_after_kill_ms",
            ms_after(first_write_at, kill_at),
        )
        .set("breaker_open_after_kill_ms", ms_after(opened_at, kill_at))
        .set("recovery_after_kill_ms", ms_after(recovered_at, kill_at))
        .set("during_requests", during.len())
        .set(
            "during_2xx",
            during.iter().filter(|s| is_2xx(s.status)).count(),
        )
        .load(&report)
        .set("journal_peak", journal_peak)
        .set("dead_letters", dead_letters)
        .set("breaker_history", history)
        .set("settle_ms", settle.as_millis())
        .stored(&stored);
    Outcome {
        cluster,
        serve,
        report,
        stored,
        figures,
        old,
        new,
        kill_at,
        killed_at,
        survived,
        first_write_at,
        recovered_at,
        dead_letters,
        rejoined_at,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_under_load_synchronous() {
    let outcome = crash_under_load(
        "ha_leader_crash",
        Crash {
            synchronous_mode: true,
            restart_old: false,
            replication_lag: None,
        },
    )
    .await;
    outcome.figures.print();
    let logs = outcome.serve.stderr();
    assert!(
        outcome.first_write_at.is_some(),
        "no write reached the new leader\n{}",
        tail(&logs, 60)
    );
    assert!(
        outcome.recovered_at.is_some(),
        "the server did not settle on the new leader within {BOUND:?}\n{}",
        tail(&logs, 60)
    );
    let report = &outcome.report;
    assert!(report.mismatches.is_empty(), "{:#?}", report.mismatches);
    assert!(report.replaced.is_empty(), "{:#?}", report.replaced);
    // Synchronous replication: what the old leader acknowledged is on the new one.
    outcome.stored.assert_nothing_lost(&logs);
}
