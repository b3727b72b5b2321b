//! Start-up while the database is away: `serve` starts, `/health` says
//! degraded; when the database comes up the table is created and
//! `/health` says ok. A write made while the database was away is
//! journaled and written back.

use std::time::{Duration, Instant};

use crate::common::{sid_of, ServeProcess};
use crate::support::{
    base, check_stored, health, http, log_lines, ms, ms_or_never, send, Figures, Rig, User,
};

/// How long the database stays away after the server started.
const AWAY: Duration = Duration::from_secs(10);
/// How long the server may take to see it back and create the table.
const UP_BOUND: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_while_database_away() {
    let rig = Rig::new().await;
    rig.cluster().stop().await.expect("stop the cluster");
    let t0 = Instant::now();
    let serve = ServeProcess::start(Some(rig.direct_url()), &[]).await;
    let started_in = t0.elapsed();
    let http = http();
    let base = base(&serve);

    let h = health(&http, &base).await.expect("/health answers");
    let status_away = h["status"].as_str().unwrap_or("?").to_owned();
    let readyz_away = send(&http, &base, "GET", "/readyz", None, None)
        .await
        .expect("/readyz")
        .status;

    // A write while the database is away: journaled (2xx) or refused (503).
    let sent = Instant::now();
    let a = send(&http, &base, "POST", "/counter", None, None)
        .await
        .expect("an answer while the database is away");
    let away_write_ms = ms(sent.elapsed());
    let mut user = User::anonymous("early".into());
    if a.status == 200 {
        let cookie = a.cookie.clone().expect("cookie");
        user.sessions.push((sid_of(&cookie), 1));
        user.cookie = Some(cookie);
    }

    tokio::time::sleep_until((t0 + AWAY).into()).await;
    rig.cluster()
        .start_again()
        .await
        .expect("start the cluster");
    let up = Instant::now();
    let mut ok_after = None;
    while up.elapsed() < UP_BOUND {
        if let Some(h) = health(&http, &base).await {
            if h["status"] == "ok" && h["journal"]["entries"] == 0 {
                ok_after = Some(up.elapsed());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let table: Option<String> = rig
        .db
        .client()
        .await
        .expect("direct connection")
        .query_one("SELECT to_regclass('public.session_store')::text", &[])
        .await
        .expect("to_regclass")
        .get(0);
    let readyz_up = send(&http, &base, "GET", "/readyz", None, None)
        .await
        .expect("/readyz")
        .status;
    let after = send(
        &http,
        &base,
        "POST",
        "/counter",
        user.cookie.as_deref(),
        None,
    )
    .await
    .expect("answer");
    if after.status == 200 {
        if let Some(cookie) = &after.cookie {
            if user.sid() != Some(sid_of(cookie).as_str()) {
                user.sessions.push((sid_of(cookie), 0));
                user.cookie = Some(cookie.clone());
            }
        }
        user.sessions.last_mut().expect("a session").1 += 1;
    }
    let stored = check_stored(&rig.db, &[user.clone()]).await;
    let logs = serve.stderr();

    Figures::new("startup_away")
        .set("healthz_after_ms", ms(started_in))
        .set("health_while_away", &status_away)
        .set("readyz_while_away", readyz_away)
        .set("write_while_away", a.status)
        .set("write_while_away_ms", away_write_ms)
        .set("away_s", AWAY.as_secs())
        .set("health_ok_after_db_up_ms", ms_or_never(ok_after))
        .set("table", table.as_deref().unwrap_or("missing"))
        .set("readyz_after", readyz_up)
        .set("views_after", after.body.trim())
        .set("error_lines", log_lines(&logs, "ERROR").len())
        .stored(&stored)
        .print();

    assert_eq!(status_away, "degraded", "{h}");
    assert_eq!(readyz_away, 503);
    assert!(
        matches!(a.status, 200 | 503),
        "a write while away: {} {}",
        a.status,
        a.body
    );
    assert_eq!(
        table.as_deref(),
        Some("session_store"),
        "the table was not created"
    );
    assert!(
        ok_after.is_some(),
        "/health did not say ok within {UP_BOUND:?} of the database coming up\n{}",
        crate::support::tail(&logs, 40)
    );
    assert_eq!(readyz_up, 200);
    assert_eq!(after.status, 200, "{}", after.body);
    stored.assert_nothing_lost(&logs);
}
