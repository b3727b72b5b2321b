//! The contract of DESIGN.md, route by route, against a real database.

use crate::common::{call, client, rows_with_sid, scalar, sid_of, test_db, ServeProcess};

#[tokio::test]
async fn the_whole_contract() {
    let db = test_db().await;
    let serve = ServeProcess::start_ready(db.url(), &[]).await;
    let http = client();

    // No session yet: GET /counter says 0 and sets no cookie.
    let a = call(&http, &serve, "GET", "/counter", None, None).await;
    assert_eq!((a.status, a.json()), (200, serde_json::json!({"views": 0})));
    assert!(a.set_cookies.is_empty(), "{:?}", a.set_cookies);
    let a = call(&http, &serve, "GET", "/me", None, None).await;
    assert_eq!(a.status, 401);
    assert_eq!(a.json(), serde_json::json!({"error": "not logged in"}));
    assert!(a.set_cookies.is_empty(), "{:?}", a.set_cookies);
    assert_eq!(
        scalar::<i64>(&db, "SELECT count(*) FROM session_store").await,
        0
    );

    let a = call(
        &http,
        &serve,
        "POST",
        "/login",
        None,
        Some(r#"{"user":"alice"}"#),
    )
    .await;
    assert_eq!(
        (a.status, a.json()),
        (200, serde_json::json!({"user": "alice"}))
    );
    let cookie = a.cookie.expect("login sets the session cookie");
    let header = &a.set_cookies[0];
    assert!(header.contains("HttpOnly"), "{header}");
    assert!(header.contains("SameSite=Lax"), "{header}");
    // Plain HTTP with PGSESSION_COOKIE_SECURE unset (auto): not Secure.
    assert!(!header.contains("Secure"), "{header}");
    assert_eq!(rows_with_sid(&db, &sid_of(&cookie)).await, 1);

    let a = call(&http, &serve, "GET", "/me", Some(&cookie), None).await;
    assert_eq!(
        (a.status, a.json()),
        (200, serde_json::json!({"user": "alice", "views": 0}))
    );

    for n in 1..=2 {
        let a = call(&http, &serve, "POST", "/counter", Some(&cookie), None).await;
        assert_eq!((a.status, a.json()), (200, serde_json::json!({"views": n})));
    }
    let a = call(&http, &serve, "GET", "/counter", Some(&cookie), None).await;
    assert_eq!((a.status, a.json()), (200, serde_json::json!({"views": 2})));
    let a = call(&http, &serve, "GET", "/me", Some(&cookie), None).await;
    assert_eq!(a.json(), serde_json::json!({"user": "alice", "views": 2}));
    // The stored document is express-session's.
    let sess: serde_json::Value = {
        let client = db.client().await.unwrap();
        client
            .query_one(
                "SELECT sess FROM session_store WHERE sid = $1",
                &[&sid_of(&cookie)],
            )
            .await
            .unwrap()
            .get(0)
    };
    assert_eq!(sess["user"], "alice");
    assert_eq!(sess["views"], 2);
    assert!(sess["cookie"].is_object(), "{sess}");

    let a = call(&http, &serve, "POST", "/logout", Some(&cookie), None).await;
    assert_eq!(a.status, 204);
    assert!(a.body.is_empty());
    assert_eq!(
        rows_with_sid(&db, &sid_of(&cookie)).await,
        0,
        "logout removes the row"
    );
    let a = call(&http, &serve, "GET", "/me", Some(&cookie), None).await;
    assert_eq!(a.status, 401);
}

#[tokio::test]
async fn counter_creates_a_session_and_get_does_not_change_it() {
    let db = test_db().await;
    let serve = ServeProcess::start_ready(db.url(), &[]).await;
    let http = client();

    let a = call(&http, &serve, "POST", "/counter", None, None).await;
    assert_eq!((a.status, a.json()), (200, serde_json::json!({"views": 1})));
    let cookie = a.cookie.expect("POST /counter creates a session");
    let sid = sid_of(&cookie);
    let before: String = {
        let client = db.client().await.unwrap();
        client
            .query_one(
                "SELECT sess::text || expire::text FROM session_store WHERE sid = $1",
                &[&sid],
            )
            .await
            .unwrap()
            .get(0)
    };
    let a = call(&http, &serve, "GET", "/counter", Some(&cookie), None).await;
    assert_eq!((a.status, a.json()), (200, serde_json::json!({"views": 1})));
    let after: String = {
        let client = db.client().await.unwrap();
        client
            .query_one(
                "SELECT sess::text || expire::text FROM session_store WHERE sid = $1",
                &[&sid],
            )
            .await
            .unwrap()
            .get(0)
    };
    assert_eq!(before, after, "GET /counter changed the session");
    // Not logged in, but with a session: still 401.
    let a = call(&http, &serve, "GET", "/me", Some(&cookie), None).await;
    assert_eq!(a.status, 401);
}

#[tokio::test]
async fn login_regenerates_the_session() {
    let db = test_db().await;
    let serve = ServeProcess::start_ready(db.url(), &[]).await;
    let http = client();

    let a = call(&http, &serve, "POST", "/counter", None, None).await;
    let old = a.cookie.expect("a session before login");
    let old_sid = sid_of(&old);
    assert_eq!(rows_with_sid(&db, &old_sid).await, 1);

    let a = call(
        &http,
        &serve,
        "POST",
        "/login",
        Some(&old),
        Some(r#"{"user":"alice"}"#),
    )
    .await;
    assert_eq!(a.status, 200);
    let new = a.cookie.expect("login sets a new cookie");
    let new_sid = sid_of(&new);
    assert_ne!(old_sid, new_sid, "login must change the session id");
    assert_eq!(
        rows_with_sid(&db, &old_sid).await,
        0,
        "the old session row is gone"
    );
    assert_eq!(rows_with_sid(&db, &new_sid).await, 1);

    let a = call(&http, &serve, "GET", "/me", Some(&old), None).await;
    assert_eq!(a.status, 401, "the old cookie is logged out: {}", a.body);
    let a = call(&http, &serve, "GET", "/me", Some(&new), None).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["user"], "alice");
}

#[tokio::test]
async fn bad_login_bodies_are_400_with_a_json_error() {
    let db = test_db().await;
    let serve = ServeProcess::start_ready(db.url(), &[]).await;
    let http = client();
    for body in [
        None,
        Some(""),
        Some("not json"),
        Some("{}"),
        Some(r#"{"user":""}"#),
        Some(r#"{"user":42}"#),
    ] {
        let a = call(&http, &serve, "POST", "/login", None, body).await;
        assert_eq!(a.status, 400, "{body:?}: {}", a.body);
        assert!(a.json()["error"].is_string(), "{body:?}: {}", a.body);
        assert!(a.set_cookies.is_empty(), "{body:?}: {:?}", a.set_cookies);
    }
    assert_eq!(
        scalar::<i64>(&db, "SELECT count(*) FROM session_store").await,
        0
    );
}

#[tokio::test]
async fn operational_routes() {
    let db = test_db().await;
    let serve =
        ServeProcess::start_ready(db.url(), &[("PGSESSION_HEALTH_CHECK_INTERVAL", "1s")]).await;
    let http = client();

    assert!(
        serve
            .stderr()
            .contains(&format!("listening on {}", serve.url(""))),
        "{}",
        serve.stderr()
    );
    let a = call(&http, &serve, "GET", "/healthz", None, None).await;
    assert_eq!(a.status, 200);
    crate::common::eventually(
        "/readyz 200",
        std::time::Duration::from_secs(20),
        || async {
            call(&http, &serve, "GET", "/readyz", None, None)
                .await
                .status
                == 200
        },
    )
    .await;
    // The library checks every health-check interval.
    crate::common::eventually(
        "a health check",
        std::time::Duration::from_secs(20),
        || async {
            call(&http, &serve, "GET", "/health", None, None)
                .await
                .json()["last_check"]["ok"]
                == true
        },
    )
    .await;
    let health = call(&http, &serve, "GET", "/health", None, None).await;
    assert_eq!(health.status, 200);
    let h = health.json();
    assert_eq!(h["status"], "ok", "{h}");
    assert_eq!(h["breaker"], "closed");
    for key in ["size", "idle", "in_use", "waiting", "max"] {
        assert!(h["pool"][key].is_u64(), "pool.{key}: {h}");
    }
    assert!(h["last_check"]["at"].is_string(), "{h}");
    assert!(h["last_check"]["latency_ms"].is_number(), "{h}");
    assert_eq!(h["journal"]["entries"], 0);

    let a = call(&http, &serve, "POST", "/counter", None, None).await;
    assert_eq!(a.status, 200);
    let m = call(&http, &serve, "GET", "/metrics", None, None).await;
    assert_eq!(m.status, 200);
    for name in [
        "# pgsession metrics",
        "pgsession_up 1",
        "pgsession_ready 1",
        "pgsession_pool_size",
        "pgsession_breaker_state",
        "pgsession_operations_total{",
        "pgsession_query_seconds_bucket{",
    ] {
        assert!(m.body.contains(name), "{name} missing:\n{}", m.body);
    }

    let d = call(&http, &serve, "GET", "/dashboard", None, None).await;
    assert_eq!(d.status, 200);
    assert!(d.body.contains("<html"), "{}", d.body);

    let n = call(&http, &serve, "GET", "/nowhere", None, None).await;
    assert_eq!(n.status, 404);
}

#[tokio::test]
async fn cookie_secure_true_marks_the_cookie_secure() {
    let db = test_db().await;
    let serve = ServeProcess::start_ready(db.url(), &[("PGSESSION_COOKIE_SECURE", "true")]).await;
    let http = client();
    let a = call(&http, &serve, "POST", "/counter", None, None).await;
    assert!(a.set_cookies[0].contains("Secure"), "{:?}", a.set_cookies);

    // auto: Secure behind a proxy that says the request came over HTTPS.
    let serve = ServeProcess::start_ready(db.url(), &[("PGSESSION_COOKIE_SECURE", "auto")]).await;
    let response = http
        .post(serve.url("/counter"))
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .unwrap();
    let a = crate::common::answer(response).await;
    assert!(a.set_cookies[0].contains("Secure"), "{:?}", a.set_cookies);
}
