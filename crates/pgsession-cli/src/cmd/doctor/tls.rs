//! The TLS step of `doctor`: asks the server for TLS on the probe's own
//! connection, runs the handshake with the library's client config, and
//! checks the certificate with the library's verifier for the mode,
//! recording what verification says even where the mode does not require
//! it (`prefer`, the insecure opt-in), and which trust store was used.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgsession::SslMode;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::hints::tls_hint;
use super::report::Verdict;
use super::{ssl_mode_name, Doctor, TLS};

impl Doctor {
    /// Asks for TLS and checks the certificate as the pool would, saying
    /// what verification found even where the mode does not require it.
    /// True when the login may go on.
    pub(super) async fn negotiate_tls(
        &mut self,
        mut stream: TcpStream,
        host: &str,
        local: bool,
        deadline: Instant,
    ) -> bool {
        let tls = self.config.tls().clone();
        let started = Instant::now();
        if tls.mode == SslMode::Disable {
            if local {
                self.report.ok(
                    TLS,
                    Duration::ZERO,
                    "not used (sslmode=disable, local link)",
                );
            } else {
                self.report.push(
                    TLS,
                    Verdict::Warn,
                    Some(Duration::ZERO),
                    "not used (sslmode=disable)",
                    Some(
                        "the password and the sessions cross the network in clear: use \
                         sslmode=verify-full (with sslrootcert= when the CA is not a public one)"
                            .to_owned(),
                    ),
                );
            }
            return true;
        }
        // SSLRequest: length 8, code 80877103.
        let request = async {
            stream
                .write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
                .await?;
            let mut answer = [0u8; 1];
            stream.read_exact(&mut answer).await?;
            Ok::<u8, std::io::Error>(answer[0])
        };
        let answer = match tokio::time::timeout_at(deadline.into(), request).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                self.report.fail(
                    TLS,
                    Some(started.elapsed()),
                    format!("the server closed the connection when asked for TLS: {e}"),
                    "something other than PostgreSQL answers on this port, or a proxy in \
                     between drops the connection: check the host and port",
                );
                return false;
            }
            Err(_) => {
                self.connect_timed_out(TLS, started.elapsed(), "asking the server for TLS");
                return false;
            }
        };
        match answer {
            b'S' => {}
            b'N' if tls.mode == SslMode::Prefer => {
                let detail = "not in use: the server does not offer TLS (sslmode=prefer)";
                if local {
                    self.timed_ok(TLS, started.elapsed(), detail.to_owned());
                } else {
                    self.report.push(
                        TLS,
                        Verdict::Warn,
                        Some(started.elapsed()),
                        detail,
                        Some(
                            "the link is not encrypted: enable ssl on the server and use \
                             sslmode=verify-full"
                                .to_owned(),
                        ),
                    );
                }
                return true;
            }
            b'N' => {
                self.report.fail(
                    TLS,
                    Some(started.elapsed()),
                    format!(
                        "the server does not offer TLS, and sslmode={} requires it",
                        ssl_mode_name(tls.mode)
                    ),
                    "enable ssl on the server (ssl = on, a certificate and key), or, on a \
                     trusted network only, set sslmode=prefer or disable in DATABASE_URL",
                );
                return false;
            }
            other => {
                self.report.fail(
                    TLS,
                    Some(started.elapsed()),
                    format!("unexpected answer {other:#04x} to the TLS request"),
                    "something other than PostgreSQL (or a pooler that does not speak TLS) \
                     answers on this port: check the host and port",
                );
                return false;
            }
        }
        let verifier = match RecordingVerifier::new(&tls) {
            Ok(verifier) => Arc::new(verifier),
            Err(e) => {
                let hint = match &tls.root_cert {
                    Some(_) => "point sslrootcert= in DATABASE_URL at a readable PEM file of the \
                                CA that signed the server's certificate (your provider documents it)"
                        .to_owned(),
                    None => format!(
                        "no CA to trust in {}: install the ca-certificates package, or set \
                         sslrootcert=/path/to/ca.pem in DATABASE_URL",
                        pgsession::tls::trust_source(&tls)
                    ),
                };
                self.report.fail(TLS, Some(started.elapsed()), e, hint);
                return false;
            }
        };
        let client_config = match pgsession::tls::client_config(&tls, verifier.clone()) {
            Ok(config) => config,
            Err(e) => {
                self.report.fail(
                    TLS,
                    Some(started.elapsed()),
                    format!("cannot set up TLS: {e}"),
                    "a bug: please report it",
                );
                return false;
            }
        };
        let Ok(name) = ServerName::try_from(host.to_owned()) else {
            self.report.fail(
                TLS,
                Some(started.elapsed()),
                format!("{host:?} cannot be checked against a certificate"),
                "use a DNS name or an IP address as the host",
            );
            return false;
        };
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
        let handshake = connector.connect(name, stream);
        let stream = match tokio::time::timeout_at(deadline.into(), handshake).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                let hint = tls_hint(&e.to_string(), &tls);
                self.report.fail(
                    TLS,
                    Some(started.elapsed()),
                    format!("TLS handshake failed: {e}"),
                    hint,
                );
                return false;
            }
            Err(_) => {
                self.connect_timed_out(TLS, started.elapsed(), "the TLS handshake");
                return false;
            }
        };
        let (_, session) = stream.get_ref();
        let version = session
            .protocol_version()
            .map(|v| format!("{v:?}").replace('_', "."))
            .unwrap_or_else(|| "TLS".to_owned());
        let trusted = pgsession::tls::trust_source(&tls);
        let took = started.elapsed();
        match (tls.mode, tls.accept_invalid_certs, verifier.outcome()) {
            (SslMode::Prefer, false, Some(Ok(()))) => self.timed_ok(
                TLS,
                took,
                format!(
                    "{version}; certificate valid for {host} by {trusted} (not required by \
                     sslmode=prefer)"
                ),
            ),
            (SslMode::Prefer, false, outcome) | (_, true, outcome) => {
                let why = match outcome {
                    Some(Err(e)) => format!(" (it would fail verification: {e})"),
                    _ => String::new(),
                };
                self.report.push(
                    TLS,
                    Verdict::Warn,
                    Some(took),
                    format!("{version}; certificate NOT verified{why}"),
                    Some(if tls.accept_invalid_certs {
                        "PGSESSION_TLS_INSECURE is on: anyone on the path can impersonate the \
                         database. Turn it off outside tests."
                            .to_owned()
                    } else if tls.root_cert.is_some() {
                        "sslmode=prefer encrypts without checking who answers: use \
                         sslmode=verify-full"
                            .to_owned()
                    } else {
                        "sslmode=prefer encrypts without checking who answers: use \
                         sslmode=verify-full (and sslrootcert= for a CA this machine does not \
                         trust)"
                            .to_owned()
                    }),
                );
            }
            (mode, false, _) => self.timed_ok(
                TLS,
                took,
                format!(
                    "{version}; certificate verified ({}) by {trusted}",
                    if mode == SslMode::VerifyCa {
                        "chain only: sslmode=verify-ca".to_owned()
                    } else {
                        format!("chain and host name {host}")
                    }
                ),
            ),
        }
        true
    }
}

/// Verifies the server's certificate as the pool would, and remembers the
/// outcome: under `sslmode=prefer` (or the insecure opt-in) the handshake
/// goes on whatever it is, and the report says what verification would
/// have said.
#[derive(Debug)]
struct RecordingVerifier {
    signatures: pgsession::tls::HandshakeSignatures,
    /// The library's own check for this mode; `None` when it could not be
    /// built (a bad `sslrootcert`) and need not be (`prefer`).
    strict: Option<Arc<dyn ServerCertVerifier>>,
    accept_any: bool,
    outcome: Mutex<Option<Result<(), String>>>,
}

impl RecordingVerifier {
    fn new(tls: &pgsession::TlsConfig) -> Result<RecordingVerifier, String> {
        let accept_any = tls.accept_invalid_certs || tls.mode == SslMode::Prefer;
        let strict = match pgsession::tls::certificate_verifier(tls) {
            Ok(verifier) => Some(verifier),
            // Prefer does not verify: a bad sslrootcert only matters when it must.
            Err(_) if accept_any => None,
            Err(e) => return Err(e.to_string()),
        };
        Ok(RecordingVerifier {
            signatures: Default::default(),
            strict,
            accept_any,
            outcome: Mutex::new(None),
        })
    }

    fn outcome(&self) -> Option<Result<(), String>> {
        self.outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = match &self.strict {
            Some(strict) => {
                strict.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
            }
            None => Err(rustls::Error::General("no trusted roots".into())),
        };
        *self.outcome.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(verified.as_ref().map(drop).map_err(|e| e.to_string()));
        if self.accept_any {
            Ok(ServerCertVerified::assertion())
        } else {
            verified
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.supported_schemes()
    }
}
