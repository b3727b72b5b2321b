//! Where the journal cannot take a write, nothing is acknowledged:
//!
//! - at its byte limit (`PGSESSION_JOURNAL_MAX_BYTES`), writes of new data
//!   answer 503 with `Retry-After`;
//! - on a full filesystem (a tmpfs filled to the last page), writes answer
//!   503;
//! - a journal directory that cannot be used at start (a path inside a
//!   regular file, a read-only filesystem) stops `serve` with an error that
//!   names `journal_dir`;
//! - with `PGSESSION_FALLBACK=false`, `serve` starts without a journal and
//!   an outage answers 503.
//!
//! In each, every 2xx is in the table once the database is back.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{free_port, pgsession, sid_of, ServeProcess, SECRET};
use crate::support::{
    base, check_stored, health, http, is_2xx, login_users, spawn_counter_load, tail, wait_health,
    wait_settled, Figures, Rig, User,
};

const USERS: usize = 8;
const WAIT: Duration = Duration::from_secs(60);
/// The byte limit of the journal-full scenario: room for a few dozen
/// sessions.
const SMALL_JOURNAL: u64 = 20_000;

fn cut(rig: &Rig) {
    rig.proxy.refuse(true);
    rig.proxy.reset_all();
}

async fn wait_open(http: &reqwest::Client, serve: &ServeProcess) -> Value {
    wait_health(http, &base(serve), WAIT, Duration::from_millis(50), |h| {
        h["breaker"] == "open"
    })
    .await
    .unwrap_or_else(|| panic!("the breaker did not open\n{}", tail(&serve.stderr(), 40)))
}

/// One `POST /login` for a new user: the status, the `Retry-After` header,
/// and the user (with its session when acknowledged).
async fn login_new(
    http: &reqwest::Client,
    base: &str,
    name: String,
) -> (u16, Option<String>, User) {
    let mut user = User::anonymous(name);
    let response = http
        .post(format!("{base}/login"))
        .header("content-type", "application/json")
        .body(format!(r#"{{"user":"{}"}}"#, user.name))
        .send()
        .await
        .expect("login answered");
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap_or("?").to_owned());
    let a = crate::common::answer(response).await;
    if is_2xx(a.status) {
        let cookie = a.cookie.expect("login sets a cookie");
        user.sessions.push((sid_of(&cookie), 0));
        user.cookie = Some(cookie);
        user.logged_in = true;
    }
    (a.status, retry_after, user)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_full() {
    let rig = Rig::new().await;
    let journal = tempfile::tempdir().expect("journal dir");
    let journal_dir = journal.path().to_str().expect("UTF-8 path").to_owned();
    let max = SMALL_JOURNAL.to_string();
    let env = [
        ("PGSESSION_JOURNAL_DIR", journal_dir.as_str()),
        ("PGSESSION_JOURNAL_MAX_BYTES", max.as_str()),
    ];
    let serve = ServeProcess::start_ready(&rig.proxied_url(), &env).await;
    let http = http();
    let base = base(&serve);
    let users = login_users(&http, &base, USERS).await;
    let t0 = Instant::now();
    let (stop, load) = spawn_counter_load(&http, &base, users, t0, Duration::from_secs(120));
    tokio::time::sleep(Duration::from_secs(1)).await;
    cut(&rig);
    wait_open(&http, &serve).await;

    // New sessions, one after another, until the journal refuses five in
    // a row.
    let mut logged_in = Vec::new();
    let (mut refused, mut in_a_row, mut attempts) = (Vec::new(), 0, 0);
    while in_a_row < 5 && attempts < 1_000 {
        attempts += 1;
        let (status, retry_after, user) = login_new(&http, &base, format!("new{attempts}")).await;
        if is_2xx(status) {
            in_a_row = 0;
            logged_in.push(user);
        } else {
            in_a_row += 1;
            refused.push((status, retry_after));
        }
    }
    let full = health(&http, &base).await.expect("/health");
    rig.proxy.heal();
    let recovery = wait_settled(&http, &serve, WAIT).await;
    // Once written back, the journal takes writes again.
    let (after_status, _, after_user) = login_new(&http, &base, "after".into()).await;
    stop.stop();
    let report = load.await.expect("load");
    wait_settled(&http, &serve, WAIT).await;
    let end = health(&http, &base).await.expect("/health");
    let mut everyone = report.users.clone();
    everyone.extend(logged_in.iter().cloned());
    everyone.push(after_user);
    let stored = check_stored(&rig.db, &everyone).await;
    let without_retry_after = refused.iter().filter(|(_, r)| r.is_none()).count();

    Figures::new("journal_full")
        .set("max_bytes", SMALL_JOURNAL)
        .load(&report)
        .set("logins_in_outage", attempts)
        .set("logins_acked", logged_in.len())
        .set(
            "logins_refused",
            refused
                .iter()
                .map(|(s, r)| format!("{s}/retry-after:{}", r.as_deref().unwrap_or("none")))
                .collect::<Vec<_>>()
                .join(","),
        )
        .set("journal_entries_full", &full["journal"]["entries"])
        .set("journal_bytes_full", &full["journal"]["bytes"])
        .set("recovery_ms", crate::support::ms(recovery))
        .set("login_after_recovery", after_status)
        .set("conflicts", &end["journal"]["conflicts"])
        .stored(&stored)
        .print();

    assert!(!logged_in.is_empty(), "no login was journaled at all");
    assert!(
        in_a_row == 5 && refused.iter().all(|(s, _)| *s == 503),
        "the full journal did not answer 503: {refused:?}"
    );
    assert_eq!(
        without_retry_after, 0,
        "503 without Retry-After: {refused:?}"
    );
    assert_eq!(full["journal"]["max_bytes"], SMALL_JOURNAL);
    assert!(
        full["journal"]["bytes"]
            .as_u64()
            .is_some_and(|b| b <= SMALL_JOURNAL),
        "the journal holds more than its limit: {}",
        full["journal"]
    );
    assert_eq!(
        after_status, 200,
        "no login once the journal was written back"
    );
    assert!(report.mismatches.is_empty(), "{:#?}", report.mismatches);
    assert!(report.replaced.is_empty(), "{:#?}", report.replaced);
    stored.assert_nothing_lost(&serve.stderr());
}

/// A tmpfs mounted on a directory; unmounted when dropped.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path, options: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mount -t tmpfs failed: this scenario needs root (CAP_SYS_ADMIN)"
        );
        Tmpfs {
            dir: dir.to_owned(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a process still holding a file there does not keep it.
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Fills the filesystem of `dir` to the last byte with a file of zeros;
/// returns its size.
fn fill(dir: &Path) -> u64 {
    let mut file = std::fs::File::create(dir.join("filler")).expect("filler");
    let chunk = vec![0u8; 4096];
    let mut written = 0u64;
    loop {
        match file.write(&chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => written += n as u64,
        }
    }
    // Then byte by byte, whatever a partial page still takes.
    while let Ok(1) = file.write(&[0]) {
        written += 1;
    }
    let _ = file.sync_all();
    written
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_unwritable() {
    let rig = Rig::new().await;
    let root = tempfile::tempdir().expect("root");
    let dir = root.path().join("journal");
    let _tmpfs = Tmpfs::mount(&dir, "size=1m,mode=0700");
    let journal_dir = dir.to_str().expect("UTF-8 path").to_owned();
    let env = [("PGSESSION_JOURNAL_DIR", journal_dir.as_str())];
    let serve = ServeProcess::start_ready(&rig.proxied_url(), &env).await;
    let http = http();
    let base = base(&serve);
    let users = login_users(&http, &base, USERS).await;
    // The disk fills up while the server runs.
    let filler = fill(&dir);

    let t0 = Instant::now();
    let (stop, load) = spawn_counter_load(&http, &base, users, t0, Duration::from_secs(120));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cut_at = t0.elapsed();
    cut(&rig);
    wait_open(&http, &serve).await;
    let open_at = t0.elapsed();
    // What the users get for a while with the database away and the disk
    // full.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = health(&http, &base).await.expect("/health");
    let healed_at = t0.elapsed();
    rig.proxy.heal();
    let recovery = wait_settled(&http, &serve, WAIT).await;
    stop.stop();
    let report = load.await.expect("load");
    wait_settled(&http, &serve, WAIT).await;
    let end = health(&http, &base).await.expect("/health");
    let stored = check_stored(&rig.db, &report.users).await;
    let window: Vec<_> = report
        .samples
        .iter()
        .filter(|s| s.at >= open_at && s.at < healed_at)
        .collect();
    let window_ok = window.iter().filter(|s| is_2xx(s.status)).count();
    let window_503 = window.iter().filter(|s| s.status == 503).count();
    let logs = serve.stderr();
    let refused_logged = logs.contains("could not be journaled");

    Figures::new("journal_unwritable")
        .set("filler_bytes", filler)
        .load(&report)
        .set(
            "acked_in_outage",
            report
                .samples
                .iter()
                .filter(|s| s.at >= cut_at && s.at < healed_at && is_2xx(s.status))
                .count(),
        )
        .set("open_window_requests", window.len())
        .set("open_window_2xx", window_ok)
        .set("open_window_503", window_503)
        .set("journal_during", &during["journal"]["entries"])
        .set(
            "broken",
            during["journal"]["broken"]
                .as_str()
                .unwrap_or("null")
                .replace(' ', "_"),
        )
        .set("refusal_logged", refused_logged)
        .set("recovery_ms", crate::support::ms(recovery))
        .set("conflicts", &end["journal"]["conflicts"])
        .stored(&stored)
        .print();

    assert!(
        window_503 > 0 && window_503 + window_ok == window.len(),
        "with the disk full and the database away, writes must answer 503: {:?}",
        report.failures()
    );
    assert!(
        window_ok < window.len() / 2,
        "most writes were acknowledged with the journal's disk full ({window_ok} of {})",
        window.len()
    );
    assert!(
        refused_logged,
        "no log line for the refused writes\n{}",
        tail(&logs, 40)
    );
    assert!(report.mismatches.is_empty(), "{:#?}", report.mismatches);
    assert!(report.replaced.is_empty(), "{:#?}", report.replaced);
    stored.assert_nothing_lost(&logs);
}

/// `pgsession serve` with `env`, expected to exit at start; its status and
/// log.
async fn serve_exits(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let port = free_port();
    let mut child = pgsession()
        .arg("serve")
        .env("PGSESSION_LISTEN", format!("127.0.0.1:{port}"))
        .env("PGSESSION_SECRET", SECRET)
        .env("DATABASE_URL", crate::common::closed_port_url())
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pgsession serve");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("serve kept running with an unusable journal directory");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut log = String::new();
    use std::io::Read as _;
    let _ = child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut log);
    (status.code(), log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_dir_unusable_at_start() {
    let root = tempfile::tempdir().expect("root");
    // A path inside a regular file.
    let file = root.path().join("a-file");
    std::fs::write(&file, b"not a directory").expect("file");
    let inside = file.join("journal");
    let (code, log) = serve_exits(&[("PGSESSION_JOURNAL_DIR", inside.to_str().unwrap())]).await;
    // A read-only filesystem.
    let ro = root.path().join("read-only");
    let _tmpfs = Tmpfs::mount(&ro, "size=64k,ro");
    let (ro_code, ro_log) = serve_exits(&[("PGSESSION_JOURNAL_DIR", ro.to_str().unwrap())]).await;

    let first_error = |log: &str| {
        log.lines()
            .find(|l| l.contains("journal_dir"))
            .unwrap_or("")
            .trim()
            .to_owned()
    };
    Figures::new("journal_dir_unusable_at_start")
        .set("in_a_file_exit", code.map_or(-1, i64::from))
        .set("read_only_exit", ro_code.map_or(-1, i64::from))
        .print();
    println!(
        "in a file: {}\nread-only: {}",
        first_error(&log),
        first_error(&ro_log)
    );

    for (what, code, log) in [("in a file", code, &log), ("read-only", ro_code, &ro_log)] {
        assert!(
            code.is_some_and(|c| c != 0),
            "{what}: serve exited with {code:?}\n{log}"
        );
        assert!(
            log.contains("journal_dir") && log.contains("PGSESSION_JOURNAL_DIR"),
            "{what}: the error does not name the setting\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_off() {
    let rig = Rig::new().await;
    let serve =
        ServeProcess::start_ready(&rig.proxied_url(), &[("PGSESSION_FALLBACK", "false")]).await;
    let http = http();
    let base = base(&serve);
    let h = health(&http, &base).await.expect("/health");
    let users = login_users(&http, &base, USERS).await;
    let t0 = Instant::now();
    let (stop, load) = spawn_counter_load(&http, &base, users, t0, Duration::from_secs(120));
    tokio::time::sleep(Duration::from_secs(1)).await;
    cut(&rig);
    wait_open(&http, &serve).await;
    let open_at = t0.elapsed();
    // One explicit request, for its header.
    let probe = http
        .post(format!("{base}/counter"))
        .send()
        .await
        .expect("answer");
    let probe_status = probe.status().as_u16();
    let probe_retry_after = probe.headers().get("retry-after").is_some();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let healed_at = t0.elapsed();
    rig.proxy.heal();
    let recovery = wait_settled(&http, &serve, WAIT).await;
    // Served again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.stop();
    let report = load.await.expect("load");
    let stored = check_stored(&rig.db, &report.users).await;
    let window: Vec<_> = report
        .samples
        .iter()
        .filter(|s| s.at >= open_at && s.at < healed_at)
        .collect();
    let window_ok = window.iter().filter(|s| is_2xx(s.status)).count();
    let after_ok = report
        .samples
        .iter()
        .filter(|s| s.at >= healed_at && is_2xx(s.status))
        .count();
    let logs = serve.stderr();
    let journal_made = serve.cwd().join(".pgsession/journal").exists();

    Figures::new("fallback_off")
        .load(&report)
        .set("health_fallback", &h["journal"]["fallback"])
        .set("open_window_requests", window.len())
        .set("open_window_2xx", window_ok)
        .set(
            "probe",
            format!("{probe_status}/retry-after:{probe_retry_after}"),
        )
        .set("ok_after_heal", after_ok)
        .set("recovery_ms", crate::support::ms(recovery))
        .stored(&stored)
        .print();

    assert_eq!(h["journal"]["fallback"], false, "/health: {h}");
    assert!(logs.contains("fallback off"), "not said in the log\n{logs}");
    assert!(
        !journal_made,
        "a journal directory was made with the fallback off"
    );
    assert!(
        !window.is_empty() && window_ok == 0,
        "2xx with the fallback off and the database away"
    );
    assert!(
        window.iter().all(|s| s.status == 503),
        "not 503: {:?}",
        report.failures()
    );
    assert!((probe_status, probe_retry_after) == (503, true));
    assert!(after_ok > 0, "not served again after the outage");
    assert!(report.mismatches.is_empty(), "{:#?}", report.mismatches);
    stored.assert_nothing_lost(&logs);
}
