//! Owns [`PatroniCluster`]: a throwaway high-availability PostgreSQL cluster managed by Patroni
//! (Debian's `patroni` package), with one etcd member (`etcd-server`) as its store, all on
//! loopback ports. Tests kill the leader, ask for a switchover, wait for the election, and bring
//! a killed node back as a replica; dropping the cluster kills every process it started.
//!
//! Each node is a Patroni process running as the user that runs the servers (`postgres` when we
//! are root, through [`crate::server::Binaries`]), with the PostgreSQL programs of
//! [`crate::server::Binaries::tool`]. Patroni makes the first node with `initdb` and the others
//! with `pg_basebackup`, and rewinds a returning old leader with `pg_rewind`. The timings of the
//! store are small (a leader lock of 6 s, renewed every second), so that an election takes
//! seconds, not the default 30 s.
//!
//! A cluster lives in a directory `pgsession-patroni-<pid>-*` beside the test kit's clusters;
//! one left behind by a test process that was killed (so that `Drop` never ran) is swept, with
//! every process still running in it, by the next [`PatroniCluster::start`].
//!
//! PgBouncer does not follow a leader by itself: [`PatroniCluster::follow_leader`] re-points a
//! [`PgBouncer`] at the leader (Patroni's REST API polled, `pgbouncer.ini` rewritten, `RELOAD`).

use std::{
    fmt::Write as _,
    fs,
    net::{Ipv4Addr, SocketAddr},
    os::unix::{ffi::OsStrExt, fs::chown, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command as StdCommand, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    cluster::{free_port, template, HOST},
    db::connect,
    server::{run, Binaries, StopMode},
    FaultProxy, PgBouncer, Result, TestkitError,
};

/// The database [`PatroniCluster::start`] creates.
const DATABASE: &str = "pgsession_test";
/// Prefix of a cluster's directory, followed by the owner's pid.
const DIR_PREFIX: &str = "pgsession-patroni-";
/// How long a start (etcd, the bootstrap, every replica streaming) may take.
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// How long one probe of a REST API may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often conditions are polled.
const POLL: Duration = Duration::from_millis(100);
/// The pid file of etcd and of each Patroni, for the sweep.
const PID_FILE: &str = "pid";

/// The store's timings: the leader lock lives `TTL` s and is renewed every `LOOP_WAIT` s; a
/// store or PostgreSQL call is retried for `RETRY_TIMEOUT` s. Patroni wants
/// `loop_wait + 2 * retry_timeout <= ttl`.
const TTL: u32 = 6;
const LOOP_WAIT: u32 = 1;
const RETRY_TIMEOUT: u32 = 2;

/// How to set up a [`PatroniCluster`]. The default is two nodes, synchronous.
#[derive(Debug, Clone)]
pub struct PatroniOptions {
    /// PostgreSQL nodes, 2 or 3.
    pub nodes: usize,
    /// Patroni's `synchronous_mode`: a commit is acknowledged once a standby has it, and only
    /// that standby may be elected. Off: asynchronous streaming, PostgreSQL's default.
    pub synchronous_mode: bool,
    /// Extra PostgreSQL parameters, e.g. `("max_connections", "200")`.
    pub parameters: Vec<(String, String)>,
    /// The other nodes reach each node (replication, `pg_rewind`) through a [`FaultProxy`] of
    /// its own ([`PatroniCluster::replication_proxy`]), so that a test can delay or cut
    /// replication from a leader; clients still reach the nodes directly.
    pub replication_proxies: bool,
}

impl Default for PatroniOptions {
    fn default() -> Self {
        PatroniOptions {
            nodes: 2,
            synchronous_mode: true,
            parameters: Vec::new(),
            replication_proxies: false,
        }
    }
}

/// One PostgreSQL node and the Patroni process that manages it.
#[derive(Debug)]
pub struct PatroniNode {
    name: String,
    pg_port: u16,
    rest_port: u16,
    /// Holds the configuration, the data directory, the socket and the logs.
    dir: PathBuf,
    child: Mutex<Option<Child>>,
}

impl PatroniNode {
    /// Patroni's member name (`node0`, `node1`, ...).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The port PostgreSQL listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.pg_port
    }

    /// PostgreSQL's socket address.
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.pg_port))
    }

    /// The port of Patroni's REST API (127.0.0.1).
    pub fn rest_port(&self) -> u16 {
        self.rest_port
    }

    /// `postgres://postgres@127.0.0.1:{port}/{database}`: this node only, whatever its role.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@{HOST}:{}/{database}", self.pg_port)
    }

    /// The node's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Patroni's `patroni.yml` for this node.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("patroni.yml")
    }

    /// Patroni's log (its output; PostgreSQL's log is in `data/log`).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("patroni.log")
    }

    /// Whether this node's Patroni process runs.
    pub fn is_running(&self) -> bool {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The answer of `GET path` on this node's REST API: its status code, or `None` when the
    /// API did not answer (Patroni down).
    pub async fn probe(&self, path: &str) -> Option<u16> {
        http_status(self.rest_port, path).await
    }

    /// The tail of Patroni's log, for failure messages.
    fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// A Patroni cluster of 2 or 3 PostgreSQL nodes and one etcd member, on loopback ports, with
/// database `pgsession_test` created. Dropping it kills every Patroni, PostgreSQL and etcd
/// process it started, then removes its directory.
///
/// ```no_run
/// use pgsession_testkit::patroni::{PatroniCluster, PatroniOptions};
///
/// # async fn demo() -> Result<(), pgsession_testkit::TestkitError> {
/// let cluster = PatroniCluster::start(PatroniOptions::default()).await?;
/// // postgres://postgres@127.0.0.1:P0,127.0.0.1:P1/pgsession_test?target_session_attrs=read-write
/// let url = cluster.url();
/// let old = cluster.kill_leader().await?;
/// let new = cluster.wait_new_leader(old, std::time::Duration::from_secs(30)).await?;
/// cluster.restart_node(old).await?; // it comes back as a replica of `new`
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct PatroniCluster {
    dir: TempDir,
    /// The server programs, to stop the servers on drop.
    bin: Binaries,
    /// `Some((uid, gid))` of `postgres` when we are root.
    owner: Option<(u32, u32)>,
    patroni: PathBuf,
    etcd: Mutex<Option<Child>>,
    etcd_port: u16,
    nodes: Vec<PatroniNode>,
    /// Per node, when asked for: the way the other nodes reach it.
    proxies: Vec<FaultProxy>,
    synchronous_mode: bool,
}

impl PatroniCluster {
    /// Starts etcd, then every node's Patroni; returns once one node leads, every other streams
    /// from it (one of them as the synchronous standby in `synchronous_mode`), and database
    /// `pgsession_test` exists on all of them.
    pub async fn start(options: PatroniOptions) -> Result<Self> {
        if !(2..=3).contains(&options.nodes) {
            return Err(TestkitError::Replication(format!(
                "a Patroni cluster of {} nodes: 2 or 3 are supported",
                options.nodes
            )));
        }
        let patroni = find_program("patroni")?;
        let etcd = find_program("etcd")?;
        let template = template().await?;
        sweep_stale_dirs(&template.base);
        let bin = Binaries::find()?;
        // The directory of the real programs: `PATH` may hold links to some of them only.
        let bindir = bin
            .tool("pg_ctl")?
            .parent()
            .map(Path::to_owned)
            .unwrap_or_default();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{}-", std::process::id()))
            .tempdir_in(&template.base)
            .map_err(TestkitError::io("creating a Patroni cluster directory"))?;
        let owner = template.owner;
        hand_over(dir.path(), owner)?;

        let etcd_port = free_port()?;
        let peer_port = free_port()?;
        let mut nodes = Vec::with_capacity(options.nodes);
        for i in 0..options.nodes {
            let node_dir = dir.path().join(format!("node{i}"));
            fs::create_dir(&node_dir).map_err(TestkitError::io("creating a node directory"))?;
            hand_over(&node_dir, owner)?;
            nodes.push(PatroniNode {
                name: format!("node{i}"),
                pg_port: free_port()?,
                rest_port: free_port()?,
                dir: node_dir,
                child: Mutex::new(None),
            });
        }
        let mut proxies = Vec::new();
        if options.replication_proxies {
            for node in &nodes {
                proxies.push(FaultProxy::start(node.socket_addr()).await?);
            }
        }
        let cluster = PatroniCluster {
            bin,
            proxies,
            owner,
            patroni,
            etcd: Mutex::new(None),
            etcd_port,
            nodes,
            synchronous_mode: options.synchronous_mode,
            dir,
        };
        cluster.start_etcd(&etcd, peer_port).await?;
        for (i, node) in cluster.nodes.iter().enumerate() {
            let config = cluster.patroni_config(i, &options, &bindir);
            fs::write(node.config_path(), config)
                .map_err(TestkitError::io("writing patroni.yml"))?;
            hand_over(&node.config_path(), owner)?;
        }
        // The first node bootstraps (initdb) alone; the others then copy it.
        cluster.spawn_patroni(0)?;
        let leader = cluster.wait_leader(START_TIMEOUT).await?;
        for i in 1..cluster.nodes.len() {
            cluster.spawn_patroni(i)?;
        }
        for i in (0..cluster.nodes.len()).filter(|i| *i != leader) {
            cluster.wait_replica(i, START_TIMEOUT).await?;
        }
        if cluster.synchronous_mode {
            cluster.wait_synchronous(START_TIMEOUT).await?;
        }
        let admin = connect(&cluster.nodes[leader].url("postgres")).await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {DATABASE}"))
            .await
            .map_err(TestkitError::pg(format!("creating database {DATABASE}")))?;
        Ok(cluster)
    }

    /// `pgsession_test`.
    pub fn database(&self) -> &str {
        DATABASE
    }

    /// The nodes, in the order of [`url`](Self::url).
    pub fn nodes(&self) -> &[PatroniNode] {
        &self.nodes
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &PatroniNode {
        &self.nodes[i]
    }

    /// Every node in one URL, with `target_session_attrs=read-write`: a client connects to
    /// whichever of them accepts writes, which is the leader.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("{HOST}:{}", n.pg_port))
            .collect();
        format!(
            "postgres://postgres@{}/{DATABASE}?target_session_attrs=read-write",
            hosts.join(",")
        )
    }

    /// The proxy through which the other nodes reach node `i` (its `connect_address`: streaming
    /// replication from it, `pg_rewind` against it), when the cluster was started with
    /// [`PatroniOptions::replication_proxies`]. E.g. `blackhole(true)` on the leader's: its
    /// standbys receive nothing from then on, as with a network that delays replication.
    pub fn replication_proxy(&self, i: usize) -> Option<&FaultProxy> {
        self.proxies.get(i)
    }

    /// The REST API ports of the nodes, in order.
    pub fn rest_ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.rest_port).collect()
    }

    /// The etcd client URL.
    pub fn etcd_url(&self) -> String {
        format!("http://{HOST}:{}", self.etcd_port)
    }

    /// The node holding the leader lock now (its REST API answers `GET /leader` with 200), if
    /// any.
    pub async fn leader(&self) -> Option<usize> {
        for (i, node) in self.nodes.iter().enumerate() {
            if node.probe("/leader").await == Some(200) {
                return Some(i);
            }
        }
        None
    }

    /// Waits (at most `timeout`) until a node leads; returns it.
    pub async fn wait_leader(&self, timeout: Duration) -> Result<usize> {
        self.wait_leader_other_than(None, timeout).await
    }

    /// Waits (at most `timeout`) until a node other than `old` leads: the election after `old`
    /// was killed, or a switchover. Returns the new leader.
    pub async fn wait_new_leader(&self, old: usize, timeout: Duration) -> Result<usize> {
        self.wait_leader_other_than(Some(old), timeout).await
    }

    async fn wait_leader_other_than(&self, old: Option<usize>, timeout: Duration) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = self.leader().await;
            if let Some(leader) = last.filter(|leader| Some(*leader) != old) {
                return Ok(leader);
            }
            if Instant::now() > deadline {
                return Err(self.failure(format!(
                    "no leader other than {old:?} within {timeout:?} (last seen: {last:?})"
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits (at most `timeout`) until node `i` runs as a replica streaming from the leader
    /// (`GET /replica` answers 200, and the leader's `pg_stat_replication` shows it streaming).
    pub async fn wait_replica(&self, i: usize, timeout: Duration) -> Result<()> {
        let node = &self.nodes[i];
        let streaming = wait_until(timeout, || async {
            if node.probe("/replica").await != Some(200) {
                return None;
            }
            let leader = self.leader().await?;
            let client = connect(&self.nodes[leader].url("postgres")).await.ok()?;
            let row = client
                .query_one(
                    "SELECT count(*) FROM pg_stat_replication \
                     WHERE application_name = $1 AND state = 'streaming'",
                    &[&node.name],
                )
                .await
                .ok()?;
            (row.get::<_, i64>(0) == 1).then_some(())
        })
        .await;
        streaming.ok_or_else(|| {
            self.failure(format!(
                "{} did not stream from a leader within {timeout:?}",
                node.name
            ))
        })
    }

    /// Waits (at most `timeout`) until a node is the synchronous standby (`GET /sync` answers
    /// 200); returns it.
    pub async fn wait_synchronous(&self, timeout: Duration) -> Result<usize> {
        let found = wait_until(timeout, || async {
            for (i, node) in self.nodes.iter().enumerate() {
                if node.probe("/sync").await == Some(200) {
                    return Some(i);
                }
            }
            None
        })
        .await;
        found.ok_or_else(|| self.failure(format!("no synchronous standby within {timeout:?}")))
    }

    /// Kills node `i` as a crash of its machine would: SIGKILL to its Patroni and to its
    /// PostgreSQL (the postmaster's whole process group: Patroni starts it in a session of its
    /// own), and waits until PostgreSQL is gone.
    pub async fn kill_node(&self, i: usize) -> Result<()> {
        let node = &self.nodes[i];
        kill_child(&node.child);
        kill_postmasters(&node.data_dir());
        let gone = wait_until(Duration::from_secs(10), || async {
            postmaster_pids(&node.data_dir()).is_empty().then_some(())
        })
        .await;
        gone.ok_or_else(|| {
            self.failure(format!("the postmaster of {} outlived SIGKILL", node.name))
        })
    }

    /// Kills the leader ([`kill_node`](Self::kill_node)); returns which node it was.
    pub async fn kill_leader(&self) -> Result<usize> {
        let leader = self
            .leader()
            .await
            .ok_or_else(|| self.failure("no leader to kill".to_owned()))?;
        self.kill_node(leader).await?;
        Ok(leader)
    }

    /// Starts the Patroni of a killed node `i` again and waits (at most `timeout`) until it
    /// streams from the leader as a replica (rewound with `pg_rewind` if it had diverged).
    pub async fn restart_node(&self, i: usize) -> Result<()> {
        self.spawn_patroni(i)?;
        self.wait_replica(i, START_TIMEOUT).await
    }

    /// A planned switchover with `patronictl switchover --force`, to `candidate` (or any
    /// healthy standby when `None`); returns the new leader once it holds the lock.
    pub async fn switchover(&self, candidate: Option<usize>) -> Result<usize> {
        let leader = self
            .leader()
            .await
            .ok_or_else(|| self.failure("no leader to switch over from".to_owned()))?;
        let mut patronictl = StdCommand::new(find_program("patronictl")?);
        patronictl
            .arg("-c")
            .arg(self.nodes[leader].config_path())
            .args([
                "switchover",
                "--leader",
                &self.nodes[leader].name,
                "--force",
            ]);
        if let Some(candidate) = candidate {
            patronictl.args(["--candidate", &self.nodes[candidate].name]);
        }
        run(patronictl).await?;
        self.wait_new_leader(leader, START_TIMEOUT).await
    }

    /// Re-points `bouncer` at the current leader now ([`PgBouncer`]'s `[databases]` line
    /// rewritten, then `RELOAD` on its admin console). Returns the leader it points at.
    pub async fn point_pgbouncer(&self, bouncer: &PgBouncer) -> Result<usize> {
        let leader = self
            .leader()
            .await
            .ok_or_else(|| self.failure("no leader to point PgBouncer at".to_owned()))?;
        repoint(bouncer, self.nodes[leader].pg_port).await?;
        Ok(leader)
    }

    /// Keeps `bouncer` pointed at the leader: every 200 ms, the nodes' REST APIs are asked which
    /// leads (`GET /leader`), and when that changed, PgBouncer is re-pointed
    /// ([`point_pgbouncer`](Self::point_pgbouncer)). The task ends when the returned
    /// [`LeaderFollower`] is dropped.
    pub fn follow_leader(&self, bouncer: &PgBouncer) -> LeaderFollower {
        let rest_ports = self.rest_ports();
        let pg_ports: Vec<u16> = self.nodes.iter().map(|n| n.pg_port).collect();
        let config_path = bouncer.config_path().to_owned();
        let admin_url = bouncer.admin_url();
        let stop = Arc::new(AtomicBool::new(false));
        let repoints = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let (stop, repoints) = (stop.clone(), repoints.clone());
            tokio::spawn(async move {
                let mut current = None;
                while !stop.load(Ordering::SeqCst) {
                    let mut leader = None;
                    for (i, port) in rest_ports.iter().enumerate() {
                        if http_status(*port, "/leader").await == Some(200) {
                            leader = Some(i);
                            break;
                        }
                    }
                    if let Some(leader) = leader.filter(|l| Some(*l) != current) {
                        match repoint_config(&config_path, &admin_url, pg_ports[leader]).await {
                            Ok(()) => {
                                current = Some(leader);
                                repoints
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .push((Instant::now(), leader));
                            }
                            Err(e) => tracing::warn!(error = %e, "re-pointing PgBouncer failed"),
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            })
        };
        LeaderFollower {
            stop,
            repoints,
            task,
        }
    }

    /// Writes etcd's and starts it; returns once it accepts connections.
    async fn start_etcd(&self, program: &Path, peer_port: u16) -> Result<()> {
        let dir = self.dir.path().join("etcd");
        fs::create_dir(&dir).map_err(TestkitError::io("creating etcd's directory"))?;
        hand_over(&dir, self.owner)?;
        let client = format!("http://{HOST}:{}", self.etcd_port);
        let peer = format!("http://{HOST}:{peer_port}");
        let mut command = StdCommand::new(program);
        command
            .args(["--name", "etcd0", "--data-dir"])
            .arg(dir.join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("etcd0={peer}")])
            .args(["--initial-cluster-state", "new"]);
        let child = self.spawn_logged(command, &dir.join("etcd.log"))?;
        write_pid(&dir, child.id());
        *self.etcd.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.etcd_port));
        let up = wait_until(START_TIMEOUT, || async {
            tokio::net::TcpStream::connect(addr).await.ok().map(drop)
        })
        .await;
        up.ok_or_else(|| {
            TestkitError::Replication(format!(
                "etcd did not accept connections on {addr} within {START_TIMEOUT:?}: {}",
                fs::read_to_string(dir.join("etcd.log")).unwrap_or_default()
            ))
        })
    }

    /// Starts node `i`'s Patroni (again).
    fn spawn_patroni(&self, i: usize) -> Result<()> {
        let node = &self.nodes[i];
        let mut command = StdCommand::new(&self.patroni);
        command.arg(node.config_path());
        let child = self.spawn_logged(command, &node.log_path())?;
        write_pid(&node.dir, child.id());
        *node.child.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
        Ok(())
    }

    /// Spawns `command` as the server user, from the cluster's directory, its output appended
    /// to `log`.
    fn spawn_logged(&self, mut command: StdCommand, log: &Path) -> Result<Child> {
        let open = || {
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .map_err(TestkitError::io(format!("opening {}", log.display())))
        };
        command
            .current_dir(self.dir.path())
            .env("HOME", self.dir.path())
            .stdin(Stdio::null())
            .stdout(open()?)
            .stderr(open()?);
        if let Some((uid, gid)) = self.owner {
            // Patroni runs PostgreSQL, which refuses to run as root.
            command.uid(uid).gid(gid);
        }
        let description = format!("{command:?}");
        command
            .spawn()
            .map_err(TestkitError::io(format!("running {description}")))
    }

    /// `patroni.yml` of `node`.
    fn patroni_config(&self, i: usize, options: &PatroniOptions, bindir: &Path) -> String {
        let node = &self.nodes[i];
        let connect_port = self.proxies.get(i).map_or(node.pg_port, FaultProxy::port);
        let mut parameters = String::new();
        for (name, value) in &options.parameters {
            let _ = writeln!(parameters, "        {name}: '{value}'");
        }
        format!(
            "scope: pgsession-{pid}
name: {name}
restapi:
  listen: {HOST}:{rest}
  connect_address: {HOST}:{rest}
etcd3:
  hosts: {HOST}:{etcd}
bootstrap:
  dcs:
    ttl: {TTL}
    loop_wait: {LOOP_WAIT}
    retry_timeout: {RETRY_TIMEOUT}
    maximum_lag_on_failover: 1048576
    synchronous_mode: {sync}
    postgresql:
      use_pg_rewind: true
      parameters:
        wal_level: replica
        hot_standby: 'on'
        wal_log_hints: 'on'
        max_wal_senders: 10
        max_replication_slots: 10
        wal_keep_size: '64MB'
{parameters}  initdb:
  - encoding: UTF8
  - locale: C
  - auth: trust
  pg_hba:
  - local all all trust
  - host all all {HOST}/32 trust
  - host replication all {HOST}/32 trust
postgresql:
  listen: {HOST}:{pg}
  connect_address: {HOST}:{connect_port}
  data_dir: {data}
  bin_dir: {bindir}
  pgpass: {dir}/pgpass
  authentication:
    superuser:
      username: postgres
    replication:
      username: postgres
    rewind:
      username: postgres
  parameters:
    unix_socket_directories: '{dir}'
",
            pid = std::process::id(),
            name = node.name,
            rest = node.rest_port,
            etcd = self.etcd_port,
            sync = self.synchronous_mode,
            pg = node.pg_port,
            data = node.data_dir().display(),
            bindir = bindir.display(),
            dir = node.dir.display(),
        )
    }

    /// An error naming what went wrong, with the tail of every node's Patroni log.
    fn failure(&self, what: String) -> TestkitError {
        let mut text = what;
        for node in &self.nodes {
            let _ = write!(
                text,
                "\n--- {} (patroni.log)\n{}",
                node.name,
                node.log_tail()
            );
        }
        TestkitError::Replication(text)
    }
}

impl Drop for PatroniCluster {
    fn drop(&mut self) {
        // Patroni first, so that none starts its PostgreSQL again; then each server is stopped
        // (`-m immediate`: it removes its shared memory), and killed if that failed.
        for node in &self.nodes {
            kill_child(&node.child);
        }
        for node in &self.nodes {
            self.bin
                .stop_blocking(&node.data_dir(), StopMode::Immediate, "10");
            kill_postmasters(&node.data_dir());
        }
        kill_child(&self.etcd);
        // The postmasters' children leave once they see it gone; wait for them (bounded), so
        // that the directory is not removed under them.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline
            && self
                .nodes
                .iter()
                .any(|n| !postmaster_pids(&n.data_dir()).is_empty())
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        // `self.dir` is removed when the fields are dropped, right after this.
    }
}

/// The re-pointing task of [`PatroniCluster::follow_leader`]; stopped when dropped.
#[derive(Debug)]
pub struct LeaderFollower {
    stop: Arc<AtomicBool>,
    repoints: Arc<Mutex<Vec<(Instant, usize)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaderFollower {
    /// When PgBouncer was pointed at which node, in order (the first is the start).
    pub fn repoints(&self) -> Vec<(Instant, usize)> {
        self.repoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for LeaderFollower {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.abort();
    }
}

/// Points `bouncer` at `port`.
async fn repoint(bouncer: &PgBouncer, port: u16) -> Result<()> {
    repoint_config(bouncer.config_path(), &bouncer.admin_url(), port).await
}

/// Rewrites the `* = host=... port=...` line of the `pgbouncer.ini` at `config_path` to `port`
/// and has PgBouncer reload it: new server connections go to `port`, and those to the old
/// upstream are closed as they are released.
async fn repoint_config(config_path: &Path, admin_url: &str, port: u16) -> Result<()> {
    let text = fs::read_to_string(config_path).map_err(TestkitError::io(format!(
        "reading {}",
        config_path.display()
    )))?;
    let rewritten: Vec<String> = text
        .lines()
        .map(|line| {
            if line.starts_with("* = ") {
                format!("* = host={HOST} port={port} user=postgres")
            } else {
                line.to_owned()
            }
        })
        .collect();
    fs::write(config_path, rewritten.join("\n") + "\n").map_err(TestkitError::io(format!(
        "writing {}",
        config_path.display()
    )))?;
    let admin = connect(admin_url).await?;
    admin
        .simple_query("RELOAD")
        .await
        .map_err(TestkitError::pg("RELOAD on PgBouncer's console"))?;
    Ok(())
}

/// Polls `check` every [`POLL`] until it yields something, at most `timeout`.
async fn wait_until<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(found) = check().await {
            return Some(found);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The status code of `GET path` on `127.0.0.1:port` (HTTP/1.0, the body ignored), or `None`
/// when nothing answered within [`PROBE_TIMEOUT`].
async fn http_status(port: u16, path: &str) -> Option<u16> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .ok()?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {HOST}:{port}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut head = [0u8; 64];
        let mut read = 0;
        // "HTTP/1.0 200 OK": the status is the second word of the first line.
        while read < head.len() && !head[..read].contains(&b'\n') {
            match stream.read(&mut head[read..]).await.ok()? {
                0 => break,
                n => read += n,
            }
        }
        let line = String::from_utf8_lossy(&head[..read]).into_owned();
        line.split_whitespace().nth(1)?.parse().ok()
    };
    tokio::time::timeout(PROBE_TIMEOUT, exchange)
        .await
        .ok()
        .flatten()
}

/// `name` on `PATH`, else in `/usr/bin`; an error that says which package to install.
fn find_program(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(std::iter::once(PathBuf::from("/usr/bin")))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| TestkitError::Command {
            command: name.to_owned(),
            status: "not found".to_owned(),
            output: "the Patroni test kit needs patroni, patronictl and etcd: install them \
                     (Debian: apt-get install patroni etcd-server)"
                .to_owned(),
        })
}

/// Gives `path` to the server user when we are root.
fn hand_over(path: &Path, owner: Option<(u32, u32)>) -> Result<()> {
    if let Some((uid, gid)) = owner {
        chown(path, Some(uid), Some(gid)).map_err(TestkitError::io(format!(
            "handing {} to postgres",
            path.display()
        )))?;
    }
    Ok(())
}

/// Writes `pid` into `dir`'s pid file, for the sweep (best effort).
fn write_pid(dir: &Path, pid: u32) {
    let _ = fs::write(dir.join(PID_FILE), pid.to_string());
}

/// SIGKILLs the child, if it runs, and reaps it.
fn kill_child(child: &Mutex<Option<Child>>) {
    if let Some(mut child) = child.lock().unwrap_or_else(|e| e.into_inner()).take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The pids of the `postgres` processes started on `data_dir` (a postmaster whose command
/// line names it): read from `/proc`, since a postmaster being started or stopped by Patroni
/// may have no `postmaster.pid`.
fn postmaster_pids(data_dir: &Path) -> Vec<u32> {
    let needle = data_dir.as_os_str().as_bytes();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let comm = fs::read_to_string(entry.path().join("comm")).ok()?;
            let cmdline = fs::read(entry.path().join("cmdline")).ok()?;
            let state = fs::read_to_string(entry.path().join("stat")).ok()?;
            // A zombie ("Z" after the command name) is gone already.
            let zombie = state
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
            (comm.trim() == "postgres"
                && !zombie
                && cmdline.windows(needle.len()).any(|w| w == needle))
            .then_some(pid)
        })
        .collect()
}

/// SIGKILLs each postmaster of `data_dir` with its process group (its server processes), and
/// removes the shared memory they leave: a server killed so never removes its System V header
/// segment (its id is on line 7 of `postmaster.pid`) nor its dynamic shared memory segments
/// (`/dev/shm/PostgreSQL.*`, those its processes had mapped), and a test must leave nothing
/// behind. (Removing memory still attached only removes its name.)
fn kill_postmasters(data_dir: &Path) {
    let pid_file = fs::read_to_string(data_dir.join("postmaster.pid")).unwrap_or_default();
    for pid in postmaster_pids(data_dir) {
        let mut segments: Vec<PathBuf> = process_group(pid)
            .into_iter()
            .flat_map(shared_memory_files)
            .collect();
        // Segments no process had mapped at this moment are listed in the control segment.
        let listed: Vec<PathBuf> = segments.iter().flat_map(|s| listed_segments(s)).collect();
        segments.extend(listed);
        // postmaster.pid: pid, data directory, start time, port, socket directory, listen
        // address, "shmem key, shmem id".
        let header = (pid_file.lines().next().map(str::trim) == Some(&pid.to_string()))
            .then(|| {
                pid_file
                    .lines()
                    .nth(6)?
                    .split_whitespace()
                    .nth(1)
                    .map(str::to_owned)
            })
            .flatten();
        let _ = StdCommand::new("kill")
            .args(["-KILL", "--", &format!("-{pid}"), &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        for segment in segments {
            let _ = fs::remove_file(segment);
        }
        if let Some(shmid) = header {
            let _ = StdCommand::new("ipcrm")
                .args(["-m", &shmid])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The segments a dynamic shared memory control segment lists (nothing when `path` is not
/// one): PostgreSQL's own cleanup after a crash (`dsm_cleanup_using_control_segment` in
/// `src/backend/storage/ipc/dsm.c`) reads the same layout. A header of `magic`, `nitems`,
/// `maxitems` (u32 each), then items of 40 bytes from offset 16: `handle` (u32), `refcnt`
/// (u32), `first_page`, `npages`, a pointer, `pinned`. A free slot has `refcnt` 0; an odd
/// handle lives in the main shared memory, not in a file of its own.
fn listed_segments(path: &Path) -> Vec<PathBuf> {
    const MAGIC: u32 = 0x9a50_3d32;
    const ITEMS_AT: usize = 16;
    const ITEM_SIZE: usize = 40;
    let Ok(bytes) = fs::read(path) else {
        return Vec::new();
    };
    let word = |at: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
    };
    if word(0) != Some(MAGIC) {
        return Vec::new();
    }
    let items = word(4).unwrap_or(0) as usize;
    (0..items)
        .filter_map(|i| {
            let at = ITEMS_AT + i * ITEM_SIZE;
            let (handle, refcnt) = (word(at)?, word(at + 4)?);
            (refcnt != 0 && handle % 2 == 0)
                .then(|| PathBuf::from(format!("/dev/shm/PostgreSQL.{handle}")))
        })
        .collect()
}

/// The processes of process group `pgid` (`/proc/PID/stat`, field 5).
fn process_group(pgid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return vec![pgid];
    };
    let mut members: Vec<u32> = entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(entry.path().join("stat")).ok()?;
            // "pid (comm) state ppid pgrp ...": the command may hold spaces, not ')'.
            let (_, rest) = stat.rsplit_once(')')?;
            let group: u32 = rest.split_whitespace().nth(2)?.parse().ok()?;
            (group == pgid).then_some(pid)
        })
        .collect();
    if !members.contains(&pgid) {
        members.push(pgid);
    }
    members
}

/// The `/dev/shm/PostgreSQL.*` files process `pid` has mapped.
fn shared_memory_files(pid: u32) -> Vec<PathBuf> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let mut files: Vec<PathBuf> = maps
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .filter(|path| path.starts_with("/dev/shm/PostgreSQL."))
        .map(PathBuf::from)
        .collect();
    files.dedup();
    files
}

/// Kills what runs in cluster directories of test processes that no longer exist (etcd and
/// Patroni by their pid files, PostgreSQL by its data directory), then removes them.
fn sweep_stale_dirs(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(owner) = name
            .to_str()
            .and_then(|n| n.strip_prefix(DIR_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        let dirs = fs::read_dir(entry.path())
            .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
            .unwrap_or_default();
        for dir in &dirs {
            let pid = fs::read_to_string(dir.join(PID_FILE)).unwrap_or_default();
            let comm = fs::read_to_string(format!("/proc/{}/comm", pid.trim())).unwrap_or_default();
            if pid.trim().parse::<u32>().is_ok() && matches!(comm.trim(), "patroni" | "etcd") {
                let _ = StdCommand::new("kill").args(["-KILL", pid.trim()]).status();
            }
        }
        for dir in &dirs {
            kill_postmasters(&dir.join("data"));
        }
        tracing::debug!(path = %entry.path().display(), "removing a stale Patroni cluster");
        let _ = fs::remove_dir_all(entry.path());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_closed_port_is_no_answer() {
        let port = free_port().expect("free port");
        assert_eq!(http_status(port, "/leader").await, None);
    }
}
