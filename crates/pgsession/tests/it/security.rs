//! Hostile input and secrets, on a real PostgreSQL.
//!
//! Every limit answers with a clear error or with "no session", never a
//! panic or a body-less 500; session ids are unguessable and never chosen
//! by the client; signatures are compared in constant time; secrets rotate;
//! rows written by other programs cannot break a request; and no password
//! or cookie secret reaches a log line, an error or a `Debug` output.
//! SECURITY.md cites these tests by name.

use std::collections::HashSet;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::routing::{get, post};
use axum::Router;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use http::{header, HeaderValue, Request, StatusCode};
use pgsession::cookie::{
    self, signed_cookie_value, unsign, CookieError, Secrets, SessionId, MAX_COOKIE_HEADER_BYTES,
    MAX_SECRETS, MAX_SESSION_ID_BYTES,
};
use pgsession::http::{Session, SessionError, SessionLayer};
use pgsession::{Config, ConfigError, Error, Identifier, Store};
use pgsession_testkit::{ClusterOptions, TestCluster};
use tower::ServiceExt;

use crate::common::*;

// ---------------------------------------------------------------------------
// Helpers

/// Every tracing event of the current thread (all levels, all targets,
/// `log` records of the driver and of rustls included), as text, plus
/// whatever [`Capture::push`] adds (panic messages).
#[derive(Clone, Default)]
pub(crate) struct Capture(Arc<Mutex<Vec<u8>>>);

impl Capture {
    /// Captures this thread's events until the guard is dropped. Use it in
    /// a current-thread runtime (`#[tokio::test]`), so that the store's
    /// tasks run, and log, on this thread too.
    pub(crate) fn start() -> (Capture, tracing::subscriber::DefaultGuard) {
        // `log` records (tokio-postgres, rustls) become tracing events; the
        // logger is global, but events still go to this thread's subscriber.
        let _ = tracing_log::LogTracer::init();
        let capture = Capture::default();
        let writer = capture.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_target(true)
            .with_writer(move || writer.clone())
            .finish();
        (capture, tracing::subscriber::set_default(subscriber))
    }

    /// Everything captured so far.
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("capture lock")).into_owned()
    }

    /// Adds a line of text (an error, a panic message).
    pub(crate) fn push(&self, text: &str) {
        let mut buffer = self.0.lock().expect("capture lock");
        buffer.extend_from_slice(text.as_bytes());
        buffer.push(b'\n');
    }
}

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("capture lock").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What a request got back.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    set_cookie: Option<String>,
    content_type: Option<String>,
    body: String,
}

impl Answer {
    /// `connect.sid=VALUE` of the `Set-Cookie`, ready to send back.
    fn cookie(&self) -> String {
        let set_cookie = self.set_cookie.as_deref().expect("a Set-Cookie");
        set_cookie.split(';').next().unwrap_or_default().to_owned()
    }

    /// The session id the `Set-Cookie` carries, checked with `secrets`.
    fn sid(&self, secrets: &Secrets) -> String {
        sid_of(&self.cookie(), secrets).expect("a cookie signed with these secrets")
    }
}

/// The session id in a `connect.sid=VALUE` pair, if `secrets` verify it.
fn sid_of(pair: &str, secrets: &Secrets) -> Option<String> {
    let value = pair.strip_prefix("connect.sid=")?;
    unsign(value, secrets).map(|u| u.sid.into_string())
}

/// Sends one request to `app` with these raw `Cookie` header values.
async fn send(app: &Router, method: &str, uri: &str, cookies: &[&[u8]]) -> Answer {
    let mut request = Request::builder().method(method).uri(uri);
    for cookie in cookies {
        let value = HeaderValue::from_bytes(cookie).expect("a header value");
        request = request.header(header::COOKIE, value);
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::empty()).expect("a request"))
        .await
        .expect("infallible");
    let status = response.status();
    let text = |name| {
        response
            .headers()
            .get(name)
            .map(|v: &HeaderValue| v.to_str().expect("ASCII header").to_owned())
    };
    let (set_cookie, content_type) = (text(header::SET_COOKIE), text(header::CONTENT_TYPE));
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("a body");
    Answer {
        status,
        set_cookie,
        content_type,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

async fn views(session: Session) -> Result<String, SessionError> {
    Ok(session.get::<u64>("views").await?.unwrap_or(0).to_string())
}

async fn increment(session: Session) -> Result<String, SessionError> {
    let views = session.get::<u64>("views").await?.unwrap_or(0) + 1;
    session.insert("views", views).await?;
    Ok(views.to_string())
}

async fn exists(session: Session) -> Result<String, SessionError> {
    Ok(session.exists().await?.to_string())
}

async fn huge(session: Session) -> Result<String, SessionError> {
    session.insert("blob", "x".repeat(100_000)).await?;
    Ok("stored".into())
}

async fn panics(session: Session) -> String {
    let views = session.get::<u64>("views").await.ok().flatten();
    panic!("handler failed with views = {views:?}")
}

async fn logout(session: Session) -> Result<String, SessionError> {
    session.destroy().await?;
    Ok(String::new())
}

/// The test application: a counter, a session probe, logout, and a handler
/// that tries to store 100 kB.
fn app(store: &Store, secrets: Secrets) -> Router {
    Router::new()
        .route("/counter", get(views).post(increment))
        .route("/exists", get(exists))
        .route("/huge", post(huge))
        .route("/logout", post(logout))
        .layer(SessionLayer::new(store.clone(), secrets))
}

fn secrets(list: &[&str]) -> Secrets {
    Secrets::new(list.iter().copied()).expect("valid secrets")
}

/// A plain connection to `url`, for looking at the table behind the store.
async fn probe(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("probe connection");
    tokio::spawn(connection);
    client
}

/// Rows of `table` (a trusted, quoted name) with this `sid`.
async fn rows(client: &tokio_postgres::Client, table: &str, sid: &str) -> i64 {
    client
        .query_one(
            &format!("SELECT count(*) FROM {table} WHERE sid = $1"),
            &[&sid],
        )
        .await
        .expect("count rows")
        .get(0)
}

/// The alphabet of base64url without padding.
fn is_base64url(text: &str) -> bool {
    text.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The text of the function whose signature starts with `signature` in
/// `source`: up to the `}` at the signature's indentation.
fn function_body<'a>(source: &'a str, signature: &str) -> &'a str {
    let start = source.find(signature).expect("function in source");
    let line_start = source[..start].rfind('\n').map_or(0, |i| i + 1);
    let close = format!("\n{}}}\n", &source[line_start..start]);
    let end = source[start..].find(&close).expect("function end") + start;
    &source[start..end]
}

// ---------------------------------------------------------------------------
// Session ids

#[tokio::test]
async fn session_ids_have_192_bits_from_the_os_generator() {
    // 24 random bytes, base64url: 32 characters, all distinct.
    let ids: HashSet<String> = (0..1000)
        .map(|_| SessionId::generate().into_string())
        .collect();
    assert_eq!(ids.len(), 1000, "1000 ids, all distinct");
    for id in &ids {
        assert_eq!(id.len(), 32, "{id}");
        assert!(is_base64url(id), "{id}");
        let bytes = URL_SAFE_NO_PAD.decode(id).expect("base64url");
        assert_eq!(bytes.len() * 8, 192, "at least 128 bits: {id}");
    }
    // The OS generator is there and used: `try_generate` reads only it.
    let id = SessionId::try_generate().expect("the OS generator works");
    assert_eq!(id.as_str().len(), 32);
    let source = include_str!("../../src/cookie.rs");
    let body = function_body(source, "pub fn try_generate()");
    assert!(body.contains("rand::rngs::SysRng"), "{body}");

    // The ids the layer hands out over the real store are of the same kind.
    let db = test_db().await;
    let store = store(&db).await;
    let keys = secrets(&["id-secret"]);
    let app = app(&store, keys.clone());
    let mut issued = HashSet::new();
    for _ in 0..20 {
        let answer = send(&app, "POST", "/counter", &[]).await;
        assert_eq!(answer.status, StatusCode::OK);
        let sid = answer.sid(&keys);
        assert_eq!(sid.len(), 32);
        assert!(is_base64url(&sid), "{sid}");
        issued.insert(sid);
    }
    assert_eq!(issued.len(), 20);
    store.close().await;
}

#[tokio::test]
async fn a_client_chosen_id_is_never_adopted() {
    let db = test_db().await;
    let store = store(&db).await;
    let keys = secrets(&["fixation-secret"]);
    let app = app(&store, keys.clone());
    let client = probe(db.url()).await;

    // An attacker plants a cookie for an id of their choosing, correctly
    // signed (say the secret leaked, or a sibling service signs the same).
    for chosen in ["attacker-chosen-session-id-0001", &"A".repeat(32)] {
        let id = SessionId::parse(chosen).expect("a valid id");
        let planted = format!("connect.sid={}", signed_cookie_value(&id, &keys));

        let read = send(&app, "GET", "/counter", &[planted.as_bytes()]).await;
        assert_eq!((read.status, read.body.as_str()), (StatusCode::OK, "0"));
        assert_eq!(read.set_cookie, None, "reading creates nothing");

        let write = send(&app, "POST", "/counter", &[planted.as_bytes()]).await;
        assert_eq!((write.status, write.body.as_str()), (StatusCode::OK, "1"));
        let issued = write.sid(&keys);
        assert_ne!(issued, chosen, "the client's id was adopted");
        assert_eq!(rows(&client, "session_store", chosen).await, 0);
        assert_eq!(rows(&client, "session_store", &issued).await, 1);
    }
    store.close().await;
}

#[tokio::test]
async fn signatures_are_compared_in_constant_time() {
    // The code path: `unsign` compares the MAC with `subtle`'s `ct_eq`,
    // for every secret (no early exit on a match), never with `==`.
    let source = include_str!("../../src/cookie.rs");
    assert!(source.contains("use subtle::ConstantTimeEq;"));
    let body = function_body(source, "pub fn unsign(");
    assert!(body.contains(".ct_eq(given_mac.as_bytes())"), "{body}");
    assert!(!body.contains("== given_mac") && !body.contains("given_mac =="));
    assert!(body.contains("for index in 0..secrets.len()"), "{body}");

    // And its behaviour: any change at any position of the MAC is refused,
    // as are a shorter and a longer one.
    let keys = secrets(&["constant-time-secret", "previous-secret"]);
    let sid = SessionId::generate();
    let value = cookie::sign(sid.as_str(), &keys);
    let dot = value.rfind('.').expect("signed value");
    assert_eq!(value.len() - dot - 1, 43, "HMAC-SHA256 in unpadded base64");
    assert_eq!(
        unsign(&value, &keys).map(|u| u.sid),
        Some(sid.clone()),
        "the untouched value verifies"
    );
    for position in dot + 1..value.len() {
        let mut tampered = value.clone().into_bytes();
        tampered[position] = if tampered[position] == b'A' {
            b'B'
        } else {
            b'A'
        };
        let tampered = String::from_utf8(tampered).expect("ASCII");
        assert!(unsign(&tampered, &keys).is_none(), "position {position}");
    }
    assert!(unsign(&value[..value.len() - 1], &keys).is_none());
    assert!(unsign(&format!("{value}A"), &keys).is_none());
    // A signature by the second secret goes through the same loop.
    let old = cookie::sign(sid.as_str(), &secrets(&["previous-secret"]));
    assert_eq!(unsign(&old, &keys).map(|u| u.secret_index), Some(1));
}

#[tokio::test]
async fn regenerate_deletes_the_old_session_before_the_response() {
    let db = test_db().await;
    let store = store(&db).await;
    let keys = secrets(&["regenerate-secret"]);
    let client = Arc::new(probe(db.url()).await);
    let seen = client.clone();
    // Login: regenerate, then (still inside the handler, before any
    // response exists) count the old id's rows.
    let login = post(move |session: Session| {
        let client = seen.clone();
        async move {
            let old = session.id().await?.map(SessionId::into_string);
            session.regenerate().await?;
            let left = match &old {
                Some(old) => rows(&client, "session_store", old).await,
                None => -1,
            };
            session.insert("user", "alice").await?;
            Ok::<_, SessionError>(left.to_string())
        }
    });
    let app = Router::new()
        .route("/counter", get(views).post(increment))
        .route("/login", login)
        .layer(SessionLayer::new(store.clone(), keys.clone()));

    let before = send(&app, "POST", "/counter", &[]).await;
    let old_cookie = before.cookie();
    let old_sid = before.sid(&keys);
    assert_eq!(rows(&client, "session_store", &old_sid).await, 1);

    let login = send(&app, "POST", "/login", &[old_cookie.as_bytes()]).await;
    assert_eq!(login.status, StatusCode::OK);
    assert_eq!(login.body, "0", "the old row was gone inside the handler");
    let new_sid = login.sid(&keys);
    assert_ne!(new_sid, old_sid);
    assert_eq!(rows(&client, "session_store", &old_sid).await, 0);
    assert_eq!(rows(&client, "session_store", &new_sid).await, 1);
    // The old cookie is dead: no session, and nothing it could revive.
    let replay = send(&app, "GET", "/counter", &[old_cookie.as_bytes()]).await;
    assert_eq!((replay.status, replay.body.as_str()), (StatusCode::OK, "0"));
    store.close().await;
}

#[tokio::test]
async fn an_old_secret_still_verifies_and_the_cookie_is_re_signed() {
    let db = test_db().await;
    let store = store(&db).await;
    let before = app(&store, secrets(&["secret-2025"]));
    let created = send(&before, "POST", "/counter", &[]).await;
    let old_cookie = created.cookie();
    let sid = created.sid(&secrets(&["secret-2025"]));

    // Rotation: the new secret signs, the old one still verifies.
    let after = app(&store, secrets(&["secret-2026", "secret-2025"]));
    let read = send(&after, "GET", "/counter", &[old_cookie.as_bytes()]).await;
    assert_eq!((read.status, read.body.as_str()), (StatusCode::OK, "1"));
    let resigned = read.cookie();
    assert_ne!(resigned, old_cookie, "re-signed");
    assert_eq!(
        sid_of(&resigned, &secrets(&["secret-2026"])).as_deref(),
        Some(sid.as_str()),
        "same session, signed with the new secret"
    );
    assert_eq!(sid_of(&resigned, &secrets(&["secret-2025"])), None);
    // Once re-signed, nothing more to send.
    let again = send(&after, "GET", "/counter", &[resigned.as_bytes()]).await;
    assert_eq!((again.body.as_str(), again.set_cookie), ("1", None));
    // After the old secret is retired, its cookies no longer verify.
    let retired = app(&store, secrets(&["secret-2026"]));
    let late = send(&retired, "GET", "/counter", &[old_cookie.as_bytes()]).await;
    assert_eq!(late.body, "0");
    store.close().await;
}

#[tokio::test]
async fn cookies_from_another_table_schema_or_secret_do_not_load() {
    let db = test_db().await;
    let client = probe(db.url()).await;
    let store_a = store_with(config(db.url()).table("app_a_sessions")).await;
    // Another application: another schema, table and secret.
    let store_b = store_with(config(db.url()).schema("app_b").table("sessions")).await;
    // A third one that shares A's secret (a copied configuration), but
    // keeps its sessions in its own table.
    let store_c = store_with(config(db.url()).table("app_c_sessions")).await;
    let app_a = app(&store_a, secrets(&["secret-of-a"]));
    let app_b = app(&store_b, secrets(&["secret-of-b"]));
    let app_c = app(&store_c, secrets(&["secret-of-a"]));

    let created = send(&app_a, "POST", "/counter", &[]).await;
    let cookie_a = created.cookie();
    let sid_a = created.sid(&secrets(&["secret-of-a"]));

    for (app, table, secret) in [
        (&app_b, "app_b.sessions", "secret-of-b"),
        (&app_c, "app_c_sessions", "secret-of-a"),
    ] {
        let read = send(app, "GET", "/exists", &[cookie_a.as_bytes()]).await;
        assert_eq!((read.status, read.body.as_str()), (StatusCode::OK, "false"));
        let write = send(app, "POST", "/counter", &[cookie_a.as_bytes()]).await;
        assert_eq!((write.status, write.body.as_str()), (StatusCode::OK, "1"));
        assert_ne!(write.sid(&secrets(&[secret])), sid_a, "{table}");
        assert_eq!(rows(&client, table, &sid_a).await, 0, "{table}");
    }
    // A's session is untouched.
    let read = send(&app_a, "GET", "/counter", &[cookie_a.as_bytes()]).await;
    assert_eq!(read.body, "1");
    for store in [store_a, store_b, store_c] {
        store.close().await;
    }
}

#[tokio::test]
async fn cookies_are_secure_http_only_and_same_site_lax_by_default() {
    let db = test_db().await;
    let store = store(&db).await;
    let app = app(&store, secrets(&["defaults-secret"]));
    let created = send(&app, "POST", "/counter", &[]).await;
    let set_cookie = created.set_cookie.clone().expect("a Set-Cookie");
    let attributes: Vec<&str> = set_cookie.split("; ").skip(1).collect();
    for expected in ["Path=/", "HttpOnly", "Secure", "SameSite=Lax"] {
        assert!(attributes.contains(&expected), "{expected}: {set_cookie}");
    }
    // What is stored says the same, for express-session to read.
    let sid = created.sid(&secrets(&["defaults-secret"]));
    let stored = store.load(&sid).await.unwrap().expect("stored");
    let doc: serde_json::Value = serde_json::from_str(&stored.json).unwrap();
    assert_eq!(doc["cookie"]["secure"], true);
    assert_eq!(doc["cookie"]["httpOnly"], true);
    assert_eq!(doc["cookie"]["sameSite"], "lax");
    // The logout cookie keeps them too.
    let gone = send(&app, "POST", "/logout", &[created.cookie().as_bytes()]).await;
    let removal = gone.set_cookie.expect("a removal cookie");
    assert!(removal.starts_with("connect.sid=;"), "{removal}");
    for expected in [
        "HttpOnly",
        "Secure",
        "SameSite=Lax",
        "Expires=Thu, 01 Jan 1970 00:00:00 GMT",
    ] {
        assert!(removal.contains(expected), "{expected}: {removal}");
    }
    store.close().await;
}

// ---------------------------------------------------------------------------
// Limits

#[tokio::test]
async fn an_oversized_cookie_header_is_no_session_not_an_error() {
    let db = test_db().await;
    let store = store(&db).await;
    let keys = secrets(&["limits-secret"]);
    let app = app(&store, keys.clone());
    let created = send(&app, "POST", "/counter", &[]).await;
    let cookie = created.cookie();
    let sid = created.sid(&keys);

    // Exactly the limit, across two headers: read as usual.
    let pad = |total: usize| format!("pad={}", "x".repeat(total - cookie.len() - 4));
    let fits = pad(MAX_COOKIE_HEADER_BYTES);
    assert_eq!(cookie.len() + fits.len(), MAX_COOKIE_HEADER_BYTES);
    let read = send(
        &app,
        "GET",
        "/counter",
        &[cookie.as_bytes(), fits.as_bytes()],
    )
    .await;
    assert_eq!((read.status, read.body.as_str()), (StatusCode::OK, "1"));

    // One byte more, or 64 kB: no session, a normal answer, nothing written.
    for too_much in [MAX_COOKIE_HEADER_BYTES + 1, 64 * 1024] {
        let padding = pad(too_much);
        let headers = [cookie.as_bytes(), padding.as_bytes()];
        let read = send(&app, "GET", "/counter", &headers).await;
        assert_eq!((read.status, read.body.as_str()), (StatusCode::OK, "0"));
        assert_eq!(read.set_cookie, None);
        let one_header = format!("{cookie}; {padding}");
        let write = send(&app, "POST", "/counter", &[one_header.as_bytes()]).await;
        assert_eq!((write.status, write.body.as_str()), (StatusCode::OK, "1"));
        assert_ne!(
            write.sid(&keys),
            sid,
            "a new session, the old one untouched"
        );
    }
    let read = send(&app, "GET", "/counter", &[cookie.as_bytes()]).await;
    assert_eq!(read.body, "1");
    store.close().await;
}

#[tokio::test]
async fn odd_cookies_are_no_session_not_an_error() {
    let db = test_db().await;
    let store = store(&db).await;
    let keys = secrets(&["odd-secret"]);
    let app = app(&store, keys.clone());
    let created = send(&app, "POST", "/counter", &[]).await;
    let cookie = created.cookie();

    // An id over MAX_SESSION_ID_BYTES, correctly signed.
    let long = "a".repeat(MAX_SESSION_ID_BYTES + 1);
    let long_cookie = format!(
        "connect.sid={}",
        cookie::encode_cookie_value(&cookie::sign(&long, &keys))
    );
    let other = format!(
        "connect.sid={}",
        signed_cookie_value(&SessionId::generate(), &keys)
    );
    let duplicate = format!("{cookie}; {other}");
    let cases: [&[u8]; 6] = [
        long_cookie.as_bytes(),
        // Not UTF-8.
        b"connect.sid=s%3A\xff\xfe.abc",
        // Two different values: ambiguous, maybe injected by a sibling domain.
        duplicate.as_bytes(),
        // Unsigned, and signed but tampered.
        b"connect.sid=just-an-id",
        b"connect.sid=s%3Aabc.%2B%2F%3D%3D",
        b"connect.sid=%",
    ];
    for case in cases {
        let read = send(&app, "GET", "/counter", &[case]).await;
        let shown = String::from_utf8_lossy(case);
        assert_eq!(read.status, StatusCode::OK, "{shown}");
        assert_eq!(read.body, "0", "{shown}");
        assert_eq!(read.set_cookie, None, "{shown}");
    }
    store.close().await;
}

#[tokio::test]
async fn an_oversized_session_is_refused_with_413_and_a_json_body() {
    let db = test_db().await;
    let client = probe(db.url()).await;
    let store = store(&db).await;
    let app = app(&store, secrets(&["size-secret"]));
    let answer = send(&app, "POST", "/huge", &[]).await;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(answer.content_type.as_deref(), Some("application/json"));
    let body: serde_json::Value = serde_json::from_str(&answer.body).expect("a JSON body");
    let message = body["error"].as_str().expect("an error message");
    assert!(message.contains("65536"), "{message}");
    assert_eq!(answer.set_cookie, None);
    let total: i64 = client
        .query_one("SELECT count(*) FROM session_store", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(total, 0, "nothing stored");

    // The store refuses it too, with a clear error, whoever calls it.
    let err = store
        .save(
            "some-id",
            &format!("{{\"blob\":\"{}\"}}", "x".repeat(70_000)),
            in_secs(60),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::TooLarge { limit: 65536, .. }), "{err}");
    assert!(err.to_string().contains("limit of 65536 bytes"), "{err}");
    store.close().await;

    // A store limit below the layer's: still 413 with a body, not a 500.
    let small = store_with(config(db.url()).table("small").max_session_bytes(1024)).await;
    let app = Router::new()
        .route(
            "/huge",
            post(|s: Session| async move {
                s.insert("blob", "x".repeat(2000)).await?;
                Ok::<_, SessionError>(String::new())
            }),
        )
        .layer(SessionLayer::new(small.clone(), secrets(&["size-secret"])));
    let answer = send(&app, "POST", "/huge", &[]).await;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(answer.body.contains("error"), "{}", answer.body);
    small.close().await;
}

#[tokio::test]
async fn too_many_secrets_is_a_clear_error_and_sixteen_work() {
    let list: Vec<String> = (0..=MAX_SECRETS).map(|i| format!("secret-{i}")).collect();
    let err = Secrets::new(list.clone()).unwrap_err();
    assert!(
        matches!(err, CookieError::TooManySecrets { count: 17, max: 16 }),
        "{err}"
    );
    assert!(err.to_string().contains("MAX_SECRETS"), "{err}");
    assert!(
        !err.to_string().contains("secret-"),
        "no secret in the message: {err}"
    );
    let err = Secrets::parse_list(&list.join(",")).unwrap_err();
    assert!(matches!(err, CookieError::TooManySecrets { .. }), "{err}");

    // Sixteen: a cookie signed with the oldest still verifies, through the
    // layer on the real store, and is re-signed with the newest.
    let db = test_db().await;
    let store = store(&db).await;
    let oldest = secrets(&[list[MAX_SECRETS - 1].as_str()]);
    let created = send(&app(&store, oldest), "POST", "/counter", &[]).await;
    let sixteen = Secrets::new(list[..MAX_SECRETS].to_vec()).expect("16 secrets");
    let read = send(
        &app(&store, sixteen),
        "GET",
        "/counter",
        &[created.cookie().as_bytes()],
    )
    .await;
    assert_eq!(read.body, "1");
    assert!(sid_of(&read.cookie(), &secrets(&["secret-0"])).is_some());
    store.close().await;
}

#[tokio::test]
async fn over_long_table_and_schema_names_are_refused_and_63_work() {
    let long = "t".repeat(Identifier::MAX_LEN + 1);
    for setting in ["table", "schema"] {
        let err = Config::builder()
            .url("postgres://localhost/app")
            .set(setting, &long)
            .unwrap()
            .build()
            .unwrap_err();
        assert!(matches!(&err, ConfigError::Invalid { setting: s, .. } if s == setting));
        let text = err.to_string();
        assert!(text.contains(setting) && text.contains("63"), "{text}");
    }
    // Injection is refused the same way.
    let err = Config::builder()
        .url("postgres://localhost/app")
        .table("sessions\"; DROP TABLE users; --")
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("table"), "{err}");

    // The longest names PostgreSQL keeps whole work end to end.
    let db = test_db().await;
    let name = "s".repeat(Identifier::MAX_LEN);
    let store = store_with(config(db.url()).schema(&name).table(&name)).await;
    store.save("sid-63", "{}", in_secs(60)).await.unwrap();
    assert!(store.load("sid-63").await.unwrap().is_some());
    store.close().await;
}

// ---------------------------------------------------------------------------
// Rows written by others

#[tokio::test]
async fn rows_written_by_others_are_no_session_and_logged() {
    let (capture, _guard) = Capture::start();
    let db = test_db().await;
    let store = store(&db).await;
    let keys = secrets(&["others-secret"]);
    let app = app(&store, keys.clone());
    let client = probe(db.url()).await;
    // Another program loosened the table.
    client
        .batch_execute(
            "ALTER TABLE session_store ALTER COLUMN sess TYPE text; \
             ALTER TABLE session_store ALTER COLUMN sess DROP NOT NULL",
        )
        .await
        .expect("alter the table");
    let huge = format!(
        r#"{{"cookie":{{"originalMaxAge":null,"expires":null}},"blob":"{}"}}"#,
        "x".repeat(5 * 1024 * 1024)
    );
    let cases: [(&str, Option<&str>); 4] = [
        ("broken-json", Some("{broken")),
        ("json-array", Some("[1,2,3]")),
        ("five-megabytes", Some(huge.as_str())),
        ("null-document", None),
    ];
    for (sid, sess) in cases {
        client
            .execute(
                "INSERT INTO session_store (sid, sess, expire) \
                 VALUES ($1, $2, (now() AT TIME ZONE 'UTC') + interval '1 hour')",
                &[&sid, &sess],
            )
            .await
            .expect("insert a foreign row");
    }
    for (sid, _) in cases {
        let before = capture.text().len();
        let id = SessionId::parse(sid).unwrap();
        let cookie = format!("connect.sid={}", signed_cookie_value(&id, &keys));
        let read = send(&app, "GET", "/exists", &[cookie.as_bytes()]).await;
        assert_eq!(
            (read.status, read.body.as_str()),
            (StatusCode::OK, "false"),
            "{sid}"
        );
        let logged = capture.text()[before..].to_owned();
        assert!(
            logged
                .lines()
                .any(|l| l.contains("WARN") && l.contains("session_store")),
            "{sid}: no warning on session_store in:\n{logged}"
        );
        // Writing starts a new session; the foreign row is left alone.
        let write = send(&app, "POST", "/counter", &[cookie.as_bytes()]).await;
        assert_eq!(
            (write.status, write.body.as_str()),
            (StatusCode::OK, "1"),
            "{sid}"
        );
        assert_ne!(write.sid(&keys), sid);
        assert_eq!(rows(&client, "session_store", sid).await, 1, "{sid}");
    }
    store.close().await;
}

// ---------------------------------------------------------------------------
// Secrets

/// The database password of the secrets test's role.
const DB_PASSWORD: &str = "Db-Passw0rd-7f3a9c";
/// A wrong password tried on purpose.
const WRONG_PASSWORD: &str = "Wr0ng-Passw0rd-e1d2";
/// The cookie secrets of the secrets test.
const COOKIE_SECRETS: [&str; 2] = ["Cookie-Secret-Now-5b8e", "Cookie-Secret-Old-2c4d"];

/// Asserts that no password or cookie secret appears in `text`.
fn assert_no_secret(what: &str, text: &str) {
    for secret in [DB_PASSWORD, WRONG_PASSWORD]
        .into_iter()
        .chain(COOKIE_SECRETS)
    {
        assert!(
            !text.contains(secret),
            "{what} contains the secret {secret:?}:\n{text}"
        );
    }
}

/// A cluster that asks every role but `postgres` for a SCRAM password over
/// TCP, with role `app` (password [`DB_PASSWORD`]) owning database `app`.
async fn scram_cluster() -> TestCluster {
    let hba = "local all all trust\n\
               host all postgres 127.0.0.1/32 trust\n\
               host all all 127.0.0.1/32 scram-sha-256\n";
    let cluster = TestCluster::start_with(ClusterOptions {
        config: vec!["password_encryption = 'scram-sha-256'".into()],
        files: vec![("pg_hba.conf".into(), hba.as_bytes().to_vec(), 0o600)],
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("no throwaway PostgreSQL: {e}"));
    let admin = probe(&cluster.url("postgres")).await;
    admin
        .batch_execute(&format!("CREATE ROLE app LOGIN PASSWORD '{DB_PASSWORD}'"))
        .await
        .expect("create the role");
    admin
        .batch_execute("CREATE DATABASE app OWNER app")
        .await
        .expect("create the database");
    cluster
}

/// A URL for role `app` with `password`.
fn app_url(port: u16, password: &str) -> String {
    format!("postgres://app:{password}@127.0.0.1:{port}/app")
}

#[tokio::test]
async fn no_password_or_cookie_secret_reaches_logs_errors_or_debug() {
    // Set up first: creating the role sends the password, which the
    // driver's own debug log repeats (that is this test's doing).
    let cluster = scram_cluster().await;
    let (capture, _guard) = Capture::start();
    // Panic messages too, from any thread, while this test runs.
    let previous: Arc<dyn Fn(&std::panic::PanicHookInfo<'_>) + Send + Sync> =
        Arc::from(std::panic::take_hook());
    let sink = capture.clone();
    let chained = previous.clone();
    std::panic::set_hook(Box::new(move |info| {
        sink.push(&format!("panic: {info}"));
        chained(info);
    }));

    let quick = |url: &str| {
        Config::builder()
            .url(url)
            .connect_timeout(Duration::from_secs(3))
            .query_timeout(Duration::from_secs(3))
            .startup_retries(0)
            .startup_backoff(Duration::from_millis(50))
    };
    let mut errors = Vec::new();

    // 1. A wrong password: refused by the server.
    let wrong = Store::new(
        quick(&app_url(cluster.port(), WRONG_PASSWORD))
            .build()
            .unwrap(),
    )
    .expect("store");
    let err = wrong
        .ready()
        .await
        .expect_err("a wrong password is refused");
    assert!(
        format!("{err} {err:?}").contains("password authentication failed"),
        "{err:?}"
    );
    errors.push(err);
    errors.push(wrong.load("some-id").await.expect_err("no session store"));
    capture.push(&format!("{wrong:?}"));
    wrong.close().await;

    // 2. A refused connection (nothing listens on that port).
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let refused = Store::new(quick(&app_url(port, DB_PASSWORD)).build().unwrap()).expect("store");
    errors.push(refused.ready().await.expect_err("nothing listens"));
    // (A write would be journaled for later: the store keeps working.)
    errors.push(refused.load("some-id").await.expect_err("nothing listens"));
    refused.close().await;

    // 3. The right password, sessions signed with both secrets, and a
    //    handler that panics with the session in hand.
    let builder = quick(&app_url(cluster.port(), DB_PASSWORD));
    capture.push(&format!("{builder:?}"));
    let config = builder.build().unwrap();
    capture.push(&format!("{config:?}"));
    capture.push(&format!("{:?}", config.postgres()));
    capture.push(&config.target());
    let store = Store::new(config).expect("store");
    store.ready().await.expect("the right password works");
    let keys = Secrets::new(COOKIE_SECRETS).unwrap();
    let layer = SessionLayer::new(store.clone(), keys);
    capture.push(&format!("{layer:?}"));
    let app = Router::new()
        .route("/counter", get(views).post(increment))
        .route("/panic", get(panics))
        .layer(layer);
    let created = send(&app, "POST", "/counter", &[]).await;
    assert_eq!(created.status, StatusCode::OK);
    let old = Secrets::new([COOKIE_SECRETS[1]]).unwrap();
    let sid = SessionId::parse(created.sid(&Secrets::new(COOKIE_SECRETS).unwrap())).unwrap();
    let old_cookie = format!("connect.sid={}", signed_cookie_value(&sid, &old));
    let read = send(&app, "GET", "/counter", &[old_cookie.as_bytes()]).await;
    assert_eq!(read.body, "1");
    let request = Request::get("/panic")
        .header(header::COOKIE, created.cookie())
        .body(Body::empty())
        .unwrap();
    let panicked = tokio::spawn(app.clone().oneshot(request)).await;
    assert!(panicked.expect_err("the handler panics").is_panic());
    store.close().await;

    let _ = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| previous(info)));

    for err in &errors {
        capture.push(&format!("error: {err} / {err:?}"));
        let mut source = std::error::Error::source(err);
        while let Some(cause) = source {
            capture.push(&format!("caused by: {cause} / {cause:?}"));
            source = cause.source();
        }
    }
    let text = capture.text();
    // The capture did see the run: every level and target, the driver's
    // own log records, the errors and the panic.
    for expected in [
        "session_store",
        "session_pool",
        "DEBUG",
        "TRACE",
        "tokio_postgres",
        "password authentication failed",
        "panic: ",
        "handler failed with views = Some(1)",
        "Secrets { count: 2 }",
        "Connection refused",
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} not captured:\n{text}"
        );
    }
    assert_no_secret("the captured logs, errors, Debug output and panics", &text);
}

/// Errors and `Debug` of configurations made from URLs with passwords.
#[test]
fn configuration_errors_and_debug_never_show_the_password() {
    let urls = [
        format!("postgres://app:{DB_PASSWORD}@db:notaport/app"),
        format!("postgres://app:{DB_PASSWORD}@db/app?sslmode=sometimes"),
        format!("postgres://app:{DB_PASSWORD}@db/app?frobnicate=1"),
        format!("postgres://app:{DB_PASSWORD}@db/app?sslcert=x"),
        format!("postgres://app:{DB_PASSWORD}@/app"),
        format!("postgres://app:{DB_PASSWORD}?x@db/app?sslmode=require"),
        format!("postgres://app:{DB_PASSWORD}@db@other/app"),
        format!("postgres://app@db/app?password={DB_PASSWORD}&port=x"),
        format!("mysql://app:{DB_PASSWORD}@db/app"),
    ];
    for url in &urls {
        let shown = match Config::builder().url(url.as_str()).build() {
            Ok(config) => format!("{config:?} {:?} {}", config.postgres(), config.target()),
            Err(e) => format!("{e} {e:?}"),
        };
        assert_no_secret(url, &shown);
        let from_env =
            Config::from_vars([("DATABASE_URL", url.as_str()), ("PGSESSION_POOL_SIZE", "0")]);
        assert_no_secret(url, &format!("{from_env:?}"));
        let builder = Config::builder().url(url.as_str());
        assert_no_secret(url, &format!("{builder:?}"));
    }
    // Cookie secrets: Debug of the secrets and of errors about them.
    let keys = Secrets::new(COOKIE_SECRETS).unwrap();
    assert_no_secret("Secrets", &format!("{keys:?}"));
    let err = Secrets::new([COOKIE_SECRETS[0], ""]).unwrap_err();
    assert_no_secret("CookieError", &format!("{err} {err:?}"));
}
