//! SIGTERM while the database is away: the server exits 0 and its
//! journaled writes stay where they already were, fsynced, in its journal
//! file (`journal-<pid>-<nanos>.log`, 0600, in a 0700 directory; there is
//! no separate spool file any more). The next start on the same directory,
//! with the database back, adopts the file, writes it back and deletes it:
//! nothing acknowledged is lost. A graceful stop with the database up then
//! leaves no journal file at all.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use crate::common::ServeProcess;
use crate::support::{
    base, check_stored, health, http, is_2xx, journal_files, login_users, ms, send,
    spawn_counter_load, tail, wait_health, wait_settled, Figures, Rig,
};

const USERS: usize = 8;
const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_database_away_keeps_the_journal_and_next_start_writes_back() {
    let rig = Rig::new().await;
    let root = tempfile::tempdir().expect("journal root");
    let dir = root.path().join("journal");
    let journal_dir = dir.to_str().expect("UTF-8 path").to_owned();
    let env = [("PGSESSION_JOURNAL_DIR", journal_dir.as_str())];
    let mut first = ServeProcess::start_ready(rig.direct_url(), &env).await;
    let http = http();
    let base1 = base(&first);
    let users = login_users(&http, &base1, USERS).await;

    // Load; the database goes away after 2 s; the load goes on until every
    // user has a write in the journal.
    let t0 = Instant::now();
    let (stop, load) = spawn_counter_load(&http, &base1, users, t0, Duration::from_secs(60));
    tokio::time::sleep_until((t0 + Duration::from_secs(2)).into()).await;
    let away_at = t0.elapsed();
    rig.cluster().stop().await.expect("stop the cluster");
    wait_health(&http, &base1, WAIT, Duration::from_millis(50), |h| {
        h["breaker"] == "open" && h["journal"]["entries"].as_u64() >= Some(USERS as u64)
    })
    .await
    .unwrap_or_else(|| panic!("nothing journaled\n{}", tail(&first.stderr(), 40)));
    stop.stop();
    let report = load.await.expect("load");
    let during_outage_ok = report
        .samples
        .iter()
        .filter(|s| s.at >= away_at && is_2xx(s.status))
        .count();
    let journal_before = health(&http, &base1).await.expect("/health")["journal"]["entries"]
        .as_u64()
        .unwrap_or(0);

    let signalled = Instant::now();
    first.sigterm();
    let status = first.wait().await;
    let exit_took = signalled.elapsed();
    let kept = journal_files(&dir);
    let dir_mode = std::fs::metadata(&dir)
        .expect("journal dir")
        .permissions()
        .mode()
        & 0o777;
    let logs1 = first.stderr();
    let first_pid = first.pid();
    drop(first);

    // The database comes back; a new server starts on the same directory.
    rig.cluster()
        .start_again()
        .await
        .expect("start the cluster");
    let restarted = Instant::now();
    let mut second = ServeProcess::start_ready(rig.direct_url(), &env).await;
    let write_back = wait_settled(&http, &second, WAIT).await;
    let written_back_after = restarted.elapsed();
    let stored = check_stored(&rig.db, &report.users).await;
    let left_by_first: Vec<_> = journal_files(&dir)
        .into_iter()
        .filter(|f| f.pid == first_pid)
        .collect();

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
    // A graceful stop with the database up: nothing is left behind.
    second.sigterm();
    let second_status = second.wait().await;
    let after_second = journal_files(&dir);

    Figures::new("sigterm_journal")
        .set("users", USERS)
        .load(&report)
        .set("acked_during_outage", during_outage_ok)
        .set("journal_at_sigterm", journal_before)
        .set("exit_code", status.code().map_or(-1, i64::from))
        .set("exit_took_ms", ms(exit_took))
        .set(
            "journal_files",
            kept.iter()
                .map(|f| format!("{}:{}live:{:o}", f.name, f.live, f.mode))
                .collect::<Vec<_>>()
                .join(","),
        )
        .set("dir_mode", format!("{dir_mode:o}"))
        .set("next_start_written_back_ms", ms(written_back_after))
        .set("settle_ms", ms(write_back))
        .set("left_by_first", left_by_first.len())
        .set("files_after_clean_stop", after_second.len())
        .set("users_carried_on", carried_on)
        .stored(&stored)
        .print();

    assert_eq!(status.code(), Some(0), "exit status\n{logs1}");
    assert!(
        during_outage_ok > 0,
        "no write was acknowledged while the database was away: nothing to keep"
    );
    assert_eq!(
        kept.len(),
        1,
        "one journal file expected: {kept:?}\n{logs1}"
    );
    assert_eq!(kept[0].pid, first_pid, "{kept:?}");
    assert_eq!(
        kept[0].live as u64, journal_before,
        "the file does not hold what /health said was journaled: {kept:?}"
    );
    assert_eq!(kept[0].mode, 0o600, "journal file mode");
    assert_eq!(dir_mode, 0o700, "journal directory mode");
    assert!(
        logs1.contains("stay in the journal file"),
        "the shutdown did not say where the writes are\n{}",
        tail(&logs1, 20)
    );
    assert!(
        left_by_first.is_empty(),
        "the first server's file is still there after the write-back: {left_by_first:?}"
    );
    assert!(report.mismatches.is_empty(), "{:#?}", report.mismatches);
    assert!(report.replaced.is_empty(), "{:#?}", report.replaced);
    stored.assert_nothing_lost(&format!("{logs1}\n--- next start\n{}", second.stderr()));
    assert_eq!(
        carried_on, USERS,
        "users did not carry on from their counts"
    );
    assert_eq!(second_status.code(), Some(0));
    assert!(
        after_second.is_empty(),
        "a clean stop with the database up left journal files: {after_second:?}"
    );
}
