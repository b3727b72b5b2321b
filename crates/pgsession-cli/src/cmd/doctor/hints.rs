//! The hints of `doctor`: for each kind of failure, the likely cause and
//! the setting to change. Pure functions of the error and the settings.

use std::time::Duration;

use pgsession::{SslMode, TlsConfig};

use super::report::humantime;

pub(crate) fn connect_timeout_hint(timeout: Duration) -> String {
    format!(
        "connection timeout: a serverless database waking from suspension can take up to ~15 s \
         (cold start); raise PGSESSION_CONNECT_TIMEOUT (--connect-timeout, now {}) above its \
         wake-up time. If it never answers, a firewall or security group drops the connection \
         silently, or the host or port is wrong.",
        humantime(timeout)
    )
}

pub(crate) fn query_timeout_hint(timeout: Duration) -> String {
    format!(
        "the server is overloaded, a lock blocks the query, or the link is very slow; \
         PGSESSION_QUERY_TIMEOUT (now {}) bounds every operation",
        humantime(timeout)
    )
}

pub(crate) fn dns_hint(host: &str) -> String {
    format!(
        "the host name {host} does not resolve: check its spelling in DATABASE_URL, this \
         machine's DNS, and (for a private database) that this machine is on its network or VPN"
    )
}

pub(crate) fn tcp_hint(refused: bool) -> &'static str {
    if refused {
        "connection refused: nothing listens there. The database is stopped or \
         restarting, the host or port in DATABASE_URL is wrong, or a firewall rejects \
         the connection."
    } else {
        "no route to the database: check the host and port in DATABASE_URL, this \
         machine's network, and the firewall or security group in front of the database."
    }
}

/// What the SQLSTATE of a failed login or query means, and what to change.
pub(crate) fn sqlstate_hint(code: &str, user: &str, db: &str) -> Option<String> {
    Some(match code {
        "28P01" => format!(
            "password authentication failed for {user}: check the password in DATABASE_URL \
             (percent-encode @ : / # ? in it: @ is %40)"
        ),
        "28000" => format!(
            "the server refuses {user} from this address (pg_hba.conf), or requires TLS: add a \
             pg_hba.conf entry for this client, or try sslmode=require"
        ),
        "3D000" => {
            format!("database {db} does not exist: check the name at the end of DATABASE_URL")
        }
        "53300" => "too many clients: the server's max_connections is reached. Lower \
                    PGSESSION_POOL_SIZE and PGSESSION_POOL_MAX_SIZE (times the number of \
                    instances), raise max_connections, or put a pooler (PgBouncer) in front"
            .to_owned(),
        "57P03" => "the database is starting up, shutting down or in recovery: try again in a \
                    moment; a waking database needs PGSESSION_CONNECT_TIMEOUT above its start time"
            .to_owned(),
        "42501" => format!("{user} lacks a privilege: see the message above, and GRANT it"),
        c if c.starts_with("08") => "the connection failed at the protocol level: check sslmode \
                                     and that this port is PostgreSQL (or a pooler that accepts \
                                     this user and database)"
            .to_owned(),
        _ => return None,
    })
}

/// The hint for a login refused or broken: by SQLSTATE when the server
/// answered, else by what the driver said.
pub(crate) fn login_hint(
    error: &pgsession::Error,
    user: &str,
    db: &str,
    tls: &TlsConfig,
    connect_timeout: Duration,
) -> String {
    if let Some(hint) = error.sql_state().and_then(|c| sqlstate_hint(c, user, db)) {
        return hint;
    }
    if error.sql_state().is_some() {
        return "see the server's message above".to_owned();
    }
    let text = error.to_string();
    if text.contains("password missing") {
        format!("the server asks {user} for a password: put it in DATABASE_URL")
    } else if text.contains("channel binding") {
        "channel_binding=require needs SCRAM over TLS: the server must use scram-sha-256 for \
         this user (password_encryption and pg_hba.conf), and sslmode must not be disable; a \
         pooler in between (PgBouncer) may not support it"
            .to_owned()
    } else if text.contains("certificate") || text.contains("TLS") || text.contains("tls") {
        tls_hint(&text, tls)
    } else if text.contains("closed") || text.contains("reset") {
        "the server closed the connection during the login: a pooler or proxy refused it, or \
         the server is restarting; check sslmode, the user and the database"
            .to_owned()
    } else if text.contains("timed out") {
        connect_timeout_hint(connect_timeout)
    } else {
        "see the error above".to_owned()
    }
}

/// The hint for a query that failed on an open connection.
pub(crate) fn query_hint(error: &pgsession::Error) -> String {
    match error.sql_state() {
        Some(code) => sqlstate_hint(code, "this user", "this database")
            .unwrap_or_else(|| "see the server's message above".to_owned()),
        None => "the connection broke: the server restarted, or a proxy cut the link".to_owned(),
    }
}

pub(crate) fn store_error_hint(e: &pgsession::Error, connect_timeout: Duration) -> String {
    if let Some(hint) = e
        .sql_state()
        .and_then(|code| sqlstate_hint(code, "the user", "the database"))
    {
        return hint;
    }
    match e.kind() {
        pgsession::ErrorKind::Connect | pgsession::ErrorKind::ConnectionClosed => {
            connect_timeout_hint(connect_timeout)
        }
        pgsession::ErrorKind::Acquire => "no pool connection became free: raise \
                                          PGSESSION_ACQUIRE_TIMEOUT or PGSESSION_POOL_SIZE"
            .to_owned(),
        pgsession::ErrorKind::Timeout => query_timeout_hint(Duration::ZERO),
        pgsession::ErrorKind::Config => "fix the setting named above".to_owned(),
        _ => "see the error above".to_owned(),
    }
}

/// Where to point `sslrootcert`, or, when it is already set, what to check
/// in the file it names.
fn trust_advice(tls: &TlsConfig) -> String {
    match &tls.root_cert {
        Some(path) => format!(
            "sslrootcert is {}: it must hold the CA that signed the server's certificate \
             (your provider's CA bundle, or its root)",
            path.display()
        ),
        None => format!(
            "this machine trusts the CAs of {}: set sslrootcert=/path/to/ca.pem in \
             DATABASE_URL (your provider's CA bundle), or install the CA on this machine \
             (on Debian: copy it to /usr/local/share/ca-certificates/ and run \
             update-ca-certificates)",
            pgsession::tls::trust_source(tls)
        ),
    }
}

/// The hint for a failed TLS handshake, from the error's text.
pub(crate) fn tls_hint(text: &str, tls: &TlsConfig) -> String {
    if text.contains("UnknownIssuer") || text.contains("unknown issuer") {
        format!(
            "the certificate is not signed by a CA this connection trusts: {}",
            trust_advice(tls)
        )
    } else if text.contains("NotValidForName") || text.contains("not valid for name") {
        "the certificate does not name this host: connect with the name it was issued for, or use \
         sslmode=verify-ca to check the chain only"
            .to_owned()
    } else if text.contains("CaUsedAsEndEntity") {
        match &tls.root_cert {
            Some(_) => "the server presents a CA certificate as its own (self-signed): give the \
                        server a certificate signed by the CA of sslrootcert"
                .to_owned(),
            None => "the server presents a CA certificate as its own (self-signed): give the \
                     server a certificate signed by a CA, and trust that CA with sslrootcert="
                .to_owned(),
        }
    } else if text.contains("Expired") || text.contains("expired") {
        "the server's certificate has expired: renew it on the server".to_owned()
    } else if tls.mode == SslMode::Prefer {
        "the server offered TLS but the handshake failed: set sslmode=disable to try without, and \
         check the server's ssl settings"
            .to_owned()
    } else {
        "check the server's certificate and sslrootcert; PGSESSION_TLS_INSECURE=true skips \
         verification (tests only)"
            .to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_name_the_setting_to_change() {
        let too_many = sqlstate_hint("53300", "app", "db").unwrap();
        assert!(too_many.contains("PGSESSION_POOL_SIZE") && too_many.contains("max_connections"));
        let auth = sqlstate_hint("28P01", "app", "db").unwrap();
        assert!(auth.contains("password"), "{auth}");
        let timeout = connect_timeout_hint(Duration::from_secs(1));
        assert!(
            timeout.contains("PGSESSION_CONNECT_TIMEOUT") && timeout.contains("now 1s"),
            "{timeout}"
        );
        assert!(sqlstate_hint("23505", "app", "db").is_none());
    }

    #[test]
    fn an_unknown_issuer_suggests_sslrootcert_only_when_it_is_not_set() {
        let unset = TlsConfig {
            mode: SslMode::VerifyFull,
            ..TlsConfig::default()
        };
        let hint = tls_hint("invalid peer certificate: UnknownIssuer", &unset);
        assert!(hint.contains("set sslrootcert="), "{hint}");
        assert!(hint.contains("this machine's store"), "{hint}");
        let set = TlsConfig {
            root_cert: Some("/etc/db/ca.pem".into()),
            ..unset
        };
        let hint = tls_hint("invalid peer certificate: UnknownIssuer", &set);
        assert!(!hint.contains("set sslrootcert"), "{hint}");
        assert!(hint.contains("sslrootcert is /etc/db/ca.pem"), "{hint}");
    }
}
