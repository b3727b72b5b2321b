//! Tests of the tower-sessions adapter ([`TowerSessionStore`]) against a real
//! PostgreSQL:
//!
//! - the `SessionStore` contract (create, save, load, delete, id
//!   collisions, concurrent creates, creates while the database is away)
//!   and `ExpiredDeletion`;
//! - what the rows look like to express-session, and the `cookie` key;
//! - an axum app on tower-sessions, checking what tower-sessions' own route
//!   tests check: no cookie without data, bogus and malformed cookies,
//!   insert, get, removing the last value, max age, `cycle_id`, `flush`,
//!   the domain, expiry changes and an expired session.
//!
//! Run with `cargo test -p pgsession --features tower-sessions --test tower_sessions`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration as StdDuration;

use axum::body::Body;
use axum::routing::get;
use axum::Router;
use http::{header, Request, StatusCode};
use pgsession::record::SessionRecord;
use pgsession::tower_sessions::TowerSessionStore;
use pgsession::{dead_letter, BreakerState, Config, ConfigBuilder, Store};
use pgsession_testkit::TestDb;
use serde_json::Value;
use tempfile::TempDir;
use time::{Duration, OffsetDateTime};
use tower::ServiceExt;
use tower_sessions::cookie::{Cookie, SameSite};
use tower_sessions::session::{Id, Record};
use tower_sessions::session_store::{self, ExpiredDeletion, SessionStore};
use tower_sessions::{Expiry, Session, SessionManagerLayer};

/// A database, a ready store on it with a journal directory of its own,
/// and the adapter.
struct Rig {
    db: TestDb,
    store: Store,
    sessions: TowerSessionStore,
    journal: TempDir,
}

impl Rig {
    async fn new() -> Rig {
        let db = TestDb::new()
            .await
            .unwrap_or_else(|e| panic!("no test database: {e}"));
        Rig::on(db, |builder| builder).await
    }

    async fn on(db: TestDb, tune: impl FnOnce(ConfigBuilder) -> ConfigBuilder) -> Rig {
        let journal = tempfile::tempdir().expect("journal dir");
        let config = tune(
            Config::builder()
                .url(db.url())
                .connect_timeout(StdDuration::from_secs(5))
                .query_timeout(StdDuration::from_secs(10))
                .startup_backoff(StdDuration::from_millis(100))
                .journal_dir(journal.path()),
        )
        .build()
        .expect("valid config");
        let store = Store::new(config).expect("store");
        store.ready().await.expect("store ready");
        let sessions = TowerSessionStore::new(store.clone());
        Rig {
            db,
            store,
            sessions,
            journal,
        }
    }

    /// Rows in the table: all, or those of `sid`.
    async fn rows(&self, sid: Option<&str>) -> i64 {
        let client = self.db.client().await.expect("test connection");
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

    /// The document of `sid`'s row, as JSON.
    async fn document(&self, sid: &str) -> Option<Value> {
        let client = self.db.client().await.expect("test connection");
        let row = client
            .query_opt(
                "SELECT sess::text FROM session_store WHERE sid = $1",
                &[&sid],
            )
            .await
            .expect("document");
        row.map(|row| serde_json::from_str(row.get::<_, &str>(0)).expect("JSON"))
    }

    /// The `expire` column of `sid`'s row.
    async fn expire(&self, sid: &str) -> OffsetDateTime {
        let client = self.db.client().await.expect("test connection");
        client
            .query_one("SELECT expire FROM session_store WHERE sid = $1", &[&sid])
            .await
            .expect("a row")
            .get::<_, time::PrimitiveDateTime>(0)
            .assume_utc()
    }
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

fn in_secs(seconds: i64) -> OffsetDateTime {
    OffsetDateTime::now_utc() + Duration::seconds(seconds)
}

/// An expiry date with a sub-microsecond part, as `now_utc` gives.
fn with_nanos(seconds: i64) -> OffsetDateTime {
    let at = in_secs(seconds);
    at.replace_nanosecond(at.nanosecond() / 1_000 * 1_000 + 789)
        .unwrap()
}

/// `at` cut to whole microseconds.
fn micros(at: OffsetDateTime) -> OffsetDateTime {
    at.replace_nanosecond(at.nanosecond() / 1_000 * 1_000)
        .unwrap()
}

// --- The SessionStore contract ------------------------------------------

#[tokio::test]
async fn create_save_load_delete() {
    let rig = Rig::new().await;
    let sessions = &rig.sessions;

    assert_eq!(sessions.load(&Id::default()).await.unwrap(), None);

    let mut rec = record(
        &[("user", Value::from("alice")), ("n", Value::from(1))],
        with_nanos(1800),
    );
    let asked = rec.clone();
    sessions.create(&mut rec).await.unwrap();
    assert_eq!(rec.id, asked.id, "a free id is kept");
    assert_eq!(rec.data, asked.data);
    assert_eq!(rec.expiry_date, micros(asked.expiry_date), "cut as stored");
    // What create leaves in the record is exactly what loads.
    assert_eq!(sessions.load(&rec.id).await.unwrap(), Some(rec.clone()));
    assert_eq!(rig.expire(&rec.id.to_string()).await, rec.expiry_date);

    // save replaces data and expiry; what it stores is cut to microseconds.
    let mut changed = rec.clone();
    changed.data.insert("n".into(), Value::from(2));
    changed.data.remove("user");
    changed.expiry_date = with_nanos(7200);
    sessions.save(&changed).await.unwrap();
    let loaded = sessions.load(&rec.id).await.unwrap().expect("saved");
    assert_eq!(
        loaded.data,
        HashMap::from([("n".to_owned(), Value::from(2))])
    );
    assert_eq!(loaded.expiry_date, micros(changed.expiry_date));
    assert_eq!(rig.rows(None).await, 1, "save is an upsert");

    // save also inserts: a record of an id not in the table.
    let fresh = record(&[("k", Value::from(true))], in_secs(60));
    sessions.save(&fresh).await.unwrap();
    assert_eq!(
        sessions.load(&fresh.id).await.unwrap().expect("saved").data,
        fresh.data
    );

    sessions.delete(&rec.id).await.unwrap();
    sessions.delete(&rec.id).await.unwrap(); // twice is fine
    assert_eq!(sessions.load(&rec.id).await.unwrap(), None);
    assert_eq!(rig.rows(Some(&rec.id.to_string())).await, 0);
    assert_eq!(rig.rows(None).await, 1, "only that session was deleted");
    rig.store.close().await;
}

#[tokio::test]
async fn create_draws_a_new_id_when_the_id_is_taken() {
    let rig = Rig::new().await;
    let sessions = &rig.sessions;

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

    // An expired row still holds its id until the prune deletes it: create
    // never writes over a row.
    let stale = record(&[("owner", Value::from("stale"))], in_secs(-60));
    sessions.save(&stale).await.unwrap();
    let mut reuse = record(&[("owner", Value::from("fresh"))], in_secs(3600));
    reuse.id = stale.id;
    sessions.create(&mut reuse).await.unwrap();
    assert_ne!(reuse.id, stale.id);
    let stale_doc = rig.document(&stale.id.to_string()).await.expect("kept");
    assert_eq!(stale_doc["owner"], "stale");
    assert_eq!(
        sessions
            .load(&reuse.id)
            .await
            .unwrap()
            .expect("created")
            .data["owner"],
        "fresh"
    );
    assert_eq!(rig.rows(None).await, 4);
    rig.store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_from_one_id_all_land() {
    let rig = Rig::new().await;
    let start = Id::default();
    let creates: Vec<_> = (0..50)
        .map(|n| {
            let sessions = rig.sessions.clone();
            tokio::spawn(async move {
                let mut rec = record(&[("n", Value::from(n))], in_secs(600));
                rec.id = start;
                sessions.create(&mut rec).await.map(|()| rec)
            })
        })
        .collect();
    let mut created = Vec::new();
    for create in creates {
        created.push(create.await.unwrap().expect("create"));
    }
    let ids: HashSet<Id> = created.iter().map(|rec| rec.id).collect();
    assert_eq!(ids.len(), 50, "every create has an id of its own");
    assert!(ids.contains(&start), "one of them kept the first id");
    assert_eq!(rig.rows(None).await, 50);
    for rec in &created {
        let loaded = rig.sessions.load(&rec.id).await.unwrap().expect("created");
        assert_eq!(
            loaded.data, rec.data,
            "each row holds its own create's data"
        );
    }
    rig.store.close().await;
}

/// While the database is away, create journals the session; an id the
/// journal or the cache knows is taken. At write-back the session is
/// inserted only if its id is still free; otherwise it becomes a dead
/// letter and the row it met is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_while_the_database_is_away_land_only_on_free_ids() {
    let db = TestDb::throwaway()
        .await
        .unwrap_or_else(|e| panic!("no throwaway PostgreSQL: {e}"));
    let cluster = db.cluster().expect("a cluster of its own").clone();
    let rig = Rig::on(db, |builder| {
        builder
            .connect_timeout(StdDuration::from_secs(2))
            .query_timeout(StdDuration::from_secs(3))
    })
    .await;
    let sessions = &rig.sessions;

    // Seen by this store (cached), and written by someone else (not seen).
    let seen = record(&[("who", Value::from("seen"))], in_secs(3600));
    sessions.save(&seen).await.unwrap();
    let unseen = Id::default();
    let node_doc = r#"{"cookie":{"originalMaxAge":null,"httpOnly":true,"path":"/"},"who":"node"}"#;
    rig.db
        .client()
        .await
        .unwrap()
        .execute(
            "INSERT INTO session_store (sid, sess, expire) \
             VALUES ($1, $2::text::json, (now() AT TIME ZONE 'UTC') + interval '1 hour')",
            &[&unseen.to_string(), &node_doc],
        )
        .await
        .unwrap();

    cluster.stop().await.unwrap();

    let mut first = record(&[("who", Value::from("first"))], in_secs(3600));
    let first_id = first.id;
    sessions.create(&mut first).await.unwrap();
    assert_eq!(first.id, first_id, "unknown here: journaled under its id");
    assert_eq!(rig.store.journal_len(), 1);

    let mut second = record(&[("who", Value::from("second"))], in_secs(3600));
    second.id = first_id;
    sessions.create(&mut second).await.unwrap();
    assert_ne!(second.id, first_id, "the journal holds that id");

    let mut third = record(&[("who", Value::from("third"))], in_secs(3600));
    third.id = seen.id;
    sessions.create(&mut third).await.unwrap();
    assert_ne!(third.id, seen.id, "the cache holds that id");

    let mut fourth = record(&[("who", Value::from("fourth"))], in_secs(3600));
    fourth.id = unseen;
    sessions.create(&mut fourth).await.unwrap();
    assert_eq!(fourth.id, unseen, "nothing here knows that id");
    assert_eq!(rig.store.journal_len(), 4);
    // Served from the journal meanwhile.
    assert_eq!(
        sessions
            .load(&first.id)
            .await
            .unwrap()
            .expect("journaled")
            .data["who"],
        "first"
    );

    cluster.start_again().await.unwrap();
    let deadline = tokio::time::Instant::now() + StdDuration::from_secs(60);
    while rig.store.journal_len() > 0 || rig.store.breaker_state() != BreakerState::Closed {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never written back: journal {}, breaker {:?}",
            rig.store.journal_len(),
            rig.store.breaker_state()
        );
        tokio::time::sleep(StdDuration::from_millis(50)).await;
    }

    for (rec, who) in [
        (&first, "first"),
        (&second, "second"),
        (&third, "third"),
        (&seen, "seen"),
    ] {
        let doc = rig.document(&rec.id.to_string()).await.expect(who);
        assert_eq!(doc["who"], who);
    }
    let doc = rig.document(&unseen.to_string()).await.expect("kept");
    assert_eq!(
        doc["who"], "node",
        "a created session never overwrites a row"
    );
    let letters = dead_letter::read(rig.journal.path()).unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].sid, unseen.to_string());
    assert_eq!(letters[0].kind.as_str(), "id_taken");
    rig.store.close().await;
}

#[tokio::test]
async fn expired_records_do_not_load_and_delete_expired_removes_only_them() {
    let rig = Rig::new().await;
    let sessions = &rig.sessions;

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
    assert_eq!(rig.rows(None).await, 5, "expired rows are still there");

    sessions.delete_expired().await.unwrap();
    assert_eq!(rig.rows(None).await, 2);
    for rec in &live {
        assert_eq!(
            sessions.load(&rec.id).await.unwrap().expect("live").data,
            rec.data
        );
    }
    // Nothing left to delete is fine too.
    sessions.delete_expired().await.unwrap();
    assert_eq!(rig.rows(None).await, 2);
    rig.store.close().await;
}

// --- Rows as express-session sees them ----------------------------------

#[tokio::test]
async fn rows_have_the_express_session_shape() {
    let rig = Rig::new().await;
    let rec = record(
        &[("user", Value::from("alice")), ("views", Value::from(3))],
        in_secs(86_400),
    );
    rig.sessions.save(&rec).await.unwrap();

    let sid = rec.id.to_string();
    assert_eq!(sid.len(), 22, "base64url of 128 bits");
    assert_eq!(rig.expire(&sid).await, micros(rec.expiry_date));
    let doc = rig.document(&sid).await.expect("a row");
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
    let parsed = SessionRecord::from_json(&doc.to_string()).unwrap();
    let cookie_expiry = parsed.cookie.expires.expect("expires");
    assert!((cookie_expiry - rec.expiry_date).abs() < Duration::milliseconds(1));
    assert_eq!(parsed.data().len(), 2);
    rig.store.close().await;
}

#[tokio::test]
async fn a_cookie_key_is_kept_beside_express_sessions_cookie() {
    let rig = Rig::new().await;
    let rec = record(
        &[
            ("cookie", Value::from("chocolate")),
            ("_cookie", Value::from(1)),
            ("user", Value::from("alice")),
        ],
        in_secs(600),
    );
    rig.sessions.save(&rec).await.unwrap();
    assert_eq!(
        rig.sessions
            .load(&rec.id)
            .await
            .unwrap()
            .expect("saved")
            .data,
        rec.data
    );

    // In the document: express-session's cookie, and the escaped keys.
    let doc = rig.document(&rec.id.to_string()).await.expect("a row");
    assert!(doc["cookie"]["expires"].is_string(), "{doc}");
    assert_eq!(doc["_cookie"], "chocolate");
    assert_eq!(doc["__cookie"], 1);
    assert_eq!(doc["user"], "alice");
    assert_eq!(doc.as_object().unwrap().len(), 4, "{doc}");

    // Through tower-sessions' Session: insert, save, load.
    let app = app(&rig, Some(Duration::hours(1)), None);
    let reply = send(&app, "/insert_cookie", None).await;
    assert_eq!(reply.status, StatusCode::OK);
    let cookie = reply.cookie.expect("a session cookie");
    let reply = send(&app, "/get_cookie", Some(&cookie)).await;
    assert_eq!(reply.body, "crumbs");
    rig.store.close().await;
}

#[tokio::test]
async fn node_documents_load_and_unreadable_ones_are_no_session() {
    let rig = Rig::new().await;
    let sessions = &rig.sessions;
    let client = rig.db.client().await.unwrap();
    let insert = "INSERT INTO session_store (sid, sess, expire) \
                  VALUES ($1, $2::text::json, (now() AT TIME ZONE 'UTC') + interval '1 hour')";

    // As express-session and connect-pg-simple write it.
    let node = Id::default();
    let node_doc = r#"{"cookie":{"originalMaxAge":86400000,"expires":"2026-11-27T18:10:49.635Z","secure":false,"httpOnly":true,"path":"/","sameSite":"lax"},"user":"alice","views":2,"_cookie":"x"}"#;
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
            ("cookie".to_owned(), Value::from("x")),
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
    rig.store.close().await;
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

#[tokio::test]
async fn store_errors_become_backend_errors() {
    let rig = Rig::new().await;
    rig.store.close().await;
    match rig.sessions.load(&Id::default()).await {
        Err(session_store::Error::Backend(message)) => {
            assert_eq!(message, "the session store is closed")
        }
        other => panic!("{other:?}"),
    }
    let mut rec = record(&[], in_secs(60));
    assert!(matches!(
        rig.sessions.create(&mut rec).await,
        Err(session_store::Error::Backend(_))
    ));
    assert!(matches!(
        rig.sessions.delete_expired().await,
        Err(session_store::Error::Backend(_))
    ));
}

// --- An axum app on tower-sessions -------------------------------------

/// A handler's session failure: a 500, and the error on stderr.
fn failed(error: tower_sessions::session::Error) -> StatusCode {
    eprintln!("session error: {error}");
    StatusCode::INTERNAL_SERVER_ERROR
}

/// The routes of the app: each does one thing to the session.
fn routes() -> Router {
    Router::new()
        .route("/", get(|_: Session| async { "untouched" }))
        .route(
            "/insert",
            get(|session: Session| async move { session.insert("foo", 42).await.map_err(failed) }),
        )
        .route(
            "/get",
            get(|session: Session| async move {
                let value: Option<u64> = session.get("foo").await.map_err(failed)?;
                Ok::<_, StatusCode>(value.map_or("missing".to_owned(), |n| n.to_string()))
            }),
        )
        .route(
            "/get_value",
            get(|session: Session| async move {
                let value = session.get_value("foo").await.map_err(failed)?;
                Ok::<_, StatusCode>(format!("{value:?}"))
            }),
        )
        .route(
            "/remove_value",
            get(|session: Session| async move {
                session.remove_value("foo").await.map_err(failed).map(drop)
            }),
        )
        .route(
            "/cycle_id",
            get(|session: Session| async move { session.cycle_id().await.map_err(failed) }),
        )
        .route(
            "/flush",
            get(|session: Session| async move { session.flush().await.map_err(failed) }),
        )
        .route(
            "/set_expiry",
            get(|session: Session| async move {
                let at = OffsetDateTime::now_utc() + Duration::days(1);
                session.set_expiry(Some(Expiry::AtDateTime(at)));
            }),
        )
        .route(
            "/remove_expiry",
            get(|session: Session| async move {
                session.set_expiry(Some(Expiry::OnSessionEnd));
            }),
        )
        .route(
            "/insert_cookie",
            get(|session: Session| async move {
                session.insert("cookie", "crumbs").await.map_err(failed)
            }),
        )
        .route(
            "/get_cookie",
            get(|session: Session| async move {
                let cookie: Option<String> = session.get("cookie").await.map_err(failed)?;
                Ok::<_, StatusCode>(cookie.unwrap_or_default())
            }),
        )
}

/// The routes behind a session layer on the rig's store: the default
/// (secure) cookie, inactivity expiry after `max_age` if given, and a
/// cookie domain if given.
fn app(rig: &Rig, max_age: Option<Duration>, domain: Option<&str>) -> Router {
    let mut layer = SessionManagerLayer::new(rig.sessions.clone());
    if let Some(max_age) = max_age {
        layer = layer.with_expiry(Expiry::OnInactivity(max_age));
    }
    if let Some(domain) = domain {
        layer = layer.with_domain(domain.to_owned());
    }
    routes().layer(layer)
}

/// A response: status, body, and the `Set-Cookie` if any.
struct Reply {
    status: StatusCode,
    body: String,
    cookie: Option<Cookie<'static>>,
}

/// Sends `GET uri`, with `cookie` (its name and value) if given.
async fn send(app: &Router, uri: &str, cookie: Option<&Cookie<'_>>) -> Reply {
    let mut request = Request::builder().uri(uri);
    if let Some(cookie) = cookie {
        request = request.header(header::COOKIE, cookie.stripped().encoded().to_string());
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let mut set_cookies = response.headers().get_all(header::SET_COOKIE).iter();
    let cookie = set_cookies.next().map(|value| {
        Cookie::parse_encoded(value.to_str().unwrap().to_owned()).expect("a valid Set-Cookie")
    });
    assert!(set_cookies.next().is_none(), "one Set-Cookie at most");
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    Reply {
        status,
        body: String::from_utf8(body.to_vec()).unwrap(),
        cookie,
    }
}

/// A cookie named `id` with `value`, as a browser would send it.
fn id_cookie(value: &str) -> Cookie<'static> {
    Cookie::new("id", value.to_owned())
}

/// Whether `max_age` is `expected`, give or take a few seconds of test time.
fn about(max_age: Option<Duration>, expected: Duration) -> bool {
    max_age.is_some_and(|age| age <= expected && age >= expected - Duration::seconds(5))
}

#[tokio::test]
async fn no_cookie_and_no_row_without_data() {
    let rig = Rig::new().await;
    let app = app(&rig, Some(Duration::hours(1)), None);
    let reply = send(&app, "/", None).await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (StatusCode::OK, "untouched")
    );
    assert!(reply.cookie.is_none(), "{:?}", reply.cookie);
    // Reading a missing value does not make a session either.
    let reply = send(&app, "/get_value", None).await;
    assert_eq!(reply.body, "None");
    assert!(reply.cookie.is_none(), "{:?}", reply.cookie);
    assert_eq!(rig.rows(None).await, 0);
    rig.store.close().await;
}

#[tokio::test]
async fn a_bogus_cookie_gets_a_new_session() {
    let rig = Rig::new().await;
    let app = app(&rig, Some(Duration::hours(1)), None);
    let bogus = "AAAAAAAAAAAAAAAAAAAAAA";
    let reply = send(&app, "/insert", Some(&id_cookie(bogus))).await;
    assert_eq!(reply.status, StatusCode::OK);
    let cookie = reply.cookie.expect("a new session cookie");
    assert_ne!(cookie.value(), bogus);
    assert_eq!(cookie.value().len(), 22);
    assert_eq!(rig.rows(Some(bogus)).await, 0, "the bogus id stays unused");
    assert_eq!(rig.rows(Some(cookie.value())).await, 1);
    rig.store.close().await;
}

#[tokio::test]
async fn a_malformed_cookie_is_removed() {
    let rig = Rig::new().await;
    let app = app(&rig, Some(Duration::hours(1)), None);
    let reply = send(&app, "/", Some(&id_cookie("malformed"))).await;
    assert_eq!(reply.status, StatusCode::OK);
    let cookie = reply.cookie.expect("a removal cookie");
    assert_eq!(cookie.value(), "");
    assert_eq!(cookie.max_age(), Some(Duration::ZERO));
    assert_eq!(rig.rows(None).await, 0);
    rig.store.close().await;
}

#[tokio::test]
async fn insert_sets_the_cookie_and_writes_the_row() {
    let rig = Rig::new().await;
    let app = app(&rig, Some(Duration::hours(1)), None);
    let reply = send(&app, "/insert", None).await;
    assert_eq!(reply.status, StatusCode::OK);
    let cookie = reply.cookie.expect("a session cookie");
    assert_eq!(cookie.name(), "id");
    assert_eq!(cookie.http_only(), Some(true));
    assert_eq!(cookie.secure(), Some(true));
    assert_eq!(cookie.same_site(), Some(SameSite::Strict));
    assert_eq!(cookie.path(), Some("/"));
    assert_eq!(cookie.domain(), None);
    assert!(about(cookie.max_age(), Duration::hours(1)), "{cookie}");

    let doc = rig.document(cookie.value()).await.expect("a row");
    assert_eq!(doc["foo"], 42);
    let expire = rig.expire(cookie.value()).await;
    assert!(
        (expire - in_secs(3600)).abs() < Duration::seconds(5),
        "{expire}"
    );
    rig.store.close().await;
}

#[tokio::test]
async fn without_an_expiry_the_cookie_has_no_max_age() {
    let rig = Rig::new().await;
    let app = app(&rig, None, None);
    let reply = send(&app, "/insert", None).await;
    let cookie = reply.cookie.expect("a session cookie");
    assert_eq!(cookie.max_age(), None, "{cookie}");
    assert_eq!(cookie.expires(), None, "a browser-session cookie: {cookie}");
    assert_eq!(cookie.http_only(), Some(true));
    assert_eq!(cookie.secure(), Some(true));
    assert_eq!(cookie.same_site(), Some(SameSite::Strict));
    assert_eq!(cookie.path(), Some("/"));
    // The row still expires: tower-sessions' two weeks for such sessions.
    let expire = rig.expire(cookie.value()).await;
    assert!(
        (expire - in_secs(14 * 86_400)).abs() < Duration::seconds(5),
        "{expire}"
    );
    rig.store.close().await;
}

#[tokio::test]
async fn get_reads_what_insert_wrote() {
    let rig = Rig::new().await;
    let app = app(&rig, Some(Duration::hours(1)), None);
    let cookie = send(&app, "/insert", None).await.cookie.expect("cookie");
    let reply = send(&app, "/get", Some(&cookie)).await;
    assert_eq!((reply.status, reply.body.as_str()), (StatusCode::OK, "42"));
    let reply = send(&app, "/get_value", Some(&cookie)).await;
    assert_eq!(reply.body, "Some(Number(42))");
    // Another client, without the cookie, has no value.
    let reply = send(&app, "/get_value", None).await;
    assert_eq!(reply.body, "None");
    rig.store.close().await;
}

#[tokio::test]
async fn removing_the_last_value_leaves_an_empty_session() {
    let rig = Rig::new().await;
    let app = app(&rig, Some(Duration::hours(1)), None);
    let cookie = send(&app, "/insert", None).await.cookie.expect("cookie");
    let reply = send(&app, "/remove_value", Some(&cookie)).await;
    assert_eq!(reply.status, StatusCode::OK);
    let kept = reply.cookie.expect("the session is saved");
    assert_eq!(kept.value(), cookie.value());

    let doc = rig.document(cookie.value()).await.expect("a row");
    assert_eq!(
        doc.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["cookie"],
        "{doc}"
    );
    let reply = send(&app, "/get_value", Some(&cookie)).await;
    assert_eq!(reply.body, "None");
    rig.store.close().await;
}

#[tokio::test]
async fn cycle_id_moves_the_data_to_a_new_id() {
    let rig = Rig::new().await;
    let app = app(&rig, Some(Duration::hours(1)), None);
    let first = send(&app, "/insert", None).await.cookie.expect("cookie");
    let reply = send(&app, "/cycle_id", Some(&first)).await;
    assert_eq!(reply.status, StatusCode::OK);
    let second = reply.cookie.expect("a new cookie");
    assert_ne!(second.value(), first.value());
    assert_eq!(
        rig.rows(Some(first.value())).await,
        0,
        "the old row is gone"
    );
    assert_eq!(rig.rows(None).await, 1);

    let reply = send(&app, "/get", Some(&second)).await;
    assert_eq!(reply.body, "42");
    let reply = send(&app, "/get_value", Some(&first)).await;
    assert_eq!(reply.body, "None", "the old id finds nothing");
    rig.store.close().await;
}

#[tokio::test]
async fn flush_deletes_the_row_and_removes_the_cookie() {
    let rig = Rig::new().await;
    let app = app(&rig, Some(Duration::hours(1)), None);
    let cookie = send(&app, "/insert", None).await.cookie.expect("cookie");
    let reply = send(&app, "/flush", Some(&cookie)).await;
    assert_eq!(reply.status, StatusCode::OK);
    let removal = reply.cookie.expect("a removal cookie");
    assert_eq!(removal.value(), "");
    assert_eq!(removal.max_age(), Some(Duration::ZERO));
    assert_eq!(removal.path(), Some("/"));
    assert_eq!(rig.rows(None).await, 0);

    let reply = send(&app, "/get_value", Some(&cookie)).await;
    assert_eq!(reply.body, "None");
    rig.store.close().await;
}

#[tokio::test]
async fn a_cookie_domain_is_set_and_removed_with_it() {
    let rig = Rig::new().await;
    let app = app(&rig, Some(Duration::hours(1)), Some("localhost"));
    let cookie = send(&app, "/insert", None).await.cookie.expect("cookie");
    assert_eq!(cookie.domain(), Some("localhost"));
    let removal = send(&app, "/flush", Some(&cookie))
        .await
        .cookie
        .expect("a removal cookie");
    assert_eq!(removal.value(), "");
    assert_eq!(removal.max_age(), Some(Duration::ZERO));
    assert_eq!(removal.domain(), Some("localhost"));
    assert_eq!(removal.path(), Some("/"));
    assert_eq!(rig.rows(None).await, 0);
    rig.store.close().await;
}

#[tokio::test]
async fn a_new_expiry_reaches_the_cookie_and_the_row() {
    let rig = Rig::new().await;
    let app = app(&rig, Some(Duration::hours(1)), Some("localhost"));
    let cookie = send(&app, "/insert", None).await.cookie.expect("cookie");
    assert!(about(cookie.max_age(), Duration::hours(1)), "{cookie}");

    let reply = send(&app, "/set_expiry", Some(&cookie)).await;
    let moved = reply.cookie.expect("a cookie with the new expiry");
    assert_eq!(moved.value(), cookie.value());
    assert!(about(moved.max_age(), Duration::days(1)), "{moved}");
    let expire = rig.expire(cookie.value()).await;
    assert!(
        (expire - in_secs(86_400)).abs() < Duration::seconds(5),
        "{expire}"
    );
    rig.store.close().await;
}

#[tokio::test]
async fn the_expiry_type_can_change_both_ways() {
    let rig = Rig::new().await;
    // From a browser-session cookie to a dated one.
    let app = app(&rig, None, Some("localhost"));
    let cookie = send(&app, "/insert", None).await.cookie.expect("cookie");
    assert_eq!(cookie.max_age(), None);
    let dated = send(&app, "/set_expiry", Some(&cookie))
        .await
        .cookie
        .expect("a dated cookie");
    assert!(about(dated.max_age(), Duration::days(1)), "{dated}");

    // And back, on an app whose sessions expire after an hour.
    let app = crate::app(&rig, Some(Duration::hours(1)), Some("localhost"));
    let cookie = send(&app, "/insert", None).await.cookie.expect("cookie");
    assert!(about(cookie.max_age(), Duration::hours(1)), "{cookie}");
    let undated = send(&app, "/remove_expiry", Some(&cookie))
        .await
        .cookie
        .expect("a browser-session cookie");
    assert_eq!(undated.max_age(), None, "{undated}");
    assert_eq!(undated.value(), cookie.value());
    rig.store.close().await;
}

#[tokio::test]
async fn an_expired_session_is_no_session() {
    let rig = Rig::new().await;
    let app = app(&rig, Some(Duration::hours(1)), None);
    let cookie = send(&app, "/insert", None).await.cookie.expect("cookie");
    // Time passes for the row (no sleep: its expiry is moved back).
    let client = rig.db.client().await.unwrap();
    client
        .execute(
            "UPDATE session_store SET expire = (now() AT TIME ZONE 'UTC') - interval '1 second' \
             WHERE sid = $1",
            &[&cookie.value()],
        )
        .await
        .unwrap();

    let reply = send(&app, "/get_value", Some(&cookie)).await;
    assert_eq!(reply.body, "None");
    let removal = reply.cookie.expect("the stale cookie is removed");
    assert_eq!(removal.max_age(), Some(Duration::ZERO));
    // Writing again makes a new session, not the expired one.
    let reply = send(&app, "/insert", Some(&cookie)).await;
    let fresh = reply.cookie.expect("a new session");
    assert_ne!(fresh.value(), cookie.value());
    assert_eq!(
        rig.rows(None).await,
        2,
        "the expired row waits for the prune"
    );
    rig.store.close().await;
}
