//! The PostgreSQL that `pgsession serve` runs for itself when no
//! `DATABASE_URL` is given: made from the installed server binaries (on
//! `PATH`, or in `pg_config --bindir`), with its data kept from one run to
//! the next under pgsession's directory (`./.pgsession/` by default).
//!
//! Finding the binaries, `initdb`, `pg_ctl` and running them as `postgres`
//! when we are root are the test kit's [`Binaries`], the same code that
//! makes the test suite's clusters. This module adds what a kept cluster
//! needs: where it lives, its configuration, its port.
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
//! PostgreSQL refuses to run as root. As root, the server runs as the
//! `postgres` user, which must be able to reach its data: when it can reach
//! `<dir>`, the cluster is `<dir>/data` as for anyone else (and `<dir>` is
//! handed to `postgres`); when it cannot (`<dir>` sits in a private
//! directory, as `mktemp -d` makes them, or under `/root`), the cluster is
//! kept in a directory of the `postgres` user's own ([`relocated_dir`]), and
//! `<dir>/data` is a symbolic link to it, so that later runs find it again.

use std::ffi::OsStr;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use pgsession_testkit::server::{Binaries, StopMode};

/// The port tried first for a new cluster.
pub(crate) const DEFAULT_PORT: u16 = 54329;

/// Where a relocated cluster's directory is made when the `postgres` user
/// has no home directory it can write to.
const RELOCATION_FALLBACKS: [&str; 2] = ["/var/tmp", "/tmp"];

/// A PostgreSQL server running from a data directory of `serve`'s.
#[derive(Debug)]
pub(crate) struct EmbeddedPostgres {
    /// pgsession's directory: the port file, the secret, the journal.
    dir: PathBuf,
    /// The cluster's directory: `data/` and `postgres.log`. `dir` itself,
    /// unless relocated.
    server_dir: PathBuf,
    data: PathBuf,
    bin: Binaries,
    port: u16,
    /// Whether the cluster lives outside `dir` (see [`relocated_dir`]).
    relocated: bool,
    /// Whether this process started the server (and so stops it).
    started_here: bool,
    stopped: bool,
}

/// The installed server binaries, or `None` when there are none.
pub(crate) fn find_binaries() -> Option<Binaries> {
    Binaries::find().ok()
}

impl EmbeddedPostgres {
    /// Makes the cluster of `dir` if it is not there yet, and starts it (or
    /// finds it already running).
    pub(crate) async fn start(dir: &Path, bin: Binaries) -> anyhow::Result<EmbeddedPostgres> {
        let dir = std::path::absolute(dir)
            .with_context(|| format!("cannot resolve the data directory {}", dir.display()))?;
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create the data directory {}", dir.display()))?;
        let (server_dir, relocated) = if bin.as_root() {
            server_dir_as_root(&dir, &bin).await?
        } else {
            (dir.clone(), false)
        };
        let mut pg = EmbeddedPostgres {
            data: server_dir.join("data"),
            server_dir,
            dir,
            bin,
            port: 0,
            relocated,
            started_here: false,
            stopped: false,
        };
        if !pg.data.join("PG_VERSION").is_file() {
            pg.initdb().await?;
        }
        if let Some(port) = pg.bin.running_port(&pg.data) {
            pg.port = port;
            tracing::info!(
                data_dir = %pg.data.display(), port,
                "the embedded PostgreSQL is already running (left by an earlier run?): using it, and leaving it running"
            );
            return Ok(pg);
        }
        pg.port = pg.choose_port()?;
        let log = pg.server_dir.join("postgres.log");
        pg.bin
            .start(&pg.data, &log, pg.port)
            .await
            .context("cannot start the embedded PostgreSQL")?;
        pg.started_here = true;
        Ok(pg)
    }

    /// The connection URL (trust authentication, no TLS).
    pub(crate) fn url(&self) -> String {
        url_for(self.port)
    }

    /// The TCP port on 127.0.0.1.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// pgsession's directory (the port file; `data` in it is the cluster,
    /// or a link to it).
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the cluster's data really is.
    pub(crate) fn data_dir(&self) -> &Path {
        &self.data
    }

    /// Whether the cluster lives outside [`EmbeddedPostgres::dir`], because
    /// the `postgres` user cannot reach that directory.
    pub(crate) fn relocated(&self) -> bool {
        self.relocated
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
        self.bin
            .stop(&self.data, StopMode::Fast)
            .await
            .context("cannot stop the embedded PostgreSQL")?;
        tracing::info!(data_dir = %self.data.display(), "embedded PostgreSQL stopped");
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
        self.bin
            .initdb(&self.data, &[])
            .await
            .context("cannot create the embedded PostgreSQL cluster")?;
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
}

impl Drop for EmbeddedPostgres {
    /// A last resort when `serve` fails before it could call
    /// [`EmbeddedPostgres::stop`]: stop the server it started, blocking.
    fn drop(&mut self) {
        if self.stopped || !self.started_here {
            return;
        }
        self.bin.stop_blocking(&self.data, StopMode::Fast, "60");
    }
}

/// As root: the directory that holds the cluster (`data/`, `postgres.log`),
/// and whether it is outside `dir`.
///
/// A link `<dir>/data` left by an earlier run says where; else `dir` itself
/// when the `postgres` user can reach it; else a directory of that user's
/// own ([`relocated_dir`]), linked from `<dir>/data`.
async fn server_dir_as_root(dir: &Path, bin: &Binaries) -> anyhow::Result<(PathBuf, bool)> {
    let link = dir.join("data");
    if let Ok(target) = std::fs::read_link(&link) {
        let server_dir = target
            .parent()
            .filter(|_| target.is_absolute() && target.file_name() == Some(OsStr::new("data")))
            .with_context(|| {
                format!(
                    "{} links to {}, which is not a cluster made by pgsession; remove the link",
                    link.display(),
                    target.display()
                )
            })?
            .to_owned();
        make_private_dir(&server_dir, bin).await?;
        return Ok((server_dir, true));
    }
    let in_place = link.join("PG_VERSION").is_file() || {
        let parent = dir.parent().unwrap_or(Path::new("/"));
        bin.server_user_passes(&[OsStr::new("-x"), parent.as_os_str()])
            .await
    };
    if in_place {
        let owner = std::fs::metadata(dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .uid();
        if owner == 0 {
            bin.hand_over(dir).await?;
        }
        if bin
            .server_user_passes(&[OsStr::new("-w"), dir.as_os_str()])
            .await
        {
            return Ok((dir.to_owned(), false));
        }
        if link.exists() {
            bail!(
                "running as root, PostgreSQL runs as the `postgres` user, which cannot write to \
                 {}; pass --data-dir (PGSESSION_DATA_DIR) with a directory it can reach, or set \
                 DATABASE_URL",
                dir.display()
            );
        }
    }
    let server_dir = relocated_dir(dir, bin).await?;
    make_private_dir(&server_dir, bin).await?;
    std::os::unix::fs::symlink(server_dir.join("data"), &link)
        .with_context(|| format!("cannot create the link {}", link.display()))?;
    Ok((server_dir, true))
}

/// Where a cluster lives when the `postgres` user cannot reach pgsession's
/// directory `dir`: `pgsession-<name>-<hash>` in that user's home directory
/// (`/var/lib/postgresql` on Debian), else in `/var/tmp` or `/tmp`. The name
/// is that of `dir`'s parent, the hash that of `dir`'s path, so that every
/// directory has a cluster of its own.
async fn relocated_dir(dir: &Path, bin: &Binaries) -> anyhow::Result<PathBuf> {
    let name: String = dir
        .parent()
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    let leaf = format!(
        "pgsession-{name}-{:016x}",
        fnv1a(dir.as_os_str().as_encoded_bytes())
    );
    let home = postgres_user().map(|user| user.home);
    for base in home
        .into_iter()
        .chain(RELOCATION_FALLBACKS.map(PathBuf::from))
    {
        if base.is_dir()
            && bin
                .server_user_passes(&[OsStr::new("-w"), base.as_os_str()])
                .await
        {
            return Ok(base.join(leaf));
        }
    }
    bail!(
        "running as root, PostgreSQL runs as the `postgres` user, which can reach neither {} \
         (are its parent directories private?) nor its home directory, /var/tmp or /tmp; pass \
         --data-dir (PGSESSION_DATA_DIR) with a directory it can reach, or set DATABASE_URL",
        dir.display()
    )
}

/// Makes `path` as the `postgres` user (mode 700) if it is missing, and
/// checks that it is a real directory of that user's that no one else can
/// write to: in a shared directory such as `/var/tmp`, anyone could have
/// made it first.
async fn make_private_dir(path: &Path, bin: &Binaries) -> anyhow::Result<()> {
    let mut mkdir = tokio::process::Command::from(bin.command("mkdir"));
    mkdir.args(["-p", "-m", "700"]).arg(path);
    let made = mkdir
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .with_context(|| format!("cannot run mkdir for {}", path.display()))?;
    if !made.status.success() {
        bail!(
            "the `postgres` user cannot create {}: {}",
            path.display(),
            String::from_utf8_lossy(&made.stderr).trim()
        );
    }
    let meta = std::fs::symlink_metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let owner = postgres_user().map(|user| user.uid);
    if !meta.is_dir() || Some(meta.uid()) != owner || meta.permissions().mode() & 0o022 != 0 {
        bail!(
            "{} is not a directory of the `postgres` user that only it can write to; remove it, \
             or pass --data-dir (PGSESSION_DATA_DIR) with a directory that user can reach",
            path.display()
        );
    }
    Ok(())
}

/// The `postgres` user's uid and home directory, from `/etc/passwd`.
struct PostgresUser {
    uid: u32,
    home: PathBuf,
}

fn postgres_user() -> Option<PostgresUser> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 6 || fields[0] != "postgres" {
            return None;
        }
        Some(PostgresUser {
            uid: fields[2].parse().ok()?,
            home: PathBuf::from(fields[5]),
        })
    })
}

/// FNV-1a, 64 bits: a short name that stays the same from one build to the
/// next (std's hasher may change between Rust releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The URL of an embedded PostgreSQL on `port`.
fn url_for(port: u16) -> String {
    format!("postgres://postgres@127.0.0.1:{port}/postgres?sslmode=disable")
}

fn port_is_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_has_no_password_and_no_tls() {
        let url = url_for(DEFAULT_PORT);
        assert_eq!(
            url,
            "postgres://postgres@127.0.0.1:54329/postgres?sslmode=disable"
        );
        let config = pgsession::Config::builder().url(url).build().unwrap();
        assert_eq!(config.target(), "127.0.0.1:54329/postgres");
    }

    #[test]
    fn relocation_names_are_stable_and_distinct() {
        // FNV-1a's published test vectors.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_ne!(fnv1a(b"/tmp/a/.pgsession"), fnv1a(b"/tmp/b/.pgsession"));
    }
}
