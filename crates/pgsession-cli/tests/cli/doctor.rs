//! `pgsession doctor` as a process: a good database (exit 0, every step
//! ok), a stopped one (exit 1, the TCP step fails with its hint), and one
//! slow to accept connections behind the fault proxy (fails with the
//! connect-timeout hint under a short connect timeout, passes under a long
//! one and shows the slow step's time); one behind PgBouncer; one over
//! TLS with SCRAM and `channel_binding=require` (doctor logs in as the pool
//! does); and a primary with its streaming standby in one multi-host URL
//! (each host's role and lag, in text and in JSON).

use std::time::Duration;

use pgsession_testkit::{
    ClusterOptions, FaultProxy, ReplicaPair, TestCluster, TestDb, STANDBY_NAME,
};

use crate::common::{free_port, run, test_db};

/// `pgsession ARGS` with `env`, off the runtime's threads, so that the
/// fault proxy (which runs on this test's runtime) keeps forwarding.
async fn run_off_runtime(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        run(&args, &env)
    })
    .await
    .expect("run pgsession")
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The report line of `step`: `  <verdict>  <step>  <time>  <detail>`.
fn line<'a>(report: &'a str, step: &str) -> &'a str {
    report
        .lines()
        .find(|l| l.get(8..).is_some_and(|rest| rest.starts_with(step)))
        .unwrap_or_else(|| panic!("no {step:?} line in\n{report}"))
}

fn verdict(line: &str) -> &str {
    line.split_whitespace().next().unwrap_or_default()
}

/// The hint printed under the line of `step`.
fn hint<'a>(report: &'a str, step: &str) -> &'a str {
    let mut lines = report
        .lines()
        .skip_while(|l| !l.get(8..).is_some_and(|r| r.starts_with(step)));
    lines.next();
    lines
        .next()
        .filter(|l| l.contains("hint: "))
        .unwrap_or_else(|| panic!("no hint under {step:?} in\n{report}"))
}

/// The time printed on a step's line, in seconds.
fn seconds(line: &str) -> f64 {
    let words: Vec<&str> = line.split_whitespace().collect();
    for pair in words.windows(2) {
        if let Ok(n) = pair[0].parse::<f64>() {
            match pair[1] {
                "ms" => return n / 1000.0,
                "s" => return n,
                _ => {}
            }
        }
    }
    panic!("no time on {line:?}")
}

/// A slow-check threshold no step reaches on a loaded machine (a SCRAM
/// login in a debug build can take a second), for tests whose verdicts
/// must not depend on the clock.
const UNHURRIED: (&str, &str) = ("PGSESSION_SLOW_CHECK_THRESHOLD", "10m");

const STEPS: [&str; 10] = [
    "URL parsed",
    "name resolved",
    "TCP connected",
    "TLS negotiated",
    "authenticated",
    "server version",
    "first query",
    "table and index",
    "sessions",
    "pool settings",
];

#[tokio::test]
async fn a_good_database_passes_every_step() {
    let db = test_db().await;
    let migrated = run(&["migrate"], &[("DATABASE_URL", db.url())]);
    assert_eq!(migrated.status.code(), Some(0));
    // A password in the URL never shows.
    let url = db
        .url()
        .replacen("postgres://postgres@", "postgres://postgres:sw0rdfish@", 1);
    let out = run(&["doctor"], &[("DATABASE_URL", &url), UNHURRIED]);
    let report = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{report}");
    for step in STEPS {
        assert_eq!(verdict(line(&report, step)), "ok", "{step}:\n{report}");
    }
    assert!(!report.contains("sw0rdfish"), "{report}");
    assert!(report.contains("postgres:****@"), "{report}");
    assert!(report.contains("mode: direct connection"), "{report}");
    assert!(report.contains("result: ok: 10 checks passed"), "{report}");
    let pool = line(&report, "pool settings");
    assert!(
        pool.contains("TimeZone UTC") && pool.contains("statement_timeout 30s"),
        "{pool}"
    );
    assert!(
        line(&report, "server version").contains("PostgreSQL"),
        "{report}"
    );
}

#[tokio::test]
async fn a_stopped_database_fails_at_tcp_with_a_hint() {
    let db = TestDb::throwaway()
        .await
        .unwrap_or_else(|e| panic!("no throwaway PostgreSQL: {e}"));
    db.cluster()
        .unwrap()
        .stop()
        .await
        .expect("stop the cluster");
    let out = run(&["doctor"], &[("DATABASE_URL", db.url())]);
    let report = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert_eq!(verdict(line(&report, "URL parsed")), "ok", "{report}");
    assert_eq!(verdict(line(&report, "TCP connected")), "FAIL", "{report}");
    let why = hint(&report, "TCP connected");
    assert!(
        why.contains("connection refused") && why.contains("stopped"),
        "{why}"
    );
    for step in &STEPS[3..] {
        assert_eq!(verdict(line(&report, step)), "skip", "{step}:\n{report}");
    }
    assert!(
        report.contains("result: FAILED: 1 of 3 checks failed"),
        "{report}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("error: doctor: 1 check failed"), "{stderr}");
}

#[tokio::test]
async fn a_database_slow_to_connect_needs_a_longer_connect_timeout() {
    let db = TestDb::throwaway()
        .await
        .unwrap_or_else(|e| panic!("no throwaway PostgreSQL: {e}"));
    run(&["migrate"], &[("DATABASE_URL", db.url())]);
    let proxy = FaultProxy::start(db.cluster().unwrap().socket_addr())
        .await
        .expect("fault proxy");
    proxy.delay_connect(Duration::from_secs(3));
    let url = proxy.url_for(db.name());

    // Too short: the connecting step fails with the connect-timeout hint.
    let out = run_off_runtime(
        &["doctor"],
        &[("DATABASE_URL", &url), ("PGSESSION_CONNECT_TIMEOUT", "1s")],
    )
    .await;
    let report = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert_eq!(verdict(line(&report, "TCP connected")), "ok", "{report}");
    let failed = ["TLS negotiated", "authenticated"]
        .into_iter()
        .find(|step| verdict(line(&report, step)) == "FAIL")
        .unwrap_or_else(|| panic!("neither TLS nor login failed:\n{report}"));
    let took = seconds(line(&report, failed));
    assert!(
        (0.9..2.5).contains(&took),
        "{failed} took {took} s:\n{report}"
    );
    let why = hint(&report, failed);
    assert!(
        why.contains("PGSESSION_CONNECT_TIMEOUT")
            && why.contains("now 1s")
            && why.contains("cold start"),
        "{why}"
    );

    // Long enough: every step passes; the slow one shows its time.
    let out = run_off_runtime(
        &["doctor"],
        &[("DATABASE_URL", &url), ("PGSESSION_CONNECT_TIMEOUT", "10s")],
    )
    .await;
    let report = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{report}");
    for step in STEPS {
        let verdict = verdict(line(&report, step));
        assert!(
            verdict == "ok" || verdict == "warn",
            "{step}: {verdict}\n{report}"
        );
    }
    let slow = STEPS
        .into_iter()
        .map(|step| (step, seconds(line(&report, step))))
        .find(|(_, s)| *s >= 2.9)
        .unwrap_or_else(|| panic!("no step shows the 3 s wait:\n{report}"));
    assert_eq!(verdict(line(&report, slow.0)), "warn", "{report}");
    assert!(hint(&report, slow.0).contains("slow"), "{report}");
}

/// Behind PgBouncer (transaction mode), the report says so, and why the
/// statement timeout is the client's only.
#[tokio::test]
async fn behind_pgbouncer_the_mode_says_pooler() {
    let db = TestDb::throwaway()
        .await
        .unwrap_or_else(|e| panic!("no throwaway PostgreSQL: {e}"));
    run_off_runtime(&["migrate"], &[("DATABASE_URL", db.url())]).await;
    let bouncer = pgsession_testkit::PgBouncer::start(db.cluster().unwrap().socket_addr())
        .await
        .unwrap_or_else(|e| panic!("no PgBouncer: {e}"));
    let out = run_off_runtime(&["doctor"], &[("DATABASE_URL", &bouncer.url(db.name()))]).await;
    let report = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{report}");
    assert!(report.contains("mode: behind a pooler"), "{report}");
    assert!(report.contains("PGSESSION_POOLER=transaction"), "{report}");
    assert_eq!(verdict(line(&report, "pool settings")), "warn", "{report}");
    assert!(
        hint(&report, "pool settings").contains("PGSESSION_QUERY_TIMEOUT"),
        "{report}"
    );
}

/// `channel_binding=require` against a server with TLS and scram-sha-256:
/// the login must be SCRAM-SHA-256-PLUS, bound to the TLS channel, which
/// only a login on the pool's own TLS connector can offer. Then the same
/// without `sslrootcert`, the CA in the machine's store (`SSL_CERT_FILE`).
#[tokio::test]
async fn channel_binding_required_logs_in_as_the_pool_does() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key")).expect("CA");
    let server_key = KeyPair::generate().expect("server key");
    let server_cert = CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .signed_by(&server_key, &ca)
        .expect("server certificate");
    // The superuser by trust (to set up), the application by SCRAM over TLS only.
    let hba = "local all all trust\n\
               host all postgres 127.0.0.1/32 trust\n\
               hostssl all app 127.0.0.1/32 scram-sha-256\n";
    let cluster = TestCluster::start_with(ClusterOptions {
        config: vec![
            "ssl = on".into(),
            "ssl_cert_file = 'server.crt'".into(),
            "ssl_key_file = 'server.key'".into(),
            "password_encryption = 'scram-sha-256'".into(),
        ],
        files: vec![
            ("server.crt".into(), server_cert.pem().into_bytes(), 0o644),
            (
                "server.key".into(),
                server_key.serialize_pem().into_bytes(),
                0o600,
            ),
            ("pg_hba.conf".into(), hba.as_bytes().to_vec(), 0o600),
        ],
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("no throwaway PostgreSQL with TLS: {e}"));
    let (admin, connection) =
        tokio_postgres::connect(&cluster.url("postgres"), tokio_postgres::NoTls)
            .await
            .expect("connect as postgres");
    tokio::spawn(connection);
    for statement in [
        "CREATE ROLE app LOGIN PASSWORD 'sw0rdfish'",
        "CREATE DATABASE app OWNER app",
    ] {
        admin.batch_execute(statement).await.expect(statement);
    }

    let dir = tempfile::tempdir().expect("temp dir");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).expect("CA file");
    let url = format!(
        "postgres://app:sw0rdfish@localhost:{}/app?sslmode=verify-full&sslrootcert={}\
         &channel_binding=require",
        cluster.port(),
        ca_file.display()
    );
    // The store itself logs in this way (`migrate` runs the pool).
    let migrated = run(&["migrate"], &[("DATABASE_URL", &url)]);
    assert_eq!(
        migrated.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    let out = run(&["doctor"], &[("DATABASE_URL", &url), UNHURRIED]);
    let report = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{report}");
    for step in STEPS {
        assert_eq!(verdict(line(&report, step)), "ok", "{step}:\n{report}");
    }
    assert!(
        line(&report, "TLS negotiated").contains("certificate verified")
            && line(&report, "TLS negotiated").contains("by sslrootcert"),
        "{report}"
    );
    assert!(!report.contains("sw0rdfish"), "{report}");

    // Without sslrootcert, the CA installed in the machine's store (the
    // bundle SSL_CERT_FILE names) is trusted, and the report says so.
    let without_root = url.replace(&format!("&sslrootcert={}", ca_file.display()), "");
    assert_ne!(without_root, url);
    let out = run(
        &["doctor"],
        &[
            ("DATABASE_URL", &without_root),
            ("SSL_CERT_FILE", ca_file.to_str().expect("UTF-8 path")),
            UNHURRIED,
        ],
    );
    let report = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{report}");
    assert!(
        line(&report, "TLS negotiated").contains("by this machine's store (SSL_CERT_FILE="),
        "{report}"
    );
}

/// A primary and its synchronous standby in one URL: the report names
/// which host is which, and each one's lag, in text and in JSON.
#[tokio::test]
async fn a_multi_host_url_names_the_primary_and_the_standby_with_their_lag() {
    let pair = ReplicaPair::start()
        .await
        .unwrap_or_else(|e| panic!("no primary and standby: {e}"));
    let url = pair.url();
    let migrated = run(&["migrate"], &[("DATABASE_URL", &url)]);
    assert_eq!(migrated.status.code(), Some(0));
    let primary = format!("127.0.0.1:{}/{}", pair.primary().port(), pair.database());
    let standby = format!("127.0.0.1:{}/{}", pair.standby().port(), pair.database());

    let out = run(&["doctor"], &[("DATABASE_URL", &url), UNHURRIED]);
    let report = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{report}");
    let hosts = line(&report, "hosts");
    assert_eq!(verdict(hosts), "ok", "{report}");
    assert!(
        hosts.contains(&format!("primary: {primary}; standby: {standby}")),
        "{report}"
    );
    let described = |host: &str| {
        report
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{host}  ")))
            .unwrap_or_else(|| panic!("no line for {host} in\n{report}"))
    };
    assert!(
        described(&primary).contains(&format!("primary; 1 standby: {STANDBY_NAME}"))
            && described(&primary).contains("streaming, sync"),
        "{report}"
    );
    assert!(
        described(&standby).contains("standby; replay lag")
            && described(&standby).contains("received "),
        "{report}"
    );

    let out = run(&["doctor", "--json"], &[("DATABASE_URL", &url), UNHURRIED]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(&out)));
    assert_eq!(json["result"], "ok", "{json}");
    let hosts = json["hosts"].as_array().expect("hosts");
    assert_eq!(hosts.len(), 2, "{json}");
    assert_eq!(hosts[0]["host"], primary.as_str(), "{json}");
    assert_eq!(hosts[0]["role"], "primary", "{json}");
    let replica = &hosts[0]["replicas"][0];
    assert_eq!(replica["name"], STANDBY_NAME, "{json}");
    assert_eq!(replica["sync_state"], "sync", "{json}");
    assert!(replica["behind_bytes"].is_number(), "{json}");
    assert_eq!(hosts[1]["host"], standby.as_str(), "{json}");
    assert_eq!(hosts[1]["role"], "standby", "{json}");
    let lag = &hosts[1]["standby"];
    assert!(
        lag["replayed_lsn"].is_string()
            && lag["received_lsn"].is_string()
            && lag["unreplayed_bytes"].is_number(),
        "{json}"
    );
    assert!(
        lag["replay_lag_seconds"].as_f64().is_some_and(|s| s >= 0.0),
        "{json}"
    );
    let steps = json["steps"].as_array().expect("steps");
    assert!(steps.iter().all(|s| s["verdict"] == "ok"), "{json}");
}

/// A multi-host URL whose first host is down: the pool goes on to the
/// next, so does doctor's login; the first host's failure is a warning,
/// and the hosts step names the host that does not answer.
#[tokio::test]
async fn a_first_host_down_is_a_warning_when_another_host_serves() {
    let db = test_db().await;
    run(&["migrate"], &[("DATABASE_URL", db.url())]);
    let closed = free_port();
    let url = db
        .url()
        .replacen("@127.0.0.1:", &format!("@127.0.0.1:{closed},127.0.0.1:"), 1);
    assert_ne!(url, db.url(), "the test database is not at 127.0.0.1");
    let out = run(&["doctor"], &[("DATABASE_URL", &url), UNHURRIED]);
    let report = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{report}");
    assert_eq!(verdict(line(&report, "TCP connected")), "warn", "{report}");
    assert!(
        hint(&report, "TCP connected").contains("goes on to the next host"),
        "{report}"
    );
    assert_eq!(verdict(line(&report, "TLS negotiated")), "skip", "{report}");
    for step in &STEPS[4..] {
        assert_eq!(verdict(line(&report, step)), "ok", "{step}:\n{report}");
    }
    let hosts = line(&report, "hosts");
    assert_eq!(verdict(hosts), "warn", "{report}");
    assert!(
        hosts.contains(&format!("unreachable: 127.0.0.1:{closed}/")),
        "{report}"
    );
}
