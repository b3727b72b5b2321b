//! Configuration: every setting with its default, one builder, and the two
//! ways in (`DATABASE_URL` plus `PGSESSION_*` variables, or code).
//!
//! Both ways go through [`ConfigBuilder::set`], so the environment and the
//! builder cannot drift apart, and a bad value is refused with the name of
//! the setting. Passwords are kept out of `Debug` and of every message.

use std::fmt;
use std::path::PathBuf;
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
    /// `sslrootcert`: a PEM file of trusted CAs. Default: the Mozilla roots
    /// (webpki-roots).
    pub root_cert: Option<PathBuf>,
    /// Send SNI (`sslsni`). Default: on.
    pub sni: bool,
    /// Skip certificate verification. Off unless explicitly asked for
    /// (`PGSESSION_TLS_INSECURE=true`); logs a warning when used.
    pub accept_invalid_certs: bool,
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
    pub(crate) pool_size: usize,
    pub(crate) pool_max_size: usize,
    pub(crate) min_idle: usize,
    pub(crate) idle_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) acquire_timeout: Duration,
    pub(crate) statement_timeout: Duration,
    pub(crate) query_timeout: Duration,
    pub(crate) max_uses: usize,
    pub(crate) keepalive_idle: Duration,
    pub(crate) startup_retries: usize,
    pub(crate) startup_backoff: Duration,
    pub(crate) schema: Identifier,
    pub(crate) table: Identifier,
    pub(crate) create_table: bool,
    pub(crate) lifetime: Duration,
    pub(crate) prune_interval: Duration,
    pub(crate) prune_batch_size: usize,
    pub(crate) pooler: PoolerMode,
    pub(crate) max_session_bytes: usize,
    pub(crate) health_check_interval: Duration,
    pub(crate) slow_check_threshold: Duration,
    pub(crate) breaker_threshold: u32,
    pub(crate) breaker_cool_down: Duration,
    pub(crate) breaker_max_cool_down: Duration,
    pub(crate) cache_max_entries: usize,
    pub(crate) cache_max_bytes: usize,
    pub(crate) journal_max_bytes: usize,
    pub(crate) journal_dir: PathBuf,
    pub(crate) fallback: bool,
}

impl Config {
    /// A builder with every default of the design.
    pub fn builder() -> ConfigBuilder {
        ConfigBuilder::default()
    }

    /// Reads `DATABASE_URL` and the `PGSESSION_*` variables (see
    /// [`ConfigBuilder::set`] for the names).
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

    /// Configured pool size. Default: 5.
    pub fn pool_size(&self) -> usize {
        self.pool_size
    }
    /// Ceiling the self-sizing pool may grow to. Default: twice the pool size.
    pub fn pool_max_size(&self) -> usize {
        self.pool_max_size
    }
    /// Connections kept open even when idle. Default: 1.
    pub fn min_idle(&self) -> usize {
        self.min_idle
    }
    /// Idle connections above the warm minimum are closed after this. Default: 30 s.
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }
    /// Deadline to open a connection, TLS and authentication included. Default: 20 s.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }
    /// The longest opening a connection may take: the connect timeout for
    /// each host of the URL, tried one after the other.
    pub fn connect_budget(&self) -> Duration {
        self.connect_timeout * self.per_host.len().max(1) as u32
    }
    /// Deadline to get a connection from a full pool. Default: 5 s.
    pub fn acquire_timeout(&self) -> Duration {
        self.acquire_timeout
    }
    /// Server-side `statement_timeout`. Default: 30 s.
    pub fn statement_timeout(&self) -> Duration {
        self.statement_timeout
    }
    /// Client-side deadline of one operation, retries included; the query
    /// is cancelled when it passes. Default: 30 s.
    pub fn query_timeout(&self) -> Duration {
        self.query_timeout
    }
    /// Uses after which a connection is replaced. Default: 7,500.
    pub fn max_uses(&self) -> usize {
        self.max_uses
    }
    /// Idle time before the first TCP keepalive probe. Default: 10 s.
    pub fn keepalive_idle(&self) -> Duration {
        self.keepalive_idle
    }
    /// Start-up attempts after the first. Default: 3.
    pub fn startup_retries(&self) -> usize {
        self.startup_retries
    }
    /// First start-up backoff, doubled each time, with jitter. Default: 1 s.
    pub fn startup_backoff(&self) -> Duration {
        self.startup_backoff
    }
    /// Schema of the session table. Default: `public`.
    pub fn schema(&self) -> &Identifier {
        &self.schema
    }
    /// Name of the session table. Default: `session_store`.
    pub fn table(&self) -> &Identifier {
        &self.table
    }
    /// Whether the store creates the table when it is missing. Default: true.
    pub fn create_table(&self) -> bool {
        self.create_table
    }
    /// Lifetime of a session whose cookie sets no expiry. Default: 1 day.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }
    /// Mean interval between prunes (randomized 50-150 %). Default: 15 min.
    pub fn prune_interval(&self) -> Duration {
        self.prune_interval
    }
    /// Rows deleted per prune statement. Default: 1,000.
    pub fn prune_batch_size(&self) -> usize {
        self.prune_batch_size
    }
    /// Direct connection or transaction pooler. Default: direct.
    pub fn pooler(&self) -> PoolerMode {
        self.pooler
    }
    /// Largest session document accepted, in bytes. Default: 64 KiB.
    pub fn max_session_bytes(&self) -> usize {
        self.max_session_bytes
    }
    /// Interval of the health check. Default: 30 s.
    pub fn health_check_interval(&self) -> Duration {
        self.health_check_interval
    }
    /// A health check slower than this is a warning. Default: 1 s.
    pub fn slow_check_threshold(&self) -> Duration {
        self.slow_check_threshold
    }
    /// Transient failures in a row that open the circuit breaker. Default: 5.
    pub fn breaker_threshold(&self) -> u32 {
        self.breaker_threshold
    }
    /// First wait before the open breaker lets a probe through; doubled
    /// after each failed probe. Default: 1 s.
    pub fn breaker_cool_down(&self) -> Duration {
        self.breaker_cool_down
    }
    /// Ceiling of the breaker's cool-down. Default: 30 s.
    pub fn breaker_max_cool_down(&self) -> Duration {
        self.breaker_max_cool_down
    }
    /// Sessions kept in the fallback cache (0 turns the cache off).
    /// Default: 10,000.
    pub fn cache_max_entries(&self) -> usize {
        self.cache_max_entries
    }
    /// Bytes of session documents kept in the fallback cache. Default: 16 MiB.
    pub fn cache_max_bytes(&self) -> usize {
        self.cache_max_bytes
    }
    /// Bytes the on-disk journal may hold while the database is away; past
    /// this, writes answer 503 with `Retry-After` rather than be
    /// acknowledged without a durable copy. Default: 64 MiB.
    pub fn journal_max_bytes(&self) -> usize {
        self.journal_max_bytes
    }
    /// The directory of the on-disk journal (mode 0700, files 0600): writes
    /// accepted while the database is away are fsynced here before they are
    /// acknowledged, and the journal files of this process, or of one that
    /// died, are written back from here. Put it on a persistent disk.
    /// Default: `.pgsession/journal`.
    pub fn journal_dir(&self) -> &std::path::Path {
        &self.journal_dir
    }
    /// Whether the fallback serves while the database is away (reads from
    /// the cache, writes to the journal). Off, an outage answers 503 and no
    /// journal directory is needed. Default: on.
    pub fn fallback(&self) -> bool {
        self.fallback
    }
    /// TLS settings.
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
        f.debug_struct("Config")
            .field("target", &self.target())
            .field("user", &self.pg.get_user())
            .field("password", &self.pg.get_password().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .field("pool_size", &self.pool_size)
            .field("pool_max_size", &self.pool_max_size)
            .field("min_idle", &self.min_idle)
            .field("idle_timeout", &self.idle_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("query_timeout", &self.query_timeout)
            .field("max_uses", &self.max_uses)
            .field("keepalive_idle", &self.keepalive_idle)
            .field("startup_retries", &self.startup_retries)
            .field("startup_backoff", &self.startup_backoff)
            .field("schema", &self.schema)
            .field("table", &self.table)
            .field("create_table", &self.create_table)
            .field("lifetime", &self.lifetime)
            .field("prune_interval", &self.prune_interval)
            .field("prune_batch_size", &self.prune_batch_size)
            .field("pooler", &self.pooler)
            .field("max_session_bytes", &self.max_session_bytes)
            .field("health_check_interval", &self.health_check_interval)
            .field("slow_check_threshold", &self.slow_check_threshold)
            .field("breaker_threshold", &self.breaker_threshold)
            .field("breaker_cool_down", &self.breaker_cool_down)
            .field("breaker_max_cool_down", &self.breaker_max_cool_down)
            .field("cache_max_entries", &self.cache_max_entries)
            .field("cache_max_bytes", &self.cache_max_bytes)
            .field("journal_max_bytes", &self.journal_max_bytes)
            .field("journal_dir", &self.journal_dir)
            .field("fallback", &self.fallback)
            .finish()
    }
}

/// Builds a [`Config`]; every setting starts at the design's default.
///
/// Typed setters are for code; [`ConfigBuilder::set`] takes text (from the
/// environment or a command line) and refuses bad values by name.
#[derive(Clone)]
pub struct ConfigBuilder {
    url: Option<String>,
    tls_insecure: bool,
    pool_size: usize,
    pool_max_size: Option<usize>,
    min_idle: usize,
    idle_timeout: Duration,
    connect_timeout: Duration,
    acquire_timeout: Duration,
    statement_timeout: Duration,
    query_timeout: Duration,
    max_uses: usize,
    keepalive_idle: Duration,
    startup_retries: usize,
    startup_backoff: Duration,
    schema: String,
    table: String,
    create_table: bool,
    lifetime: Duration,
    prune_interval: Duration,
    prune_batch_size: usize,
    pooler: PoolerMode,
    max_session_bytes: usize,
    health_check_interval: Duration,
    slow_check_threshold: Duration,
    breaker_threshold: u32,
    breaker_cool_down: Duration,
    breaker_max_cool_down: Duration,
    cache_max_entries: usize,
    cache_max_bytes: usize,
    journal_max_bytes: usize,
    journal_dir: PathBuf,
    fallback: bool,
}

impl Default for ConfigBuilder {
    fn default() -> Self {
        ConfigBuilder {
            url: None,
            tls_insecure: false,
            pool_size: 5,
            pool_max_size: None,
            min_idle: 1,
            idle_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(20),
            acquire_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(30),
            query_timeout: Duration::from_secs(30),
            max_uses: 7_500,
            keepalive_idle: Duration::from_secs(10),
            startup_retries: 3,
            startup_backoff: Duration::from_secs(1),
            schema: "public".into(),
            table: "session_store".into(),
            create_table: true,
            lifetime: Duration::from_secs(24 * 60 * 60),
            prune_interval: Duration::from_secs(15 * 60),
            prune_batch_size: 1_000,
            pooler: PoolerMode::Direct,
            max_session_bytes: 64 * 1024,
            health_check_interval: Duration::from_secs(30),
            slow_check_threshold: Duration::from_secs(1),
            breaker_threshold: 5,
            breaker_cool_down: Duration::from_secs(1),
            breaker_max_cool_down: Duration::from_secs(30),
            cache_max_entries: 10_000,
            cache_max_bytes: 16 * 1024 * 1024,
            journal_max_bytes: 64 * 1024 * 1024,
            journal_dir: PathBuf::from(".pgsession/journal"),
            fallback: true,
        }
    }
}

impl fmt::Debug for ConfigBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may hold a password: say only whether there is one.
        f.debug_struct("ConfigBuilder")
            .field("url_set", &self.url.is_some())
            .finish_non_exhaustive()
    }
}

/// The `PGSESSION_*` variables [`ConfigBuilder::vars`] reads, with the
/// setting each one sets.
pub const ENV_SETTINGS: &[(&str, &str)] = &[
    ("DATABASE_URL", "url"),
    ("PGSESSION_POOL_SIZE", "pool_size"),
    ("PGSESSION_POOL_MAX_SIZE", "pool_max_size"),
    ("PGSESSION_MIN_IDLE", "min_idle"),
    ("PGSESSION_IDLE_TIMEOUT", "idle_timeout"),
    ("PGSESSION_CONNECT_TIMEOUT", "connect_timeout"),
    ("PGSESSION_ACQUIRE_TIMEOUT", "acquire_timeout"),
    ("PGSESSION_STATEMENT_TIMEOUT", "statement_timeout"),
    ("PGSESSION_QUERY_TIMEOUT", "query_timeout"),
    ("PGSESSION_MAX_USES", "max_uses"),
    ("PGSESSION_KEEPALIVE_IDLE", "keepalive_idle"),
    ("PGSESSION_STARTUP_RETRIES", "startup_retries"),
    ("PGSESSION_STARTUP_BACKOFF", "startup_backoff"),
    ("PGSESSION_SCHEMA", "schema"),
    ("PGSESSION_TABLE", "table"),
    ("PGSESSION_CREATE_TABLE", "create_table"),
    ("PGSESSION_LIFETIME", "lifetime"),
    ("PGSESSION_PRUNE_INTERVAL", "prune_interval"),
    ("PGSESSION_PRUNE_BATCH_SIZE", "prune_batch_size"),
    ("PGSESSION_POOLER", "pooler"),
    ("PGSESSION_MAX_SESSION_BYTES", "max_session_bytes"),
    ("PGSESSION_HEALTH_CHECK_INTERVAL", "health_check_interval"),
    ("PGSESSION_SLOW_CHECK_THRESHOLD", "slow_check_threshold"),
    ("PGSESSION_BREAKER_THRESHOLD", "breaker_threshold"),
    ("PGSESSION_BREAKER_COOL_DOWN", "breaker_cool_down"),
    ("PGSESSION_BREAKER_MAX_COOL_DOWN", "breaker_max_cool_down"),
    ("PGSESSION_CACHE_MAX_ENTRIES", "cache_max_entries"),
    ("PGSESSION_CACHE_MAX_BYTES", "cache_max_bytes"),
    ("PGSESSION_JOURNAL_MAX_BYTES", "journal_max_bytes"),
    ("PGSESSION_JOURNAL_DIR", "journal_dir"),
    ("PGSESSION_FALLBACK", "fallback"),
    ("PGSESSION_TLS_INSECURE", "tls_insecure"),
];

impl ConfigBuilder {
    /// Sets one setting from text, by its name. The names are those of the
    /// typed setters (`pool_size`, `idle_timeout`, ...) and `url`; the
    /// environment variable of each is in [`ENV_SETTINGS`]. Durations take
    /// `500ms`, `30s`, `5m`, `1h`, `1d`, or a bare number of seconds.
    ///
    /// ```
    /// let error = pgsession::Config::builder().set("pool_size", "many").unwrap_err();
    /// assert!(error.to_string().contains("pool_size"));
    /// ```
    pub fn set(self, setting: &str, value: &str) -> Result<Self, ConfigError> {
        let value = value.trim();
        let count = || parse_count(setting, value);
        let duration = || parse_duration(setting, value);
        Ok(match setting {
            "url" => self.url(value),
            "pool_size" => self.pool_size(count()?),
            "pool_max_size" => self.pool_max_size(count()?),
            "min_idle" => self.min_idle(count()?),
            "idle_timeout" => self.idle_timeout(duration()?),
            "connect_timeout" => self.connect_timeout(duration()?),
            "acquire_timeout" => self.acquire_timeout(duration()?),
            "statement_timeout" => self.statement_timeout(duration()?),
            "query_timeout" => self.query_timeout(duration()?),
            "max_uses" => self.max_uses(count()?),
            "keepalive_idle" => self.keepalive_idle(duration()?),
            "startup_retries" => self.startup_retries(count()?),
            "startup_backoff" => self.startup_backoff(duration()?),
            "schema" => self.schema(value),
            "table" => self.table(value),
            "create_table" => self.create_table(parse_bool(setting, value)?),
            "lifetime" => self.lifetime(duration()?),
            "prune_interval" => self.prune_interval(duration()?),
            "prune_batch_size" => self.prune_batch_size(count()?),
            "pooler" => self.pooler(value.parse()?),
            "max_session_bytes" => self.max_session_bytes(count()?),
            "health_check_interval" => self.health_check_interval(duration()?),
            "slow_check_threshold" => self.slow_check_threshold(duration()?),
            "breaker_threshold" => {
                let n = count()?;
                self.breaker_threshold(
                    u32::try_from(n).map_err(|_| ConfigError::invalid(setting, "too large"))?,
                )
            }
            "breaker_cool_down" => self.breaker_cool_down(duration()?),
            "breaker_max_cool_down" => self.breaker_max_cool_down(duration()?),
            "cache_max_entries" => self.cache_max_entries(count()?),
            "cache_max_bytes" => self.cache_max_bytes(count()?),
            "journal_max_bytes" => self.journal_max_bytes(count()?),
            "journal_dir" => self.journal_dir(value),
            "fallback" => self.fallback(parse_bool(setting, value)?),
            "tls_insecure" => self.danger_accept_invalid_certs(parse_bool(setting, value)?),
            other => return Err(ConfigError::invalid(other, "no such setting")),
        })
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
    /// See [`Config::pool_size`].
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size;
        self
    }
    /// See [`Config::pool_max_size`].
    pub fn pool_max_size(mut self, size: usize) -> Self {
        self.pool_max_size = Some(size);
        self
    }
    /// See [`Config::min_idle`].
    pub fn min_idle(mut self, count: usize) -> Self {
        self.min_idle = count;
        self
    }
    /// See [`Config::idle_timeout`].
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }
    /// See [`Config::connect_timeout`].
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }
    /// See [`Config::acquire_timeout`].
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }
    /// See [`Config::statement_timeout`].
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = timeout;
        self
    }
    /// See [`Config::query_timeout`].
    pub fn query_timeout(mut self, timeout: Duration) -> Self {
        self.query_timeout = timeout;
        self
    }
    /// See [`Config::max_uses`].
    pub fn max_uses(mut self, uses: usize) -> Self {
        self.max_uses = uses;
        self
    }
    /// See [`Config::keepalive_idle`].
    pub fn keepalive_idle(mut self, idle: Duration) -> Self {
        self.keepalive_idle = idle;
        self
    }
    /// See [`Config::startup_retries`].
    pub fn startup_retries(mut self, retries: usize) -> Self {
        self.startup_retries = retries;
        self
    }
    /// See [`Config::startup_backoff`].
    pub fn startup_backoff(mut self, backoff: Duration) -> Self {
        self.startup_backoff = backoff;
        self
    }
    /// See [`Config::schema`]. Checked as an identifier at [`build`](Self::build).
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }
    /// See [`Config::table`]. Checked as an identifier at [`build`](Self::build).
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }
    /// See [`Config::create_table`].
    pub fn create_table(mut self, create: bool) -> Self {
        self.create_table = create;
        self
    }
    /// See [`Config::lifetime`].
    pub fn lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = lifetime;
        self
    }
    /// See [`Config::prune_interval`].
    pub fn prune_interval(mut self, interval: Duration) -> Self {
        self.prune_interval = interval;
        self
    }
    /// See [`Config::prune_batch_size`].
    pub fn prune_batch_size(mut self, rows: usize) -> Self {
        self.prune_batch_size = rows;
        self
    }
    /// See [`Config::pooler`].
    pub fn pooler(mut self, mode: PoolerMode) -> Self {
        self.pooler = mode;
        self
    }
    /// See [`Config::max_session_bytes`].
    pub fn max_session_bytes(mut self, bytes: usize) -> Self {
        self.max_session_bytes = bytes;
        self
    }
    /// See [`Config::health_check_interval`].
    pub fn health_check_interval(mut self, interval: Duration) -> Self {
        self.health_check_interval = interval;
        self
    }
    /// See [`Config::slow_check_threshold`].
    pub fn slow_check_threshold(mut self, threshold: Duration) -> Self {
        self.slow_check_threshold = threshold;
        self
    }
    /// See [`Config::breaker_threshold`].
    pub fn breaker_threshold(mut self, failures: u32) -> Self {
        self.breaker_threshold = failures;
        self
    }
    /// See [`Config::breaker_cool_down`].
    pub fn breaker_cool_down(mut self, cool_down: Duration) -> Self {
        self.breaker_cool_down = cool_down;
        self
    }
    /// See [`Config::breaker_max_cool_down`].
    pub fn breaker_max_cool_down(mut self, cool_down: Duration) -> Self {
        self.breaker_max_cool_down = cool_down;
        self
    }
    /// See [`Config::cache_max_entries`].
    pub fn cache_max_entries(mut self, entries: usize) -> Self {
        self.cache_max_entries = entries;
        self
    }
    /// See [`Config::cache_max_bytes`].
    pub fn cache_max_bytes(mut self, bytes: usize) -> Self {
        self.cache_max_bytes = bytes;
        self
    }
    /// See [`Config::journal_max_bytes`].
    pub fn journal_max_bytes(mut self, bytes: usize) -> Self {
        self.journal_max_bytes = bytes;
        self
    }
    /// See [`Config::fallback`].
    pub fn fallback(mut self, on: bool) -> Self {
        self.fallback = on;
        self
    }
    /// See [`Config::journal_dir`].
    pub fn journal_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.journal_dir = dir.into();
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

        positive("pool_size", self.pool_size)?;
        positive("max_uses", self.max_uses)?;
        positive("prune_batch_size", self.prune_batch_size)?;
        positive("max_session_bytes", self.max_session_bytes)?;
        positive("breaker_threshold", self.breaker_threshold as usize)?;
        if self.breaker_max_cool_down < self.breaker_cool_down {
            return Err(ConfigError::invalid(
                "breaker_max_cool_down",
                "is shorter than breaker_cool_down",
            ));
        }
        if self.min_idle > self.pool_size {
            return Err(ConfigError::invalid(
                "min_idle",
                format!(
                    "{} is more than pool_size ({})",
                    self.min_idle, self.pool_size
                ),
            ));
        }
        // The pool preallocates a slot per connection: refuse absurd sizes
        // here rather than abort in `Store::new`. `pool_size * 2` overflowed
        // (found by the `config` fuzz target).
        if self.pool_size > MAX_POOL_SIZE {
            return Err(ConfigError::invalid(
                "pool_size",
                format!("{} is more than {MAX_POOL_SIZE}", self.pool_size),
            ));
        }
        let pool_max_size = self
            .pool_max_size
            .unwrap_or(self.pool_size.saturating_mul(2).min(MAX_POOL_SIZE));
        if pool_max_size > MAX_POOL_SIZE {
            return Err(ConfigError::invalid(
                "pool_max_size",
                format!("{pool_max_size} is more than {MAX_POOL_SIZE}"),
            ));
        }
        if pool_max_size < self.pool_size {
            return Err(ConfigError::invalid(
                "pool_max_size",
                format!(
                    "{pool_max_size} is less than pool_size ({})",
                    self.pool_size
                ),
            ));
        }
        for (setting, value) in [
            ("idle_timeout", self.idle_timeout),
            ("connect_timeout", self.connect_timeout),
            ("acquire_timeout", self.acquire_timeout),
            ("statement_timeout", self.statement_timeout),
            ("query_timeout", self.query_timeout),
            ("keepalive_idle", self.keepalive_idle),
            ("lifetime", self.lifetime),
            ("prune_interval", self.prune_interval),
            ("health_check_interval", self.health_check_interval),
            ("breaker_cool_down", self.breaker_cool_down),
        ] {
            if value.is_zero() {
                return Err(ConfigError::invalid(setting, "must be more than zero"));
            }
        }
        let schema =
            Identifier::new(&self.schema).map_err(|r| ConfigError::invalid("schema", r))?;
        let table = Identifier::new(&self.table).map_err(|r| ConfigError::invalid("table", r))?;

        for pg in std::iter::once(&mut pg).chain(per_host.iter_mut()) {
            pg.connect_timeout(self.connect_timeout);
            pg.keepalives(true);
            pg.keepalives_idle(self.keepalive_idle);
            if pg.get_application_name().is_none() {
                pg.application_name("pgsession");
            }
        }

        Ok(Config {
            pg,
            per_host,
            tls,
            pool_size: self.pool_size,
            pool_max_size,
            min_idle: self.min_idle,
            idle_timeout: self.idle_timeout,
            connect_timeout: self.connect_timeout,
            acquire_timeout: self.acquire_timeout,
            statement_timeout: self.statement_timeout,
            query_timeout: self.query_timeout,
            max_uses: self.max_uses,
            keepalive_idle: self.keepalive_idle,
            startup_retries: self.startup_retries,
            startup_backoff: self.startup_backoff,
            schema,
            table,
            create_table: self.create_table,
            lifetime: self.lifetime,
            prune_interval: self.prune_interval,
            prune_batch_size: self.prune_batch_size,
            pooler: self.pooler,
            max_session_bytes: self.max_session_bytes,
            health_check_interval: self.health_check_interval,
            slow_check_threshold: self.slow_check_threshold,
            breaker_threshold: self.breaker_threshold,
            breaker_cool_down: self.breaker_cool_down,
            breaker_max_cool_down: self.breaker_max_cool_down,
            cache_max_entries: self.cache_max_entries,
            cache_max_bytes: self.cache_max_bytes,
            journal_max_bytes: self.journal_max_bytes,
            journal_dir: self.journal_dir,
            fallback: self.fallback,
        })
    }
}

/// The largest pool accepted: far more connections than a session store
/// needs, or than most servers allow.
const MAX_POOL_SIZE: usize = 10_000;

/// The longest duration accepted from text: far beyond any sensible
/// setting, and short enough that sums and multiples of settings cannot
/// overflow.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

fn positive(setting: &str, value: usize) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(ConfigError::invalid(setting, "must be at least 1"));
    }
    Ok(())
}

fn parse_count(setting: &str, value: &str) -> Result<usize, ConfigError> {
    value.replace('_', "").parse().map_err(|_| {
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
