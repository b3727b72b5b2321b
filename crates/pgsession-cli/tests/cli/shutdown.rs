//! SIGTERM while requests are in flight: they all finish, then the process
//! exits 0.

use std::time::Duration;

use crate::common::{answer, call, client, eventually, scalar, test_db, ServeProcess};

const REQUESTS: usize = 20;

#[tokio::test]
async fn sigterm_lets_requests_in_flight_finish() {
    let db = test_db().await;
    // One connection per request, so that every request is seen waiting on
    // the lock (and none waits for a pool connection).
    let serve = ServeProcess::start_ready(
        db.url(),
        &[
            ("PGSESSION_POOL_SIZE", "25"),
            ("PGSESSION_SHUTDOWN_GRACE", "20s"),
        ],
    )
    .await;
    let mut serve = serve;
    let http = client();
    eventually("/readyz 200", Duration::from_secs(20), || async {
        call(&http, &serve, "GET", "/readyz", None, None)
            .await
            .status
            == 200
    })
    .await;

    // Make session writes slow: hold the table in an open transaction.
    let locker = db.client().await.unwrap();
    locker
        .batch_execute("BEGIN; LOCK TABLE session_store IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();

    let requests: Vec<_> = (0..REQUESTS)
        .map(|_| {
            let http = http.clone();
            let url = serve.url("/counter");
            tokio::spawn(async move { answer(http.post(url).send().await.expect("request")).await })
        })
        .collect();

    // Every request is inside the server, and the session writes wait on
    // the lock (concurrent saves share batched statements, so there are
    // fewer waiting statements than requests).
    let watcher = db.client().await.unwrap();
    let waiting_sql = "SELECT count(*) FROM pg_stat_activity \
                       WHERE datname = current_database() AND wait_event_type = 'Lock'";
    eventually(
        "all requests in the server, writes waiting on the lock",
        Duration::from_secs(30),
        || async {
            let waiting: i64 = watcher.query_one(waiting_sql, &[]).await.unwrap().get(0);
            let health = call(&http, &serve, "GET", "/health", None, None).await;
            let in_flight = health.json()["requests_in_flight"].as_u64().unwrap_or(0);
            waiting >= 1 && in_flight as usize >= REQUESTS
        },
    )
    .await;

    serve.sigterm();
    // The shutdown has begun once the listener is closed: new connections
    // are refused.
    let addr = serve.url("").trim_start_matches("http://").to_owned();
    eventually("the listener to close", Duration::from_secs(10), || async {
        tokio::net::TcpStream::connect(&addr).await.is_err()
    })
    .await;
    // Its log line is read from the child's stderr by another task: it may
    // arrive a moment after the listener closed.
    eventually(
        "the shutdown to be logged",
        Duration::from_secs(10),
        || async { serve.stderr().contains("no longer accepting connections") },
    )
    .await;
    // The requests in flight are still waiting on the lock, and the process
    // waits for them. (That it waits until they are answered is proved
    // below: each one gets its 200 after the lock is released, which a
    // process that had exited could not send.)
    assert!(
        !serve.has_exited(),
        "exited with requests in flight\n{}",
        serve.stderr()
    );
    assert!(
        requests.iter().all(|request| !request.is_finished()),
        "a request was answered while the table was locked"
    );

    locker.batch_execute("COMMIT").await.unwrap();

    for request in requests {
        let a = request.await.unwrap();
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.json()["views"], 1);
    }
    let status = serve.wait().await;
    assert_eq!(status.code(), Some(0), "{}", serve.stderr());
    // Every answer was sent after its session was stored.
    let rows: i64 = scalar(&db, "SELECT count(*) FROM session_store").await;
    assert_eq!(rows as usize, REQUESTS);
    let logs = serve.stderr();
    assert!(logs.contains("session store closed"), "{logs}");
}

#[tokio::test]
async fn sigterm_when_idle_exits_0_at_once() {
    let db = test_db().await;
    let mut serve = ServeProcess::start_ready(db.url(), &[]).await;
    let http = client();
    let a = call(&http, &serve, "POST", "/counter", None, None).await;
    assert_eq!(a.status, 200);
    let started = std::time::Instant::now();
    serve.sigterm();
    let status = serve.wait().await;
    assert_eq!(status.code(), Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}
