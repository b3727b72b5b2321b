//! TLS for the session pool: a rustls client (ring, no aws-lc, no OpenSSL)
//! that verifies certificates as the `sslmode` of [`TlsConfig`] asks.
//!
//! `require`, `verify-ca` and `verify-full` all verify the chain; all but
//! `verify-ca` check the host name. `prefer` encrypts when it can without
//! checking, as libpq does. Skipping verification anywhere takes
//! [`ConfigBuilder::danger_accept_invalid_certs`](crate::ConfigBuilder::danger_accept_invalid_certs),
//! and every connection made that way logs a warning.
//!
//! The trusted roots are `sslrootcert`'s file, or else (no `sslrootcert`,
//! or `sslrootcert=system`) the machine's own store, read with
//! rustls-native-certs: `SSL_CERT_FILE` / `SSL_CERT_DIR` when set, else the
//! system's bundle (on Debian `/etc/ssl/certs`, which `update-ca-certificates`
//! writes). There is no compiled-in fallback: a machine with no certificates
//! verifies nothing, as libpq does. SECURITY.md has the table of modes.

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::{ConfigError, SslMode, TlsConfig};

/// Builds the connector for the pool from the TLS settings.
pub(crate) fn connector(tls: &TlsConfig) -> Result<MakeRustlsConnect, ConfigError> {
    let verifier: Arc<dyn ServerCertVerifier> =
        if tls.accept_invalid_certs || tls.mode == SslMode::Prefer {
            Arc::new(AcceptAnyCertificate {
                signatures: HandshakeSignatures::default(),
                warn: tls.accept_invalid_certs,
            })
        } else {
            certificate_verifier(tls)?
        };
    Ok(MakeRustlsConnect::new(client_config(tls, verifier)?))
}

/// The client config of the pool's connections (ring, the safe default
/// protocol versions, SNI as `tls` says), with `verifier` deciding about
/// the server's certificate.
///
/// ```
/// let tls = pgsession::TlsConfig::default();
/// let verifier = pgsession::tls::certificate_verifier(&tls)?;
/// let config = pgsession::tls::client_config(&tls, verifier)?;
/// assert_eq!(config.enable_sni, tls.sni);
/// # Ok::<(), pgsession::ConfigError>(())
/// ```
pub fn client_config(
    tls: &TlsConfig,
    verifier: Arc<dyn ServerCertVerifier>,
) -> Result<ClientConfig, ConfigError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::invalid("sslmode", e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.enable_sni = tls.sni;
    Ok(config)
}

/// The one crypto provider of every TLS object here (ring), made once.
///
/// Passed explicitly rather than installed as the process default, so that
/// an application that installs another one keeps it for its own clients.
///
/// rustls 0.23.48 deprecates ring's provider for its lack of post-quantum
/// key exchange. pgsession keeps ring (it needs only a C compiler; aws-lc-rs,
/// the other provider, brings a heavier native build), and an application
/// that resolves a newer rustls should not get a warning for that choice.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// The check a certificate must pass under `tls`'s settings when it is
/// verified: the chain to the trusted roots (`sslrootcert`, else the
/// machine's store), and the host name unless the mode is `verify-ca`. The
/// pool uses it for `require`, `verify-ca` and `verify-full`; `pgsession
/// doctor` uses it to say what verification would say under any mode.
pub fn certificate_verifier(tls: &TlsConfig) -> Result<Arc<dyn ServerCertVerifier>, ConfigError> {
    let roots = Arc::new(root_store(tls)?);
    let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| ConfigError::invalid("sslrootcert", e.to_string()))?;
    Ok(if tls.mode == SslMode::VerifyCa {
        Arc::new(IgnoreHostName(webpki))
    } else {
        webpki
    })
}

fn root_store(tls: &TlsConfig) -> Result<RootCertStore, ConfigError> {
    let mut roots = RootCertStore::empty();
    match &tls.root_cert {
        Some(path) => {
            let bad = |reason: String| {
                ConfigError::invalid("sslrootcert", format!("{}: {reason}", path.display()))
            };
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| bad(e.to_string()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(e.to_string()))?;
            let (added, _ignored) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(bad("no usable certificate in the file".into()));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = match found.errors.first() {
                    Some(e) => format!(": {e}"),
                    None => String::new(),
                };
                return Err(ConfigError::invalid(
                    "sslrootcert",
                    format!(
                        "this machine trusts no CA certificate (none found in SSL_CERT_FILE, \
                         SSL_CERT_DIR or the system store{why}): install the ca-certificates \
                         package, or set sslrootcert=/path/to/ca.pem"
                    ),
                ));
            }
        }
    }
    Ok(roots)
}

/// Where the roots of `tls` come from, for reports: the `sslrootcert` file,
/// or the machine's store and the variable that points at it, if any.
///
/// ```
/// let tls = pgsession::TlsConfig::default();
/// assert!(pgsession::tls::trust_source(&tls).contains("this machine"));
/// ```
pub fn trust_source(tls: &TlsConfig) -> String {
    if let Some(path) = &tls.root_cert {
        return format!("sslrootcert {}", path.display());
    }
    // Either variable, when set, replaces the system's store.
    let named: Vec<String> = ["SSL_CERT_FILE", "SSL_CERT_DIR"]
        .into_iter()
        .filter_map(|name| {
            let value = std::env::var_os(name)?;
            Some(format!("{name}={}", std::path::Path::new(&value).display()))
        })
        .collect();
    if named.is_empty() {
        "this machine's store (the system's CA bundle)".to_owned()
    } else {
        format!("this machine's store ({})", named.join(", "))
    }
}

/// `verify-ca`: the chain must lead to a trusted CA; the name may differ.
#[derive(Debug)]
struct IgnoreHostName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for IgnoreHostName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The handshake signature checks of the crypto provider the pool uses
/// (ring), for a certificate verifier that decides about the certificate
/// itself but must still check that the server holds the certificate's key.
///
/// ```
/// let signatures = pgsession::tls::HandshakeSignatures::default();
/// assert!(!signatures.supported_schemes().is_empty());
/// ```
#[derive(Debug, Clone)]
pub struct HandshakeSignatures(Arc<CryptoProvider>);

impl Default for HandshakeSignatures {
    fn default() -> Self {
        HandshakeSignatures(provider())
    }
}

impl HandshakeSignatures {
    /// For [`ServerCertVerifier::verify_tls12_signature`].
    pub fn verify_tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    /// For [`ServerCertVerifier::verify_tls13_signature`].
    pub fn verify_tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    /// For [`ServerCertVerifier::supported_verify_schemes`].
    pub fn supported_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `prefer`, or the explicit insecure opt-in: any certificate is accepted,
/// but the handshake signatures are still checked.
#[derive(Debug)]
struct AcceptAnyCertificate {
    signatures: HandshakeSignatures,
    /// Whether this is the operator's opt-in (warned about) rather than
    /// `sslmode=prefer`.
    warn: bool,
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.warn {
            tracing::warn!(
                target: "session_pool",
                server = %server_name.to_str(),
                "TLS certificate NOT verified (danger_accept_invalid_certs / PGSESSION_TLS_INSECURE is on)"
            );
        }
        Ok(ServerCertVerified::assertion())
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
