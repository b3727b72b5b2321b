//! Integration tests of the testkit against real PostgreSQL servers. They fail (never skip)
//! when the PostgreSQL binaries are missing.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use pgsession_testkit::{
    ClusterOptions, FaultProxy, PgBouncer, PgBouncerOptions, ReplicaPair, TestCluster, TestDb,
    STANDBY_NAME,
};
use tokio::time::timeout;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

async fn one(client: &Client) -> Result<i32, tokio_postgres::Error> {
    Ok(client.query_one("SELECT 1", &[]).await?.get(0))
}

async fn text(client: &Client, sql: &str) -> String {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

fn accepts_tcp(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

#[tokio::test]
async fn cluster_stops_starts_restarts_and_recovers_from_a_kill() {
    let cluster = TestCluster::start().await.unwrap();
    assert_eq!(cluster.host(), "127.0.0.1");
    let url = cluster.url("postgres");
    assert_eq!(
        url,
        format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port())
    );
    assert!(cluster.is_running());
    let client = connect(&url).await.unwrap();
    assert_eq!(one(&client).await.unwrap(), 1);

    cluster.stop().await.unwrap();
    assert!(!cluster.is_running());
    assert!(
        one(&client).await.is_err(),
        "a stopped server still answered"
    );
    assert!(
        connect(&url).await.is_err(),
        "connected to a stopped server"
    );
    cluster.stop().await.unwrap(); // stopping twice is fine

    cluster.start_again().await.unwrap();
    assert!(cluster.is_running());
    let client = connect(&url).await.unwrap();
    client
        .batch_execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (7)")
        .await
        .unwrap();

    cluster.restart().await.unwrap();
    assert!(
        one(&client).await.is_err(),
        "a connection survived a restart"
    );
    let client = connect(&url).await.unwrap();
    let kept: i32 = client
        .query_one("SELECT x FROM kept", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 7);

    cluster.kill().await.unwrap();
    assert!(!cluster.is_running());
    assert!(connect(&url).await.is_err());
    cluster.start_again().await.unwrap();
    let client = connect(&url).await.unwrap();
    assert_eq!(one(&client).await.unwrap(), 1);
}

#[tokio::test]
async fn two_clusters_run_side_by_side() {
    let (a, b) = tokio::try_join!(TestCluster::start(), TestCluster::start()).unwrap();
    assert_ne!(a.port(), b.port());
    assert_ne!(a.data_dir(), b.data_dir());
    let (ca, cb) = (
        connect(&a.url("postgres")).await.unwrap(),
        connect(&b.url("postgres")).await.unwrap(),
    );
    ca.batch_execute("CREATE TABLE only_in_a (x int)")
        .await
        .unwrap();
    assert!(cb.batch_execute("SELECT * FROM only_in_a").await.is_err());
    assert_eq!(
        text(&ca, "SELECT current_setting('port')").await,
        a.port().to_string()
    );
    assert_eq!(
        text(&cb, "SELECT current_setting('port')").await,
        b.port().to_string()
    );

    a.stop().await.unwrap();
    assert_eq!(
        one(&cb).await.unwrap(),
        1,
        "stopping one cluster affected the other"
    );
}

#[tokio::test]
async fn cluster_options_apply() {
    let cluster = TestCluster::start_with(ClusterOptions {
        config: vec!["include 'extra.conf'".into()],
        max_connections: Some(17),
        files: vec![("extra.conf".into(), b"work_mem = '7MB'\n".to_vec(), 0o600)],
        log_statements: true,
    })
    .await
    .unwrap();
    let client = connect(&cluster.url("postgres")).await.unwrap();
    assert_eq!(text(&client, "SHOW max_connections").await, "17");
    assert_eq!(text(&client, "SHOW work_mem").await, "7MB");
    assert_eq!(text(&client, "SHOW fsync").await, "off");
    assert_eq!(text(&client, "SHOW listen_addresses").await, "127.0.0.1");

    cluster.create_database("made_by_helper").await.unwrap();
    connect(&cluster.url("made_by_helper")).await.unwrap();

    client.batch_execute("SELECT 'marker-41c9'").await.unwrap();
    let log = cluster.read_log().unwrap();
    assert!(cluster
        .log_path()
        .starts_with(cluster.data_dir().parent().unwrap()));
    assert_eq!(
        log.matches("statement: SELECT 'marker-41c9'").count(),
        1,
        "log:\n{log}"
    );
}

#[test]
fn dropping_a_cluster_in_a_panicking_test_stops_it_and_removes_its_directory() {
    let (tx, rx) = std::sync::mpsc::channel();
    let panicked = std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let cluster = runtime.block_on(TestCluster::start()).unwrap();
        tx.send((cluster.data_dir().to_owned(), cluster.port()))
            .unwrap();
        panic!("test failure while a cluster is running");
    })
    .join();
    assert!(panicked.is_err());
    let (data_dir, port) = rx.recv().unwrap();
    assert!(!data_dir.exists(), "{} is still there", data_dir.display());
    assert!(
        !accepts_tcp(port),
        "the server on port {port} is still running"
    );
}

#[tokio::test]
async fn throwaway_test_db_has_its_own_cluster() {
    let db = TestDb::throwaway().await.unwrap();
    let cluster = db.cluster().expect("a throwaway TestDb owns a cluster");
    assert_eq!(db.url(), cluster.url("pgsession_test"));
    let client = db.client().await.unwrap();
    assert_eq!(
        text(&client, "SELECT current_database()::text").await,
        "pgsession_test"
    );
    let port = cluster.port();
    drop(client);
    drop(db);
    assert!(!accepts_tcp(port), "the cluster outlived its TestDb");
}

#[tokio::test]
async fn test_db_new_gives_an_empty_database() {
    // Uses DATABASE_URL if the environment sets it, a throwaway cluster otherwise.
    let db = TestDb::new().await.unwrap();
    let client = db.client().await.unwrap();
    assert_eq!(
        text(&client, "SELECT current_database()::text").await,
        db.name()
    );
    let tables: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 0);
}

async fn database_exists(admin: &Client, name: &str) -> bool {
    admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .unwrap()
        .is_some()
}

async fn on_server_creates_and_drops_a_unique_database() {
    let cluster = TestCluster::start().await.unwrap();
    let admin = connect(&cluster.url("postgres")).await.unwrap();
    let (a, b) = (
        TestDb::on_server(&cluster.url("postgres")).await.unwrap(),
        TestDb::on_server(&format!("{}?application_name=it", cluster.url("")))
            .await
            .unwrap(),
    );
    assert!(a.cluster().is_none());
    assert_ne!(a.name(), b.name());
    assert!(a
        .name()
        .starts_with(&format!("pgsession_test_{}_", std::process::id())));
    for db in [&a, &b] {
        let client = db.client().await.unwrap();
        assert_eq!(
            text(&client, "SELECT current_database()::text").await,
            db.name()
        );
    }

    // Still connected: the drop must force the database away anyway.
    let connected = a.client().await.unwrap();
    connected
        .batch_execute("CREATE TABLE t (x int)")
        .await
        .unwrap();
    let name = a.name().to_owned();
    drop(a);
    assert!(
        !database_exists(&admin, &name).await,
        "{name} was not dropped"
    );
    assert!(database_exists(&admin, b.name()).await);
}

#[tokio::test]
async fn on_server_database_is_dropped_from_a_current_thread_runtime() {
    on_server_creates_and_drops_a_unique_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_server_database_is_dropped_from_a_multi_thread_runtime() {
    on_server_creates_and_drops_a_unique_database().await;
}

#[tokio::test]
async fn test_db_on_a_missing_server_fails_clearly() {
    let closed_port = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let error = TestDb::on_server(&format!(
        "postgres://postgres@127.0.0.1:{closed_port}/postgres"
    ))
    .await
    .unwrap_err();
    assert!(error.to_string().contains("connecting to"), "{error}");
}

async fn proxied() -> (TestCluster, FaultProxy) {
    let cluster = TestCluster::start().await.unwrap();
    let proxy = FaultProxy::start(cluster.socket_addr()).await.unwrap();
    (cluster, proxy)
}

#[tokio::test]
async fn proxy_forwards_and_counts_connections() {
    let (cluster, proxy) = proxied().await;
    assert_eq!(proxy.addr().ip(), Ipv4Addr::LOCALHOST);
    assert_eq!(
        proxy.url_for("postgres"),
        format!("postgres://postgres@127.0.0.1:{}/postgres", proxy.port())
    );
    assert_eq!(proxy.upstream(), cluster.socket_addr());
    let client = connect(&proxy.url_for("postgres")).await.unwrap();
    assert_eq!(one(&client).await.unwrap(), 1);
    assert_eq!((proxy.connections(), proxy.total_connections()), (1, 1));

    drop(client);
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.connections() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!((proxy.connections(), proxy.total_connections()), (0, 1));
}

#[tokio::test]
async fn blackhole_hangs_queries_until_healed() {
    let (_cluster, proxy) = proxied().await;
    let client = connect(&proxy.url_for("postgres")).await.unwrap();
    proxy.blackhole(true);
    let query = one(&client);
    tokio::pin!(query);
    assert!(
        timeout(Duration::from_secs(1), &mut query).await.is_err(),
        "a query got through the blackhole"
    );

    // New connections hang too.
    assert!(timeout(
        Duration::from_millis(300),
        connect(&proxy.url_for("postgres"))
    )
    .await
    .is_err());

    proxy.heal();
    match timeout(Duration::from_secs(30), query)
        .await
        .expect("the query still hangs after heal")
    {
        Ok(value) => assert_eq!(value, 1),
        Err(error) => eprintln!("the connection failed after heal: {error}"),
    }
}

#[tokio::test]
async fn reset_all_breaks_open_connections() {
    let (_cluster, proxy) = proxied().await;
    let client = connect(&proxy.url_for("postgres")).await.unwrap();
    assert_eq!(one(&client).await.unwrap(), 1);
    proxy.reset_all();
    assert!(one(&client).await.is_err(), "a query survived reset_all");
    // New connections are fine.
    let client = connect(&proxy.url_for("postgres")).await.unwrap();
    assert_eq!(one(&client).await.unwrap(), 1);
}

#[tokio::test]
async fn refuse_makes_connecting_fail_fast() {
    let (_cluster, proxy) = proxied().await;
    let open = connect(&proxy.url_for("postgres")).await.unwrap();
    proxy.refuse(true);
    let attempt = timeout(Duration::from_secs(5), connect(&proxy.url_for("postgres"))).await;
    assert!(
        attempt.expect("refusing took more than 5 s").is_err(),
        "connected while refusing"
    );
    assert_eq!(
        one(&open).await.unwrap(),
        1,
        "refuse affected an open connection"
    );

    proxy.heal();
    let client = connect(&proxy.url_for("postgres")).await.unwrap();
    assert_eq!(one(&client).await.unwrap(), 1);
}

#[tokio::test]
async fn delay_connect_delays_connecting() {
    let (_cluster, proxy) = proxied().await;
    let delay = Duration::from_millis(700);
    proxy.delay_connect(delay);
    let started = Instant::now();
    let client = connect(&proxy.url_for("postgres")).await.unwrap();
    assert!(
        started.elapsed() >= delay,
        "connected after {:?}",
        started.elapsed()
    );
    assert_eq!(one(&client).await.unwrap(), 1);
}

#[tokio::test]
async fn heal_releases_connections_waiting_on_a_connect_delay() {
    let (_cluster, proxy) = proxied().await;
    proxy.delay_connect(Duration::from_secs(3600));
    let url = proxy.url_for("postgres");
    let pending = tokio::spawn(async move { connect(&url).await.map(drop) });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!pending.is_finished());
    proxy.heal();
    timeout(Duration::from_secs(30), pending)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn latency_slows_each_round_trip() {
    let (_cluster, proxy) = proxied().await;
    let client = connect(&proxy.url_for("postgres")).await.unwrap();
    let latency = Duration::from_millis(150);

    proxy.latency(latency);
    let started = Instant::now();
    assert_eq!(one(&client).await.unwrap(), 1);
    assert!(
        started.elapsed() >= 2 * latency,
        "round trip took {:?}",
        started.elapsed()
    );

    proxy.heal();
    proxy.latency_to_client(latency);
    let started = Instant::now();
    client.simple_query("SELECT 1").await.unwrap();
    assert!(
        started.elapsed() >= latency,
        "round trip took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn set_upstream_redirects_new_connections() {
    let (first, proxy) = proxied().await;
    let second = TestCluster::start().await.unwrap();
    let old = connect(&proxy.url_for("postgres")).await.unwrap();
    proxy.set_upstream(second.socket_addr());
    let new = connect(&proxy.url_for("postgres")).await.unwrap();
    assert_eq!(
        text(&old, "SELECT current_setting('port')").await,
        first.port().to_string()
    );
    assert_eq!(
        text(&new, "SELECT current_setting('port')").await,
        second.port().to_string()
    );
}

#[tokio::test]
async fn dropping_the_proxy_closes_everything() {
    let (_cluster, proxy) = proxied().await;
    let url = proxy.url_for("postgres");
    let client = connect(&url).await.unwrap();
    drop(proxy);
    assert!(
        one(&client).await.is_err(),
        "a connection outlived the proxy"
    );
    assert!(
        connect(&url).await.is_err(),
        "the proxy still accepts connections"
    );
}

/// `SHOW CONFIG` of a PgBouncer's admin console, as `key -> value`.
async fn pgbouncer_config(bouncer: &PgBouncer) -> std::collections::HashMap<String, String> {
    let admin = connect(&bouncer.admin_url()).await.unwrap();
    admin
        .simple_query("SHOW CONFIG")
        .await
        .unwrap()
        .into_iter()
        .filter_map(|message| match message {
            SimpleQueryMessage::Row(row) => Some((
                row.get(0).unwrap_or_default().to_owned(),
                row.get(1).unwrap_or_default().to_owned(),
            )),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn pgbouncer_pools_in_transaction_mode_and_refuses_startup_options() {
    let cluster = TestCluster::start().await.unwrap();
    let bouncer = PgBouncer::start(cluster.socket_addr()).await.unwrap();
    assert_eq!(bouncer.upstream(), cluster.socket_addr());
    assert_ne!(bouncer.port(), cluster.port());
    assert_eq!(
        bouncer.url("postgres"),
        format!("postgres://postgres@127.0.0.1:{}/postgres", bouncer.port())
    );
    let client = connect(&bouncer.url("postgres")).await.unwrap();
    assert_eq!(one(&client).await.unwrap(), 1);
    // Through PgBouncer to the cluster: the server's port is the cluster's.
    assert_eq!(
        text(&client, "SELECT current_setting('port')").await,
        cluster.port().to_string()
    );
    let config = pgbouncer_config(&bouncer).await;
    assert_eq!(config["pool_mode"], "transaction");
    assert_eq!(config["ignore_startup_parameters"], "");

    let with_options = format!("{}?options=-c%20TimeZone%3DUTC", bouncer.url("postgres"));
    let refused = connect(&with_options).await.unwrap_err();
    let message = refused.as_db_error().map(|e| e.message().to_owned());
    assert_eq!(
        message.as_deref(),
        Some("unsupported startup parameter: options"),
        "{refused:?}"
    );

    // The variant that drops `options` silently.
    let lenient = PgBouncer::start_with(
        cluster.socket_addr(),
        PgBouncerOptions {
            ignore_startup_parameters: vec!["options".into()],
            ..PgBouncerOptions::default()
        },
    )
    .await
    .unwrap();
    let with_options = format!("{}?options=-c%20work_mem%3D7MB", lenient.url("postgres"));
    let client = connect(&with_options).await.unwrap();
    assert_eq!(
        text(&client, "SHOW work_mem").await,
        "4MB",
        "options dropped"
    );
    assert_eq!(
        pgbouncer_config(&lenient).await["ignore_startup_parameters"],
        "options"
    );
}

#[tokio::test]
async fn pgbouncer_stops_restarts_on_the_same_port_and_dies_with_drop() {
    let cluster = TestCluster::start().await.unwrap();
    let bouncer = PgBouncer::start(cluster.socket_addr()).await.unwrap();
    let url = bouncer.url("postgres");
    let port = bouncer.port();
    let first_pid = bouncer.pid().expect("running");
    let client = connect(&url).await.unwrap();
    assert_eq!(one(&client).await.unwrap(), 1);

    bouncer.restart().await.unwrap();
    assert!(one(&client).await.is_err(), "a client survived the restart");
    assert_eq!(bouncer.port(), port);
    assert_ne!(bouncer.pid(), Some(first_pid));
    let client = connect(&url).await.unwrap();
    assert_eq!(one(&client).await.unwrap(), 1);

    bouncer.stop().await.unwrap();
    assert!(!bouncer.is_running());
    assert!(!accepts_tcp(port));
    assert!(connect(&url).await.is_err());
    bouncer.stop().await.unwrap(); // stopping twice is fine
    bouncer.start_again().await.unwrap();
    assert_eq!(one(&connect(&url).await.unwrap()).await.unwrap(), 1);

    bouncer.kill().await.unwrap();
    assert!(!accepts_tcp(port));
    bouncer.start_again().await.unwrap();
    assert!(bouncer.read_log().unwrap().contains("process up"));

    let config = bouncer.config_path().to_owned();
    assert!(config.exists());
    drop(bouncer);
    assert!(!accepts_tcp(port), "PgBouncer outlived its drop");
    assert!(!config.exists(), "{} is still there", config.display());
}

#[tokio::test]
async fn pgbouncer_that_cannot_start_says_why() {
    let cluster = TestCluster::start().await.unwrap();
    let error = PgBouncer::start_with(
        cluster.socket_addr(),
        PgBouncerOptions {
            pool_mode: "nonsense".into(),
            ..PgBouncerOptions::default()
        },
    )
    .await
    .unwrap_err();
    let message = error.to_string();
    assert!(message.contains("PgBouncer did not start"), "{message}");
    assert!(message.contains("nonsense"), "{message}");
}

#[tokio::test]
async fn replica_pair_replicates_synchronously_and_fails_over() {
    let pair = ReplicaPair::start().await.unwrap();
    let (primary, standby) = (pair.primary(), pair.standby());
    assert_eq!(
        pair.url(),
        format!(
            "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/pgsession_test\
             ?target_session_attrs=read-write",
            primary.port(),
            standby.port()
        )
    );
    let on_primary = connect(&pair.primary_url()).await.unwrap();
    let on_standby = connect(&pair.standby_url()).await.unwrap();
    assert_eq!(
        text(&on_primary, "SELECT sync_state FROM pg_stat_replication").await,
        "sync"
    );
    assert_eq!(
        text(
            &on_primary,
            "SELECT application_name FROM pg_stat_replication"
        )
        .await,
        STANDBY_NAME
    );
    on_primary
        .batch_execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    pair.wait_caught_up().await.unwrap();
    assert_eq!(text(&on_standby, "SELECT count(*)::text FROM t").await, "1");
    let read_only = on_standby
        .batch_execute("INSERT INTO t VALUES (2)")
        .await
        .unwrap_err();
    assert_eq!(read_only.code().map(|c| c.code()), Some("25006"));

    // Standby first in the list: target_session_attrs=read-write still picks the primary.
    let reversed = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/pgsession_test?target_session_attrs=read-write",
        standby.port(),
        primary.port()
    );
    let writable = connect(&reversed).await.unwrap();
    assert_eq!(
        text(&writable, "SELECT current_setting('port')").await,
        primary.port().to_string()
    );

    pair.stop_primary().await.unwrap();
    assert!(connect(&pair.url()).await.is_err(), "no writable server");
    pair.promote_standby().await.unwrap();
    let client = connect(&pair.url()).await.unwrap();
    assert_eq!(
        text(&client, "SELECT current_setting('port')").await,
        standby.port().to_string()
    );
    // Commits no longer wait for a standby.
    timeout(
        Duration::from_secs(10),
        client.batch_execute("INSERT INTO t VALUES (3)"),
    )
    .await
    .expect("a commit on the promoted standby waited")
    .unwrap();
    assert_eq!(text(&client, "SELECT count(*)::text FROM t").await, "2");
    // A session opened before the promotion may write now.
    on_standby
        .batch_execute("INSERT INTO t VALUES (4)")
        .await
        .unwrap();
}
