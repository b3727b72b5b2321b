//! Owns [`PgBouncer`]: the installed `pgbouncer` (Debian's package) started on a free loopback
//! port in front of a server, in transaction mode unless told otherwise, with a configuration
//! of its own in a temporary directory. Tests can stop, kill and restart it; dropping it kills it.
//!
//! PgBouncer refuses to run as root: when we are root it runs as the `postgres` user, like the
//! clusters. Its directory is swept like a cluster's when a test process dies without dropping
//! it (the sweep kills the PgBouncer named in its pid file).

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command as StdCommand, Stdio},
    time::{Duration, Instant},
};

use tempfile::TempDir;
use tokio::sync::Mutex;

use crate::{
    cluster::{free_port, template, HOST, PGBOUNCER_PID_FILE, PORT_ATTEMPTS},
    Result, TestkitError,
};

/// How long a start may take before it is given up.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stop may take before the process is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Where `pgbouncer` is looked for after `PATH` (Debian installs it in `/usr/sbin`).
const SBIN_DIRS: &[&str] = &["/usr/sbin", "/usr/local/sbin", "/usr/local/bin", "/usr/bin"];

/// How to set up a [`PgBouncer`]. `PgBouncerOptions::default()` is a stock PgBouncer in
/// transaction mode.
#[derive(Debug, Clone)]
pub struct PgBouncerOptions {
    /// `pool_mode`: `"transaction"` by default (`"session"` and `"statement"` are the others).
    pub pool_mode: String,
    /// `ignore_startup_parameters`: the startup parameters PgBouncer drops instead of refusing
    /// the connection. Empty by default, so that a client sending the `options` parameter is
    /// refused with `unsupported startup parameter: options`, as by a stock PgBouncer; add
    /// `"options"` to have it dropped silently instead.
    pub ignore_startup_parameters: Vec<String>,
    /// `default_pool_size`: server connections per database and user. 4 by default.
    pub default_pool_size: u32,
    /// `max_client_conn`. 200 by default.
    pub max_client_conn: u32,
    /// Extra lines for the `[pgbouncer]` section, e.g. `"server_lifetime = 5"`. They come
    /// last, so they win.
    pub config: Vec<String>,
}

impl Default for PgBouncerOptions {
    fn default() -> Self {
        PgBouncerOptions {
            pool_mode: "transaction".to_owned(),
            ignore_startup_parameters: Vec::new(),
            default_pool_size: 4,
            max_client_conn: 200,
            config: Vec::new(),
        }
    }
}

/// A PgBouncer listening on `127.0.0.1` that forwards every database to one upstream server
/// (`* = host=... port=...`) as the user `postgres`, with `auth_type = trust`.
///
/// The user `postgres` is also an admin: [`PgBouncer::admin_url`] reaches the console
/// (`SHOW POOLS`, `SHOW SERVERS`, ...; simple queries only).
///
/// ```no_run
/// use pgsession_testkit::{PgBouncer, TestCluster};
///
/// # async fn demo() -> Result<(), pgsession_testkit::TestkitError> {
/// let cluster = TestCluster::start().await?;
/// let bouncer = PgBouncer::start(cluster.socket_addr()).await?;
/// let url = bouncer.url("postgres"); // what the application connects to
/// bouncer.restart().await?; // every client connection is cut; the port stays the same
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct PgBouncer {
    /// Holds the configuration, the user list, the pid file and the log.
    dir: TempDir,
    binary: PathBuf,
    /// `Some((uid, gid))` of `postgres` when we are root.
    owner: Option<(u32, u32)>,
    config_path: PathBuf,
    log_path: PathBuf,
    port: u16,
    upstream: SocketAddr,
    options: PgBouncerOptions,
    /// The running process, if any.
    child: std::sync::Mutex<Option<Child>>,
    /// Serialises start and stop.
    lifecycle: Mutex<()>,
}

impl PgBouncer {
    /// Starts a PgBouncer in transaction mode in front of `upstream` (e.g.
    /// [`TestCluster::socket_addr`](crate::TestCluster::socket_addr) or a
    /// [`FaultProxy`](crate::FaultProxy)'s address).
    pub async fn start(upstream: SocketAddr) -> Result<Self> {
        Self::start_with(upstream, PgBouncerOptions::default()).await
    }

    /// Starts a PgBouncer set up as `options` says in front of `upstream`, on a free port.
    pub async fn start_with(upstream: SocketAddr, options: PgBouncerOptions) -> Result<Self> {
        let binary = find_binary()?;
        let template = template().await?;
        let dir = template.new_dir("pgbouncer-")?;
        let userlist = dir.path().join("userlist.txt");
        fs::write(&userlist, "\"postgres\" \"\"\n")
            .map_err(TestkitError::io(format!("writing {}", userlist.display())))?;
        let mut bouncer = PgBouncer {
            binary,
            owner: template.owner,
            config_path: dir.path().join("pgbouncer.ini"),
            log_path: dir.path().join("pgbouncer.log"),
            dir,
            port: 0,
            upstream,
            options,
            child: std::sync::Mutex::new(None),
            lifecycle: Mutex::new(()),
        };
        let mut attempt = 1;
        loop {
            bouncer.port = free_port()?;
            bouncer.write_config()?;
            match bouncer.spawn().await {
                Err(TestkitError::PgBouncerStart { log, .. })
                    if attempt < PORT_ATTEMPTS && log.contains("Address already in use") =>
                {
                    attempt += 1;
                }
                result => return result.map(|()| bouncer),
            }
        }
    }

    /// The TCP port PgBouncer listens on; it stays the same across restarts.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// PgBouncer's socket address.
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The server PgBouncer forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// `postgres://postgres@127.0.0.1:{port}/{database}`: `database` on the upstream server,
    /// through PgBouncer.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@{HOST}:{}/{database}", self.port)
    }

    /// The URL of PgBouncer's admin console (the `pgbouncer` database).
    pub fn admin_url(&self) -> String {
        self.url("pgbouncer")
    }

    /// The `pgbouncer.ini` in use.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// PgBouncer's log (its stderr, across restarts).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The log so far.
    pub fn read_log(&self) -> Result<String> {
        let bytes = fs::read(&self.log_path).map_err(TestkitError::io(format!(
            "reading {}",
            self.log_path.display()
        )))?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The process id of the running PgBouncer, if it runs.
    pub fn pid(&self) -> Option<u32> {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let running = child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)));
        running.then(|| child.as_ref().map(Child::id)).flatten()
    }

    /// Whether PgBouncer runs.
    pub fn is_running(&self) -> bool {
        self.pid().is_some()
    }

    /// Shuts PgBouncer down (SIGTERM: an immediate shutdown, which closes every client and
    /// server connection at once) and waits until it is gone. Does nothing if it is not running.
    pub async fn stop(&self) -> Result<()> {
        let _guard = self.lifecycle.lock().await;
        self.terminate("-TERM").await
    }

    /// Kills PgBouncer (SIGKILL) and waits until it is gone. Does nothing if it is not running.
    pub async fn kill(&self) -> Result<()> {
        let _guard = self.lifecycle.lock().await;
        self.terminate("-KILL").await
    }

    /// Starts a stopped PgBouncer again, on the same port. Does nothing if it runs.
    pub async fn start_again(&self) -> Result<()> {
        let _guard = self.lifecycle.lock().await;
        if self.is_running() {
            return Ok(());
        }
        self.spawn().await
    }

    /// [`stop`](Self::stop) then [`start_again`](Self::start_again): every client connection is
    /// cut, and new ones are accepted again on the same port.
    pub async fn restart(&self) -> Result<()> {
        self.stop().await?;
        self.start_again().await
    }

    fn write_config(&self) -> Result<()> {
        let o = &self.options;
        let dir = self.dir.path();
        let mut lines = vec![
            "[databases]".to_owned(),
            format!(
                "* = host={} port={} user=postgres",
                self.upstream.ip(),
                self.upstream.port()
            ),
            String::new(),
            "[pgbouncer]".to_owned(),
            format!("listen_addr = {HOST}"),
            format!("listen_port = {}", self.port),
            "unix_socket_dir =".to_owned(),
            format!("pidfile = {}", dir.join(PGBOUNCER_PID_FILE).display()),
            "auth_type = trust".to_owned(),
            format!("auth_file = {}", dir.join("userlist.txt").display()),
            "admin_users = postgres".to_owned(),
            "stats_users = postgres".to_owned(),
            format!("pool_mode = {}", o.pool_mode),
            format!("default_pool_size = {}", o.default_pool_size),
            format!("max_client_conn = {}", o.max_client_conn),
            format!(
                "ignore_startup_parameters = {}",
                o.ignore_startup_parameters.join(",")
            ),
            // The defaults (15 s after a failed server login, 15 s to connect) would make a
            // restarted upstream look away for far longer than it is.
            "server_login_retry = 1".to_owned(),
            "server_connect_timeout = 5".to_owned(),
        ];
        lines.extend(o.config.iter().cloned());
        let text = lines.join("\n") + "\n";
        fs::write(&self.config_path, text).map_err(TestkitError::io(format!(
            "writing {}",
            self.config_path.display()
        )))
    }

    /// Starts the process and waits until it accepts connections.
    async fn spawn(&self) -> Result<()> {
        let log_offset = fs::metadata(&self.log_path).map_or(0, |m| m.len() as usize);
        let log = || {
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log_path)
                .map_err(TestkitError::io(format!(
                    "opening {}",
                    self.log_path.display()
                )))
        };
        let mut command = StdCommand::new(&self.binary);
        command
            .arg(&self.config_path)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log()?)
            .stderr(log()?);
        if let Some((uid, gid)) = self.owner {
            // PgBouncer refuses to run as root.
            command.uid(uid).gid(gid);
        }
        let child = command.spawn().map_err(TestkitError::io(format!(
            "running {}",
            self.binary.display()
        )))?;
        *self.child.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);

        let failed = |reason: &str| {
            let log = fs::read(&self.log_path).unwrap_or_default();
            TestkitError::PgBouncerStart {
                port: self.port,
                reason: reason.to_owned(),
                log: String::from_utf8_lossy(log.get(log_offset..).unwrap_or_default())
                    .into_owned(),
            }
        };
        let started = Instant::now();
        loop {
            let exited = {
                let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
                match child.as_mut().map(Child::try_wait) {
                    Some(Ok(Some(status))) => {
                        *child = None;
                        Some(status.to_string())
                    }
                    _ => None,
                }
            };
            if let Some(status) = exited {
                return Err(failed(&format!("it exited ({status})")));
            }
            let connect = tokio::net::TcpStream::connect(self.socket_addr());
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), connect).await {
                return Ok(());
            }
            if started.elapsed() > START_TIMEOUT {
                let _ = self.terminate("-KILL").await;
                return Err(failed(&format!(
                    "it did not accept connections within {START_TIMEOUT:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends `signal` to the process and waits for it to exit (killing it after
    /// [`STOP_TIMEOUT`]).
    async fn terminate(&self, signal: &str) -> Result<()> {
        let Some(mut child) = self.child.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return Ok(());
        };
        if matches!(child.try_wait(), Ok(Some(_))) {
            return Ok(());
        }
        let sent = StdCommand::new("kill")
            .args([signal, &child.id().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let deadline = Instant::now() + STOP_TIMEOUT;
        while sent && Instant::now() < deadline {
            match child.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(e) => return Err(TestkitError::io("waiting for PgBouncer")(e)),
            }
        }
        tracing::warn!(pid = child.id(), "PgBouncer did not stop; killing it");
        child
            .kill()
            .and_then(|()| child.wait().map(drop))
            .map_err(TestkitError::io("killing PgBouncer"))
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(mut child) = child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // `self.dir` is removed when the fields are dropped, right after this.
    }
}

/// `pgbouncer` on `PATH`, else in the usual system directories.
fn find_binary() -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SBIN_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join("pgbouncer"))
        .find(|candidate| candidate.is_file())
        .ok_or(TestkitError::PgBouncerNotFound)
}
