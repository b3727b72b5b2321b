//! TLS to the database, on a throwaway cluster with `ssl = on` and a server
//! certificate for `localhost` only (no IP address), signed by a test CA.
//!
//! Under `verify-full` and `require` the chain and the host name are
//! checked, under `verify-ca` only the chain; a refusal is a certificate
//! error returned at once, not a hang. `prefer` encrypts without checking,
//! as libpq does; skipping checks elsewhere takes the explicit opt-in,
//! which logs a warning. Without `sslrootcert` the machine's store is
//! trusted, as `SSL_CERT_FILE` names it. SECURITY.md cites these tests by
//! name.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use pgsession::{Config, ConfigBuilder, Error, Store};
use pgsession_testkit::{ClusterOptions, TestCluster};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use crate::common::in_secs;
use crate::security::Capture;

/// The connect timeout of these tests: a refusal must come well before it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A TLS-enabled cluster and the CA files a client may trust.
struct TlsServer {
    cluster: TestCluster,
    /// Holds the CA files.
    _dir: tempfile::TempDir,
    /// The CA that signed the server's certificate.
    right_ca: PathBuf,
    /// A CA that signed nothing the server has.
    wrong_ca: PathBuf,
}

impl TlsServer {
    async fn start() -> TlsServer {
        let ca = certificate_authority("pgsession test CA");
        let other = certificate_authority("some other CA");
        let server_key = KeyPair::generate().expect("server key");
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = params
            .signed_by(&server_key, &ca)
            .expect("server certificate");

        let cluster = TestCluster::start_with(ClusterOptions {
            config: vec![
                "ssl = on".into(),
                "ssl_cert_file = 'server.crt'".into(),
                "ssl_key_file = 'server.key'".into(),
            ],
            files: vec![
                ("server.crt".into(), server_cert.pem().into_bytes(), 0o644),
                // PostgreSQL refuses a key others can read.
                (
                    "server.key".into(),
                    server_key.serialize_pem().into_bytes(),
                    0o600,
                ),
            ],
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("no throwaway PostgreSQL with TLS: {e}"));
        cluster.create_database("tls").await.expect("database");

        let dir = tempfile::tempdir().expect("temp dir");
        let right_ca = dir.path().join("right-ca.pem");
        let wrong_ca = dir.path().join("wrong-ca.pem");
        std::fs::write(&right_ca, ca.pem()).expect("CA file");
        std::fs::write(&wrong_ca, other.pem()).expect("CA file");
        TlsServer {
            cluster,
            _dir: dir,
            right_ca,
            wrong_ca,
        }
    }

    /// A builder for `host` with `sslmode` and `root` as `sslrootcert`;
    /// the connections' `application_name` is `tls-<sslmode>-<host>`.
    fn config(&self, host: &str, sslmode: &str, root: &std::path::Path) -> ConfigBuilder {
        let url = format!(
            "postgres://postgres@{host}:{}/tls?sslmode={sslmode}&sslrootcert={}\
             &application_name=tls-{sslmode}-{host}",
            self.cluster.port(),
            root.display()
        );
        Config::builder()
            .url(url)
            .connect_timeout(CONNECT_TIMEOUT)
            .query_timeout(CONNECT_TIMEOUT)
            .startup_retries(0)
            .startup_backoff(Duration::from_millis(100))
    }

    /// Sessions of `application_name` the server sees encrypted, and not.
    async fn encrypted(&self, application_name: &str) -> (i64, i64) {
        let (client, connection) =
            tokio_postgres::connect(&self.cluster.url("tls"), tokio_postgres::NoTls)
                .await
                .expect("probe");
        tokio::spawn(connection);
        let row = client
            .query_one(
                "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
                 FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                 WHERE a.application_name = $1",
                &[&application_name],
            )
            .await
            .expect("pg_stat_ssl");
        (row.get(0), row.get(1))
    }
}

/// A self-signed CA that may sign server certificates.
fn certificate_authority(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key")).expect("CA")
}

/// The error, its `Debug` and its sources, as one line.
fn chain(error: &Error) -> String {
    let mut text = format!("{error} / {error:?}");
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// Starts a store from `builder` and asserts that it is refused at once,
/// with a certificate error; returns that error.
async fn refused(builder: ConfigBuilder, what: &str) -> String {
    let store = Store::new(builder.build().expect("valid config")).expect("store");
    let started = Instant::now();
    let result = tokio::time::timeout(CONNECT_TIMEOUT * 3, store.ready())
        .await
        .unwrap_or_else(|_| panic!("{what}: ready() hung"));
    let elapsed = started.elapsed();
    let error = result.expect_err(what);
    let text = chain(&error);
    assert!(
        elapsed < CONNECT_TIMEOUT,
        "{what}: refused after {elapsed:?}, by the timeout rather than the certificate: {text}"
    );
    // The message itself says why, for the operator reading the log.
    let message = error.to_string();
    assert!(
        message.contains("TLS handshake") && message.to_lowercase().contains("certificate"),
        "{what}: not a TLS certificate error: {text}"
    );
    assert!(!store.is_ready());
    store.close().await;
    text
}

/// Starts a store from `builder`, asserts it is ready and keeps sessions.
async fn accepted(builder: ConfigBuilder, what: &str) -> Store {
    let store = Store::new(builder.build().expect("valid config")).expect("store");
    tokio::time::timeout(CONNECT_TIMEOUT * 3, store.ready())
        .await
        .unwrap_or_else(|_| panic!("{what}: ready() hung"))
        .unwrap_or_else(|e| panic!("{what}: {}", chain(&e)));
    store
        .save("tls-session", r#"{"user":"alice"}"#, in_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{what}: save: {}", chain(&e)));
    let loaded = store
        .load("tls-session")
        .await
        .expect("load")
        .expect("saved");
    assert!(loaded.json.contains("alice"), "{what}");
    store
}

#[tokio::test]
async fn verify_full_with_the_right_ca_connects_encrypted() {
    let server = TlsServer::start().await;
    let builder = server.config("localhost", "verify-full", &server.right_ca);
    let store = accepted(builder, "verify-full").await;
    let (encrypted, plain) = server.encrypted("tls-verify-full-localhost").await;
    assert!(
        encrypted >= 1 && plain == 0,
        "{encrypted} encrypted, {plain} not"
    );
    store.close().await;
}

#[tokio::test]
async fn a_certificate_from_an_unknown_ca_is_refused_under_require_and_verify() {
    let server = TlsServer::start().await;
    for mode in ["require", "verify-ca", "verify-full"] {
        let builder = server.config("localhost", mode, &server.wrong_ca);
        let text = refused(builder, mode).await;
        assert!(text.contains("UnknownIssuer"), "{mode}: {text}");
    }
    // With no sslrootcert the machine's store is trusted, which does not
    // include this private CA either.
    let url = format!(
        "postgres://postgres@localhost:{}/tls?sslmode=verify-full",
        server.cluster.port()
    );
    let builder = Config::builder()
        .url(url)
        .connect_timeout(CONNECT_TIMEOUT)
        .startup_retries(0);
    refused(builder, "verify-full with the system roots").await;
}

#[tokio::test]
async fn a_host_name_the_certificate_does_not_name_is_refused_unless_verify_ca() {
    let server = TlsServer::start().await;
    // The certificate names `localhost`, not `127.0.0.1`.
    for mode in ["verify-full", "require"] {
        let builder = server.config("127.0.0.1", mode, &server.right_ca);
        let text = refused(builder, mode).await;
        assert!(text.contains("NotValidForName"), "{mode}: {text}");
    }
    // verify-ca checks the chain only.
    let builder = server.config("127.0.0.1", "verify-ca", &server.right_ca);
    let store = accepted(builder, "verify-ca by IP address").await;
    store.close().await;
}

#[tokio::test]
async fn the_insecure_opt_in_connects_and_logs_a_warning() {
    let (capture, _guard) = Capture::start();
    let server = TlsServer::start().await;
    let builder = server
        .config("localhost", "verify-full", &server.wrong_ca)
        .danger_accept_invalid_certs(true);
    let store = accepted(builder, "danger_accept_invalid_certs").await;
    store.close().await;
    let text = capture.text();
    let warning = text
        .lines()
        .find(|line| line.contains("TLS certificate NOT verified"))
        .unwrap_or_else(|| panic!("no warning in:\n{text}"));
    assert!(
        warning.contains("WARN") && warning.contains("session_pool"),
        "{warning}"
    );
}

#[tokio::test]
async fn prefer_encrypts_without_verifying_like_libpq() {
    let (capture, _guard) = Capture::start();
    let server = TlsServer::start().await;
    // A CA that signed nothing here: under prefer it is not consulted.
    let builder = server.config("127.0.0.1", "prefer", &server.wrong_ca);
    let store = accepted(builder, "prefer").await;
    let (encrypted, plain) = server.encrypted("tls-prefer-127.0.0.1").await;
    assert!(
        encrypted >= 1 && plain == 0,
        "{encrypted} encrypted, {plain} not"
    );
    store.close().await;
    // Not the operator's opt-in: no warning.
    assert!(!capture.text().contains("TLS certificate NOT verified"));
}

/// A certificate from an unknown CA is a configuration error, not an
/// outage: the operation fails at once with the setting to change, the
/// breaker stays closed (it would open at the first failure counted),
/// nothing is journaled, and `/health` shows the problem.
#[tokio::test]
async fn an_unknown_ca_is_a_configuration_error_shown_in_health_and_never_journaled() {
    let server = TlsServer::start().await;
    let journal = tempfile::tempdir().expect("journal dir");
    let builder = server
        .config("localhost", "verify-full", &server.wrong_ca)
        .breaker_threshold(1)
        .journal_dir(journal.path());
    let store = Store::new(builder.build().expect("valid config")).expect("store");
    for _ in 0..3 {
        let error = store
            .save("tls-session", r#"{"user":"alice"}"#, in_secs(60))
            .await
            .expect_err("an unknown CA");
        let hint = error
            .config_hint()
            .unwrap_or_else(|| panic!("no hint: {}", chain(&error)));
        assert!(hint.contains("sslrootcert"), "{hint}");
        assert!(
            !error.is_outage() && !error.is_transient(),
            "{}",
            chain(&error)
        );
    }
    assert_eq!(store.breaker_state(), pgsession::BreakerState::Closed);
    assert_eq!(store.journal_len(), 0);
    let health = store.health();
    assert_eq!(health.status, pgsession::HealthStatus::Degraded);
    let shown = health.config_error.expect("config_error in /health");
    assert!(
        shown.contains("trusted CA") && shown.contains("UnknownIssuer"),
        "{shown}"
    );
    store.close().await;
}

/// Set in the child processes of
/// [`verify_full_trusts_a_ca_installed_in_the_machines_store`]: what the
/// child must find (`accepted`, `refused` or `no-roots`) at the URL of
/// [`STORE_CHILD_URL`].
const STORE_CHILD_EXPECT: &str = "PGSESSION_TEST_STORE_CHILD_EXPECT";
const STORE_CHILD_URL: &str = "PGSESSION_TEST_STORE_CHILD_URL";

/// With no `sslrootcert`, `verify-full` trusts the machine's store, which
/// `SSL_CERT_FILE` names: a PEM bundle as Debian's `update-ca-certificates`
/// writes it (every trusted CA, concatenated). Our own CA in that bundle
/// is trusted; a bundle without it is not; a bundle with no certificate at
/// all is a configuration error that says so (no compiled-in fallback).
///
/// The variable is read by the process, so each case runs in a child
/// process: this test re-runs itself (`--exact`) with `SSL_CERT_FILE` set,
/// and the child, seeing [`STORE_CHILD_EXPECT`], checks the one case.
#[tokio::test]
async fn verify_full_trusts_a_ca_installed_in_the_machines_store() {
    if let Ok(expect) = std::env::var(STORE_CHILD_EXPECT) {
        let url = std::env::var(STORE_CHILD_URL).expect("the parent sets the URL");
        let builder = Config::builder()
            .url(url)
            .connect_timeout(CONNECT_TIMEOUT)
            .query_timeout(CONNECT_TIMEOUT)
            .startup_retries(0);
        match expect.as_str() {
            "accepted" => {
                accepted(builder, "a CA in SSL_CERT_FILE")
                    .await
                    .close()
                    .await
            }
            "refused" => {
                let text = refused(builder, "a CA missing from SSL_CERT_FILE").await;
                assert!(text.contains("UnknownIssuer"), "{text}");
            }
            "no-roots" => {
                let error = Store::new(builder.build().expect("valid config"))
                    .expect_err("no CA at all in SSL_CERT_FILE");
                let text = chain(&error);
                assert!(
                    text.contains("trusts no CA") && text.contains("sslrootcert"),
                    "{text}"
                );
            }
            other => panic!("unknown {STORE_CHILD_EXPECT}={other}"),
        }
        return;
    }

    let server = TlsServer::start().await;
    let url = format!(
        "postgres://postgres@localhost:{}/tls?sslmode=verify-full",
        server.cluster.port()
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let wrong = std::fs::read_to_string(&server.wrong_ca).expect("CA file");
    let right = std::fs::read_to_string(&server.right_ca).expect("CA file");
    let bundles = [
        ("accepted", format!("{wrong}{right}")),
        ("refused", wrong),
        ("no-roots", "# no certificate here\n".to_owned()),
    ];
    let me = std::env::current_exe().expect("the test binary");
    for (expect, bundle) in bundles {
        let file = dir.path().join(format!("{expect}-ca-certificates.crt"));
        std::fs::write(&file, bundle).expect("bundle");
        let child = tokio::process::Command::new(&me)
            .args([
                "--exact",
                "tls::verify_full_trusts_a_ca_installed_in_the_machines_store",
                "--test-threads=1",
            ])
            .env(STORE_CHILD_EXPECT, expect)
            .env(STORE_CHILD_URL, &url)
            .env("SSL_CERT_FILE", &file)
            .env_remove("SSL_CERT_DIR")
            .output()
            .await
            .expect("run the test binary");
        let output = format!(
            "{}{}",
            String::from_utf8_lossy(&child.stdout),
            String::from_utf8_lossy(&child.stderr)
        );
        // The filter must have run this very test, once, and it passed.
        assert!(
            child.status.success() && output.contains("1 passed"),
            "{expect}: {output}"
        );
    }
}
