//! Tests of the tower-sessions adapter ([`TowerSessionStore`]) against a real
//! PostgreSQL: the `SessionStore` and `ExpiredDeletion` contract, what the
//! rows look like to express-session, and an axum app on tower-sessions.
//!
//! Run with `cargo test -p pgsession --features tower-sessions --test tower_sessions`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration as StdDuration;

use axum::body::Body;
use axum::routing::{get, post};
use axum::Router;
use http::{header, Request, StatusCode};
use pgsession::record::SessionRecord;
use pgsession::tower_sessions::TowerSessionStore;
use pgsession::{Config, Store};
use pgsession_testkit::TestDb;
use serde_json::Value;
use time::{Duration, OffsetDateTime};
use tower::ServiceExt;
use tower_sessions::session::{Id, Record};
use tower_sessions::session_store::{self, ExpiredDeletion, SessionStore};
use tower_sessions::{Session, SessionManagerLayer};

/// A fresh database and a ready store on it.
async fn setup() -> (TestDb, Store) {
    let db = TestDb::new()
        .await
        .unwrap_or_else(|e| panic!("no test database: {e}"));
    let config = Config::builder()
        .url(db.url())
        .connect_timeout(StdDuration::from_secs(5))
        .query_timeout(StdDuration::from_secs(10))
        .startup_backoff(StdDuration::from_millis(100))
        .build()
        .expect("valid config");
    let store = Store::new(config).expect("store");
    store.ready().await.expect("store ready");
    (db, store)
}

fn record(data: &[(&str, Value)], expiry_date: OffsetDateTime) -> Record {
    Record {
        id: Id::default(),
        data: data
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect(),
        expiry_date,
    }
}

/// What a test's log subscriber wrote.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn take(&self) -> String {
        let bytes = std::mem::take(&mut *self.0.lock().unwrap());
        String::from_utf8(bytes).unwrap()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn in_secs(seconds: i64) -> OffsetDateTime {
    OffsetDateTime::now_utc() + Duration::seconds(seconds)
}

/// The `timestamp(6)` column keeps microseconds.
fn same_instant(a: OffsetDateTime, b: OffsetDateTime) -> bool {
    (a - b).abs() < Duration::microseconds(1)
}

async fn rows(db: &TestDb, sid: Option<&str>) -> i64 {
    let client = db.client().await.expect("test connection");
    let row = match sid {
        Some(sid) => {
            client
                .query_one("SELECT count(*) FROM session_store WHERE sid = $1", &[&sid])
                .await
        }
        None => {
            client
                .query_one("SELECT count(*) FROM session_store", &[])
                .await
        }
    };
    row.expect("count").get(0)
}

#[tokio::test]
async fn create_save_load_delete() {
    let (_db, store) = setup().await;
    let sessions = TowerSessionStore::new(store.clone());

    assert_eq!(sessions.load(&Id::default()).await.unwrap(), None);

    let mut rec = record(
        &[("user", Value::from("alice")), ("n", Value::from(1))],
        in_secs(3600),
    );
    let first_id = rec.id;
    sessions.create(&mut rec).await.unwrap();
    assert_eq!(rec.id, first_id, "a free id is kept");

    let loaded = sessions.load(&rec.id).await.unwrap().expect("created");
    assert_eq!(loaded.id, rec.id);
    assert_eq!(loaded.data, rec.data);
    assert!(same_instant(loaded.expiry_date, rec.expiry_date));

    rec.data.insert("n".into(), Value::from(2));
    rec.data.remove("user");
    rec.expiry_date = in_secs(7200);
    sessions.save(&rec).await.unwrap();
    let loaded = sessions.load(&rec.id).await.unwrap().expect("saved");
    assert_eq!(
        loaded.data,
        HashMap::from([("n".to_owned(), Value::from(2))])
    );
    assert!(same_instant(loaded.expiry_date, rec.expiry_date));
    assert_eq!(store.count().await.unwrap(), 1, "save is an upsert");

    sessions.delete(&rec.id).await.unwrap();
    sessions.delete(&rec.id).await.unwrap(); // twice is fine
    assert_eq!(sessions.load(&rec.id).await.unwrap(), None);
    assert_eq!(store.count().await.unwrap(), 0);
    store.close().await;
}

#[tokio::test]
async fn create_picks_a_fresh_id_when_taken() {
    let (_db, store) = setup().await;
    let sessions = TowerSessionStore::new(store.clone());

    let existing = record(&[("owner", Value::from("first"))], in_secs(3600));
    sessions.save(&existing).await.unwrap();

    let mut newcomer = record(&[("owner", Value::from("second"))], in_secs(3600));
    newcomer.id = existing.id;
    sessions.create(&mut newcomer).await.unwrap();
    assert_ne!(newcomer.id, existing.id);

    let kept = sessions.load(&existing.id).await.unwrap().expect("kept");
    assert_eq!(kept.data["owner"], "first");
    let created = sessions.load(&newcomer.id).await.unwrap().expect("created");
    assert_eq!(created.data["owner"], "second");

    // An expired row is not a live session: its id may be reused.
    let stale = record(&[("owner", Value::from("stale"))], in_secs(-60));
    sessions.save(&stale).await.unwrap();
    let mut reuse = record(&[("owner", Value::from("fresh"))], in_secs(3600));
    reuse.id = stale.id;
    sessions.create(&mut reuse).await.unwrap();
    assert_eq!(reuse.id, stale.id);
    assert_eq!(
        sessions
            .load(&stale.id)
            .await
            .unwrap()
            .expect("replaced")
            .data["owner"],
        "fresh"
    );
    store.close().await;
}

#[tokio::test]
async fn expired_records_do_not_load_and_delete_expired_removes_only_them() {
    let (db, store) = setup().await;
    let sessions = TowerSessionStore::new(store.clone());

    let expired: Vec<Record> = (0..3)
        .map(|i| record(&[("i", Value::from(i))], in_secs(-10 - i)))
        .collect();
    let live: Vec<Record> = (0..2)
        .map(|i| record(&[("i", Value::from(i))], in_secs(600)))
        .collect();
    for rec in expired.iter().chain(&live) {
        sessions.save(rec).await.unwrap();
    }
    for rec in &expired {
        assert_eq!(sessions.load(&rec.id).await.unwrap(), None);
    }
    assert_eq!(rows(&db, None).await, 5, "expired rows are still there");

    sessions.delete_expired().await.unwrap();
    assert_eq!(rows(&db, None).await, 2);
    for rec in &live {
        assert_eq!(
            sessions.load(&rec.id).await.unwrap().expect("live").data,
            rec.data
        );
    }
    // Nothing left to delete is fine too.
    sessions.delete_expired().await.unwrap();
    assert_eq!(rows(&db, None).await, 2);
    store.close().await;
}

#[tokio::test]
async fn rows_have_the_express_session_shape() {
    let (db, store) = setup().await;
    let sessions = TowerSessionStore::new(store.clone());
    let rec = record(
        &[("user", Value::from("alice")), ("views", Value::from(3))],
        in_secs(86_400),
    );
    sessions.save(&rec).await.unwrap();

    let client = db.client().await.unwrap();
    let row = client
        .query_one(
            "SELECT sess::text, expire FROM session_store WHERE sid = $1",
            &[&rec.id.to_string()],
        )
        .await
        .unwrap();
    let json: String = row.get(0);
    let expire = row.get::<_, time::PrimitiveDateTime>(1).assume_utc();
    assert!(same_instant(expire, rec.expiry_date));
    assert_eq!(rec.id.to_string().len(), 22, "base64url of 128 bits");

    let doc: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(doc["user"], "alice");
    assert_eq!(doc["views"], 3);
    let cookie = &doc["cookie"];
    assert_eq!(cookie["httpOnly"], true);
    assert_eq!(cookie["path"], "/");
    let max_age = cookie["originalMaxAge"].as_i64().expect("a number");
    assert!((86_390_000..=86_400_000).contains(&max_age), "{max_age}");
    let expires = cookie["expires"].as_str().expect("a string");
    // JavaScript's toISOString: milliseconds and a Z.
    assert_eq!(expires.len(), "2026-11-27T18:00:00.000Z".len(), "{expires}");
    assert!(expires.ends_with('Z'), "{expires}");
    let parsed = SessionRecord::from_json(&json).unwrap();
    let cookie_expiry = parsed.cookie.expires.expect("expires");
    assert!((cookie_expiry - rec.expiry_date).abs() < Duration::milliseconds(1));
    assert_eq!(parsed.data().len(), 2);

    // The cookie key is reserved: refused, not silently dropped.
    let mut bad = rec.clone();
    bad.data.insert("cookie".into(), Value::from(1));
    assert!(matches!(
        sessions.save(&bad).await,
        Err(session_store::Error::Encode(_))
    ));
    store.close().await;
}

#[tokio::test]
async fn node_documents_load_and_unreadable_ones_are_no_session() {
    let (db, store) = setup().await;
    let sessions = TowerSessionStore::new(store.clone());
    let client = db.client().await.unwrap();
    let insert = "INSERT INTO session_store (sid, sess, expire) \
                  VALUES ($1, $2::text::json, (now() AT TIME ZONE 'UTC') + interval '1 hour')";

    // As express-session and connect-pg-simple write it.
    let node = Id::default();
    let node_doc = r#"{"cookie":{"originalMaxAge":86400000,"expires":"2026-11-27T18:10:49.635Z","secure":false,"httpOnly":true,"path":"/","sameSite":"lax"},"user":"alice","views":2}"#;
    client
        .execute(insert, &[&node.to_string(), &node_doc])
        .await
        .unwrap();
    let loaded = sessions.load(&node).await.unwrap().expect("node session");
    assert_eq!(
        loaded.data,
        HashMap::from([
            ("user".to_owned(), Value::from("alice")),
            ("views".to_owned(), Value::from(2)),
        ])
    );
    // The expiry is the column's (an hour away), not the cookie's.
    assert!((loaded.expiry_date - in_secs(3600)).abs() < Duration::minutes(1));

    // Unreadable documents (the json column holds valid JSON, so: not an
    // object, or a cookie that is not one): no session, and a warning that
    // quotes neither the id in full nor the data.
    let logs = Logs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer({
            let logs = logs.clone();
            move || logs.clone()
        })
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    for doc in [
        r#"[1,"hunter2"]"#,
        r#""hunter2""#,
        "null",
        r#"{"cookie":5,"user":"hunter2"}"#,
    ] {
        let id = Id::default();
        let sid = id.to_string();
        client.execute(insert, &[&sid, &doc]).await.unwrap();
        assert_eq!(sessions.load(&id).await.unwrap(), None, "{doc}");
        let text = logs.take();
        assert!(text.contains("WARN"), "{doc}: {text}");
        assert!(text.contains("unreadable"), "{doc}: {text}");
        assert!(text.contains(&sid[..4]), "{doc}: {text}");
        assert!(!text.contains(&sid[..8]), "{doc}: {text}");
        assert!(!text.contains("hunter2"), "{doc}: {text}");
    }
    store.close().await;
}

#[tokio::test]
async fn store_errors_become_backend_errors() {
    let (_db, store) = setup().await;
    let sessions = TowerSessionStore::new(store.clone());
    store.close().await;
    match sessions.load(&Id::default()).await {
        Err(session_store::Error::Backend(message)) => {
            assert_eq!(message, "the session store is closed")
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        sessions.delete_expired().await,
        Err(session_store::Error::Backend(_))
    ));
}

// --- An axum app on tower-sessions -------------------------------------

async fn count(session: Session) -> Result<String, StatusCode> {
    let n: u64 = session
        .get("count")
        .await
        .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?
        .unwrap_or(0)
        + 1;
    session
        .insert("count", n)
        .await
        .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    Ok(n.to_string())
}

async fn logout(session: Session) -> StatusCode {
    match session.flush().await {
        Ok(()) => StatusCode::NO_CONTENT,
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn app(store: &Store) -> Router {
    Router::new()
        .route("/count", get(count))
        .route("/logout", post(logout))
        .layer(SessionManagerLayer::new(TowerSessionStore::new(store.clone())).with_secure(false))
}

/// Sends one request; returns the body and the `Set-Cookie`, if any.
async fn send(
    app: &Router,
    method: &str,
    uri: &str,
    cookie: Option<&str>,
) -> (String, Option<String>) {
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(cookie) = cookie {
        request = request.header(header::COOKIE, cookie);
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "{method} {uri}: {}",
        response.status()
    );
    let set_cookie = response
        .headers()
        .get(header::SET_COOKIE)
        .map(|v| v.to_str().unwrap().to_owned());
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    (String::from_utf8(body.to_vec()).unwrap(), set_cookie)
}

#[tokio::test]
async fn an_axum_app_counts_across_requests_and_logs_out() {
    let (db, store) = setup().await;
    let app = app(&store);

    let (body, set_cookie) = send(&app, "GET", "/count", None).await;
    assert_eq!(body, "1");
    let set_cookie = set_cookie.expect("a session cookie");
    // `id=<value>` for the Cookie header of the next requests.
    let pair = set_cookie.split(';').next().unwrap().trim().to_owned();
    let sid = pair
        .strip_prefix("id=")
        .expect("tower-sessions' cookie name");
    assert_eq!(sid.len(), 22);

    for expected in ["2", "3"] {
        let (body, _) = send(&app, "GET", "/count", Some(&pair)).await;
        assert_eq!(body, expected);
    }

    // The row as express-session would have written it.
    let client = db.client().await.unwrap();
    let row = client
        .query_one(
            "SELECT sess->'cookie'->>'expires', sess->>'count', sess->'cookie'->>'path', \
             json_typeof(sess->'cookie'->'originalMaxAge') \
             FROM session_store WHERE sid = $1",
            &[&sid],
        )
        .await
        .unwrap();
    let expires: Option<String> = row.get(0);
    let expires = expires.expect("sess.cookie.expires is set");
    assert!(expires.ends_with('Z') && expires.contains('.'), "{expires}");
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("3"));
    assert_eq!(row.get::<_, Option<String>>(2).as_deref(), Some("/"));
    assert_eq!(row.get::<_, Option<String>>(3).as_deref(), Some("number"));
    assert_eq!(rows(&db, None).await, 1);

    // Logging out removes the row and the cookie.
    let (_, set_cookie) = send(&app, "POST", "/logout", Some(&pair)).await;
    let set_cookie = set_cookie.expect("a removal cookie");
    assert!(set_cookie.contains("Max-Age=0"), "{set_cookie}");
    assert_eq!(rows(&db, Some(sid)).await, 0);

    // The old cookie no longer finds a session: counting starts again.
    let (body, set_cookie) = send(&app, "GET", "/count", Some(&pair)).await;
    assert_eq!(body, "1");
    let new_pair = set_cookie.expect("a new session cookie");
    assert!(!new_pair.starts_with(&pair), "a new id");
    assert_eq!(rows(&db, Some(sid)).await, 0);
    assert_eq!(rows(&db, None).await, 1);
    store.close().await;
}
