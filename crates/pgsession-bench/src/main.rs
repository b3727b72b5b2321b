//! `pgsession-bench`: benchmarks of pgsession.
//!
//! - `http`: the reference server (`pgsession serve`) and a peer built on
//!   axum + tower-sessions + tower-sessions-sqlx-store on the same database,
//!   each in a fresh child process per workload, driven by the same load
//!   ([`load`]) one after the other, in alternating slices; prints
//!   requests/s, latencies, errors, each server's peak RSS and the ratios
//!   ([`report`]).
//! - `store`: `pgsession::Store` alone against pgbench ([`store_bench`]).
//! - `peer-server`: the peer ([`peer`]), run by `http` as a child process.
//!
//! The database is a throwaway PostgreSQL cluster unless `DATABASE_URL` (or
//! `--database-url`) names a server; then a fresh database is made there.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use pgsession_testkit::TestDb;

mod load;
mod peer;
mod report;
mod store_bench;

use load::Workload;
use report::ServerKind;

/// Benchmarks of pgsession against a tower-sessions peer and pgbench.
#[derive(Debug, Parser)]
#[command(name = "pgsession-bench")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Drive `pgsession serve` and the peer server with the same HTTP load.
    Http(HttpArgs),
    /// Measure `pgsession::Store` load and save beside pgbench.
    Store(store_bench::StoreArgs),
    /// Run the peer server (axum + tower-sessions + sqlx store).
    PeerServer(peer::PeerArgs),
}

/// `pgsession-bench http`.
#[derive(Debug, clap::Args)]
struct HttpArgs {
    /// Measured time of each workload on each server: 10s, 500ms, 1m.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Unmeasured load before the measured time.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,
    /// The measured time is cut into slices of this length, given to each
    /// server in turn, so that other work on the machine weighs on both
    /// alike; 0 measures each server in one piece.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    slice: Duration,
    /// Concurrent connections, each with its own session cookie.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Workloads to run, in order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "read,rolling,write,login"
    )]
    workloads: Vec<Workload>,
    /// Servers to drive, in order, for each workload.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "pgsession,peer"
    )]
    servers: Vec<ServerKind>,
    /// Threads of the load generator (the servers and PostgreSQL share the
    /// machine with it).
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
    #[command(flatten)]
    database: DatabaseArgs,
    /// The `pgsession` binary. Default: target/release/pgsession, built
    /// first with `cargo build --release -p pgsession-cli`.
    #[arg(long)]
    pgsession_bin: Option<PathBuf>,
    /// An earlier `pgsession` binary, run as server `baseline` (add it to
    /// `--servers`) in the same alternating slices: what a change costs,
    /// measured in one run.
    #[arg(long)]
    baseline_bin: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Command::Http(args) = &cli.command {
        // The load generator's threads: the rest of the machine is the servers'.
        runtime.worker_threads(args.client_threads.max(1));
    }
    let runtime = runtime.enable_all().build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Http(args) => http(args).await,
            Command::Store(args) => {
                println!("{}\n", report::machine());
                let rows = store_bench::run(args).await?;
                println!("{}", report::store_table(&rows));
                Ok(())
            }
            Command::PeerServer(args) => peer::serve(args).await,
        }
    })
}

/// `10s`, `500ms`, `1m` or a number of seconds, with the library's parser.
fn parse_duration(text: &str) -> Result<Duration, String> {
    pgsession::config::parse_duration("duration", text.trim()).map_err(|e| e.to_string())
}

/// Where the database of a benchmark lives.
#[derive(Debug, clap::Args)]
struct DatabaseArgs {
    /// PostgreSQL server to use (a fresh database is created on it and
    /// dropped at the end); without it, a throwaway cluster is started.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
}

/// A fresh database on the server of `args`, or in a throwaway cluster.
async fn database(args: &DatabaseArgs) -> anyhow::Result<TestDb> {
    let db = match args
        .database_url
        .as_deref()
        .filter(|u| !u.trim().is_empty())
    {
        Some(url) => TestDb::on_server(url).await?,
        None => TestDb::throwaway().await?,
    };
    eprintln!("database: {}", db.url());
    Ok(db)
}

/// The `http` mode. For each workload: a fresh process of each server,
/// each warmed up, then measured in alternating slices (pgsession, peer,
/// pgsession, ...) so that both see the same background load; then the
/// tables.
async fn http(args: HttpArgs) -> anyhow::Result<()> {
    let pgsession_bin = match &args.pgsession_bin {
        Some(path) => path.clone(),
        None => build_pgsession()?,
    };
    let db = database(&args.database).await?;
    let logs = tempfile::Builder::new()
        .prefix("pgsession-bench-")
        .tempdir()?;
    let slice = slice_of(args.slice, args.duration);
    let mut rows = Vec::new();
    for &workload in &args.workloads {
        let rolling = workload == Workload::Rolling;
        let mut runs = Vec::new();
        for &server in &args.servers {
            let log = logs
                .path()
                .join(format!("{}-{}.log", server.name(), workload.name()));
            let bin = match server {
                ServerKind::Baseline => args.baseline_bin.as_deref().context(
                    "server `baseline` needs --baseline-bin (an earlier pgsession binary)",
                )?,
                _ => pgsession_bin.as_path(),
            };
            let journal = logs.path().join(format!("journal-{}", server.name()));
            let process =
                ServerProcess::start(server, bin, db.url(), rolling, &log, &journal).await?;
            runs.push((server, process, load::LoadResult::default()));
        }
        let mut drivers = Vec::new();
        for (server, process, _) in &runs {
            eprintln!(
                "{} on {}: set-up and warm-up ...",
                workload.name(),
                server.name()
            );
            let mut driver = load::Driver::connect(process.addr, workload, args.connections)
                .await
                .with_context(|| process.log_tail())?;
            driver.run(args.warmup, Duration::ZERO).await?;
            drivers.push(driver);
        }
        eprintln!("{}: measuring ...", workload.name());
        let mut left = args.duration;
        while !left.is_zero() {
            let window = slice.min(left);
            for ((_, process, load), driver) in runs.iter_mut().zip(&mut drivers) {
                let part = driver
                    .run(Duration::ZERO, window)
                    .await
                    .with_context(|| process.log_tail())?;
                load.merge(part);
            }
            left -= window;
        }
        for (server, mut process, load) in runs {
            let peak_rss_kib = process.peak_rss_kib();
            process.stop().await;
            if load.errors > 0 || load.setup_errors > 0 {
                eprintln!(
                    "  {} answered errors; its log:\n{}",
                    server.name(),
                    process.log_tail()
                );
            }
            rows.push(report::HttpRow {
                workload,
                server,
                load,
                peak_rss_kib,
            });
        }
        settle(&db).await;
    }
    println!("{}", report::machine());
    println!(
        "{} connections; per workload and server: warm-up {:?}, measured {:?} in slices of {:?}, alternating servers\n",
        args.connections, args.warmup, args.duration, slice
    );
    println!("{}", report::http_table(&rows));
    Ok(())
}

/// The length of one measured slice: `slice`, or the whole `duration` when
/// `slice` is zero or longer.
fn slice_of(slice: Duration, duration: Duration) -> Duration {
    if slice.is_zero() || slice > duration {
        duration
    } else {
        slice
    }
}

/// Between runs: dead rows vacuumed and dirty pages written, so that one
/// run does not pay for the previous one.
async fn settle(db: &TestDb) {
    if let Ok(client) = db.client().await {
        let _ = client.batch_execute("VACUUM ANALYZE").await;
        let _ = client.batch_execute("CHECKPOINT").await;
    }
}

/// `target/release/pgsession`, after `cargo build --release -p
/// pgsession-cli` (a no-op when it is up to date). A failed build is
/// fatal only when there is no binary at all.
fn build_pgsession() -> anyhow::Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or(root.join("target"), PathBuf::from);
    let bin = target.join("release/pgsession");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("building pgsession-cli (cargo build --release -p pgsession-cli) ...");
    let built = std::process::Command::new(cargo)
        .args(["build", "--release", "-p", "pgsession-cli"])
        .current_dir(&root)
        .status()
        .is_ok_and(|status| status.success());
    match (built, bin.is_file()) {
        (_, false) => bail!(
            "no pgsession binary at {}: `cargo build --release -p pgsession-cli` failed",
            bin.display()
        ),
        (false, true) => {
            eprintln!(
                "warning: the build failed; using the existing {}",
                bin.display()
            )
        }
        (true, true) => {}
    }
    Ok(bin)
}

/// A server under test, in a child process of its own.
struct ServerProcess {
    child: tokio::process::Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl ServerProcess {
    /// Starts `kind` on a free port and waits until `GET /healthz` answers.
    async fn start(
        kind: ServerKind,
        pgsession_bin: &Path,
        database_url: &str,
        rolling: bool,
        log: &Path,
        journal_dir: &Path,
    ) -> anyhow::Result<ServerProcess> {
        let addr = free_addr()?;
        let mut command = match kind {
            ServerKind::Pgsession | ServerKind::Baseline => {
                let mut command = tokio::process::Command::new(pgsession_bin);
                command
                    .arg("serve")
                    .env("DATABASE_URL", database_url)
                    .env("PGSESSION_JOURNAL_DIR", journal_dir)
                    .env(
                        "PGSESSION_SECRET",
                        "pgsession-bench-secret-0123456789abcdef",
                    )
                    .env("PGSESSION_LISTEN", addr.to_string())
                    .env("PGSESSION_COOKIE_SECURE", "false");
                if rolling {
                    command.env("PGSESSION_ROLLING", "true");
                }
                command
            }
            ServerKind::Peer => {
                let mut command = tokio::process::Command::new(std::env::current_exe()?);
                command
                    .args(["peer-server", "--listen", &addr.to_string()])
                    .args(["--database-url", database_url]);
                if rolling {
                    command.arg("--always-save");
                }
                command
            }
        };
        let log_file = std::fs::File::create(log)?;
        command
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .kill_on_drop(true);
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", kind.name()))?;
        let mut process = ServerProcess {
            child,
            addr,
            log: log.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if load::healthy(addr).await {
                return Ok(process);
            }
            if let Ok(Some(status)) = process.child.try_wait() {
                bail!("{} exited ({status}):\n{}", kind.name(), process.log_tail());
            }
            if Instant::now() > deadline {
                process.stop().await;
                bail!(
                    "{} did not answer /healthz within 60 s:\n{}",
                    kind.name(),
                    process.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The process's peak resident set (`VmHWM` in /proc/PID/status), KiB.
    fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()?)).ok()?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// SIGTERM, then SIGKILL after 10 s.
    async fn stop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            let exited = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
            if exited.is_ok() {
                return;
            }
        }
        let _ = self.child.kill().await;
    }

    /// The last lines the server wrote.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl std::fmt::Debug for ServerProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerProcess")
            .field("pid", &self.child.id())
            .field("addr", &self.addr)
            .finish()
    }
}

/// A loopback address whose port was free a moment ago.
fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?)
}
