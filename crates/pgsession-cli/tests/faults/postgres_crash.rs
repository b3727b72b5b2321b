//! PostgreSQL itself crashes (`pg_ctl stop -m immediate`: every server
//! process killed, no shutdown checkpoint) in the middle of a write load
//! straight to the database, and is started again (crash recovery from its
//! WAL). The cluster runs with PostgreSQL's default durability (`fsync`,
//! `synchronous_commit` and `full_page_writes` on; the test kit turns them
//! off elsewhere, for speed), so that a commit acknowledged to pgsession
//! is in the WAL before the answer: 0 acknowledged writes lost, whether
//! they were committed before the crash or journaled during it.
//!
//! The test kit's clusters live in `/dev/shm` when it has room, where an
//! `fsync` costs nothing; what a process crash can lose is what was never
//! written out of PostgreSQL's own buffers, which `synchronous_commit = on`
//! forbids for an acknowledged commit.

use std::time::{Duration, Instant};

use pgsession_testkit::{ClusterOptions, TestCluster, TestDb};

use crate::common::ServeProcess;
use crate::support::{
    base, breaker_not_closed, check_stored, http, is_2xx, login_users, ms, ms_after, settled,
    spawn_counter_load, wait_settled, Figures, Monitor,
};

const USERS: usize = 8;
const DATABASE: &str = "pgsession_test";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_crash() {
    let cluster = TestCluster::start_with(ClusterOptions {
        config: vec![
            "fsync = on".to_owned(),
            "synchronous_commit = on".to_owned(),
            "full_page_writes = on".to_owned(),
        ],
        ..ClusterOptions::default()
    })
    .await
    .unwrap_or_else(|e| panic!("the fault suite needs the PostgreSQL binaries: {e}"));
    cluster
        .create_database(DATABASE)
        .await
        .expect("create the database");
    let db = TestDb::existing(cluster.url(DATABASE), DATABASE);
    {
        let client = db.client().await.expect("connect");
        for setting in ["fsync", "synchronous_commit", "full_page_writes"] {
            let value: String = client
                .query_one(&format!("SHOW {setting}"), &[])
                .await
                .expect("SHOW")
                .get(0);
            assert_eq!(value, "on", "{setting} must be on in this cluster");
        }
    }
    let journal = tempfile::tempdir().expect("journal dir");
    let journal_dir = journal.path().to_str().expect("UTF-8 path").to_owned();
    let env = [("PGSESSION_JOURNAL_DIR", journal_dir.as_str())];
    let serve = ServeProcess::start_ready(db.url(), &env).await;
    let http = http();
    let base = base(&serve);
    let users = login_users(&http, &base, USERS).await;

    let t0 = Instant::now();
    let monitor = Monitor::start(&http, &base, t0);
    let (stop, load) = spawn_counter_load(&http, &base, users, t0, Duration::from_secs(90));
    tokio::time::sleep_until((t0 + Duration::from_secs(3)).into()).await;
    let crash_at = t0.elapsed();
    cluster.kill().await.expect("pg_ctl stop -m immediate");
    let crashed_at = t0.elapsed();
    cluster.start_again().await.expect("start after the crash");
    let restarted_at = t0.elapsed();
    let recovered_at = monitor
        .wait_for(restarted_at, Duration::from_secs(60), settled)
        .await;
    // A little load on the recovered database, then stop.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.stop();
    let report = load.await.expect("load");
    let settle = wait_settled(&http, &serve, Duration::from_secs(60)).await;
    let end = crate::support::health(&http, &base).await.expect("/health");
    let opened_at = monitor.first_after(crash_at, breaker_not_closed);
    let history = monitor.breaker_history();
    let samples = monitor.finish().await;
    let journal_peak = samples.iter().filter_map(|s| s.journal).max().unwrap_or(0);
    let stored = check_stored(&db, &report.users).await;
    let gap_ok = report
        .samples
        .iter()
        .filter(|s| s.at >= crash_at && s.at < restarted_at && is_2xx(s.status))
        .count();
    let recovery_log = cluster
        .read_log()
        .unwrap_or_default()
        .lines()
        .any(|l| l.contains("database system was interrupted") || l.contains("redo"));

    Figures::new("postgres_crash")
        .set("users", USERS)
        .set("crash_took_ms", ms(crashed_at - crash_at))
        .set("restart_took_ms", ms(restarted_at - crashed_at))
        .set("crash_recovery_in_log", recovery_log)
        .load(&report)
        .set("acked_while_down", gap_ok)
        .set("journal_peak", journal_peak)
        .set("breaker_open_after_ms", ms_after(opened_at, crash_at))
        .set("recovery_ms", ms_after(recovered_at, restarted_at))
        .set("breaker_history", history)
        .set("settle_ms", ms(settle))
        .set("conflicts", &end["journal"]["conflicts"])
        .stored(&stored)
        .print();

    let logs = serve.stderr();
    assert!(
        recovery_log,
        "PostgreSQL did not run crash recovery: was it killed?"
    );
    assert!(recovered_at.is_some(), "the server did not settle");
    assert!(report.mismatches.is_empty(), "{:#?}", report.mismatches);
    assert!(report.replaced.is_empty(), "{:#?}", report.replaced);
    stored.assert_nothing_lost(&logs);
}
