//! The layer's behaviour, on an in-memory backend that counts its calls
//! and can be made to fail.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use http::{header, Request, Response, StatusCode};
use time::OffsetDateTime;
use tower::{service_fn, Layer, ServiceExt};

use super::*;
use crate::cookie::{encode_cookie_value, sign, Secrets};
use crate::{Error, MemoryStore, SessionBackend, StoredSession};

#[derive(Clone, Default)]
struct Counting {
    store: MemoryStore,
    loads: Arc<AtomicUsize>,
    saves: Arc<AtomicUsize>,
    touches: Arc<AtomicUsize>,
    destroys: Arc<AtomicUsize>,
    fail: Arc<AtomicBool>,
}

impl Counting {
    fn check(&self) -> Result<(), Error> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(Error::Unavailable);
        }
        Ok(())
    }
    fn writes(&self) -> usize {
        self.saves.load(Ordering::SeqCst)
            + self.touches.load(Ordering::SeqCst)
            + self.destroys.load(Ordering::SeqCst)
    }
}

impl SessionBackend for Counting {
    async fn load(&self, sid: &str) -> Result<Option<StoredSession>, Error> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        self.store.load(sid).await
    }
    async fn save(&self, sid: &str, json: &str, expire: OffsetDateTime) -> Result<(), Error> {
        self.saves.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        self.store.save(sid, json, expire).await
    }
    async fn touch(&self, sid: &str, expire: OffsetDateTime) -> Result<bool, Error> {
        self.touches.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        self.store.touch(sid, expire).await
    }
    async fn destroy(&self, sid: &str) -> Result<(), Error> {
        self.destroys.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        self.store.destroy(sid).await
    }
}

fn secrets() -> Secrets {
    Secrets::new(["current-secret", "old-secret"]).unwrap()
}

/// What the test handler does with the session.
#[derive(Clone, Copy)]
enum Action {
    Nothing,
    Read,
    Increment,
    Regenerate,
    Destroy,
    InsertHuge,
}

async fn call(layer: &SessionLayer, action: Action, cookie: Option<&str>) -> Response<String> {
    let service = layer.layer(service_fn(move |request: Request<String>| async move {
        let session = request
            .extensions()
            .get::<Session>()
            .cloned()
            .expect("layer adds the session");
        let result: Result<String, SessionError> = async {
            match action {
                Action::Nothing => Ok(String::new()),
                Action::Read => Ok(session.get::<u64>("views").await?.unwrap_or(0).to_string()),
                Action::Increment => {
                    let views = session.get::<u64>("views").await?.unwrap_or(0) + 1;
                    session.insert("views", views).await?;
                    Ok(views.to_string())
                }
                Action::Regenerate => {
                    session.regenerate().await?;
                    session.insert("user", "alice").await?;
                    Ok(String::new())
                }
                Action::Destroy => session.destroy().await.map(|()| String::new()),
                Action::InsertHuge => session
                    .insert("blob", "x".repeat(100_000))
                    .await
                    .map(|()| String::new()),
            }
        }
        .await;
        Ok::<_, std::convert::Infallible>(match result {
            Ok(body) => Response::new(body),
            Err(e) => e.to_response(),
        })
    }));
    let mut request = Request::new(String::new());
    if let Some(cookie) = cookie {
        request
            .headers_mut()
            .insert(header::COOKIE, cookie.parse().unwrap());
    }
    service.oneshot(request).await.unwrap()
}

fn set_cookie(response: &Response<String>) -> Option<String> {
    response
        .headers()
        .get(header::SET_COOKIE)
        .map(|v| v.to_str().unwrap().to_owned())
}

/// `connect.sid=VALUE` from a `Set-Cookie`.
fn cookie_pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap().to_owned()
}

fn sid_of(set_cookie: &str) -> String {
    let value = cookie_pair(set_cookie)
        .trim_start_matches("connect.sid=")
        .to_owned();
    crate::cookie::unsign(&value, &secrets())
        .unwrap()
        .sid
        .as_str()
        .to_owned()
}

#[tokio::test]
async fn a_handler_that_ignores_the_session_costs_nothing() {
    let backend = Counting::default();
    let layer = SessionLayer::new(backend.clone(), secrets());
    let response = call(&layer, Action::Nothing, Some("connect.sid=whatever")).await;
    assert_eq!(set_cookie(&response), None);
    assert_eq!(backend.loads.load(Ordering::SeqCst) + backend.writes(), 0);
}

#[tokio::test]
async fn reading_without_a_session_creates_nothing() {
    let backend = Counting::default();
    let layer = SessionLayer::new(backend.clone(), secrets());
    let response = call(&layer, Action::Read, None).await;
    assert_eq!(response.body(), "0");
    assert_eq!(set_cookie(&response), None);
    assert_eq!(backend.writes(), 0);
    assert!(backend.store.is_empty());
}

#[tokio::test]
async fn a_new_session_is_saved_with_an_express_session_cookie() {
    let backend = Counting::default();
    let layer = SessionLayer::new(backend.clone(), secrets());
    let response = call(&layer, Action::Increment, None).await;
    let cookie = set_cookie(&response).expect("a new session sets the cookie");
    assert!(cookie.starts_with("connect.sid=s%3A"), "{cookie}");
    assert!(cookie.contains("; Path=/"), "{cookie}");
    assert!(cookie.contains("; HttpOnly"), "{cookie}");
    assert!(cookie.contains("; Secure"), "{cookie}");
    assert!(cookie.contains("; SameSite=Lax"), "{cookie}");
    let sid = sid_of(&cookie);
    assert_eq!(sid.len(), 32);
    let stored = backend.store.load(&sid).await.unwrap().expect("saved");
    let doc: serde_json::Value = serde_json::from_str(&stored.json).unwrap();
    assert_eq!(doc["views"], 1);
    assert_eq!(doc["cookie"]["httpOnly"], true);
    assert_eq!(doc["cookie"]["path"], "/");
    assert_eq!(doc["cookie"]["sameSite"], "lax");
}

#[tokio::test]
async fn an_unchanged_session_inside_the_touch_step_is_not_written() {
    let backend = Counting::default();
    let layer = SessionLayer::new(backend.clone(), secrets());
    let first = call(&layer, Action::Increment, None).await;
    let cookie = cookie_pair(&set_cookie(&first).unwrap());
    let writes = backend.writes();
    for _ in 0..5 {
        let response = call(&layer, Action::Read, Some(&cookie)).await;
        assert_eq!(response.body(), "1");
        assert_eq!(set_cookie(&response), None);
    }
    assert_eq!(
        backend.writes(),
        writes,
        "reads inside the touch step write nothing"
    );
    assert_eq!(backend.loads.load(Ordering::SeqCst), 5);

    // A row whose expiry would move by more than the step gets a touch,
    // not a save.
    let sid = sid_of(&format!("{cookie};"));
    let stored = backend.store.load(&sid).await.unwrap().unwrap();
    backend
        .store
        .save(
            &sid,
            &stored.json,
            OffsetDateTime::now_utc() + time::Duration::HOUR,
        )
        .await
        .unwrap();
    let saves = backend.saves.load(Ordering::SeqCst);
    call(&layer, Action::Read, Some(&cookie)).await;
    assert_eq!(backend.touches.load(Ordering::SeqCst), 1);
    assert_eq!(backend.saves.load(Ordering::SeqCst), saves);
    let touched = backend.store.load(&sid).await.unwrap().unwrap();
    assert!(touched.expire > OffsetDateTime::now_utc() + time::Duration::hours(23));
    assert_eq!(
        touched.json, stored.json,
        "a touch leaves the document alone"
    );
}

#[tokio::test]
async fn changes_are_saved_and_rolling_renews_the_cookie() {
    let backend = Counting::default();
    let layer = SessionLayer::new(backend.clone(), secrets()).with_rolling(true);
    let first = call(&layer, Action::Increment, None).await;
    let cookie = cookie_pair(&set_cookie(&first).unwrap());
    let second = call(&layer, Action::Increment, Some(&cookie)).await;
    assert_eq!(second.body(), "2");
    assert_eq!(
        cookie_pair(&set_cookie(&second).expect("rolling")),
        cookie,
        "same id"
    );
    let third = call(&layer, Action::Read, Some(&cookie)).await;
    assert!(set_cookie(&third).is_some(), "rolling renews on reads too");
    assert_eq!(backend.saves.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn regenerate_replaces_the_id_and_kills_the_old_one() {
    let backend = Counting::default();
    let layer = SessionLayer::new(backend.clone(), secrets());
    let first = call(&layer, Action::Increment, None).await;
    let old = set_cookie(&first).unwrap();
    let response = call(&layer, Action::Regenerate, Some(&cookie_pair(&old))).await;
    let new = set_cookie(&response).expect("new cookie");
    assert_ne!(sid_of(&old), sid_of(&new));
    assert!(
        backend.store.load(&sid_of(&old)).await.unwrap().is_none(),
        "old id is dead at once"
    );
    let stored = backend.store.load(&sid_of(&new)).await.unwrap().unwrap();
    assert!(stored.json.contains("alice") && !stored.json.contains("views"));
    assert_eq!(
        call(&layer, Action::Read, Some(&cookie_pair(&old)))
            .await
            .body(),
        "0"
    );
}

#[tokio::test]
async fn a_login_with_a_cookie_deletes_the_old_row_without_reading_it() {
    let backend = Counting::default();
    let layer = SessionLayer::new(backend.clone(), secrets());
    let first = call(&layer, Action::Increment, None).await;
    let old = cookie_pair(&set_cookie(&first).unwrap());
    let loads_before = backend.loads.load(Ordering::SeqCst);
    let response = call(&layer, Action::Regenerate, Some(&old)).await;
    assert!(set_cookie(&response).is_some(), "new cookie");
    assert_eq!(
        backend.loads.load(Ordering::SeqCst) - loads_before,
        0,
        "regenerate before any read loads nothing"
    );
    assert_eq!(backend.destroys.load(Ordering::SeqCst), 1);
    assert!(backend.store.load(&sid_of(&old)).await.unwrap().is_none());
}

#[tokio::test]
async fn destroy_removes_the_row_and_clears_the_cookie() {
    let backend = Counting::default();
    let layer = SessionLayer::new(backend.clone(), secrets());
    let first = call(&layer, Action::Increment, None).await;
    let cookie = set_cookie(&first).unwrap();
    let response = call(&layer, Action::Destroy, Some(&cookie_pair(&cookie))).await;
    let cleared = set_cookie(&response).expect("removal cookie");
    assert!(cleared.starts_with("connect.sid=;"), "{cleared}");
    assert!(
        cleared.contains("Expires=Thu, 01 Jan 1970 00:00:00 GMT"),
        "{cleared}"
    );
    assert!(backend.store.is_empty());
}

#[tokio::test]
async fn a_logout_the_store_cannot_take_still_clears_the_cookie() {
    let backend = Counting::default();
    let layer = SessionLayer::new(backend.clone(), secrets());
    let first = call(&layer, Action::Increment, None).await;
    let cookie = cookie_pair(&set_cookie(&first).unwrap());
    backend.fail.store(true, Ordering::SeqCst);
    let response = call(&layer, Action::Destroy, Some(&cookie)).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let cleared = set_cookie(&response).expect("removal cookie on the 503 too");
    assert!(cleared.starts_with("connect.sid=;"), "{cleared}");
}

#[tokio::test]
async fn bad_cookies_mean_no_session_and_are_never_adopted() {
    let backend = Counting::default();
    let layer = SessionLayer::new(backend.clone(), secrets());
    let chosen = "attacker-chosen-id-000000000000000";
    backend
        .store
        .save(
            chosen,
            r#"{"cookie":{},"views":41}"#,
            OffsetDateTime::now_utc() + time::Duration::HOUR,
        )
        .await
        .unwrap();
    let forged = encode_cookie_value(&sign(chosen, &Secrets::new(["not-our-secret"]).unwrap()));
    let valid = encode_cookie_value(&sign(chosen, &secrets()));
    for cookie in [
        format!("connect.sid={chosen}"),                       // unsigned
        format!("connect.sid=s%3A{chosen}"),                   // no signature
        format!("connect.sid={forged}"),                       // wrong secret
        format!("connect.sid={}x", &valid[..valid.len() - 1]), // tampered
        format!("connect.sid={valid}; connect.sid={forged}"),  // duplicated
        format!("connect.sid={}", "a".repeat(10_000)),         // oversized
        "connect.sid=%E0%A4%A".to_owned(),                     // garbled
    ] {
        let response = call(&layer, Action::Increment, Some(&cookie)).await;
        assert_eq!(response.status(), StatusCode::OK, "{cookie}");
        assert_eq!(response.body(), "1", "no session read from {cookie}");
        assert_ne!(sid_of(&set_cookie(&response).unwrap()), chosen, "{cookie}");
    }
    // The properly signed cookie does read it.
    assert_eq!(
        call(&layer, Action::Read, Some(&format!("connect.sid={valid}")))
            .await
            .body(),
        "41"
    );
}

#[tokio::test]
async fn an_old_secret_still_verifies_and_the_cookie_is_re_signed() {
    let backend = Counting::default();
    let layer = SessionLayer::new(backend.clone(), secrets());
    let sid = "0123456789abcdef0123456789abcdef";
    backend
        .store
        .save(
            sid,
            r#"{"cookie":{"path":"/","httpOnly":true},"views":2}"#,
            OffsetDateTime::now_utc() + time::Duration::HOUR,
        )
        .await
        .unwrap();
    let old_signed = encode_cookie_value(&sign(sid, &Secrets::new(["old-secret"]).unwrap()));
    let response = call(
        &layer,
        Action::Read,
        Some(&format!("connect.sid={old_signed}")),
    )
    .await;
    assert_eq!(response.body(), "2");
    let resigned = set_cookie(&response).expect("re-signed with the current secret");
    assert_eq!(
        cookie_pair(&resigned),
        format!(
            "connect.sid={}",
            encode_cookie_value(&sign(sid, &secrets()))
        )
    );
}

#[tokio::test]
async fn a_store_failure_is_a_503_with_retry_after_and_a_body() {
    let backend = Counting::default();
    let layer = SessionLayer::new(backend.clone(), secrets());
    let first = call(&layer, Action::Increment, None).await;
    let cookie = cookie_pair(&set_cookie(&first).unwrap());
    backend.fail.store(true, Ordering::SeqCst);
    let response = call(&layer, Action::Increment, Some(&cookie)).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
    assert!(response.body().contains("\"error\""));
    assert_eq!(set_cookie(&response), None, "the client keeps its cookie");
    assert_eq!(
        backend.saves.load(Ordering::SeqCst),
        1,
        "no new session replaced the unreadable one"
    );
    backend.fail.store(false, Ordering::SeqCst);
    assert_eq!(call(&layer, Action::Read, Some(&cookie)).await.body(), "1");
}

#[tokio::test]
async fn a_failed_save_replaces_the_handlers_answer() {
    let backend = Counting::default();
    let layer = SessionLayer::new(backend.clone(), secrets());
    // Loading a missing session works; saving fails.
    let failing = backend.clone();
    let service = layer.layer(service_fn(move |request: Request<String>| {
        let failing = failing.clone();
        async move {
            let session = request.extensions().get::<Session>().cloned().unwrap();
            session.insert("views", 1).await.unwrap();
            failing.fail.store(true, Ordering::SeqCst);
            Ok::<_, std::convert::Infallible>(Response::new("ok".to_owned()))
        }
    }));
    let response = service.oneshot(Request::new(String::new())).await.unwrap();
    assert_eq!(
        response.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "not acknowledged when not stored"
    );
}

#[tokio::test]
async fn sessions_over_the_size_limit_are_refused() {
    let backend = Counting::default();
    let layer = SessionLayer::new(backend.clone(), secrets()).with_max_session_bytes(1024);
    let response = call(&layer, Action::InsertHuge, None).await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(response.body().contains("limit"));
    assert!(backend.store.is_empty());
}

#[tokio::test]
async fn an_unreadable_row_is_no_session() {
    let backend = Counting::default();
    let layer = SessionLayer::new(backend.clone(), secrets());
    let sid = "broken-row-0000000000000000000000";
    backend
        .store
        .save(
            sid,
            "[1,2,3]",
            OffsetDateTime::now_utc() + time::Duration::HOUR,
        )
        .await
        .unwrap();
    let cookie = format!(
        "connect.sid={}",
        encode_cookie_value(&sign(sid, &secrets()))
    );
    let response = call(&layer, Action::Increment, Some(&cookie)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.body(), "1");
    assert_ne!(sid_of(&set_cookie(&response).unwrap()), sid);
}

#[tokio::test]
async fn secure_auto_follows_the_request() {
    let backend = Counting::default();
    let layer =
        SessionLayer::new(backend.clone(), secrets()).with_cookie_secure(CookieSecure::Auto);
    let plain = call(&layer, Action::Increment, None).await;
    assert!(!set_cookie(&plain).unwrap().contains("Secure"));
    let never = SessionLayer::new(backend, secrets()).with_cookie_secure(CookieSecure::Never);
    assert!(!set_cookie(&call(&never, Action::Increment, None).await)
        .unwrap()
        .contains("Secure"));
}

/// A backend configured with its own lifetime and size limit.
#[derive(Clone, Default)]
struct Configured(MemoryStore);

impl SessionBackend for Configured {
    async fn load(&self, sid: &str) -> Result<Option<StoredSession>, Error> {
        self.0.load(sid).await
    }
    async fn save(&self, sid: &str, json: &str, expire: OffsetDateTime) -> Result<(), Error> {
        self.0.save(sid, json, expire).await
    }
    async fn touch(&self, sid: &str, expire: OffsetDateTime) -> Result<bool, Error> {
        self.0.touch(sid, expire).await
    }
    async fn destroy(&self, sid: &str) -> Result<(), Error> {
        self.0.destroy(sid).await
    }
    fn lifetime(&self) -> Option<std::time::Duration> {
        Some(std::time::Duration::from_secs(7200))
    }
    fn max_session_bytes(&self) -> Option<usize> {
        Some(100_001 + 1024)
    }
}

#[tokio::test]
async fn the_layer_takes_the_backends_lifetime_and_size_limit() {
    let backend = Configured::default();
    let layer = SessionLayer::new(backend.clone(), secrets());
    let response = call(&layer, Action::Increment, None).await;
    let cookie = cookie_pair(&set_cookie(&response).unwrap());
    let crate::cookie::CookieLookup::Found(value) =
        crate::cookie::parse_cookie_header([cookie.as_bytes()], "connect.sid")
    else {
        panic!("no session cookie in {cookie}");
    };
    let sid = crate::cookie::unsign(value, &secrets()).expect("a signed cookie");
    let stored = backend.0.load(sid.sid.as_str()).await.unwrap().unwrap();
    let lives = stored.expire - OffsetDateTime::now_utc();
    assert!(
        lives > time::Duration::minutes(119) && lives < time::Duration::minutes(121),
        "the row lives {lives}, not the backend's 2 h"
    );
    // A 100 kB value is over the default 64 KiB but within the backend's limit.
    let response = call(&layer, Action::InsertHuge, Some(&cookie)).await;
    assert_eq!(response.status(), StatusCode::OK);
}

#[test]
fn cookie_options_are_checked_when_set() {
    let layer = || SessionLayer::new(MemoryStore::new(), secrets());
    assert!(layer().with_cookie_name("bad name").is_err());
    assert!(layer().with_cookie_name("").is_err());
    assert!(layer().with_path("/a;b").is_err());
    assert!(layer().with_domain("-bad-.example").is_err());
    assert!(layer().with_cookie_name("app.sid").is_ok());
    assert!(layer().with_path("/app").is_ok());
    assert!(layer().with_domain(".example.com").is_ok());
}

#[tokio::test]
async fn options_set_after_a_clone_neither_panic_nor_reach_the_clone() {
    let layer = SessionLayer::new(Counting::default(), secrets());
    let clone = layer.clone();
    let renamed = layer.with_cookie_name("other.sid").unwrap();
    let response = call(&renamed, Action::Increment, None).await;
    assert!(set_cookie(&response).unwrap().starts_with("other.sid="));
    let response = call(&clone, Action::Increment, None).await;
    assert!(set_cookie(&response).unwrap().starts_with("connect.sid="));
}
