//! The leader crashes under load with asynchronous replication (`synchronous_mode: false`,
//! PostgreSQL's default): a commit is acknowledged before any standby has it, so the writes the
//! standby had not received when the leader died are gone with it. That is PostgreSQL's own
//! window, measured here and stated in RELIABILITY.md; Patroni only promotes a standby within
//! `maximum_lag_on_failover` (1 MiB here) of the leader.
//!
//! What pgsession must not do is widen it. Asserted: every session holds at least what the
//! promoted standby had when the leader died (nothing it received is lost), and every
//! acknowledged increment missing from the table is accounted for: either the standby never
//! received it (at most what was acknowledged before the crash, less what the standby had), or
//! it is kept on disk as a dead letter (a journaled write whose write-back found the row not as
//! it was based on: the row went back in time with the failover, and the write-back never
//! overwrites a row it did not read).

use std::collections::BTreeMap;

use crate::leader_crash::{crash_under_load, Crash};
use crate::support::{is_2xx, tail};
use crate::{on_leader, views_by_sid};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_under_load_asynchronous() {
    let mut outcome = crash_under_load(
        "ha_async_crash",
        Crash {
            synchronous_mode: false,
            restart_old: false,
        },
    )
    .await;
    let report = &outcome.report;
    let kill_at = outcome.kill_at;
    // Per user (each keeps one session: logged-in sessions are not replaced, asserted below),
    // what was acknowledged for requests sent before the crash: an upper bound of what the old
    // leader had committed and acknowledged when it died.
    let mut acked_before: BTreeMap<String, i64> = BTreeMap::new();
    for sample in report
        .samples
        .iter()
        .filter(|s| s.at < kill_at && is_2xx(s.status))
    {
        let user = &report.users[sample.user];
        let sid = user.sid().expect("a session").to_owned();
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
    for (sid, acked) in &acked_before {
        let survived = outcome.survived.get(sid).copied().unwrap_or(0);
        window += (acked - survived).max(0);
        let now = table.get(sid).copied().unwrap_or(0);
        if now < survived {
            below_survived.push(format!(
                "{sid}: {now} stored, {survived} on the promoted standby"
            ));
        }
    }
    let lost = outcome.stored.lost as i64;
    let dead_letters = outcome.dead_letters as i64;
    outcome
        .figures
        .set("not_received_by_standby_max", window)
        .set("lost_beyond_window", (lost - window - dead_letters).max(0))
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
        lost <= window + dead_letters,
        "{lost} acknowledged increments lost, more than PostgreSQL's window ({window}: \
         acknowledged before the crash and not on the standby) and the dead letters \
         ({dead_letters}) together\n{}",
        tail(&logs, 60)
    );
}
