//! Starting without a reachable database, with the embedded PostgreSQL, and
//! in memory.

use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use pgsession_testkit::server::StopMode;

use crate::common::{call, client, closed_port_url, eventually, ServeProcess};

#[tokio::test]
async fn an_unreachable_database_does_not_stop_the_server() {
    let url = closed_port_url();
    let mut serve = ServeProcess::start(
        Some(&url),
        &[
            ("PGSESSION_STARTUP_BACKOFF", "100ms"),
            ("PGSESSION_QUERY_TIMEOUT", "2s"),
        ],
    )
    .await;
    let http = client();
    assert_eq!(
        call(&http, &serve, "GET", "/healthz", None, None)
            .await
            .status,
        200
    );
    let ready = call(&http, &serve, "GET", "/readyz", None, None).await;
    assert_eq!(ready.status, 503, "{}", ready.body);
    let health = call(&http, &serve, "GET", "/health", None, None).await;
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["status"], "degraded", "{}", health.body);
    // A request that needs the store is served from the library's fallback
    // or refused with its 503; never a 500.
    let a = call(&http, &serve, "POST", "/counter", None, None).await;
    assert!(matches!(a.status, 200 | 503), "{} {}", a.status, a.body);
    if a.status == 503 {
        assert!(a.json()["error"].is_string());
    }
    // Still up.
    assert_eq!(
        call(&http, &serve, "GET", "/healthz", None, None)
            .await
            .status,
        200
    );

    serve.sigterm();
    assert_eq!(serve.wait().await.code(), Some(0));
}

/// The newcomer's path: no `DATABASE_URL`, no `PGSESSION_SECRET`, in a
/// private directory (mode 700, as `mktemp -d` makes them). As root, the
/// `postgres` user cannot reach it, so the cluster lives in a directory of
/// that user's, linked from `.pgsession/data`.
#[tokio::test]
async fn without_database_url_an_embedded_postgresql_is_used_and_kept() {
    if pgsession_binaries_missing() {
        eprintln!("skipped: no PostgreSQL binaries");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let pgsession_dir = dir.path().join(".pgsession");
    let _cleanup = RemoveRelocatedCluster(pgsession_dir.join("data"));
    let no_secret = [("PGSESSION_SECRET", "")];
    let http = client();

    let mut serve = ServeProcess::start_in(dir.path(), None, None, &no_secret).await;
    wait_ready(&http, &serve).await;
    let logs = serve.stderr();
    assert!(logs.contains("embedded PostgreSQL"), "{logs}");
    assert_eq!(
        logs.matches("PGSESSION_SECRET is not set").count(),
        1,
        "the secret is announced once: {logs}"
    );
    assert!(logs.contains("(made now)"), "{logs}");
    let health = call(&http, &serve, "GET", "/health", None, None).await;
    assert_eq!(health.json()["store"], "embedded");
    let a = call(&http, &serve, "POST", "/counter", None, None).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let cookie = a.cookie.unwrap();
    let data = pgsession_dir.join("data");
    assert!(data.join("PG_VERSION").is_file());
    assert!(pgsession_dir.join("port").is_file());
    let secret = std::fs::metadata(pgsession_dir.join("secret")).expect("the secret is kept");
    assert_eq!(secret.permissions().mode() & 0o777, 0o600);
    serve.sigterm();
    assert_eq!(serve.wait().await.code(), Some(0));
    assert!(
        !data.join("postmaster.pid").exists(),
        "the embedded PostgreSQL was not stopped"
    );
    drop(serve);

    // The next run reuses the cluster and the secret: the session is still
    // there, and its cookie still valid.
    let mut serve = ServeProcess::start_in(dir.path(), None, None, &no_secret).await;
    wait_ready(&http, &serve).await;
    let logs = serve.stderr();
    assert!(!logs.contains("initdb"), "{logs}");
    assert!(logs.contains("(made by an earlier run)"), "{logs}");
    let a = call(&http, &serve, "POST", "/counter", Some(&cookie), None).await;
    assert_eq!(
        (a.status, a.json()["views"].as_u64()),
        (200, Some(2)),
        "{}",
        a.body
    );
    serve.sigterm();
    assert_eq!(serve.wait().await.code(), Some(0));
    assert!(!data.join("postmaster.pid").exists());
}

async fn wait_ready(http: &reqwest::Client, serve: &ServeProcess) {
    eventually("/readyz 200", Duration::from_secs(30), || async {
        call(http, serve, "GET", "/readyz", None, None).await.status == 200
    })
    .await;
}

/// Removes the cluster that `.pgsession/data` links to (as root, it lives
/// outside the test's directory), when the test ends.
struct RemoveRelocatedCluster(std::path::PathBuf);

impl Drop for RemoveRelocatedCluster {
    fn drop(&mut self) {
        let Ok(target) = std::fs::read_link(&self.0) else {
            return;
        };
        if let Some(server_dir) = target.parent() {
            if let Ok(bin) = pgsession_testkit::server::Binaries::find() {
                bin.stop_blocking(&target, StopMode::Immediate, "10");
            }
            let _ = std::fs::remove_dir_all(server_dir);
        }
    }
}

#[tokio::test]
async fn without_database_or_binaries_sessions_live_in_memory() {
    let mut serve = ServeProcess::start(None, &[("PATH", "/nonexistent")]).await;
    let http = client();
    let logs = serve.stderr();
    assert!(
        logs.contains("IN MEMORY") && logs.contains("WARN"),
        "{logs}"
    );
    assert_eq!(
        call(&http, &serve, "GET", "/readyz", None, None)
            .await
            .status,
        200
    );
    let health = call(&http, &serve, "GET", "/health", None, None).await;
    assert_eq!(health.json()["store"], "memory");
    assert_eq!(health.json()["status"], "ok");

    let a = call(
        &http,
        &serve,
        "POST",
        "/login",
        None,
        Some(r#"{"user":"bob"}"#),
    )
    .await;
    assert_eq!(a.status, 200);
    let cookie = a.cookie.unwrap();
    let a = call(&http, &serve, "POST", "/counter", Some(&cookie), None).await;
    assert_eq!(a.json()["views"], 1);
    let a = call(&http, &serve, "GET", "/me", Some(&cookie), None).await;
    assert_eq!(a.json(), serde_json::json!({"user": "bob", "views": 1}));
    let a = call(&http, &serve, "POST", "/logout", Some(&cookie), None).await;
    assert_eq!(a.status, 204);
    let a = call(&http, &serve, "GET", "/me", Some(&cookie), None).await;
    assert_eq!(a.status, 401);
    assert!(!serve.cwd().join(".pgsession").exists());
    serve.sigterm();
    assert_eq!(serve.wait().await.code(), Some(0));
}

fn pgsession_binaries_missing() -> bool {
    let on_path = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path)
            .any(|d| d.join("initdb").is_file() && d.join("pg_ctl").is_file())
    });
    let from_pg_config = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
        .is_ok_and(|o| o.status.success());
    !(on_path || from_pg_config)
}
