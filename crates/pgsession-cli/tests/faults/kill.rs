//! `pgsession serve` killed with SIGKILL (no shutdown, no flush: the OOM
//! killer, a crash, a deploy tool whose grace period ran out) while the
//! database is away, or while it writes its journal back, and started again
//! at once on the same journal directory. Every write it acknowledged was
//! fsynced to its journal file first; the new process adopts that file
//! (its lock died with the old process), serves the sessions in it, and
//! writes it back when the database answers: 0 acknowledged increments
//! missing.
//!
//! The first scenario also measures what an outage costs: journaled writes
//! acknowledged per second by a burst of clients that do not pause, and
//! writes per `fsync` (group commit).

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::ServeProcess;
use crate::support::{
    base, check_stored, counter_load, health, http, is_2xx, journal_files, login, login_users,
    login_users_named, metric, ms, sigkill, spawn_counter_load_on, tail, wait_health, wait_settled,
    Figures, LoadBounds, LoadReport, Rig, Stop, Target, User,
};

/// Users of the counter load: sequential `POST /counter`, 10 ms apart.
const USERS: usize = 8;
/// Clients of the cost burst: `POST /counter` with no pause.
const BURST_USERS: usize = 32;
const BURST: Duration = Duration::from_secs(2);
/// Sessions created during the outage, for a write-back long enough to be
/// interrupted.
const FILL_USERS: usize = 1_500;
/// Entries written back before the kill.
const KILL_AFTER_WRITTEN_BACK: u64 = 300;
/// Bounds of every wait on a condition (each is met in seconds).
const WAIT: Duration = Duration::from_secs(60);

fn load_bounds() -> LoadBounds {
    LoadBounds {
        max_time: Duration::from_secs(180),
        ..LoadBounds::default()
    }
}

fn entries(h: &Value) -> u64 {
    h["journal"]["entries"].as_u64().unwrap_or(0)
}

/// The proxy resets every open connection and refuses new ones.
fn cut(rig: &Rig) {
    rig.proxy.refuse(true);
    rig.proxy.reset_all();
}

/// Waits until `serve` has its breaker open and at least `n` sessions in
/// its journal.
async fn wait_journaled(http: &reqwest::Client, serve: &ServeProcess, n: usize) -> Value {
    wait_health(http, &base(serve), WAIT, Duration::from_millis(50), |h| {
        h["breaker"] == "open" && entries(h) >= n as u64
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "the breaker did not open with {n} sessions journaled\n{}",
            tail(&serve.stderr(), 40)
        )
    })
}

/// Requests of `report` sent to the server of `generation`, and how many
/// of them got a 2xx.
fn on_generation(report: &LoadReport, generation: u32) -> (usize, usize) {
    let sent: Vec<_> = report
        .samples
        .iter()
        .filter(|s| s.generation == generation)
        .collect();
    let ok = sent.iter().filter(|s| is_2xx(s.status)).count();
    (sent.len(), ok)
}

/// Journal files left in `dir` by processes other than `pid`.
fn left_by_others(dir: &Path, pid: u32) -> Vec<String> {
    journal_files(dir)
        .into_iter()
        .filter(|f| f.pid != pid)
        .map(|f| format!("{} ({} live)", f.name, f.live))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_during_outage() {
    let rig = Rig::new().await;
    let root = tempfile::tempdir().expect("journal root");
    let dir = root.path().join("journal");
    let dir_text = dir.to_str().expect("UTF-8 path").to_owned();
    let env = [("PGSESSION_JOURNAL_DIR", dir_text.as_str())];
    let mut first = ServeProcess::start_ready(&rig.proxied_url(), &env).await;
    let http = http();
    let base1 = base(&first);
    let users = login_users(&http, &base1, USERS).await;
    let burst_users = login_users_named(&http, &base1, "burst", BURST_USERS).await;

    let t0 = Instant::now();
    let target = Target::new(std::slice::from_ref(&base1));
    let (stop, load) = spawn_counter_load_on(&http, target.clone(), users, t0, load_bounds());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cut_at = t0.elapsed();
    cut(&rig);
    wait_journaled(&http, &first, USERS).await;

    // The cost of an outage: a burst of clients that do not pause, every
    // write journaled and fsynced before its answer.
    let fsyncs = |b: String| {
        let http = http.clone();
        async move {
            metric(&http, &b, "pgsession_journal_fsyncs_total", &[])
                .await
                .expect("/metrics")
        }
    };
    let fsyncs_before = fsyncs(base1.clone()).await;
    let burst_from = t0.elapsed();
    let burst = counter_load(
        &http,
        std::slice::from_ref(&base1),
        burst_users,
        t0,
        Stop::default(),
        LoadBounds {
            max_time: BURST,
            max_per_user: usize::MAX,
            pause: Duration::ZERO,
        },
    )
    .await;
    let burst_to = t0.elapsed();
    let fsyncs_after = fsyncs(base1.clone()).await;
    let journal_at_kill = entries(&health(&http, &base1).await.expect("/health"));

    // SIGKILL in the middle of the outage, and a new server at once.
    let killed_at = t0.elapsed();
    sigkill(&mut first).await;
    let files_at_kill = journal_files(&dir);
    let logs1 = first.stderr();
    drop(first);
    let second = ServeProcess::start(Some(&rig.proxied_url()), &env).await;
    let base2 = base(&second);
    target.set(&base2);
    let restarted_at = t0.elapsed();
    let adopted = entries(&health(&http, &base2).await.expect("/health"));
    // The load goes on against the new server, the database still away.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let healed_at = t0.elapsed();
    rig.proxy.heal();
    let recovery = wait_settled(&http, &second, WAIT).await;
    stop.stop();
    let report = load.await.expect("load");
    let settle = wait_settled(&http, &second, WAIT).await;
    let mut everyone: Vec<User> = report.users.clone();
    everyone.extend(burst.users.iter().cloned());
    let stored = check_stored(&rig.db, &everyone).await;
    let left = left_by_others(&dir, second.pid());
    let h2 = health(&http, &base2).await.expect("/health");

    // The burst's figures: writes acknowledged from the journal.
    let window = (burst_to - burst_from).as_secs_f64();
    let burst_ok = burst.ok() as f64
        + report
            .samples
            .iter()
            .filter(|s| s.at >= burst_from && s.at < burst_to && is_2xx(s.status))
            .count() as f64;
    let fsync_count = fsyncs_after - fsyncs_before;
    let (after_restart, after_restart_ok) = on_generation(&report, 1);
    let during: Vec<_> = report
        .samples
        .iter()
        .filter(|s| s.at >= cut_at && s.at < healed_at)
        .collect();
    Figures::new("kill_during_outage")
        .set("users", USERS)
        .load(&report)
        .set(
            "acked_in_outage",
            during.iter().filter(|s| is_2xx(s.status)).count(),
        )
        .set("burst_clients", BURST_USERS)
        .set("burst_acked_per_s", format!("{:.0}", burst_ok / window))
        .set("burst_fsyncs_per_s", format!("{:.0}", fsync_count / window))
        .set(
            "writes_per_fsync",
            format!("{:.1}", burst_ok / fsync_count.max(1.0)),
        )
        .set("burst_p99_ms", ms(burst.quantile(0.99)))
        .set("journal_at_kill", journal_at_kill)
        .set(
            "files_at_kill",
            files_at_kill
                .iter()
                .map(|f| format!("{}:{}live:{:o}", f.name, f.live, f.mode))
                .collect::<Vec<_>>()
                .join(","),
        )
        .set("adopted", adopted)
        .set("killed_at_ms", ms(killed_at - cut_at))
        .set("restart_ms", ms(restarted_at - killed_at))
        .set("after_restart_requests", after_restart)
        .set(
            "after_restart_ok_pct",
            format!(
                "{:.1}",
                100.0 * after_restart_ok as f64 / after_restart.max(1) as f64
            ),
        )
        .set("recovery_ms", ms(recovery))
        .set("settle_ms", ms(settle))
        .set("conflicts", &h2["journal"]["conflicts"])
        .set("dead_letters", &h2["journal"]["dead_letters"])
        .stored(&stored)
        .print();

    let logs = format!("{logs1}\n--- after the restart\n{}", second.stderr());
    assert!(
        files_at_kill.iter().any(|f| f.live > 0 && f.mode == 0o600),
        "the killed server left no journal file (0600) with its entries: {files_at_kill:?}"
    );
    assert!(adopted > 0, "the new server adopted nothing");
    assert_eq!(
        after_restart_ok, after_restart,
        "the new server refused users whose sessions it adopted from the journal"
    );
    assert!(left.is_empty(), "journal files left: {left:?}");
    assert!(report.mismatches.is_empty(), "{:#?}", report.mismatches);
    assert!(burst.mismatches.is_empty(), "{:#?}", burst.mismatches);
    assert!(report.replaced.is_empty(), "{:#?}", report.replaced);
    assert_eq!(h2["journal"]["conflicts"], 0, "write-back conflicts");
    stored.assert_nothing_lost(&logs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_during_write_back() {
    let rig = Rig::new().await;
    let root = tempfile::tempdir().expect("journal root");
    let dir = root.path().join("journal");
    let dir_text = dir.to_str().expect("UTF-8 path").to_owned();
    let env = [("PGSESSION_JOURNAL_DIR", dir_text.as_str())];
    let mut first = ServeProcess::start_ready(&rig.proxied_url(), &env).await;
    let http = http();
    let base1 = base(&first);
    let users = login_users(&http, &base1, USERS).await;

    let t0 = Instant::now();
    let target = Target::new(std::slice::from_ref(&base1));
    let (stop, load) = spawn_counter_load_on(&http, target.clone(), users, t0, load_bounds());
    tokio::time::sleep(Duration::from_secs(1)).await;
    cut(&rig);
    wait_journaled(&http, &first, USERS).await;

    // Sessions created during the outage (logins), each a journal entry:
    // a write-back long enough to be killed in the middle of.
    let fill_started = Instant::now();
    let fillers: Vec<_> = (0..16)
        .map(|task| {
            let (http, base1) = (http.clone(), base1.clone());
            tokio::spawn(async move {
                let mut users = Vec::new();
                for i in (task..FILL_USERS).step_by(16) {
                    let mut user = User::anonymous(format!("fill{i}"));
                    login(&http, &base1, &mut user).await;
                    users.push(user);
                }
                users
            })
        })
        .collect();
    let mut filled = Vec::new();
    for task in fillers {
        filled.extend(task.await.expect("fill"));
    }
    let fill_took = fill_started.elapsed();
    let peak = entries(&health(&http, &base1).await.expect("/health"));

    // The database returns, slowly (3 ms each way per packet), so that the
    // write-back takes seconds; the kill comes once a part of it is done
    // (past its first durable batch of `done` records, every 256 entries).
    rig.proxy.latency(Duration::from_millis(3));
    let healed_at = t0.elapsed();
    rig.proxy.refuse(false);
    let kill_below = peak.saturating_sub(KILL_AFTER_WRITTEN_BACK);
    let under_way = wait_health(&http, &base1, WAIT, Duration::from_millis(10), |h| {
        entries(h) <= kill_below
    })
    .await
    .unwrap_or_else(|| panic!("no write-back began\n{}", tail(&first.stderr(), 40)));
    let killed_at = t0.elapsed();
    sigkill(&mut first).await;
    let files_at_kill = journal_files(&dir);
    let logs1 = first.stderr();
    drop(first);
    rig.proxy.heal();
    let second = ServeProcess::start(Some(&rig.proxied_url()), &env).await;
    let base2 = base(&second);
    target.set(&base2);
    let restarted_at = t0.elapsed();
    let adopted = entries(&health(&http, &base2).await.expect("/health"));
    let recovery = wait_settled(&http, &second, WAIT).await;
    stop.stop();
    let report = load.await.expect("load");
    let settle = wait_settled(&http, &second, WAIT).await;
    let mut everyone: Vec<User> = report.users.clone();
    everyone.extend(filled);
    let stored = check_stored(&rig.db, &everyone).await;
    let left = left_by_others(&dir, second.pid());
    let h2 = health(&http, &base2).await.expect("/health");
    let (after_restart, after_restart_ok) = on_generation(&report, 1);

    let live_at_kill: usize = files_at_kill.iter().map(|f| f.live).sum();
    Figures::new("kill_during_write_back")
        .set("users", USERS)
        .load(&report)
        .set("sessions_created_in_outage", FILL_USERS)
        .set("fill_ms", ms(fill_took))
        .set("journal_peak", peak)
        .set("journal_at_kill", entries(&under_way))
        .set(
            "breaker_at_kill",
            under_way["breaker"].as_str().unwrap_or("?"),
        )
        .set("live_in_file_at_kill", live_at_kill)
        .set("killed_after_heal_ms", ms(killed_at - healed_at))
        .set("adopted", adopted)
        .set("restart_ms", ms(restarted_at - killed_at))
        .set("after_restart_requests", after_restart)
        .set(
            "after_restart_ok_pct",
            format!(
                "{:.1}",
                100.0 * after_restart_ok as f64 / after_restart.max(1) as f64
            ),
        )
        .set("recovery_ms", ms(recovery))
        .set("settle_ms", ms(settle))
        .set("conflicts", &h2["journal"]["conflicts"])
        .set("dead_letters", &h2["journal"]["dead_letters"])
        .stored(&stored)
        .print();

    let logs = format!("{logs1}\n--- after the restart\n{}", second.stderr());
    assert!(
        live_at_kill > 0 && (live_at_kill as u64) < peak,
        "the kill did not come in the middle of the write-back: {live_at_kill} of {peak} \
         entries left in the file"
    );
    assert!(left.is_empty(), "journal files left: {left:?}");
    assert!(report.mismatches.is_empty(), "{:#?}", report.mismatches);
    assert!(report.replaced.is_empty(), "{:#?}", report.replaced);
    assert_eq!(
        h2["journal"]["conflicts"],
        0,
        "write-back conflicts\n{}",
        tail(&logs, 60)
    );
    stored.assert_nothing_lost(&logs);
}
