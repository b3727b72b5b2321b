//! SIGTERM while the database is away: the server exits 0 and leaves its
//! journal in a spool file; the next start (the database back) writes it
//! back, and nothing acknowledged is lost.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::ServeProcess;
use crate::support::{
    base, check_stored, health, http, login_users, ms, send, spawn_counter_load, wait_settled,
    Figures, Rig,
};

const USERS: usize = 8;

/// Spool files (`spool-<table>-*.jsonl`, claimed or not) in `dir`.
fn spool_files(dir: &Path) -> Vec<(String, usize)> {
    let Ok(listing) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<(String, usize)> = listing
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("spool-"))
        })
        .map(|p| {
            let lines = std::fs::read_to_string(&p).map_or(0, |t| t.lines().count());
            // The first line is the header.
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                lines.saturating_sub(1),
            )
        })
        .collect();
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_database_away_spools_and_next_start_writes_back() {
    let rig = Rig::new().await;
    let spool = tempfile::tempdir().expect("spool dir");
    let spool_dir = spool.path().to_str().expect("UTF-8 path").to_owned();
    let env = [("PGSESSION_SPOOL_DIR", spool_dir.as_str())];
    let mut first = ServeProcess::start_ready(rig.direct_url(), &env).await;
    let http = http();
    let base1 = base(&first);
    let users = login_users(&http, &base1, USERS).await;

    // Load; the database goes away after 3 s; 5 s more of load.
    let t0 = Instant::now();
    let (stop, load) = spawn_counter_load(&http, &base1, users, t0, Duration::from_secs(30));
    tokio::time::sleep_until((t0 + Duration::from_secs(3)).into()).await;
    let away_at = t0.elapsed();
    rig.cluster().stop().await.expect("stop the cluster");
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.stop();
    let report = load.await.expect("load");
    let during_outage_ok = report
        .samples
        .iter()
        .filter(|s| s.at >= away_at && crate::support::is_2xx(s.status))
        .count();
    let journal_before = health(&http, &base1).await.expect("/health")["journal"]["entries"]
        .as_u64()
        .unwrap_or(0);

    let signalled = Instant::now();
    first.sigterm();
    let status = first.wait().await;
    let exit_took = signalled.elapsed();
    let spooled = spool_files(spool.path());
    let logs1 = first.stderr();
    drop(first);

    // The database comes back; a new server starts on the same spool.
    rig.cluster()
        .start_again()
        .await
        .expect("start the cluster");
    let restarted = Instant::now();
    let second = ServeProcess::start_ready(rig.direct_url(), &env).await;
    let write_back = wait_settled(&http, &second, Duration::from_secs(60)).await;
    let written_back_after = restarted.elapsed();
    let stored = check_stored(&rig.db, &report.users).await;
    // Give the recovery a tick to remove the claimed file.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let left = spool_files(spool.path());

    // The users carry on on the new server from what they were told.
    let base2 = base(&second);
    let mut carried_on = 0;
    for user in &report.users {
        let a = send(
            &http,
            &base2,
            "POST",
            "/counter",
            user.cookie.as_deref(),
            None,
        )
        .await
        .expect("answer");
        if a.status == 200 && a.json()["views"].as_u64() == Some(user.acked() + 1) {
            carried_on += 1;
        }
    }

    Figures::new("sigterm_spool")
        .set("users", USERS)
        .load(&report)
        .set("acked_during_outage", during_outage_ok)
        .set("journal_at_sigterm", journal_before)
        .set("exit_code", status.code().map_or(-1, i64::from))
        .set("exit_took_ms", ms(exit_took))
        .set(
            "spool_files",
            spooled
                .iter()
                .map(|(n, e)| format!("{n}:{e}"))
                .collect::<Vec<_>>()
                .join(","),
        )
        .set("next_start_written_back_ms", ms(written_back_after))
        .set("settle_ms", ms(write_back))
        .set("spool_left", left.len())
        .set("users_carried_on", carried_on)
        .stored(&stored)
        .print();

    assert_eq!(status.code(), Some(0), "exit status\n{logs1}");
    assert!(
        during_outage_ok > 0,
        "no write was acknowledged while the database was away: nothing to spool"
    );
    assert_eq!(
        spooled.len(),
        1,
        "one spool file expected: {spooled:?}\n{logs1}"
    );
    assert!(spooled[0].1 > 0, "the spool file is empty");
    assert!(
        left.is_empty(),
        "spool files left after the write-back: {left:?}"
    );
    assert!(report.mismatches.is_empty(), "{:#?}", report.mismatches);
    assert!(report.replaced.is_empty(), "{:#?}", report.replaced);
    stored.assert_nothing_lost(&format!("{logs1}\n--- next start\n{}", second.stderr()));
    assert_eq!(
        carried_on, USERS,
        "users did not carry on from their counts"
    );
}
