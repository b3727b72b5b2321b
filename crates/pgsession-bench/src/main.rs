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
use pgsession_testkit::{ClusterOptions, TestCluster, TestDb};

mod ceiling;
mod load;
mod peer;
mod report;
mod statements;
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
    /// Run the no-store ceiling (axum answering `{"views":1}`).
    CeilingServer(ceiling::CeilingArgs),
}

/// `pgsession-bench http`.
#[derive(Debug, clap::Args)]
struct HttpArgs {
    /// Measured time of each workload on each server: 10s, 500ms, 1m.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// Unmeasured load before the measured time.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,
    /// The measured time is cut into slices of this length, given to each
    /// server in turn, so that other work on the machine weighs on both
    /// alike; the order of the servers is reversed every other round, so
    /// that each is first as often as the other. 0 measures each server in
    /// one piece.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    slice: Duration,
    /// Numbers of concurrent connections, each with its own session cookie;
    /// every workload runs at each.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    connections: Vec<usize>,
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
    /// Leave out the no-store ceiling (`ceiling-server`), otherwise measured
    /// beside the others in the read workload.
    #[arg(long)]
    no_ceiling: bool,
    /// The throwaway cluster's durability, one table each: `on` is
    /// PostgreSQL's defaults (fsync, synchronous_commit and full_page_writes
    /// on, as users run it), `off` all three off. Ignored with
    /// `--database-url`: that server's own settings are shown.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "on,off")]
    durability: Vec<Durability>,
    /// Connections in each server's pool: pgsession's pool size and its
    /// maximum (so it does not grow), and the peer's sqlx pool.
    #[arg(long, default_value_t = 5)]
    pool_size: usize,
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

/// A throwaway cluster's durability settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Durability {
    /// PostgreSQL's defaults: fsync, synchronous_commit, full_page_writes on.
    On,
    /// All three off (the test kit's defaults).
    Off,
}

impl Durability {
    /// The cluster's settings: these, and `pg_stat_statements` loaded.
    fn cluster_options(self) -> ClusterOptions {
        let value = match self {
            Durability::On => "on",
            Durability::Off => "off",
        };
        let mut config = vec!["shared_preload_libraries = 'pg_stat_statements'".to_owned()];
        config.extend(
            ["fsync", "synchronous_commit", "full_page_writes"]
                .map(|setting| format!("{setting} = {value}")),
        );
        ClusterOptions {
            config,
            ..ClusterOptions::default()
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Http(_) | Command::Store(_)) {
        clusters_on_disk();
    }
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
            Command::CeilingServer(args) => ceiling::serve(args).await,
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

/// The test kit puts its clusters in `/dev/shm` when it can, where an
/// `fsync` costs nothing: the bench's go to the temporary directory (on
/// disk here) unless `PGSESSION_TESTKIT_DIR` says otherwise, so that
/// durability `on` pays what it pays for users.
fn clusters_on_disk() {
    if std::env::var_os("PGSESSION_TESTKIT_DIR").is_none_or(|dir| dir.is_empty()) {
        // Still one thread: nothing reads the environment concurrently.
        std::env::set_var("PGSESSION_TESTKIT_DIR", std::env::temp_dir());
    }
}

/// The database of a benchmark, the cluster holding it (if it is ours),
/// and what its durability settings are.
#[derive(Debug)]
pub(crate) struct BenchDb {
    pub(crate) db: TestDb,
    /// Kept for as long as the database is used.
    _cluster: Option<TestCluster>,
    /// `fsync on, synchronous_commit on, full_page_writes on`, as the server
    /// reports them.
    pub(crate) durability: String,
}

/// The database every cluster gets.
const BENCH_DATABASE: &str = "pgsession_bench";

/// A fresh database on the server of `args`, or in a throwaway cluster with
/// `durability` and `pg_stat_statements`.
pub(crate) async fn database(
    args: &DatabaseArgs,
    durability: Durability,
) -> anyhow::Result<BenchDb> {
    let (db, cluster) = match args
        .database_url
        .as_deref()
        .filter(|u| !u.trim().is_empty())
    {
        Some(url) => (TestDb::on_server(url).await?, None),
        None => {
            let cluster = TestCluster::start_with(durability.cluster_options()).await?;
            cluster.create_database(BENCH_DATABASE).await?;
            eprintln!("cluster in {}", cluster.data_dir().display());
            let db = TestDb::existing(cluster.url(BENCH_DATABASE), BENCH_DATABASE);
            (db, Some(cluster))
        }
    };
    let client = db.client().await?;
    let mut settings = Vec::new();
    for setting in ["fsync", "synchronous_commit", "full_page_writes"] {
        let row = client.query_one(&format!("SHOW {setting}"), &[]).await?;
        settings.push(format!("{setting} {}", row.get::<_, String>(0)));
    }
    eprintln!("database: {}", db.url());
    Ok(BenchDb {
        db,
        _cluster: cluster,
        durability: settings.join(", "),
    })
}

/// The `http` mode: for each durability, a cluster; in it, for each number
/// of connections and each workload, [`Run::measure`]; then one table per
/// durability.
async fn http(args: HttpArgs) -> anyhow::Result<()> {
    let pgsession_bin = match &args.pgsession_bin {
        Some(path) => path.clone(),
        None => build_pgsession()?,
    };
    let logs = tempfile::Builder::new()
        .prefix("pgsession-bench-")
        .tempdir()?;
    let durabilities = if args.database.database_url.is_some() {
        eprintln!("--database-url given: --durability is that server's own");
        vec![Durability::On]
    } else {
        args.durability.clone()
    };
    let started = Instant::now();
    let mut tables = Vec::new();
    for durability in durabilities {
        let bench_db = database(&args.database, durability).await?;
        let counter = match statements::StatementCounter::connect(bench_db.db.url()).await {
            Ok(counter) => Some(counter),
            Err(e) => {
                eprintln!("statements per request left out: {e:#}");
                None
            }
        };
        let mut rows = Vec::new();
        for &connections in &args.connections {
            for &workload in &args.workloads {
                let run = Run {
                    args: &args,
                    pgsession_bin: &pgsession_bin,
                    db: &bench_db.db,
                    counter: counter.as_ref(),
                    logs: logs.path(),
                };
                rows.extend(run.measure(workload, connections).await?);
                settle(&bench_db.db).await;
            }
        }
        tables.push((bench_db.durability.clone(), rows));
    }
    println!("{}", report::machine());
    println!(
        "per workload, connections and server: warm-up {:?}, measured {:?} in slices of {:?}, \
         servers alternating (order reversed every other round); pool size {} for every server \
         (pgsession's maximum too); whole run {:.0} s\n",
        args.warmup,
        args.duration,
        slice_of(args.slice, args.duration),
        args.pool_size,
        started.elapsed().as_secs_f64(),
    );
    for (durability, rows) in &tables {
        println!("#### Durability: {durability}\n");
        println!("{}", report::http_table(rows));
    }
    Ok(())
}

/// What one workload's measurement needs.
struct Run<'a> {
    args: &'a HttpArgs,
    pgsession_bin: &'a Path,
    db: &'a TestDb,
    counter: Option<&'a statements::StatementCounter>,
    logs: &'a Path,
}

/// One server's figures over all its slices.
#[derive(Default)]
struct Tally {
    load: load::LoadResult,
    cpu_ticks: Option<u64>,
    context_switches: Option<u64>,
    statements: Option<statements::Counts>,
}

impl Run<'_> {
    /// A fresh process of each server (and of the no-store ceiling for the
    /// read workload), each warmed up, then measured in alternating slices;
    /// a row per server.
    async fn measure(
        &self,
        workload: Workload,
        connections: usize,
    ) -> anyhow::Result<Vec<report::HttpRow>> {
        let args = self.args;
        let mut servers = args.servers.clone();
        if workload == Workload::Read && !args.no_ceiling {
            servers.push(ServerKind::Ceiling);
        }
        let rolling = workload == Workload::Rolling;
        let mut processes = Vec::new();
        for &server in &servers {
            let name = format!("{}-{}-{connections}", server.name(), workload.name());
            let bin = match server {
                ServerKind::Baseline => args.baseline_bin.as_deref().context(
                    "server `baseline` needs --baseline-bin (an earlier pgsession binary)",
                )?,
                _ => self.pgsession_bin,
            };
            let setup = ServerSetup {
                kind: server,
                pgsession_bin: bin,
                database_url: self.db.url(),
                rolling,
                pool_size: args.pool_size,
                log: &self.logs.join(format!("{name}.log")),
                journal_dir: &self.logs.join(format!("journal-{name}")),
            };
            processes.push(ServerProcess::start(setup).await?);
        }
        let mut drivers = Vec::new();
        for (server, process) in servers.iter().zip(&processes) {
            eprintln!(
                "{} at {connections} on {}: set-up and warm-up ...",
                workload.name(),
                server.name()
            );
            let sessions = *server != ServerKind::Ceiling;
            let mut driver = load::Driver::connect(process.addr, workload, connections, sessions)
                .await
                .with_context(|| process.log_tail())?;
            driver.run(args.warmup, Duration::ZERO).await?;
            drivers.push(driver);
        }
        eprintln!("{} at {connections}: measuring ...", workload.name());
        let mut tallies: Vec<Tally> = servers.iter().map(|_| Tally::default()).collect();
        let slice = slice_of(args.slice, args.duration);
        let mut left = args.duration;
        let mut round = 0;
        while !left.is_zero() {
            let window = slice.min(left);
            let mut order: Vec<usize> = (0..servers.len()).collect();
            if round % 2 == 1 {
                order.reverse();
            }
            for i in order {
                let (process, tally) = (&processes[i], &mut tallies[i]);
                if let Some(counter) = self.counter {
                    counter.reset().await?;
                }
                let cpu_before = process.cpu_ticks();
                let switches_before = process.context_switches();
                let part = drivers[i]
                    .run(Duration::ZERO, window)
                    .await
                    .with_context(|| process.log_tail())?;
                tally.cpu_ticks = add_difference(tally.cpu_ticks, cpu_before, process.cpu_ticks());
                tally.context_switches = add_difference(
                    tally.context_switches,
                    switches_before,
                    process.context_switches(),
                );
                if let Some(counter) = self.counter {
                    let counts = counter.read().await?;
                    tally
                        .statements
                        .get_or_insert_with(Default::default)
                        .merge(&counts);
                }
                tally.load.merge(part);
            }
            left -= window;
            round += 1;
        }
        let mut rows = Vec::new();
        for ((server, mut process), tally) in servers.into_iter().zip(processes).zip(tallies) {
            let peak_rss_kib = process.peak_rss_kib();
            process.stop().await;
            if tally.load.errors > 0 || tally.load.setup_errors > 0 {
                eprintln!(
                    "  {} answered errors; its log:\n{}",
                    server.name(),
                    process.log_tail()
                );
            }
            let requests = tally.load.requests.max(1) as f64;
            rows.push(report::HttpRow {
                workload,
                server,
                connections,
                cpu_us_per_request: tally
                    .cpu_ticks
                    .map(|ticks| ticks as f64 * 1e6 / clock_ticks_per_second() / requests),
                switches_per_request: tally
                    .context_switches
                    .map(|switches| switches as f64 / requests),
                statements: tally.statements,
                load: tally.load,
                peak_rss_kib,
            });
        }
        Ok(rows)
    }
}

/// `total` plus `after - before`, when both were read.
fn add_difference(total: Option<u64>, before: Option<u64>, after: Option<u64>) -> Option<u64> {
    Some(total.unwrap_or(0) + after?.saturating_sub(before?))
}

/// `sysconf(_SC_CLK_TCK)`, the unit of `/proc/PID/stat`'s CPU times, from
/// `getconf CLK_TCK` (100 on Linux when it cannot be read).
fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
            .filter(|ticks: &f64| *ticks > 0.0)
            .unwrap_or(100.0)
    })
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

/// How to start one server.
struct ServerSetup<'a> {
    kind: ServerKind,
    pgsession_bin: &'a Path,
    database_url: &'a str,
    rolling: bool,
    pool_size: usize,
    log: &'a Path,
    journal_dir: &'a Path,
}

impl ServerProcess {
    /// Starts a server on a free port and waits until `GET /healthz` answers.
    async fn start(setup: ServerSetup<'_>) -> anyhow::Result<ServerProcess> {
        let kind = setup.kind;
        let addr = free_addr()?;
        let mut command = match kind {
            ServerKind::Pgsession | ServerKind::Baseline => {
                let mut command = tokio::process::Command::new(setup.pgsession_bin);
                let pool_size = setup.pool_size.to_string();
                command
                    .arg("serve")
                    .env("DATABASE_URL", setup.database_url)
                    .env("PGSESSION_JOURNAL_DIR", setup.journal_dir)
                    .env(
                        "PGSESSION_SECRET",
                        "pgsession-bench-secret-0123456789abcdef",
                    )
                    .env("PGSESSION_LISTEN", addr.to_string())
                    .env("PGSESSION_COOKIE_SECURE", "false")
                    .env("PGSESSION_POOL_SIZE", &pool_size)
                    .env("PGSESSION_POOL_MAX_SIZE", &pool_size);
                if setup.rolling {
                    command.env("PGSESSION_ROLLING", "true");
                }
                command
            }
            ServerKind::Peer => {
                let mut command = tokio::process::Command::new(std::env::current_exe()?);
                command
                    .args(["peer-server", "--listen", &addr.to_string()])
                    .args(["--database-url", setup.database_url])
                    .args(["--pool-size", &setup.pool_size.to_string()]);
                if setup.rolling {
                    command.arg("--always-save");
                }
                command
            }
            ServerKind::Ceiling => {
                let mut command = tokio::process::Command::new(std::env::current_exe()?);
                command.args(["ceiling-server", "--listen", &addr.to_string()]);
                command
            }
        };
        let log_file = std::fs::File::create(setup.log)?;
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
            log: setup.log.to_owned(),
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

    /// The CPU time the process has used so far (user + system, all its
    /// threads), in clock ticks: fields 14 and 15 of `/proc/PID/stat`.
    fn cpu_ticks(&self) -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()?)).ok()?;
        // The command name (field 2) may hold spaces: count after its ')'.
        let fields: Vec<&str> = stat
            .get(stat.rfind(')')? + 1..)?
            .split_whitespace()
            .collect();
        let utime: u64 = fields.get(11)?.parse().ok()?;
        let stime: u64 = fields.get(12)?.parse().ok()?;
        Some(utime + stime)
    }

    /// Context switches of all the process's threads so far, voluntary
    /// (a thread parked, waiting to be woken) and not, from
    /// `/proc/PID/task/*/status`: how often serving hands work from one
    /// thread to another.
    fn context_switches(&self) -> Option<u64> {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.child.id()?)).ok()?;
        let mut switches = 0;
        for task in tasks.flatten() {
            let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
                continue; // the thread ended meanwhile
            };
            switches += status
                .lines()
                .filter(|line| line.contains("ctxt_switches:"))
                .filter_map(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        }
        Some(switches)
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
