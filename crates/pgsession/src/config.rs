//! Configuration: every setting with its default, one builder, and the two
//! ways in (`DATABASE_URL` plus `PGSESSION_*` variables, or code).
//!
//! Each setting is written once, in the list given to `settings!` below:
//! its name, type, default, documentation, environment variable and check.
//! The list makes the [`Config`] getter, the [`ConfigBuilder`] setter, the
//! arm of [`ConfigBuilder::set`], the entry of [`ENV_SETTINGS`] and of
//! [`SETTINGS`] (from which `pgsession` makes its flags and their help),
//! and the check run by [`ConfigBuilder::build`]. A setting's text form is
//! read by the parser of its type (counts, durations, booleans, names).
//!
//! The environment, a command line and the builder all go through
//! [`ConfigBuilder::set`] or the same fields, so they cannot drift apart,
//! and a bad value is refused with the name of the setting. Passwords are
//! kept out of `Debug` and of every message.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use crate::schema::Identifier;

/// A refused configuration value. The message names the setting, never a
/// password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A setting had a value that cannot be used.
    #[error("invalid value for `{setting}`: {reason}")]
    Invalid {
        /// The setting, e.g. `pool_size` or `sslmode`.
        setting: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A required setting was not given.
    #[error("`{0}` is required but was not set")]
    Missing(&'static str),
}

impl ConfigError {
    pub(crate) fn invalid(setting: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            setting: setting.into(),
            reason: reason.into(),
        }
    }
}

/// How TLS is used and checked, as libpq's `sslmode`, with one difference:
/// `require` verifies the certificate too (libpq's `require` does not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Never use TLS.
    Disable,
    /// Use TLS when the server offers it, without verification: an attacker
    /// who can tamper with the link can also refuse TLS, so checking the
    /// certificate here would protect nothing (libpq's behaviour).
    #[default]
    Prefer,
    /// Require TLS and verify the certificate chain and the host name.
    Require,
    /// Require TLS and verify the certificate chain, not the host name.
    VerifyCa,
    /// Require TLS and verify the chain and the host name.
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "disable" => Ok(SslMode::Disable),
            "allow" | "prefer" => Ok(SslMode::Prefer),
            "require" => Ok(SslMode::Require),
            "verify-ca" => Ok(SslMode::VerifyCa),
            "verify-full" => Ok(SslMode::VerifyFull),
            other => Err(ConfigError::invalid(
                "sslmode",
                format!(
                    "`{other}` is not one of disable, allow, prefer, require, verify-ca, verify-full"
                ),
            )),
        }
    }
}

impl SslMode {
    /// The mode tokio-postgres negotiates with; verification is ours.
    pub(crate) fn negotiation(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Pg;
        match self {
            SslMode::Disable => Pg::Disable,
            SslMode::Prefer => Pg::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Pg::Require,
        }
    }
}

/// How the database is reached: directly, or through a pooler such as
/// PgBouncer in transaction mode, where no session state survives between
/// transactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PoolerMode {
    /// A direct connection (or a session-mode pooler). Default.
    #[default]
    Direct,
    /// A transaction-mode pooler: no startup options, no session locks.
    Transaction,
}

impl FromStr for PoolerMode {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" | "direct" | "session" => Ok(PoolerMode::Direct),
            "transaction" => Ok(PoolerMode::Transaction),
            other => Err(ConfigError::invalid(
                "pooler",
                format!("`{other}` is not one of direct, session, transaction"),
            )),
        }
    }
}

/// TLS settings taken from the URL and the environment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsConfig {
    /// `sslmode`. Default: `prefer`.
    pub mode: SslMode,
    /// `sslrootcert`: a PEM file of trusted CAs. Default (and `system`):
    /// the machine's store, or the bundle `SSL_CERT_FILE` / `SSL_CERT_DIR`
    /// name (see SECURITY.md).
    pub root_cert: Option<PathBuf>,
    /// Send SNI (`sslsni`). Default: on.
    pub sni: bool,
    /// Skip certificate verification. Off unless explicitly asked for
    /// (`PGSESSION_TLS_INSECURE=true`); logs a warning when used.
    pub accept_invalid_certs: bool,
}

/// Makes everything a setting needs from one entry per setting:
///
/// ```text
/// /// Summary paragraph (the flag's short help).
/// ///
/// /// Why the default is what it is.
/// name: Type { set: SetterArg, raw: BuilderType, get: GetterType, }
///     = "default as text", env "PGSESSION_NAME", check rule;
/// ```
///
/// The braces are needed only where a type differs from `Type` (what
/// [`Config`] holds): the setter's argument, the builder's value (from
/// which `rule` makes the `Type`), the getter's result. The default is
/// text, read by the same parser as the environment's values.
macro_rules! settings {
    ($(
        $(#[doc = $doc:literal])*
        $name:ident: $ty:ty $({ $(set: $set:ty,)? $(raw: $raw:ty,)? $(get: $get:ty,)? })?
            = $default:literal, env $env:literal, check $rule:ident;
    )*) => {
        /// The settings of a built [`Config`], checked.
        #[derive(Clone, PartialEq)]
        struct Settings {
            $($name: $ty,)*
        }

        /// The settings of a [`ConfigBuilder`], as given.
        #[derive(Clone)]
        struct Values {
            $($name: or_ty!([$($($raw)?)?] $ty),)*
        }

        impl Default for Values {
            fn default() -> Self {
                Values {
                    $($name: Value::parse(stringify!($name), $default)
                        .expect("every default of the list parses"),)*
                }
            }
        }

        impl Values {
            /// Sets the setting called `setting` from text.
            fn set(&mut self, setting: &str, text: &str) -> Result<(), ConfigError> {
                match setting {
                    $(stringify!($name) => self.$name = Value::parse(setting, text)?,)*
                    other => return Err(ConfigError::invalid(other, "no such setting")),
                }
                Ok(())
            }

            /// Runs each setting's check, in the order of the list.
            fn check(&self) -> Result<Settings, ConfigError> {
                Ok(Settings {
                    $($name: $rule(self, stringify!($name), &self.$name)?,)*
                })
            }
        }

        impl Settings {
            fn debug_fields(&self, out: &mut fmt::DebugStruct<'_, '_>) {
                $(out.field(stringify!($name), &self.$name);)*
            }
        }

        impl Config {
            $(
                $(#[doc = $doc])*
                ///
                #[doc = concat!("Default: `", $default, "`. Environment: `", $env, "`.")]
                pub fn $name(&self) -> or_ty!([$($($get)?)?] $ty) {
                    Get::get(&self.settings.$name)
                }
            )*
        }

        impl ConfigBuilder {
            $(
                #[doc = concat!("See [`Config::", stringify!($name), "`].")]
                #[allow(clippy::useless_conversion)]
                pub fn $name(mut self, value: or_ty!([$($($set)?)?] $ty)) -> Self {
                    self.values.$name = value.into();
                    self
                }
            )*
        }

        /// The variables [`ConfigBuilder::vars`] reads, with the setting
        /// each one sets.
        pub const ENV_SETTINGS: &[(&str, &str)] = &[
            (URL.env, URL.name),
            $(($env, stringify!($name)),)*
            (TLS_INSECURE.env, TLS_INSECURE.name),
        ];

        /// Every setting [`ConfigBuilder::set`] takes, with its variable,
        /// default and documentation, in the order of the list.
        pub const SETTINGS: &[Setting] = &[
            URL,
            $(Setting {
                name: stringify!($name),
                env: $env,
                default: Some($default),
                value_name: <or_ty!([$($($raw)?)?] $ty) as Value>::HINT,
                doc: concat!($($doc, "\n"),*),
                secret: false,
            },)*
            TLS_INSECURE,
        ];
    };
}

/// The first type given, else the second: an entry's optional type.
macro_rules! or_ty {
    ([$given:ty] $otherwise:ty) => {
        $given
    };
    ([] $otherwise:ty) => {
        $otherwise
    };
}

settings! {
    /// Connections the session pool keeps for requests.
    ///
    /// Under load the pool grows towards `pool_max_size`, and it shrinks
    /// back when idle.
    ///
    /// Five, because a session operation is one short statement (several
    /// waiting ones are even batched into one), so a few connections serve
    /// many requests, and a small pool leaves room on servers with a low
    /// connection limit, as serverless plans often have.
    pool_size: usize = "5", env "PGSESSION_POOL_SIZE", check pool_size_in_range;

    /// Ceiling the self-sizing pool may grow to while callers wait; `auto`
    /// is twice `pool_size`.
    ///
    /// Twice the pool size absorbs a burst without letting one instance
    /// take a large share of the server's connection limit; the pool also
    /// stops short of the connections the server says it has free.
    pool_max_size: usize { raw: Option<usize>, }
        = "auto", env "PGSESSION_POOL_MAX_SIZE", check pool_max_size_resolved;

    /// Connections kept open even when idle.
    ///
    /// One, so that the first request after a quiet spell does not wait for
    /// a connection to be opened (TCP, TLS, login), while an idle instance
    /// holds a single connection on the server.
    min_idle: usize = "1", env "PGSESSION_MIN_IDLE", check at_most_pool_size;

    /// Idle connections above `min_idle` are closed after this.
    ///
    /// Thirty seconds carries a burst's connections over to the next burst,
    /// and hands them back soon to a server whose connections are shared.
    idle_timeout: Duration = "30s", env "PGSESSION_IDLE_TIMEOUT", check more_than_zero;

    /// Deadline to open a connection, TLS and authentication included.
    ///
    /// Each host of a multi-host URL gets it in turn.
    ///
    /// Twenty seconds, because a serverless database waking from sleep (a
    /// cold start) can take several seconds to accept a connection, and a
    /// shorter deadline would fail exactly then.
    connect_timeout: Duration = "20s", env "PGSESSION_CONNECT_TIMEOUT", check more_than_zero;

    /// Deadline to get a connection from a pool whose connections are busy.
    ///
    /// Five seconds: a request that waits longer for a connection is better
    /// answered with an error that says the pool is saturated than left
    /// hanging until the HTTP client gives up.
    acquire_timeout: Duration = "5s", env "PGSESSION_ACQUIRE_TIMEOUT", check more_than_zero;

    /// Server-side `statement_timeout` of every connection of the pool.
    ///
    /// Thirty seconds, as `query_timeout`: the server stops a statement the
    /// client has given up on (one stuck behind a lock, say) rather than
    /// let it hold a connection and its locks.
    statement_timeout: Duration = "30s", env "PGSESSION_STATEMENT_TIMEOUT", check more_than_zero;

    /// Client-side deadline of one operation, retries included.
    ///
    /// The query is cancelled on the server when it passes.
    ///
    /// Thirty seconds: a session operation takes milliseconds, so one that
    /// takes this long is stuck, and its request should fail rather than
    /// wait for ever.
    query_timeout: Duration = "30s", env "PGSESSION_QUERY_TIMEOUT", check more_than_zero;

    /// Uses after which a connection is closed and replaced.
    ///
    /// 7,500, the figure node-postgres suggests: now and then connections
    /// are spread again over the servers behind a load balancer, and a
    /// backend's slowly growing caches are let go, for one connect per
    /// 7,500 operations.
    max_uses: usize = "7500", env "PGSESSION_MAX_USES", check at_least_one;

    /// Idle time before the first TCP keepalive probe.
    ///
    /// Ten seconds: NAT gateways and load balancers drop idle flows without
    /// telling either end; early probes keep a flow alive, and find a dead
    /// link before a request does.
    keepalive_idle: Duration = "10s", env "PGSESSION_KEEPALIVE_IDLE", check more_than_zero;

    /// Start-up attempts after the first.
    ///
    /// After them the store reports the database unreachable, runs
    /// degraded, and keeps trying more slowly.
    ///
    /// Three, so that with the backoff a database that takes a few seconds
    /// to start is met without a warning that it is unreachable.
    startup_retries: usize = "3", env "PGSESSION_STARTUP_RETRIES", check any;

    /// First wait between start-up attempts, doubled each time, with jitter.
    ///
    /// One second: long enough for a waking database, short enough that a
    /// brief hiccup costs little.
    startup_backoff: Duration = "1s", env "PGSESSION_STARTUP_BACKOFF", check any;

    /// Schema of the session table, checked as an identifier.
    ///
    /// `public`, where connect-pg-simple puts the table too.
    schema: Identifier { set: impl Into<String>, raw: String, get: &Identifier, }
        = "public", env "PGSESSION_SCHEMA", check identifier;

    /// Name of the session table, checked as an identifier.
    ///
    /// `session_store`, connect-pg-simple's name, so that a Node service
    /// and this store share sessions without configuration.
    table: Identifier { set: impl Into<String>, raw: String, get: &Identifier, }
        = "session_store", env "PGSESSION_TABLE", check identifier;

    /// Whether the store creates the table and its index when they are
    /// missing.
    ///
    /// On, so that a new application works at once; turn it off where the
    /// application's role may not create tables, and make the table with
    /// `pgsession migrate`.
    create_table: bool = "true", env "PGSESSION_CREATE_TABLE", check any;

    /// Lifetime of a session whose cookie sets no expiry of its own.
    ///
    /// One day, connect-pg-simple's default, so that a Node service sharing
    /// the table gives the same expiries.
    lifetime: Duration = "1d", env "PGSESSION_LIFETIME", check more_than_zero;

    /// Mean interval between prunes of expired rows, randomized 50-150 %.
    ///
    /// The randomness keeps instances from pruning in step.
    ///
    /// Fifteen minutes, connect-pg-simple's default: an expired row is never
    /// served (loads check the expiry), so pruning only bounds the table.
    prune_interval: Duration = "15m", env "PGSESSION_PRUNE_INTERVAL", check more_than_zero;

    /// Rows deleted per prune statement.
    ///
    /// 1,000: each statement is short and holds few row locks, so a large
    /// backlog is pruned without holding up session writes.
    prune_batch_size: usize = "1000", env "PGSESSION_PRUNE_BATCH_SIZE", check at_least_one;

    /// Whether the store prunes expired rows in the background, every
    /// `prune_interval`, one instance at a time (an advisory lock).
    ///
    /// On, so that a table shared by any number of instances never grows
    /// without bound; turn it off where a scheduled `pgsession prune` does
    /// the job instead.
    prune: bool = "true", env "PGSESSION_PRUNE", check any;

    /// How the database is reached: `direct`, `session` or `transaction`.
    ///
    /// `session` is a session-mode pooler, treated as a direct connection;
    /// `transaction` a transaction-mode pooler such as PgBouncer's, where
    /// no session state survives between transactions.
    ///
    /// Direct, the common case. A transaction pooler is also detected when
    /// it refuses the startup options, so setting it only spares that
    /// first refused connection.
    pooler: PoolerMode = "direct", env "PGSESSION_POOLER", check any;

    /// Largest session document accepted, in bytes; a larger one is refused.
    ///
    /// 64 KiB: far more than a session should hold (an id, a user, a few
    /// flags), and little enough that a client cannot make the store keep
    /// megabytes per cookie.
    max_session_bytes: usize = "64KiB", env "PGSESSION_MAX_SESSION_BYTES", check at_least_one;

    /// Interval of the background health check.
    ///
    /// Thirty seconds: a problem shows in the health report within half a
    /// minute, for one trivial query per interval.
    health_check_interval: Duration = "30s", env "PGSESSION_HEALTH_CHECK_INTERVAL", check more_than_zero;

    /// A health check slower than this is reported as failed, and warned of.
    ///
    /// One second: `SELECT 1` takes milliseconds on a healthy server, so a
    /// second means the server or the link is struggling.
    slow_check_threshold: Duration = "1s", env "PGSESSION_SLOW_CHECK_THRESHOLD", check any;

    /// Transient failures in a row that open the circuit breaker.
    ///
    /// Five: one or two failures are the usual noise (a restarted backend,
    /// a dropped link) and are retried; five in a row mean the database is
    /// away, and failing fast then spares every request the full timeout.
    breaker_threshold: u32 = "5", env "PGSESSION_BREAKER_THRESHOLD", check at_least_one;

    /// First wait before the open breaker lets a probe through.
    ///
    /// It is doubled after each failed probe, up to `breaker_max_cool_down`.
    ///
    /// One second, so that a database back after a restart is used again
    /// within a second.
    breaker_cool_down: Duration = "1s", env "PGSESSION_BREAKER_COOL_DOWN", check more_than_zero;

    /// Ceiling of the breaker's cool-down.
    ///
    /// Thirty seconds: a long outage costs one probe per half minute, and
    /// the database's return is noticed within that.
    breaker_max_cool_down: Duration = "30s", env "PGSESSION_BREAKER_MAX_COOL_DOWN", check at_least_cool_down;

    /// Sessions kept in the fallback cache; 0 turns the cache off.
    ///
    /// The cache serves reads while the database is away.
    ///
    /// 10,000 recently used sessions: most active users of a busy instance
    /// keep theirs through an outage, and `cache_max_bytes` bounds the
    /// memory.
    cache_max_entries: usize = "10000", env "PGSESSION_CACHE_MAX_ENTRIES", check any;

    /// Bytes of session documents kept in the fallback cache.
    ///
    /// 16 MiB: a small, fixed share of memory, enough for the 10,000
    /// sessions of `cache_max_entries` at 1.6 KiB each.
    cache_max_bytes: usize = "16MiB", env "PGSESSION_CACHE_MAX_BYTES", check any;

    /// Bytes the on-disk journal may hold while the database is away.
    ///
    /// Past this, writes answer 503 with `Retry-After` rather than be
    /// acknowledged without a durable copy.
    ///
    /// 64 MiB: many thousands of session writes, minutes of a busy
    /// instance's outage, while bounding the disk used and the length of
    /// the write-back.
    journal_max_bytes: usize = "64MiB", env "PGSESSION_JOURNAL_MAX_BYTES", check any;

    /// Directory of the on-disk journal; put it on a persistent disk.
    ///
    /// Writes accepted while the database is away are fsynced here (mode
    /// 0700, files 0600) before they are acknowledged, and the journal
    /// files of this process, or of one that died, are written back from
    /// here.
    ///
    /// `.pgsession/journal`, beside the embedded server's data, relative
    /// to the working directory: a place that works without setup; a
    /// container needs it on a volume to keep it across restarts.
    journal_dir: PathBuf { set: impl Into<PathBuf>, get: &Path, }
        = ".pgsession/journal", env "PGSESSION_JOURNAL_DIR", check any;

    /// Whether the fallback serves while the database is away.
    ///
    /// Reads are served from the cache, writes go to the journal. Off, an
    /// outage answers 503, and no journal directory is needed.
    ///
    /// On, because keeping users logged in through an outage is the point
    /// of the store; turn it off where no local disk can be written.
    fallback: bool = "true", env "PGSESSION_FALLBACK", check any;
}

/// The setting outside the list: it makes the driver's configuration.
const URL: Setting = Setting {
    name: "url",
    env: "DATABASE_URL",
    default: None,
    value_name: "URL",
    doc: "PostgreSQL URL, as libpq takes it \
          (postgres://user:pass@host:port/db?sslmode=...).\n\n\
          Several hosts are separated by commas. Required.\n",
    secret: true,
};

/// The setting outside the list: it goes into [`TlsConfig`].
const TLS_INSECURE: Setting = Setting {
    name: "tls_insecure",
    env: "PGSESSION_TLS_INSECURE",
    default: Some("false"),
    value_name: "BOOL",
    doc: "Accept any server certificate (tests only).\n\nOff: a certificate \
          that cannot be verified means the server may not be the one meant.\n",
    secret: false,
};

/// A setting as the environment and a command line see it, taken from the
/// same list as the typed API (see [`SETTINGS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Setting {
    /// The name [`ConfigBuilder::set`] takes, e.g. `pool_size`.
    pub name: &'static str,
    /// The environment variable, e.g. `PGSESSION_POOL_SIZE`.
    pub env: &'static str,
    /// The default as text, as [`ConfigBuilder::set`] takes it; `None` for
    /// a required setting.
    pub default: Option<&'static str>,
    /// What the value is, for a usage line: `N`, `DURATION`, `BOOL`, ...
    pub value_name: &'static str,
    /// The documentation: a summary paragraph, then why the default is
    /// what it is.
    pub doc: &'static str,
    /// Whether the value may hold a password, to be kept out of help texts.
    pub secret: bool,
}

impl Setting {
    /// The command-line flag: the variable without `PGSESSION_`, in lower
    /// case with `-` for `_`.
    ///
    /// ```
    /// let flags: Vec<String> = pgsession::config::SETTINGS.iter().map(|s| s.flag()).collect();
    /// assert!(flags.contains(&"database-url".to_owned()));
    /// assert!(flags.contains(&"pool-size".to_owned()));
    /// ```
    pub fn flag(&self) -> String {
        let name = self.env.strip_prefix("PGSESSION_").unwrap_or(self.env);
        name.to_ascii_lowercase().replace('_', "-")
    }

    /// The first paragraph of the documentation, on one line.
    pub fn summary(&self) -> String {
        self.paragraphs().swap_remove(0)
    }

    /// The whole documentation, each paragraph on one line, paragraphs
    /// separated by a blank line.
    pub fn description(&self) -> String {
        self.paragraphs().join("\n\n")
    }

    /// The paragraphs of the documentation, each on one line; at least one.
    fn paragraphs(&self) -> Vec<String> {
        let mut paragraphs = vec![String::new()];
        for line in self.doc.lines().map(str::trim) {
            let last = paragraphs.last_mut().expect("never empty");
            match (line.is_empty(), last.is_empty()) {
                (true, true) => {}
                (true, false) => paragraphs.push(String::new()),
                (false, _) => {
                    if !last.is_empty() {
                        last.push(' ');
                    }
                    last.push_str(line);
                }
            }
        }
        if paragraphs.len() > 1 && paragraphs.last().is_some_and(String::is_empty) {
            paragraphs.pop();
        }
        paragraphs
    }
}

/// The complete, validated configuration of a session store.
///
/// Build one with [`Config::builder`] or [`Config::from_env`].
///
/// ```
/// use std::time::Duration;
/// let config = pgsession::Config::builder()
///     .url("postgres://app:secret@db.example.com/app?sslmode=verify-full")
///     .pool_size(8)
///     .query_timeout(Duration::from_secs(5))
///     .build()?;
/// assert_eq!(config.pool_size(), 8);
/// assert!(!format!("{config:?}").contains("secret"));
/// # Ok::<(), pgsession::ConfigError>(())
/// ```
#[derive(Clone, PartialEq)]
pub struct Config {
    pub(crate) pg: tokio_postgres::Config,
    /// For a multi-host URL, one configuration per host, in order.
    pub(crate) per_host: Vec<tokio_postgres::Config>,
    pub(crate) tls: TlsConfig,
    settings: Settings,
}

impl Config {
    /// A builder with every default of the design.
    pub fn builder() -> ConfigBuilder {
        ConfigBuilder::default()
    }

    /// Reads `DATABASE_URL` and the `PGSESSION_*` variables (see
    /// [`ENV_SETTINGS`] for the names).
    pub fn from_env() -> Result<Config, ConfigError> {
        Self::from_vars(std::env::vars())
    }

    /// Like [`Config::from_env`], from any list of variables (for tests and
    /// for programs that keep their settings elsewhere).
    ///
    /// ```
    /// let vars = [
    ///     ("DATABASE_URL", "postgres://localhost/app"),
    ///     ("PGSESSION_POOL_SIZE", "12"),
    ///     ("PGSESSION_IDLE_TIMEOUT", "45s"),
    /// ];
    /// let config = pgsession::Config::from_vars(vars)?;
    /// assert_eq!(config.pool_size(), 12);
    /// # Ok::<(), pgsession::ConfigError>(())
    /// ```
    pub fn from_vars<K, V>(vars: impl IntoIterator<Item = (K, V)>) -> Result<Config, ConfigError>
    where
        K: AsRef<str>,
        V: AsRef<str>,
    {
        ConfigBuilder::default().vars(vars)?.build()
    }

    /// The longest opening a connection may take: the connect timeout for
    /// each host of the URL, tried one after the other.
    pub fn connect_budget(&self) -> Duration {
        self.connect_timeout() * self.per_host.len().max(1) as u32
    }
    /// TLS settings, from the URL's `sslmode`, `sslrootcert` and `sslsni`,
    /// and `tls_insecure`.
    pub fn tls(&self) -> &TlsConfig {
        &self.tls
    }
    /// The driver configuration (hosts, user, database; the password is
    /// redacted in its `Debug`).
    pub fn postgres(&self) -> &tokio_postgres::Config {
        &self.pg
    }
    /// The connection target without credentials, for logs: `host:port/db`.
    pub fn target(&self) -> String {
        use tokio_postgres::config::Host;
        let hosts: Vec<String> = self
            .pg
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, host)| {
                let port = self
                    .pg
                    .get_ports()
                    .get(i)
                    .or(self.pg.get_ports().first())
                    .copied();
                let port = port.unwrap_or(5432);
                match host {
                    // An IPv6 address in brackets, as in a URL.
                    Host::Tcp(name) if name.contains(':') => format!("[{name}]:{port}"),
                    Host::Tcp(name) => format!("{name}:{port}"),
                    Host::Unix(path) => format!("{}:{port}", path.display()),
                }
            })
            .collect();
        format!("{}/{}", hosts.join(","), self.pg.get_dbname().unwrap_or(""))
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = f.debug_struct("Config");
        out.field("target", &self.target())
            .field("user", &self.pg.get_user())
            .field("password", &self.pg.get_password().map(|_| "<redacted>"))
            .field("tls", &self.tls);
        self.settings.debug_fields(&mut out);
        out.finish()
    }
}

/// Builds a [`Config`]; every setting starts at the design's default.
///
/// Typed setters are for code; [`ConfigBuilder::set`] takes text (from the
/// environment or a command line) and refuses bad values by name.
#[derive(Clone, Default)]
pub struct ConfigBuilder {
    url: Option<String>,
    tls_insecure: bool,
    values: Values,
}

impl fmt::Debug for ConfigBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may hold a password: say only whether there is one.
        f.debug_struct("ConfigBuilder")
            .field("url_set", &self.url.is_some())
            .finish_non_exhaustive()
    }
}

impl ConfigBuilder {
    /// Sets one setting from text, by its name. The names are those of the
    /// typed setters (`pool_size`, `idle_timeout`, ...), `url` and
    /// `tls_insecure`; the environment variable of each is in
    /// [`ENV_SETTINGS`]. Durations take `500ms`, `30s`, `5m`, `1h`, `1d`,
    /// or a bare number of seconds; sizes in bytes may end in `KiB`, `MiB`
    /// or `GiB`.
    ///
    /// ```
    /// let error = pgsession::Config::builder().set("pool_size", "many").unwrap_err();
    /// assert!(error.to_string().contains("pool_size"));
    /// ```
    pub fn set(mut self, setting: &str, value: &str) -> Result<Self, ConfigError> {
        let value = value.trim();
        match setting {
            "url" => self.url = Some(value.to_owned()),
            "tls_insecure" => self.tls_insecure = Value::parse(setting, value)?,
            _ => self.values.set(setting, value)?,
        }
        Ok(self)
    }

    /// Applies every variable of [`ENV_SETTINGS`] found in `vars`; others
    /// are ignored. An empty value counts as unset.
    pub fn vars<K, V>(mut self, vars: impl IntoIterator<Item = (K, V)>) -> Result<Self, ConfigError>
    where
        K: AsRef<str>,
        V: AsRef<str>,
    {
        for (key, value) in vars {
            let Some((env, setting)) = ENV_SETTINGS.iter().find(|(env, _)| *env == key.as_ref())
            else {
                continue;
            };
            if value.as_ref().trim().is_empty() {
                continue;
            }
            self = self.set(setting, value.as_ref()).map_err(|e| match e {
                ConfigError::Invalid { setting, reason } => {
                    ConfigError::invalid(format!("{setting}` (`{env}"), reason)
                }
                other => other,
            })?;
        }
        Ok(self)
    }

    /// The connection URL, as libpq takes it: `postgres://user:pass@host:port/db?sslmode=...`,
    /// several hosts separated by commas. Required.
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self
    }

    /// Accepts any server certificate. Only for tests and for servers whose
    /// certificate cannot be checked; a warning is logged at every connect.
    pub fn danger_accept_invalid_certs(mut self, accept: bool) -> Self {
        self.tls_insecure = accept;
        self
    }

    /// Checks every value and returns the configuration.
    pub fn build(self) -> Result<Config, ConfigError> {
        let url = self
            .url
            .as_deref()
            .ok_or(ConfigError::Missing("DATABASE_URL"))?;
        let (mut pg, mut per_host, mut tls) = parse_url(url)?;
        tls.accept_invalid_certs = self.tls_insecure;
        let settings = self.values.check()?;
        for pg in std::iter::once(&mut pg).chain(per_host.iter_mut()) {
            pg.connect_timeout(settings.connect_timeout);
            pg.keepalives(true);
            pg.keepalives_idle(settings.keepalive_idle);
            if pg.get_application_name().is_none() {
                pg.application_name("pgsession");
            }
        }
        Ok(Config {
            pg,
            per_host,
            tls,
            settings,
        })
    }
}

// The checks of the list: each takes the builder's values (for a setting
// checked against another), the setting's name and its value, and returns
// the value the configuration holds.

fn any<T: Clone>(_: &Values, _: &str, value: &T) -> Result<T, ConfigError> {
    Ok(value.clone())
}

fn at_least_one<T: Copy + Default + PartialEq>(
    _: &Values,
    setting: &str,
    value: &T,
) -> Result<T, ConfigError> {
    if *value == T::default() {
        return Err(ConfigError::invalid(setting, "must be at least 1"));
    }
    Ok(*value)
}

fn more_than_zero(_: &Values, setting: &str, value: &Duration) -> Result<Duration, ConfigError> {
    if value.is_zero() {
        return Err(ConfigError::invalid(setting, "must be more than zero"));
    }
    Ok(*value)
}

fn identifier(_: &Values, setting: &str, value: &str) -> Result<Identifier, ConfigError> {
    Identifier::new(value).map_err(|reason| ConfigError::invalid(setting, reason))
}

/// The pool preallocates a slot per connection: absurd sizes are refused
/// here rather than abort in `Store::new` (`pool_size * 2` overflowed,
/// found by the `config` fuzz target).
fn pool_size_in_range(values: &Values, setting: &str, size: &usize) -> Result<usize, ConfigError> {
    at_least_one(values, setting, size)?;
    if *size > MAX_POOL_SIZE {
        return Err(ConfigError::invalid(
            setting,
            format!("{size} is more than {MAX_POOL_SIZE}"),
        ));
    }
    Ok(*size)
}

fn pool_max_size_resolved(
    values: &Values,
    setting: &str,
    size: &Option<usize>,
) -> Result<usize, ConfigError> {
    let size = size.unwrap_or(values.pool_size.saturating_mul(2).min(MAX_POOL_SIZE));
    if size > MAX_POOL_SIZE {
        return Err(ConfigError::invalid(
            setting,
            format!("{size} is more than {MAX_POOL_SIZE}"),
        ));
    }
    if size < values.pool_size {
        return Err(ConfigError::invalid(
            setting,
            format!("{size} is less than pool_size ({})", values.pool_size),
        ));
    }
    Ok(size)
}

fn at_most_pool_size(values: &Values, setting: &str, count: &usize) -> Result<usize, ConfigError> {
    if *count > values.pool_size {
        return Err(ConfigError::invalid(
            setting,
            format!("{count} is more than pool_size ({})", values.pool_size),
        ));
    }
    Ok(*count)
}

fn at_least_cool_down(
    values: &Values,
    setting: &str,
    ceiling: &Duration,
) -> Result<Duration, ConfigError> {
    if *ceiling < values.breaker_cool_down {
        return Err(ConfigError::invalid(
            setting,
            "is shorter than breaker_cool_down",
        ));
    }
    Ok(*ceiling)
}

/// A type of setting: how its values are read from text, and what a usage
/// line calls them.
trait Value: Sized {
    const HINT: &'static str;
    fn parse(setting: &str, text: &str) -> Result<Self, ConfigError>;
}

impl Value for usize {
    const HINT: &'static str = "N";
    fn parse(setting: &str, text: &str) -> Result<Self, ConfigError> {
        parse_count(setting, text)
    }
}

impl Value for u32 {
    const HINT: &'static str = "N";
    fn parse(setting: &str, text: &str) -> Result<Self, ConfigError> {
        u32::try_from(parse_count(setting, text)?)
            .map_err(|_| ConfigError::invalid(setting, "too large"))
    }
}

/// A count that may be left to the configuration (`auto`).
impl Value for Option<usize> {
    const HINT: &'static str = "N";
    fn parse(setting: &str, text: &str) -> Result<Self, ConfigError> {
        match text {
            "auto" => Ok(None),
            _ => parse_count(setting, text).map(Some),
        }
    }
}

impl Value for Duration {
    const HINT: &'static str = "DURATION";
    fn parse(setting: &str, text: &str) -> Result<Self, ConfigError> {
        parse_duration(setting, text)
    }
}

impl Value for bool {
    const HINT: &'static str = "BOOL";
    fn parse(setting: &str, text: &str) -> Result<Self, ConfigError> {
        parse_bool(setting, text)
    }
}

/// A name, checked as an identifier at [`ConfigBuilder::build`].
impl Value for String {
    const HINT: &'static str = "NAME";
    fn parse(_: &str, text: &str) -> Result<Self, ConfigError> {
        Ok(text.to_owned())
    }
}

impl Value for PathBuf {
    const HINT: &'static str = "DIR";
    fn parse(_: &str, text: &str) -> Result<Self, ConfigError> {
        Ok(PathBuf::from(text))
    }
}

impl Value for PoolerMode {
    const HINT: &'static str = "MODE";
    fn parse(_: &str, text: &str) -> Result<Self, ConfigError> {
        text.parse()
    }
}

/// How a getter hands out what the configuration holds: a copy, or a
/// borrow (a path, a name).
trait Get<'a, R> {
    fn get(&'a self) -> R;
}

impl<T: Copy> Get<'_, T> for T {
    fn get(&self) -> T {
        *self
    }
}

impl<'a> Get<'a, &'a Path> for PathBuf {
    fn get(&'a self) -> &'a Path {
        self
    }
}

impl<'a> Get<'a, &'a Identifier> for Identifier {
    fn get(&'a self) -> &'a Identifier {
        self
    }
}

/// The largest pool accepted: far more connections than a session store
/// needs, or than most servers allow.
const MAX_POOL_SIZE: usize = 10_000;

/// The longest duration accepted from text: far beyond any sensible
/// setting, and short enough that sums and multiples of settings cannot
/// overflow.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// A whole number, `_` allowed between digits; a size in bytes may end in
/// `KiB`, `MiB` or `GiB`.
fn parse_count(setting: &str, value: &str) -> Result<usize, ConfigError> {
    let text = value.replace('_', "");
    let (number, scale) = [("KiB", 1 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30)]
        .into_iter()
        .find_map(|(unit, scale)| Some((text.strip_suffix(unit)?.trim_end(), scale)))
        .unwrap_or((&text, 1));
    number
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| {
            ConfigError::invalid(setting, format!("expected a whole number, got {value:?}"))
        })
}
fn parse_bool(setting: &str, value: &str) -> Result<bool, ConfigError> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::invalid(
            setting,
            format!("expected true or false, got {value:?}"),
        )),
    }
}

/// Parses `500ms`, `30s`, `5m`, `1h`, `1d` or a bare number of seconds.
///
/// Written here rather than taken from a crate: five units do not justify a
/// dependency, and the error must name our setting.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(pgsession::config::parse_duration("grace", "1.5s")?, Duration::from_millis(1500));
/// assert!(pgsession::config::parse_duration("grace", "soon").unwrap_err().to_string().contains("grace"));
/// # Ok::<(), pgsession::ConfigError>(())
/// ```
pub fn parse_duration(setting: &str, value: &str) -> Result<Duration, ConfigError> {
    let bad = || {
        ConfigError::invalid(
            setting,
            format!("expected a duration such as 500ms, 30s, 5m, 1h, got {value:?}"),
        )
    };
    let split = value
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let number: f64 = number.parse().map_err(|_| bad())?;
    let seconds = match unit.trim() {
        "ms" => number / 1000.0,
        "" | "s" => number,
        "m" | "min" => number * 60.0,
        "h" => number * 3600.0,
        "d" => number * 86_400.0,
        _ => return Err(bad()),
    };
    let duration = Duration::try_from_secs_f64(seconds).map_err(|_| bad())?;
    if duration > MAX_DURATION {
        return Err(ConfigError::invalid(
            setting,
            format!("{value:?} is more than 100 years"),
        ));
    }
    Ok(duration)
}

/// Connection parameters libpq knows that tokio-postgres takes as they are.
const DRIVER_PARAMS: &[&str] = &[
    "user",
    "password",
    "dbname",
    "options",
    "application_name",
    "sslnegotiation",
    "host",
    "hostaddr",
    "port",
    "connect_timeout",
    "tcp_user_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_retries",
    "target_session_attrs",
    "channel_binding",
    "load_balance_hosts",
];

/// libpq parameters that change nothing here and are dropped.
const IGNORED_PARAMS: &[&str] = &[
    "gssencmode",
    "sslcompression",
    "krbsrvname",
    "gsslib",
    "sslcrldir",
];

/// Splits a libpq URL into the driver's configuration and our TLS settings.
///
/// tokio-postgres rejects `verify-ca`, `verify-full` and `sslrootcert`, so
/// those are taken out here and enforced by our own TLS connector.
fn parse_url(
    url: &str,
) -> Result<
    (
        tokio_postgres::Config,
        Vec<tokio_postgres::Config>,
        TlsConfig,
    ),
    ConfigError,
> {
    let invalid = |reason: String| ConfigError::invalid("DATABASE_URL", reason);
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(invalid(
            "expected a URL starting with postgres:// or postgresql://".into(),
        ));
    }
    let (base, query) = split_query(url)?;
    let mut tls = TlsConfig {
        sni: true,
        ..TlsConfig::default()
    };
    let mut kept: Vec<&str> = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_encoding::percent_decode_str(raw_value)
            .decode_utf8()
            .map_err(|_| ConfigError::invalid(key, "not valid UTF-8 once percent-decoded"))?;
        match key {
            "sslmode" => tls.mode = value.parse()?,
            "sslrootcert" if value != "system" => tls.root_cert = Some(PathBuf::from(&*value)),
            "sslrootcert" => tls.root_cert = None,
            "sslsni" => tls.sni = parse_bool("sslsni", &value)?,
            "sslcert" | "sslkey" | "sslpassword" => {
                return Err(ConfigError::invalid(
                    key,
                    "client certificates are not supported",
                ));
            }
            key if DRIVER_PARAMS.contains(&key) => kept.push(pair),
            key if IGNORED_PARAMS.contains(&key) => {}
            key => {
                return Err(ConfigError::invalid(
                    key,
                    "unknown connection parameter in DATABASE_URL",
                ))
            }
        }
    }
    let mode = match tls.mode.negotiation() {
        tokio_postgres::config::SslMode::Disable => "disable",
        tokio_postgres::config::SslMode::Require => "require",
        _ => "prefer",
    };
    let sslmode = format!("sslmode={mode}");
    kept.push(&sslmode);
    let normalized = format!("{base}?{}", kept.join("&"));
    let pg = tokio_postgres::Config::from_str(&normalized)
        .map_err(|e| invalid(crate::error::chain(&e)))?;
    if pg.get_hosts().is_empty() {
        return Err(invalid("no host given".into()));
    }
    let per_host = single_host_urls(base)
        .iter()
        .map(|one| {
            tokio_postgres::Config::from_str(&format!("{one}?{}", kept.join("&")))
                .map_err(|e| invalid(crate::error::chain(&e)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((pg, per_host, tls))
}

/// For `postgres://user@h1:1,h2:2/db`, the URLs `postgres://user@h1:1/db`
/// and `postgres://user@h2:2/db`; nothing for a single host.
fn single_host_urls(base: &str) -> Vec<String> {
    let Some((scheme, rest)) = base.split_once("://") else {
        return Vec::new();
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let (userinfo, hosts) = match authority.rfind('@') {
        Some(i) => (&authority[..=i], &authority[i + 1..]),
        None => ("", authority),
    };
    let hosts: Vec<&str> = hosts.split(',').collect();
    if hosts.len() < 2 {
        return Vec::new();
    }
    hosts
        .iter()
        .map(|host| format!("{scheme}://{userinfo}{host}{path}"))
        .collect()
}

/// Splits a URL into the part before its query and the query, where libpq
/// and the driver both see the query.
///
/// Credentials end at the first `@` met before any `/` (libpq's rule; the
/// driver reads up to the first `@`). A password may hold `?`, so the query
/// is looked for only after the credentials: splitting at the first `?`
/// would cut such a password in two and repeat its end in an error message.
/// Any other raw `@` is refused, without repeating the URL: the driver
/// would read everything before it as credentials, mistaking a password
/// for a host, or losing `sslmode` (a silent downgrade).
fn split_query(url: &str) -> Result<(&str, &str), ConfigError> {
    let refuse = || {
        ConfigError::invalid(
            "DATABASE_URL",
            "has an `@` outside `user:password@`; write `@` in a password or a parameter as %40",
        )
    };
    let scheme_end = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[scheme_end..];
    let after_credentials = match rest.find(['@', '/']) {
        Some(i) if rest[i..].starts_with('@') => scheme_end + i + 1,
        _ => scheme_end,
    };
    if url[after_credentials..].contains('@') {
        return Err(refuse());
    }
    Ok(match url[after_credentials..].find('?') {
        Some(i) => (
            &url[..after_credentials + i],
            &url[after_credentials + i + 1..],
        ),
        None => (url, ""),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(url: &str) -> Result<Config, ConfigError> {
        Config::builder().url(url).build()
    }

    #[test]
    fn defaults_are_the_design_defaults() {
        let c = build("postgres://localhost/app").unwrap();
        assert_eq!(c.pool_size(), 5);
        assert_eq!(c.min_idle(), 1);
        assert_eq!(c.idle_timeout(), Duration::from_secs(30));
        assert_eq!(c.connect_timeout(), Duration::from_secs(20));
        assert_eq!(c.statement_timeout(), Duration::from_secs(30));
        assert_eq!(c.query_timeout(), Duration::from_secs(30));
        assert_eq!(c.max_uses(), 7_500);
        assert_eq!(c.keepalive_idle(), Duration::from_secs(10));
        assert_eq!(c.startup_retries(), 3);
        assert_eq!(c.startup_backoff(), Duration::from_secs(1));
        assert_eq!(c.schema().as_str(), "public");
        assert_eq!(c.table().as_str(), "session_store");
        assert_eq!(c.lifetime(), Duration::from_secs(86_400));
        assert_eq!(c.prune_interval(), Duration::from_secs(900));
        assert_eq!(c.health_check_interval(), Duration::from_secs(30));
        assert_eq!(c.slow_check_threshold(), Duration::from_secs(1));
        assert_eq!(c.pool_max_size(), 10);
        assert_eq!(c.acquire_timeout(), Duration::from_secs(5));
        assert!(c.create_table());
        assert_eq!(c.prune_batch_size(), 1_000);
        assert_eq!(c.pooler(), PoolerMode::Direct);
        assert_eq!(c.max_session_bytes(), 64 * 1024);
        assert_eq!(c.breaker_threshold(), 5);
        assert_eq!(c.breaker_cool_down(), Duration::from_secs(1));
        assert_eq!(c.breaker_max_cool_down(), Duration::from_secs(30));
        assert_eq!(c.cache_max_entries(), 10_000);
        assert_eq!(c.cache_max_bytes(), 16 * 1024 * 1024);
        assert_eq!(c.journal_max_bytes(), 64 * 1024 * 1024);
        assert_eq!(c.journal_dir(), Path::new(".pgsession/journal"));
        assert!(c.fallback());
        assert_eq!(c.tls().mode, SslMode::Prefer);
        assert!(c.tls().sni);
        assert!(!c.tls().accept_invalid_certs);
        // The settings reach the driver.
        assert_eq!(
            c.postgres().get_connect_timeout(),
            Some(&Duration::from_secs(20))
        );
        assert!(c.postgres().get_keepalives());
        assert_eq!(c.postgres().get_keepalives_idle(), Duration::from_secs(10));
    }

    #[test]
    fn the_list_gives_each_setting_a_variable_a_flag_a_default_and_a_reason() {
        let names: Vec<&str> = SETTINGS.iter().map(|s| s.name).collect();
        let env: Vec<(&str, &str)> = SETTINGS.iter().map(|s| (s.env, s.name)).collect();
        assert_eq!(env, ENV_SETTINGS, "one list, in one order");
        let mut explicit = Config::builder();
        for (i, setting) in SETTINGS.iter().enumerate() {
            assert!(
                !names[..i].contains(&setting.name),
                "{} twice",
                setting.name
            );
            assert!(setting.env.starts_with("PGSESSION_") || setting.name == "url");
            assert!(!setting.summary().is_empty(), "{}", setting.name);
            assert!(
                setting.description().contains("\n\n"),
                "{}: the doc says why, after its summary",
                setting.name
            );
            if let Some(default) = setting.default {
                explicit = explicit.set(setting.name, default).unwrap();
            }
        }
        assert_eq!(SETTINGS[0].flag(), "database-url");
        assert!(SETTINGS.iter().any(|s| s.flag() == "journal-max-bytes"));
        // The defaults as text are the defaults.
        let url = "postgres://localhost/app";
        assert_eq!(explicit.url(url).build().unwrap(), build(url).unwrap());
        // Every setting of the configuration is shown, none twice.
        let shown = format!("{:?}", build(url).unwrap());
        for name in names
            .iter()
            .filter(|n| !["url", "tls_insecure"].contains(n))
        {
            assert_eq!(
                shown.matches(&format!(" {name}: ")).count(),
                1,
                "{name}: {shown}"
            );
        }
    }

    #[test]
    fn sizes_take_binary_units_and_the_pool_ceiling_auto() {
        let c = Config::from_vars([
            ("DATABASE_URL", "postgres://localhost/app"),
            ("PGSESSION_CACHE_MAX_BYTES", "2MiB"),
            ("PGSESSION_MAX_SESSION_BYTES", "8 KiB"),
            ("PGSESSION_JOURNAL_MAX_BYTES", "1_000"),
            ("PGSESSION_POOL_SIZE", "4"),
            ("PGSESSION_POOL_MAX_SIZE", "auto"),
        ])
        .unwrap();
        assert_eq!(c.cache_max_bytes(), 2 << 20);
        assert_eq!(c.max_session_bytes(), 8 << 10);
        assert_eq!(c.journal_max_bytes(), 1_000);
        assert_eq!(c.pool_max_size(), 8);
        let too_big = format!("{}GiB", usize::MAX);
        for bad in ["1KB", "KiB", "-1KiB", too_big.as_str()] {
            let err = Config::builder().set("cache_max_bytes", bad).unwrap_err();
            assert!(err.to_string().contains("cache_max_bytes"), "{bad}: {err}");
        }
    }

    /// The driver is the consumer of these two: each host's configuration
    /// carries them (tokio-postgres sets the socket's keepalive and bounds
    /// the connect with them).
    #[test]
    fn connect_timeout_and_keepalive_idle_reach_the_driver_for_every_host() {
        let c = Config::builder()
            .url("postgres://a:5432,b:5433/app")
            .connect_timeout(Duration::from_secs(3))
            .keepalive_idle(Duration::from_secs(42))
            .build()
            .unwrap();
        assert_eq!(c.per_host.len(), 2);
        for pg in std::iter::once(&c.pg).chain(&c.per_host) {
            assert_eq!(pg.get_connect_timeout(), Some(&Duration::from_secs(3)));
            assert!(pg.get_keepalives());
            assert_eq!(pg.get_keepalives_idle(), Duration::from_secs(42));
        }
        assert_eq!(c.connect_budget(), Duration::from_secs(6));
    }

    #[test]
    fn environment_and_builder_agree() {
        let from_env = Config::from_vars([
            ("DATABASE_URL", "postgres://u@db:6543/app"),
            ("PGSESSION_POOL_SIZE", "9"),
            ("PGSESSION_MIN_IDLE", "2"),
            ("PGSESSION_IDLE_TIMEOUT", "1m"),
            ("PGSESSION_QUERY_TIMEOUT", "1500ms"),
            ("PGSESSION_TABLE", "sessions"),
            ("PGSESSION_SCHEMA", "auth"),
            ("PGSESSION_POOLER", "transaction"),
            ("UNRELATED", "ignored"),
        ])
        .unwrap();
        let built = Config::builder()
            .url("postgres://u@db:6543/app")
            .pool_size(9)
            .min_idle(2)
            .idle_timeout(Duration::from_secs(60))
            .query_timeout(Duration::from_millis(1500))
            .table("sessions")
            .schema("auth")
            .pooler(PoolerMode::Transaction)
            .build()
            .unwrap();
        assert_eq!(from_env, built);
    }

    #[test]
    fn bad_values_name_the_setting() {
        let cases = [
            ("PGSESSION_POOL_SIZE", "zero", "pool_size"),
            ("PGSESSION_POOL_SIZE", "0", "pool_size"),
            ("PGSESSION_IDLE_TIMEOUT", "soon", "idle_timeout"),
            ("PGSESSION_QUERY_TIMEOUT", "0s", "query_timeout"),
            ("PGSESSION_TABLE", "sessions; DROP TABLE users", "table"),
            ("PGSESSION_POOLER", "statement", "pooler"),
            ("PGSESSION_TLS_INSECURE", "maybe", "tls_insecure"),
        ];
        for (var, value, setting) in cases {
            let err =
                Config::from_vars([("DATABASE_URL", "postgres://localhost/app"), (var, value)])
                    .unwrap_err()
                    .to_string();
            assert!(err.contains(setting), "{var}={value}: {err}");
        }
        let err = Config::from_vars([
            ("DATABASE_URL", "postgres://localhost/app"),
            ("PGSESSION_MIN_IDLE", "9"),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("min_idle"), "{err}");
        let err = Config::from_vars([("PGSESSION_POOL_SIZE", "3")]).unwrap_err();
        assert_eq!(err, ConfigError::Missing("DATABASE_URL"));
    }

    #[test]
    fn every_sslmode_is_understood() {
        for (mode, expected) in [
            ("disable", SslMode::Disable),
            ("allow", SslMode::Prefer),
            ("prefer", SslMode::Prefer),
            ("require", SslMode::Require),
            ("verify-ca", SslMode::VerifyCa),
            ("verify-full", SslMode::VerifyFull),
        ] {
            let c = build(&format!(
                "postgres://h/db?sslmode={mode}&sslrootcert=%2Ftmp%2Fca.pem"
            ))
            .unwrap();
            assert_eq!(c.tls().mode, expected, "{mode}");
            assert_eq!(
                c.tls().root_cert.as_deref(),
                Some(std::path::Path::new("/tmp/ca.pem"))
            );
            assert_eq!(c.postgres().get_ssl_mode(), expected.negotiation());
        }
        let err = build("postgres://h/db?sslmode=sometimes").unwrap_err();
        assert!(err.to_string().contains("sslmode"), "{err}");
    }

    #[test]
    fn libpq_parameters_are_normalized_and_unknown_ones_refused() {
        let c = build(
            "postgresql://a:5432,b:5433/app?target_session_attrs=read-write&sslmode=verify-full\
             &channel_binding=prefer&gssencmode=disable&application_name=web",
        )
        .unwrap();
        assert_eq!(c.postgres().get_hosts().len(), 2);
        assert_eq!(c.postgres().get_ports(), &[5432, 5433]);
        assert_eq!(
            c.postgres().get_target_session_attrs(),
            tokio_postgres::config::TargetSessionAttrs::ReadWrite
        );
        assert_eq!(c.postgres().get_application_name(), Some("web"));
        assert_eq!(c.target(), "a:5432,b:5433/app");
        let v6 = Config::builder()
            .url("postgres://u:secret@[::1]:5433,127.0.0.1/app")
            .build()
            .unwrap();
        assert_eq!(v6.target(), "[::1]:5433,127.0.0.1:5432/app");
        // Each host alone too, with the same settings, for the connector.
        assert_eq!(c.per_host.len(), 2);
        assert_eq!(c.per_host[1].get_ports(), &[5433]);
        assert_eq!(
            c.per_host[1].get_target_session_attrs(),
            tokio_postgres::config::TargetSessionAttrs::ReadWrite
        );
        assert_eq!(c.per_host[1].get_application_name(), Some("web"));

        let err = build("postgres://h/db?frobnicate=1").unwrap_err();
        assert!(err.to_string().contains("frobnicate"), "{err}");
        let err = build("mysql://h/db").unwrap_err();
        assert!(err.to_string().contains("DATABASE_URL"), "{err}");
    }

    #[test]
    fn passwords_stay_out_of_debug_and_errors() {
        let c = build("postgres://app:hunter2@db/app").unwrap();
        assert_eq!(c.postgres().get_password(), Some(&b"hunter2"[..]));
        assert!(!format!("{c:?}").contains("hunter2"));
        let b = Config::builder().url("postgres://app:hunter2@db/app");
        assert!(!format!("{b:?}").contains("hunter2"));
        for url in [
            "postgres://app:hunter2@db:notaport/app",
            "postgres://app:hunter2@db/app?sslmode=bogus",
            "postgres://app:hunter2@db/app?port=x",
            "postgres://app:hunter2@/app",
        ] {
            if let Err(e) = build(url) {
                assert!(!e.to_string().contains("hunter2"), "{e}");
            }
        }
    }

    #[test]
    fn special_characters_in_a_password_neither_leak_nor_downgrade() {
        // Found by the `config` fuzz target: the query was split at the
        // first `?`, so a password holding one was cut in two and its end
        // repeated in "unknown connection parameter" errors.
        let c = build("postgres://app:pa?ss-word@db/app?sslmode=verify-full").unwrap();
        assert_eq!(c.postgres().get_password(), Some(&b"pa?ss-word"[..]));
        assert_eq!(c.postgres().get_user(), Some("app"));
        assert_eq!(c.target(), "db:5432/app");
        assert_eq!(c.tls().mode, SslMode::VerifyFull);
        assert!(!format!("{c:?}").contains("ss-word"));
        // A raw `@` anywhere else is refused without repeating the URL:
        // in a password (the rest would be taken for the host) ...
        for url in [
            "postgres://app:p@ss-word@db/app",
            "postgres://app:p/a?ss-word@db/app",
            "postgres://app:pa?ss-word@@db/app",
        ] {
            let err = build(url).unwrap_err().to_string();
            assert!(err.contains("%40"), "{url}: {err}");
            assert!(!err.contains("ss-word"), "{url}: {err}");
        }
        // ... or, with no credentials, in a parameter, where the driver
        // would read everything before it, sslmode included, as a user name.
        let err = build("postgres://db/app?sslmode=verify-full&application_name=a@b").unwrap_err();
        assert!(err.to_string().contains("DATABASE_URL"), "{err}");
        let c = build("postgres://db/app?sslmode=verify-full&application_name=a%40b").unwrap();
        assert_eq!(c.tls().mode, SslMode::VerifyFull);
        assert_eq!(c.postgres().get_application_name(), Some("a@b"));
        assert_eq!(c.target(), "db:5432/app");
        let c = build("postgres://app:p%40ss@db/app?sslmode=require").unwrap();
        assert_eq!(c.postgres().get_password(), Some(&b"p@ss"[..]));
        assert_eq!(c.tls().mode, SslMode::Require);
    }

    #[test]
    fn durations_parse() {
        let d = |v| parse_duration("x", v);
        assert_eq!(d("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(d("30").unwrap(), Duration::from_secs(30));
        assert_eq!(d("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(d("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(d("1d").unwrap(), Duration::from_secs(86_400));
        for bad in ["", "s", "-1s", "1 fortnight", "1e999", "NaN"] {
            assert!(d(bad).is_err(), "{bad}");
        }
        // Absurd values are refused, so that no sum of settings overflows.
        assert!(d("36500d").is_ok());
        assert!(d("36501d").is_err());
        assert!(d("18446744073709551615").is_err());
    }

    #[test]
    fn absurd_pool_sizes_are_refused_not_a_panic() {
        // Found by the `config` fuzz target: `pool_size * 2` overflowed.
        let max = usize::MAX.to_string();
        for (setting, value) in [("pool_size", max.as_str()), ("pool_max_size", max.as_str())] {
            let err = Config::builder()
                .url("postgres://localhost/app")
                .set(setting, value)
                .unwrap()
                .build()
                .unwrap_err();
            assert!(err.to_string().contains(setting), "{err}");
        }
        let c = build("postgres://localhost/app").unwrap();
        assert_eq!(c.pool_max_size(), 10);
        let c = Config::builder()
            .url("postgres://localhost/app")
            .pool_size(MAX_POOL_SIZE)
            .build()
            .unwrap();
        assert_eq!(c.pool_max_size(), MAX_POOL_SIZE);
    }
}
