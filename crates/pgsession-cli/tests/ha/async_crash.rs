//! The leader crashes under load with asynchronous replication (`synchronous_mode: false`,
//! PostgreSQL's default): a commit is acknowledged before any standby has it, so the writes the
//! standby had not received when the leader died are gone with it. That is PostgreSQL's own
//! window. On loopback the standby receives WAL within microseconds, so the scenario makes the
//! window certain: the other node reaches the leader through the test kit's replication proxy,
//! which swallows everything from 300 ms before the crash (as a network that delays
//! replication would), so the commits acknowledged in those 300 ms never reach the standby.
//! Patroni still promotes it: it is within `maximum_lag_on_failover` (1 MiB).
//!
//! What pgsession must not do is widen that window. Asserted: every session holds at least
//! what the promoted standby had; and the acknowledged increments missing from the table are no
//! more than PostgreSQL's window (per session: acknowledged for requests sent before the leader
//! was dead, less what the standby had). The journaled writes of the election's seconds must
//! all land on the new leader.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::leader_crash::{crash_under_load, Crash};
use crate::support::{is_2xx, tail};
use crate::{on_leader, views_by_sid};

/// How long the standby receives nothing before the crash.
const LAG: Duration = Duration::from_millis(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_under_load_asynchronous() {
    let mut outcome = crash_under_load(
        "ha_async_crash",
        Crash {
            synchronous_mode: false,
            restart_old: false,
            replication_lag: Some(LAG),
        },
    )
    .await;
    let report = &outcome.report;
    // Per session (each user keeps one: asserted below), what was acknowledged for requests
    // sent before the leader was dead: an upper bound of what it acknowledged.
    let mut acked_before: BTreeMap<String, i64> = BTreeMap::new();
    for sample in report
        .samples
        .iter()
        .filter(|s| s.at < outcome.killed_at && is_2xx(s.status))
    {
        let sid = report.users[sample.user]
            .sid()
            .expect("a session")
            .to_owned();
        *acked_before.entry(sid).or_default() += 1;
    }
    let table = views_by_sid(
        &on_leader(&outcome.cluster)
            .client()
            .await
            .expect("connect to the leader"),
    )
    .await;
    let mut window = 0i64;
    let mut below_survived = Vec::new();
    let mut beyond_window = Vec::new();
    for user in &report.users {
        let Some((sid, acked)) = user.sessions.last() else {
            continue;
        };
        let survived = outcome.survived.get(sid).copied().unwrap_or(0);
        let session_window = (acked_before.get(sid).copied().unwrap_or(0) - survived).max(0);
        window += session_window;
        let now = table.get(sid).copied().unwrap_or(0);
        let lost = *acked as i64 - now;
        if now < survived {
            below_survived.push(format!(
                "{sid}: {now} stored, {survived} on the promoted standby"
            ));
        }
        if lost > session_window {
            beyond_window.push(format!(
                "{}: {acked} acknowledged, {now} stored, {survived} on the standby at the crash, \
                 window {session_window}",
                user.name
            ));
        }
    }
    let lost = outcome.stored.lost as i64;
    outcome
        .figures
        .set("replication_held_ms", LAG.as_millis())
        .set("pg_window", window)
        .set("lost_beyond_window", (lost - window).max(0))
        .print();

    let logs = outcome.serve.stderr();
    assert!(
        outcome.recovered_at.is_some(),
        "the server did not settle on the new leader\n{}",
        tail(&logs, 60)
    );
    assert!(
        outcome.report.replaced.is_empty(),
        "{:#?}",
        outcome.report.replaced
    );
    assert!(
        below_survived.is_empty(),
        "sessions lost what the promoted standby had:\n{}",
        below_survived.join("\n")
    );
    assert!(
        beyond_window.is_empty(),
        "{lost} acknowledged increments lost, PostgreSQL's window is {window}: the journal \
         widened it ({} dead letters)\n{}\n{}",
        outcome.dead_letters,
        beyond_window.join("\n"),
        tail(&logs, 40)
    );
}
