//! The PostgreSQL that `pgsession serve` runs for itself when no
//! `DATABASE_URL` is given: made from the installed server binaries (on
//! `PATH`, or in `pg_config --bindir`), with its data in a directory of its
//! own (`./.pgsession/` by default), kept from one run to the next.
//!
//! The first run makes the cluster (`initdb`, trust authentication for the
//! `postgres` user, listening on 127.0.0.1 only, no Unix socket) and picks a
//! port (54329 when free, else any free one), saved in `<dir>/port`. Later
//! runs reuse both. The server is stopped when `serve` stops; a server
//! already running in the directory (left by a run that was killed) is used
//! as it is and left running.
//!
//! Trust authentication means any local user can connect to this server as
//! its superuser: it is meant for trying pgsession out on one's own machine,
//! not for shared hosts (set `DATABASE_URL` there).
//!
//! PostgreSQL refuses to run as root: as root, `initdb` and `pg_ctl` run as
//! the `postgres` user through `runuser -u postgres --`, and the directory
//! is handed to that user.

use std::ffi::OsStr;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use anyhow::{bail, Context as _};

/// The port tried first for a new cluster.
pub(crate) const DEFAULT_PORT: u16 = 54329;
/// Seconds `pg_ctl -w` waits for a start or a stop.
const PG_CTL_WAIT: &str = "60";

/// A PostgreSQL server running from a data directory of `serve`'s.
#[derive(Debug)]
pub(crate) struct EmbeddedPostgres {
    dir: PathBuf,
    data: PathBuf,
    bindir: PathBuf,
    port: u16,
    as_root: bool,
    /// Whether this process started the server (and so stops it).
    started_here: bool,
    stopped: bool,
}

/// The directory holding `initdb` and `pg_ctl`: the first directory of
/// `PATH` that has both, else `pg_config --bindir`. `None` when neither.
pub(crate) fn find_bindir() -> Option<PathBuf> {
    let has_binaries = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    let on_path = std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).find(|dir| has_binaries(dir)));
    on_path.or_else(|| {
        let output = std::process::Command::new("pg_config")
            .arg("--bindir")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        (output.status.success() && has_binaries(&dir)).then_some(dir)
    })
}

impl EmbeddedPostgres {
    /// Makes the cluster in `dir` if it is not there yet, and starts it (or
    /// finds it already running).
    pub(crate) async fn start(dir: &Path, bindir: &Path) -> anyhow::Result<EmbeddedPostgres> {
        let dir = std::path::absolute(dir)
            .with_context(|| format!("cannot resolve the data directory {}", dir.display()))?;
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create the data directory {}", dir.display()))?;
        let as_root = running_as_root();
        let mut pg = EmbeddedPostgres {
            data: dir.join("data"),
            dir,
            bindir: bindir.to_owned(),
            port: 0,
            as_root,
            started_here: false,
            stopped: false,
        };
        if as_root {
            pg.hand_to_postgres_user().await?;
        }
        if !pg.data.join("PG_VERSION").is_file() {
            pg.initdb().await?;
        }
        if let Some(port) = pg.running_port().await {
            pg.port = port;
            tracing::info!(
                data_dir = %pg.data.display(), port,
                "the embedded PostgreSQL is already running (left by an earlier run?): using it, and leaving it running"
            );
            return Ok(pg);
        }
        pg.port = pg.choose_port()?;
        pg.pg_ctl_start().await?;
        pg.started_here = true;
        Ok(pg)
    }

    /// The connection URL (trust authentication, no TLS).
    pub(crate) fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    /// The TCP port on 127.0.0.1.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the cluster, its port file and its log.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stops the server (fast shutdown: sessions are committed rows, nothing
    /// is lost) if this process started it.
    pub(crate) async fn stop(mut self) -> anyhow::Result<()> {
        self.stopped = true;
        if !self.started_here {
            return Ok(());
        }
        if !self.data.join("postmaster.pid").exists() {
            // Already stopped (a Ctrl-C on the terminal reaches it too).
            tracing::info!(data_dir = %self.data.display(), "embedded PostgreSQL already stopped");
            return Ok(());
        }
        let mut pg_ctl = self.command("pg_ctl");
        pg_ctl
            .args(["stop", "-w", "-t", PG_CTL_WAIT, "-m", "fast", "-D"])
            .arg(&self.data);
        let output = output(pg_ctl).await?;
        if !output.status.success() {
            bail!(
                "pg_ctl stop failed ({}): {}",
                output.status,
                describe(&output)
            );
        }
        tracing::info!(data_dir = %self.data.display(), "embedded PostgreSQL stopped");
        Ok(())
    }

    async fn hand_to_postgres_user(&self) -> anyhow::Result<()> {
        let owner = std::fs::metadata(&self.dir)?.uid();
        if owner == 0 {
            let mut chown = tokio::process::Command::new("chown");
            chown.arg("postgres:").arg(&self.dir);
            let output = output(chown).await?;
            if !output.status.success() {
                bail!(
                    "running as root, the data directory {} must belong to the `postgres` user, \
                     and `chown postgres: {}` failed: {}",
                    self.dir.display(),
                    self.dir.display(),
                    describe(&output)
                );
            }
        }
        // Every parent directory must be searchable by `postgres` too.
        let mut test = self.command_for("test");
        test.arg("-w").arg(&self.dir);
        let reachable = output(test).await.is_ok_and(|o| o.status.success());
        if !reachable {
            bail!(
                "running as root, PostgreSQL runs as the `postgres` user, which cannot write to {} \
                 (are its parent directories private?); pass --data-dir (PGSESSION_DATA_DIR) with a \
                 directory it can reach, or set DATABASE_URL",
                self.dir.display()
            );
        }
        Ok(())
    }

    async fn initdb(&self) -> anyhow::Result<()> {
        if self.data.exists() {
            bail!(
                "{} exists but holds no PostgreSQL cluster (an interrupted initdb?); remove it \
                 and start again",
                self.data.display()
            );
        }
        tracing::info!(data_dir = %self.data.display(), "creating the embedded PostgreSQL cluster (initdb)");
        let mut initdb = self.command("initdb");
        initdb.arg("-D").arg(&self.data).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        let output = output(initdb).await?;
        if !output.status.success() {
            bail!("initdb failed ({}): {}", output.status, describe(&output));
        }
        // Loopback only, and no Unix socket (its default directory may not
        // exist or be writable here).
        let conf = self.data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf)
            .with_context(|| format!("cannot read {}", conf.display()))?;
        text.push_str(
            "\n# Added by pgsession serve\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\n",
        );
        std::fs::write(&conf, text).with_context(|| format!("cannot write {}", conf.display()))?;
        Ok(())
    }

    /// The port of a server already running in the data directory.
    async fn running_port(&self) -> Option<u16> {
        let mut status = self.command("pg_ctl");
        status.arg("status").arg("-D").arg(&self.data);
        let running = output(status).await.is_ok_and(|o| o.status.success());
        if !running {
            return None;
        }
        // postmaster.pid: pid, data dir, start time, port, ...
        let pid_file = std::fs::read_to_string(self.data.join("postmaster.pid")).ok()?;
        pid_file.lines().nth(3)?.trim().parse().ok()
    }

    /// The saved port, or 54329, or any free port when that one is taken;
    /// saved in `<dir>/port` for the next run.
    fn choose_port(&self) -> anyhow::Result<u16> {
        let file = self.dir.join("port");
        let saved = std::fs::read_to_string(&file)
            .ok()
            .and_then(|text| text.trim().parse::<u16>().ok());
        let wanted = saved.unwrap_or(DEFAULT_PORT);
        let port = if port_is_free(wanted) {
            wanted
        } else {
            let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .and_then(|l| l.local_addr())
                .context("cannot find a free port for the embedded PostgreSQL")?
                .port();
            tracing::info!(
                wanted,
                port,
                "port taken; the embedded PostgreSQL moves to another"
            );
            port
        };
        if saved != Some(port) {
            std::fs::write(&file, format!("{port}\n"))
                .with_context(|| format!("cannot write {}", file.display()))?;
        }
        Ok(port)
    }

    async fn pg_ctl_start(&self) -> anyhow::Result<()> {
        let log = self.dir.join("postgres.log");
        let mut pg_ctl = self.command("pg_ctl");
        pg_ctl
            .args(["start", "-w", "-t", PG_CTL_WAIT, "-D"])
            .arg(&self.data)
            .arg("-l")
            .arg(&log)
            .arg("-o")
            .arg(format!("-p {}", self.port));
        let output = output(pg_ctl).await?;
        if !output.status.success() {
            let tail = std::fs::read_to_string(&log)
                .map(|text| last_lines(&text, 10))
                .unwrap_or_default();
            bail!(
                "pg_ctl start failed ({}): {}\n{} says:\n{tail}",
                output.status,
                describe(&output),
                log.display()
            );
        }
        Ok(())
    }

    /// `initdb` or `pg_ctl` from the server's directory, as `postgres` when
    /// we are root.
    fn command(&self, program: &str) -> tokio::process::Command {
        let mut command = self.as_server_user(self.bindir.join(program));
        command.current_dir(&self.dir);
        command.into()
    }

    /// Any program, as the user that runs the server.
    fn command_for(&self, program: &str) -> tokio::process::Command {
        self.as_server_user(program).into()
    }

    /// `program`, through `runuser -u postgres --` when we are root.
    fn as_server_user(&self, program: impl AsRef<OsStr>) -> std::process::Command {
        if self.as_root {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            std::process::Command::new(program)
        }
    }
}

impl Drop for EmbeddedPostgres {
    /// A last resort when `serve` fails before it could call
    /// [`EmbeddedPostgres::stop`]: stop the server it started, blocking.
    fn drop(&mut self) {
        if self.stopped || !self.started_here {
            return;
        }
        let _ = self
            .as_server_user(self.bindir.join("pg_ctl"))
            .args(["stop", "-w", "-t", PG_CTL_WAIT, "-m", "fast", "-D"])
            .arg(&self.data)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Whether this process runs as root (PostgreSQL then needs another user).
fn running_as_root() -> bool {
    // `/proc/self` belongs to the process's effective user.
    match std::fs::metadata("/proc/self") {
        Ok(meta) => meta.uid() == 0,
        Err(_) => std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0"),
    }
}

fn port_is_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

async fn output(mut command: tokio::process::Command) -> anyhow::Result<Output> {
    let description = format!("{:?}", command.as_std());
    command.stdin(Stdio::null()).kill_on_drop(true);
    command
        .output()
        .await
        .with_context(|| format!("cannot run {description}"))
}

fn describe(output: &Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    format!("{}\n{}", stdout.trim(), stderr.trim())
        .trim()
        .to_owned()
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_lines_keeps_the_end() {
        assert_eq!(last_lines("a\nb\nc", 2), "b\nc");
        assert_eq!(last_lines("a", 5), "a");
        assert_eq!(last_lines("", 5), "");
    }

    #[test]
    fn the_url_has_no_password_and_no_tls() {
        let pg = EmbeddedPostgres {
            dir: "/x".into(),
            data: "/x/data".into(),
            bindir: "/bin".into(),
            port: 54329,
            as_root: false,
            started_here: false,
            stopped: true,
        };
        assert_eq!(
            pg.url(),
            "postgres://postgres@127.0.0.1:54329/postgres?sslmode=disable"
        );
        let config = pgsession::Config::builder().url(pg.url()).build().unwrap();
        assert_eq!(config.target(), "127.0.0.1:54329/postgres");
    }
}
