//! Owns [`Binaries`]: the installed PostgreSQL server programs (`initdb`, `pg_ctl`, ...) and the
//! user that runs them. The test kit's clusters are made with it, and so is the PostgreSQL that
//! `pgsession serve` runs for itself when no `DATABASE_URL` is given: one way to find the
//! binaries, to run `initdb`, and to start, stop and ask after a server.
//!
//! PostgreSQL refuses to run as root. As root, every program runs as the `postgres` user through
//! `runuser -u postgres --`, and the directories it writes must belong to that user
//! ([`Binaries::hand_over`]) and be reachable by it (no private parent directory).

use std::{
    env,
    ffi::OsStr,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Command as StdCommand, Output, Stdio},
};

use crate::{Result, TestkitError};

/// Seconds `pg_ctl -w` waits for a start or a stop.
pub const PG_CTL_TIMEOUT: &str = "30";

/// The arguments every cluster is made with: trust authentication for the `postgres` user
/// (loopback only: the servers listen on 127.0.0.1), UTF-8, the C locale.
const INITDB_ARGS: [&str; 7] = ["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C"];

/// How `pg_ctl stop` ends a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// `-m fast`: sessions are disconnected, then a shutdown checkpoint.
    Fast,
    /// `-m immediate`: no checkpoint; crash recovery on the next start.
    Immediate,
}

impl StopMode {
    fn as_str(self) -> &'static str {
        match self {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        }
    }
}

/// The PostgreSQL server programs found on this machine, and whether they must run as the
/// `postgres` user (when this process is root).
#[derive(Debug, Clone)]
pub struct Binaries {
    bindir: PathBuf,
    as_root: bool,
}

impl Binaries {
    /// The first directory of `PATH` holding both `initdb` and `pg_ctl`, else
    /// `pg_config --bindir`; [`TestkitError::BinariesNotFound`] when neither has them.
    pub fn find() -> Result<Binaries> {
        let has_binaries =
            |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
        let on_path =
            env::var_os("PATH").and_then(|path| env::split_paths(&path).find(|d| has_binaries(d)));
        let from_pg_config = || {
            let output = StdCommand::new("pg_config")
                .arg("--bindir")
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output()
                .ok()?;
            let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
            (output.status.success() && has_binaries(&dir)).then_some(dir)
        };
        let bindir = on_path
            .or_else(from_pg_config)
            .ok_or(TestkitError::BinariesNotFound)?;
        Ok(Binaries {
            bindir,
            as_root: running_as_root(),
        })
    }

    /// The directory `initdb` and `pg_ctl` were found in.
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// Whether this process is root, so that the servers run as `postgres`.
    pub fn as_root(&self) -> bool {
        self.as_root
    }

    /// `program` (a path, or a name looked up on `PATH`), run as the user that runs the servers.
    pub fn command(&self, program: impl AsRef<OsStr>) -> StdCommand {
        if self.as_root {
            let mut command = StdCommand::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            StdCommand::new(program)
        }
    }

    /// Another server program, e.g. `pg_basebackup`: beside the real `pg_ctl` (`PATH` may hold
    /// a symbolic link to it alone), beside the `pg_ctl` found, or in `pg_config --bindir`.
    pub fn tool(&self, name: &str) -> Result<PathBuf> {
        let pg_ctl = self.bindir.join("pg_ctl");
        let real_bindir = fs::canonicalize(&pg_ctl)
            .ok()
            .and_then(|p| p.parent().map(Path::to_owned));
        let pg_config_bindir = || {
            let output = StdCommand::new("pg_config").arg("--bindir").output().ok()?;
            output
                .status
                .success()
                .then(|| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()))
        };
        real_bindir
            .into_iter()
            .chain(std::iter::once(self.bindir.clone()))
            .chain(std::iter::once_with(pg_config_bindir).flatten())
            .map(|dir| dir.join(name))
            .find(|path| path.is_file())
            .ok_or_else(|| TestkitError::Command {
                command: name.to_owned(),
                status: "not found".to_owned(),
                output: format!("looked beside {}", pg_ctl.display()),
            })
    }

    /// Gives `dir` to the `postgres` user when we are root (`chown postgres: dir`); does
    /// nothing otherwise.
    pub async fn hand_over(&self, dir: &Path) -> Result<()> {
        if self.as_root {
            let mut chown = StdCommand::new("chown");
            chown.arg("postgres:").arg(dir);
            run(chown).await?;
        }
        Ok(())
    }

    /// Whether the server user passes `test ARGS` (e.g. `-w DIR`: it may write there, which
    /// also means it can reach it through every parent directory).
    pub async fn server_user_passes(&self, test_args: &[&OsStr]) -> bool {
        let mut test = self.command("test");
        test.args(test_args);
        output(test).await.is_ok_and(|o| o.status.success())
    }

    /// Makes a cluster in `data` (which must not exist, or be empty): `initdb` with the common
    /// arguments, then `extra_args` (e.g. `--no-sync`).
    pub async fn initdb(&self, data: &Path, extra_args: &[&str]) -> Result<()> {
        let mut initdb = self.server_program("initdb", data);
        initdb
            .arg("-D")
            .arg(data)
            .args(INITDB_ARGS)
            .args(extra_args);
        run(initdb).await.map(drop)
    }

    /// Starts the server of `data` on `port` (`pg_ctl start -w`), its output appended to `log`.
    /// Fails with [`TestkitError::Start`], holding what the server logged during this attempt.
    pub async fn start(&self, data: &Path, log: &Path, port: u16) -> Result<()> {
        let log_offset = fs::metadata(log).map_or(0, |m| m.len() as usize);
        let mut pg_ctl = self.server_program("pg_ctl", data);
        pg_ctl
            .args(["start", "-w", "-t", PG_CTL_TIMEOUT, "-D"])
            .arg(data)
            .arg("-l")
            .arg(log)
            .arg("-o")
            .arg(format!("-p {port}"));
        let output = output(pg_ctl).await?;
        if output.status.success() {
            return Ok(());
        }
        let logged = fs::read(log).unwrap_or_default();
        Err(TestkitError::Start {
            port,
            data_dir: data.to_owned(),
            output: describe_output(&output),
            log: String::from_utf8_lossy(logged.get(log_offset..).unwrap_or_default()).into_owned(),
        })
    }

    /// Stops the server of `data` and waits until it is gone; does nothing when it is not
    /// running (no `postmaster.pid`).
    pub async fn stop(&self, data: &Path, mode: StopMode) -> Result<()> {
        if !data.join("postmaster.pid").exists() {
            return Ok(());
        }
        run(self.pg_ctl_stop(data, mode, PG_CTL_TIMEOUT))
            .await
            .map(drop)
    }

    /// [`Binaries::stop`] for `Drop`: blocks, waits at most `timeout_secs`, and says whether
    /// the server is stopped.
    pub fn stop_blocking(&self, data: &Path, mode: StopMode, timeout_secs: &str) -> bool {
        if !data.join("postmaster.pid").exists() {
            return true;
        }
        self.pg_ctl_stop(data, mode, timeout_secs)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }

    /// `pg_ctl promote -w`: returns once the standby of `data` accepts writes.
    pub async fn promote(&self, data: &Path) -> Result<()> {
        let mut pg_ctl = self.server_program("pg_ctl", data);
        pg_ctl
            .args(["promote", "-w", "-t", PG_CTL_TIMEOUT, "-D"])
            .arg(data);
        run(pg_ctl).await.map(drop)
    }

    /// Whether the server of `data` runs (`pg_ctl status`).
    pub fn is_running(&self, data: &Path) -> bool {
        self.server_program("pg_ctl", data)
            .arg("status")
            .arg("-D")
            .arg(data)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }

    /// The port of the server running in `data` (from its `postmaster.pid`), if one runs.
    pub fn running_port(&self, data: &Path) -> Option<u16> {
        if !self.is_running(data) {
            return None;
        }
        // postmaster.pid: pid, data directory, start time, port, ...
        let pid_file = fs::read_to_string(data.join("postmaster.pid")).ok()?;
        pid_file.lines().nth(3)?.trim().parse().ok()
    }

    fn pg_ctl_stop(&self, data: &Path, mode: StopMode, timeout_secs: &str) -> StdCommand {
        let mut pg_ctl = self.server_program("pg_ctl", data);
        pg_ctl
            .args(["stop", "-w", "-t", timeout_secs, "-m", mode.as_str(), "-D"])
            .arg(data);
        pg_ctl
    }

    /// A program of the bindir, run as the server user from the directory holding `data` (the
    /// server user may not be able to enter ours).
    fn server_program(&self, name: &str, data: &Path) -> StdCommand {
        let mut command = self.command(self.bindir.join(name));
        if let Some(parent) = data.parent().filter(|p| !p.as_os_str().is_empty()) {
            command.current_dir(parent);
        }
        command
    }
}

/// Whether this process runs as root (PostgreSQL then needs another user).
fn running_as_root() -> bool {
    // `/proc/self` belongs to the process's effective user.
    match fs::metadata("/proc/self") {
        Ok(meta) => meta.uid() == 0,
        Err(_) => StdCommand::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0"),
    }
}

/// Runs `command` with no input and collects its output, whatever its exit status.
pub(crate) async fn output(mut command: StdCommand) -> Result<Output> {
    let description = format!("{command:?}");
    command.stdin(Stdio::null());
    tokio::process::Command::from(command)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(TestkitError::io(format!("running {description}")))
}

/// Runs `command`, failing unless it exits successfully.
pub(crate) async fn run(command: StdCommand) -> Result<Output> {
    let description = format!("{command:?}");
    let output = output(command).await?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(TestkitError::Command {
            command: description,
            status: output.status.to_string(),
            output: describe_output(&output),
        })
    }
}

/// A command's stdout and stderr, trimmed.
pub(crate) fn describe_output(output: &Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    format!("{}\n{}", stdout.trim(), stderr.trim())
        .trim()
        .to_owned()
}
