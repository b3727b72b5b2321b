//! Owns [`TestCluster`]: a throwaway PostgreSQL cluster on a loopback port, with its own data
//! directory, that tests can stop, kill, start again and restart, and that is torn down on drop.
//!
//! `initdb` runs once per process into a template directory; each cluster is a `cp -a` copy of
//! it, which makes a start take well under a second. Clusters live in `/dev/shm` when it has room
//! (see [`base_dir`]), and directories left by killed test processes are swept on the next run
//! (with any server or PgBouncer still running in them).
//!
//! A cluster can also be a streaming standby of another ([`TestCluster::start_standby`]): its data
//! directory then comes from `pg_basebackup -R` instead of the template.

use std::{
    env, fs,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    os::unix::fs::{chown, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::Command as StdCommand,
};

use tempfile::TempDir;
use tokio::sync::{Mutex, OnceCell};

use crate::server::{run, Binaries, StopMode};
use crate::{db::connect, db::quote_ident, Result, TestkitError};

/// The only address clusters listen on.
pub(crate) const HOST: &str = "127.0.0.1";
/// Prefix of every directory the testkit creates in the temp dir, followed by the owner's pid.
const DIR_PREFIX: &str = "pgsession-testkit-";
/// How often a first start is retried when another process grabbed the chosen port.
pub(crate) const PORT_ATTEMPTS: usize = 5;
/// Overrides where clusters are created (see [`base_dir`]).
const DIR_ENV: &str = "PGSESSION_TESTKIT_DIR";
/// RAM-backed directory preferred for clusters when it has this much room.
const SHM_DIR: &str = "/dev/shm";
const SHM_MIN_FREE_KIB: u64 = 2 * 1024 * 1024;
/// The pid file a [`crate::PgBouncer`] writes in its directory, so that a sweep can stop it.
pub(crate) const PGBOUNCER_PID_FILE: &str = "pgbouncer.pid";

/// How to set up a [`TestCluster`]. `ClusterOptions::default()` is a plain server.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Extra `postgresql.conf` lines, e.g. `"ssl = on"` or
    /// `"shared_preload_libraries = 'pg_stat_statements'"`. They come last, so they win.
    pub config: Vec<String>,
    /// Sets `max_connections`.
    pub max_connections: Option<u32>,
    /// Files written into the data directory before the first start, as
    /// `(path relative to the data dir, contents, unix mode)`, e.g. a TLS certificate and key.
    pub files: Vec<(String, Vec<u8>, u32)>,
    /// Sets `log_statement = 'all'`, so a test can count statements in [`TestCluster::read_log`].
    pub log_statements: bool,
}

/// The initdb'd data directory every cluster of this process is copied from.
#[derive(Debug)]
pub(crate) struct Template {
    /// Lives as long as the process; [`sweep_stale_dirs`] removes it after the process is gone.
    _dir: TempDir,
    /// Where the template and the clusters live.
    pub(crate) base: PathBuf,
    data: PathBuf,
    /// The server programs, and the user they run as.
    bin: Binaries,
    /// `Some((uid, gid))` of the `postgres` user when we run as root and must drop privileges.
    pub(crate) owner: Option<(u32, u32)>,
}

impl Template {
    /// A new directory for a cluster (or a pooler) of this process, owned by the user that runs
    /// the servers. `kind` (empty, or ending with `-`, so that [`sweep_stale_dirs`] still finds
    /// the pid after the prefix) ends up in its name.
    pub(crate) fn new_dir(&self, kind: &str) -> Result<TempDir> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{}-{kind}", std::process::id()))
            .tempdir_in(&self.base)
            .map_err(TestkitError::io("creating a testkit directory"))?;
        if let Some((uid, gid)) = self.owner {
            chown(dir.path(), Some(uid), Some(gid))
                .map_err(TestkitError::io("handing a testkit directory to postgres"))?;
        }
        Ok(dir)
    }
}

/// The template of this process, made on first use: where throwaway servers live and which user
/// runs them.
pub(crate) async fn template() -> Result<&'static Template> {
    TEMPLATE.get_or_try_init(init_template).await
}

static TEMPLATE: OnceCell<Template> = OnceCell::const_new();

/// A throwaway PostgreSQL cluster listening on `127.0.0.1` with trust authentication for the
/// `postgres` user. Dropping it kills the server (`-m immediate`) and deletes its directory,
/// also when a test panics.
#[derive(Debug)]
pub struct TestCluster {
    template: &'static Template,
    /// Holds the data dir, unix socket and log; removed after `Drop::drop` stopped the server.
    dir: TempDir,
    data_dir: PathBuf,
    log_path: PathBuf,
    port: u16,
    /// Serialises start and stop.
    lifecycle: Mutex<()>,
}

impl TestCluster {
    /// Starts a cluster with default options.
    pub async fn start() -> Result<Self> {
        Self::start_with(ClusterOptions::default()).await
    }

    /// Starts a cluster set up as `options` says, on a free port.
    pub async fn start_with(options: ClusterOptions) -> Result<Self> {
        let template = template().await?;
        let dir = template.new_dir("")?;
        let data_dir = dir.path().join("data");
        let mut cp = StdCommand::new("cp");
        cp.arg("-a").arg(&template.data).arg(&data_dir);
        run(cp).await?;
        let cluster = TestCluster::in_dir(template, dir);
        cluster.write_files(&options.files)?;
        cluster.start_on_free_port(&options).await
    }

    /// Starts a streaming standby of `primary`, on a free port: its data directory is a
    /// `pg_basebackup -R -X stream` of the running primary, and it streams from it as
    /// `application_name` (the name `synchronous_standby_names` on the primary refers to).
    ///
    /// The standby inherits the primary's `postgresql.conf`; `options.config` comes after it
    /// (e.g. `synchronous_standby_names = ''`, so that a promoted standby does not wait for a
    /// standby of its own). `options.files` are written after the base backup.
    pub async fn start_standby(
        primary: &TestCluster,
        application_name: &str,
        options: ClusterOptions,
    ) -> Result<Self> {
        let template = primary.template;
        let dir = template.new_dir("standby-")?;
        let data_dir = dir.path().join("data");
        let mut basebackup = template.bin.command(template.bin.tool("pg_basebackup")?);
        basebackup
            .args([
                "-h",
                HOST,
                "-p",
                &primary.port.to_string(),
                "-U",
                "postgres",
            ])
            .args(["-X", "stream", "-c", "fast", "--no-sync", "-R", "-D"])
            .arg(&data_dir)
            .current_dir(dir.path());
        run(basebackup).await?;
        // `-R` wrote a primary_conninfo of its own into postgresql.auto.conf, which is read after
        // postgresql.conf: this one, appended to the same file, wins.
        let auto_conf = data_dir.join("postgresql.auto.conf");
        let conninfo = format!(
            "\n# pgsession-testkit standby\nprimary_conninfo = 'host={HOST} port={} user=postgres \
             application_name={application_name}'\n",
            primary.port
        );
        let mut file = fs::OpenOptions::new()
            .append(true)
            .open(&auto_conf)
            .map_err(TestkitError::io(format!("opening {}", auto_conf.display())))?;
        std::io::Write::write_all(&mut file, conninfo.as_bytes())
            .map_err(TestkitError::io(format!("writing {}", auto_conf.display())))?;
        let cluster = TestCluster::in_dir(template, dir);
        cluster.write_files(&options.files)?;
        cluster.start_on_free_port(&options).await
    }

    /// A cluster whose data directory is (to be) `dir/data`; not started.
    fn in_dir(template: &'static Template, dir: TempDir) -> Self {
        TestCluster {
            template,
            log_path: dir.path().join("postgres.log"),
            data_dir: dir.path().join("data"),
            dir,
            port: 0,
            lifecycle: Mutex::new(()),
        }
    }

    async fn start_on_free_port(mut self, options: &ClusterOptions) -> Result<Self> {
        let conf_path = self.data_dir.join("postgresql.conf");
        let base_conf = fs::read_to_string(&conf_path)
            .map_err(TestkitError::io(format!("reading {}", conf_path.display())))?;
        let mut attempt = 1;
        loop {
            self.port = free_port()?;
            let conf = format!(
                "{base_conf}\n# pgsession-testkit\n{}",
                self.settings(options)
            );
            fs::write(&conf_path, conf)
                .map_err(TestkitError::io(format!("writing {}", conf_path.display())))?;
            match self.pg_ctl_start().await {
                Err(TestkitError::Start { log, .. })
                    if attempt < PORT_ATTEMPTS && log.contains("Address already in use") =>
                {
                    attempt += 1;
                }
                result => return result.map(|()| self),
            }
        }
    }

    fn settings(&self, options: &ClusterOptions) -> String {
        let mut lines = vec![
            format!("listen_addresses = '{HOST}'"),
            format!("port = {}", self.port),
            format!("unix_socket_directories = '{}'", self.dir.path().display()),
            "fsync = off".to_owned(),
            "synchronous_commit = off".to_owned(),
            "full_page_writes = off".to_owned(),
        ];
        if let Some(max) = options.max_connections {
            lines.push(format!("max_connections = {max}"));
        }
        if options.log_statements {
            lines.push("log_statement = 'all'".to_owned());
        }
        lines.extend(options.config.iter().cloned());
        lines.join("\n") + "\n"
    }

    fn write_files(&self, files: &[(String, Vec<u8>, u32)]) -> Result<()> {
        let owner = self.template.owner;
        for (relative, contents, mode) in files {
            let path = self.data_dir.join(relative);
            let io = || TestkitError::io(format!("writing {}", path.display()));
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).map_err(io())?;
            }
            fs::write(&path, contents).map_err(io())?;
            fs::set_permissions(&path, fs::Permissions::from_mode(*mode)).map_err(io())?;
            if let Some((uid, gid)) = owner {
                // The file and any directory created for it belong to postgres.
                for p in path.ancestors().take_while(|p| *p != self.data_dir) {
                    chown(p, Some(uid), Some(gid)).map_err(io())?;
                }
            }
        }
        Ok(())
    }

    /// Always `"127.0.0.1"`.
    pub fn host(&self) -> &str {
        HOST
    }

    /// The TCP port the server listens on; it stays the same across restarts.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's socket address, e.g. as the upstream of a [`crate::FaultProxy`].
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// `postgres://postgres@127.0.0.1:{port}/{database}`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@{HOST}:{}/{database}", self.port)
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server log file (stderr of the postmaster).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The server log so far.
    pub fn read_log(&self) -> Result<String> {
        let bytes = fs::read(&self.log_path).map_err(TestkitError::io(format!(
            "reading {}",
            self.log_path.display()
        )))?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Creates database `name` (connecting to the `postgres` database).
    pub async fn create_database(&self, name: &str) -> Result<()> {
        let client = connect(&self.url("postgres")).await?;
        client
            .batch_execute(&format!("CREATE DATABASE {}", quote_ident(name)))
            .await
            .map_err(TestkitError::pg(format!("creating database {name}")))
    }

    /// Whether the server is running (`pg_ctl status`).
    pub fn is_running(&self) -> bool {
        self.template.bin.is_running(&self.data_dir)
    }

    /// Stops the server cleanly (`pg_ctl stop -m fast`) and waits until it is gone.
    /// Does nothing if it is not running.
    pub async fn stop(&self) -> Result<()> {
        self.pg_ctl_stop(StopMode::Fast).await
    }

    /// Kills the server (`pg_ctl stop -m immediate`: no shutdown checkpoint, crash recovery on
    /// the next start) and waits until it is gone. Does nothing if it is not running.
    pub async fn kill(&self) -> Result<()> {
        self.pg_ctl_stop(StopMode::Immediate).await
    }

    /// Starts a stopped server again, with the same data dir and port.
    pub async fn start_again(&self) -> Result<()> {
        let _guard = self.lifecycle.lock().await;
        self.pg_ctl_start().await
    }

    /// [`stop`](Self::stop) then [`start_again`](Self::start_again).
    pub async fn restart(&self) -> Result<()> {
        self.stop().await?;
        self.start_again().await
    }

    /// Promotes a standby to a primary (`pg_ctl promote -w`): returns once it accepts writes.
    pub async fn promote(&self) -> Result<()> {
        let _guard = self.lifecycle.lock().await;
        self.template.bin.promote(&self.data_dir).await
    }

    fn pid_file(&self) -> PathBuf {
        self.data_dir.join("postmaster.pid")
    }

    async fn pg_ctl_start(&self) -> Result<()> {
        let bin = &self.template.bin;
        bin.start(&self.data_dir, &self.log_path, self.port).await
    }

    async fn pg_ctl_stop(&self, mode: StopMode) -> Result<()> {
        let _guard = self.lifecycle.lock().await;
        self.template.bin.stop(&self.data_dir, mode).await
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let pid_file = self.pid_file();
        if !pid_file.exists() {
            return;
        }
        let stopped = self
            .template
            .bin
            .stop_blocking(&self.data_dir, StopMode::Immediate, "10");
        if !stopped {
            // The first line of postmaster.pid is the postmaster's pid; its children exit when
            // they notice it is gone.
            let pid = fs::read_to_string(&pid_file).unwrap_or_default();
            if let Some(pid) = pid.lines().next().filter(|p| p.parse::<u32>().is_ok()) {
                tracing::warn!(pid, "pg_ctl stop failed; killing the postmaster");
                let _ = StdCommand::new("kill").args(["-KILL", pid]).status();
            }
        }
        // `self.dir` is removed when the fields are dropped, right after this.
    }
}

/// Runs `initdb` once for this process.
async fn init_template() -> Result<Template> {
    let bin = Binaries::find()?;
    let base = base_dir();
    let dir = tempfile::Builder::new()
        .prefix(&format!("{DIR_PREFIX}{}-template-", std::process::id()))
        .tempdir_in(&base)
        .map_err(TestkitError::io("creating the template directory"))?;
    let metadata = |path: &Path| {
        fs::metadata(path).map_err(TestkitError::io(format!("reading {}", path.display())))
    };
    // PostgreSQL refuses to run as root: then everything runs as (and belongs to) `postgres`.
    bin.hand_over(dir.path()).await?;
    let owner = bin
        .as_root()
        .then(|| metadata(dir.path()).map(|m| (m.uid(), m.gid())))
        .transpose()?;
    sweep_stale_dirs(&base, &bin);

    let data = dir.path().join("data");
    bin.initdb(&data, &["--no-sync"]).await?;
    Ok(Template {
        _dir: dir,
        base,
        data,
        bin,
        owner,
    })
}

/// Where clusters are created: `$PGSESSION_TESTKIT_DIR` if set; else `/dev/shm` when it has
/// 2 GiB free, because a cluster is ~1000 files and creating files on disk can cost a
/// millisecond each; else the system temp dir.
fn base_dir() -> PathBuf {
    if let Some(dir) = env::var_os(DIR_ENV).filter(|dir| !dir.is_empty()) {
        return dir.into();
    }
    let shm_free_kib = || {
        let output = StdCommand::new("df").args(["-Pk", SHM_DIR]).output().ok()?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        stdout
            .lines()
            .nth(1)?
            .split_whitespace()
            .nth(3)?
            .parse::<u64>()
            .ok()
    };
    if Path::new(SHM_DIR).is_dir() && shm_free_kib().is_some_and(|free| free >= SHM_MIN_FREE_KIB) {
        SHM_DIR.into()
    } else {
        env::temp_dir()
    }
}

/// Removes directories left behind by test processes that no longer exist (the template, and
/// clusters of a run that was killed before `Drop` ran), stopping any postgres still using them.
fn sweep_stale_dirs(base: &Path, bin: &Binaries) {
    if !Path::new("/proc/self").exists() {
        return; // No cheap way to tell whether the owning process is alive.
    }
    let bases = [base.to_owned(), env::temp_dir(), SHM_DIR.into()];
    for entry in bases
        .iter()
        .filter_map(|base| fs::read_dir(base).ok())
        .flatten()
        .flatten()
    {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|name| name.strip_prefix(DIR_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        stop_stale_pgbouncer(&entry.path().join(PGBOUNCER_PID_FILE));
        bin.stop_blocking(&entry.path().join("data"), StopMode::Immediate, "10");
        tracing::debug!(path = %entry.path().display(), "removing stale testkit directory");
        let _ = fs::remove_dir_all(entry.path());
    }
}

/// Kills the PgBouncer whose pid file this is, if it still runs.
fn stop_stale_pgbouncer(pid_file: &Path) {
    let Ok(pid) = fs::read_to_string(pid_file) else {
        return;
    };
    let pid = pid.trim();
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if pid.parse::<u32>().is_ok() && comm.trim() == "pgbouncer" {
        tracing::debug!(pid, "killing a stale PgBouncer");
        let _ = StdCommand::new("kill").args(["-KILL", pid]).status();
    }
}

/// A port that was free a moment ago.
pub(crate) fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map_err(TestkitError::io("finding a free port"))?;
    Ok(listener.port())
}
