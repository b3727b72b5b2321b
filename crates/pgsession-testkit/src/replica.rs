//! Owns [`ReplicaPair`]: a primary and a synchronous streaming standby, two [`TestCluster`]s on
//! loopback ports, for failover tests: stop the primary, promote the standby, and see whether
//! the application finds the new primary.

use std::time::{Duration, Instant};

use crate::{db::connect, ClusterOptions, Result, TestCluster, TestkitError};

/// The database [`ReplicaPair::start`] creates.
const DATABASE: &str = "pgsession_test";
/// The standby's `application_name`, as the primary sees it in `pg_stat_replication`.
pub const STANDBY_NAME: &str = "pgsession_standby";
/// How long [`ReplicaPair::start`] waits for the standby to stream synchronously.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);

/// Client and replication connections from loopback, without a password.
const PG_HBA: &str = "\
local all all trust
host all all 127.0.0.1/32 trust
host replication all 127.0.0.1/32 trust
";

/// A primary (`wal_level = replica`, `synchronous_standby_names = '*'`,
/// `synchronous_commit = on`) and a hot standby made from it with `pg_basebackup -R`, streaming
/// as [`STANDBY_NAME`]. Once [`ReplicaPair::start`] returns, the standby is the synchronous one:
/// a commit acknowledged by the primary is flushed on the standby, so it survives a failover.
///
/// The standby has `synchronous_standby_names = ''`, so that once promoted (with no standby of
/// its own) its commits do not wait. Both clusters are torn down on drop.
///
/// ```no_run
/// use pgsession_testkit::ReplicaPair;
///
/// # async fn demo() -> Result<(), pgsession_testkit::TestkitError> {
/// let pair = ReplicaPair::start().await?;
/// // postgres://postgres@127.0.0.1:P1,127.0.0.1:P2/pgsession_test?target_session_attrs=read-write
/// let url = pair.url();
/// pair.stop_primary().await?;
/// pair.promote_standby().await?; // the same URL now reaches the new primary
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct ReplicaPair {
    primary: TestCluster,
    standby: TestCluster,
}

impl ReplicaPair {
    /// Starts the primary, makes the standby from it, waits until the standby streams
    /// synchronously, and creates database `pgsession_test` (on both, by replication).
    pub async fn start() -> Result<Self> {
        let primary = TestCluster::start_with(ClusterOptions {
            config: vec![
                "wal_level = replica".into(),
                "max_wal_senders = 5".into(),
                "wal_keep_size = '64MB'".into(),
                "hot_standby = on".into(),
                // The testkit's default is off, which would not wait for the standby.
                "synchronous_commit = on".into(),
                "synchronous_standby_names = '*'".into(),
            ],
            files: vec![("pg_hba.conf".into(), PG_HBA.as_bytes().to_vec(), 0o600)],
            ..ClusterOptions::default()
        })
        .await?;
        let standby = TestCluster::start_standby(
            &primary,
            STANDBY_NAME,
            ClusterOptions {
                config: vec!["synchronous_standby_names = ''".into()],
                ..ClusterOptions::default()
            },
        )
        .await?;
        let pair = ReplicaPair { primary, standby };
        pair.wait_synchronous().await?;
        pair.primary.create_database(DATABASE).await?;
        pair.wait_caught_up().await?;
        Ok(pair)
    }

    /// The primary (until a promotion; it stays the first host of [`url`](Self::url)).
    pub fn primary(&self) -> &TestCluster {
        &self.primary
    }

    /// The standby.
    pub fn standby(&self) -> &TestCluster {
        &self.standby
    }

    /// `pgsession_test`.
    pub fn database(&self) -> &str {
        DATABASE
    }

    /// Both servers in one URL, primary first, with `target_session_attrs=read-write`: a client
    /// connects to whichever of them accepts writes.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{DATABASE}?target_session_attrs=read-write",
            self.primary.port(),
            self.standby.port()
        )
    }

    /// The database on the primary only.
    pub fn primary_url(&self) -> String {
        self.primary.url(DATABASE)
    }

    /// The database on the standby only.
    pub fn standby_url(&self) -> String {
        self.standby.url(DATABASE)
    }

    /// Stops the primary (`pg_ctl stop -m fast`). With synchronous replication, every commit it
    /// acknowledged is on the standby.
    pub async fn stop_primary(&self) -> Result<()> {
        self.primary.stop().await
    }

    /// Promotes the standby (`pg_ctl promote -w`): returns once it accepts writes.
    pub async fn promote_standby(&self) -> Result<()> {
        self.standby.promote().await
    }

    /// Waits (at most 30 s) until the primary reports the standby as streaming and synchronous.
    pub async fn wait_synchronous(&self) -> Result<()> {
        let primary = connect(&self.primary.url("postgres")).await?;
        let started = Instant::now();
        loop {
            let row = primary
                .query_one(
                    "SELECT count(*) FROM pg_stat_replication \
                     WHERE application_name = $1 AND state = 'streaming' AND sync_state = 'sync'",
                    &[&STANDBY_NAME],
                )
                .await
                .map_err(TestkitError::pg("reading pg_stat_replication"))?;
            if row.get::<_, i64>(0) == 1 {
                return Ok(());
            }
            if started.elapsed() > SYNC_TIMEOUT {
                return Err(TestkitError::Replication(format!(
                    "the standby did not stream synchronously within {SYNC_TIMEOUT:?}; \
                     standby log:\n{}",
                    self.standby.read_log().unwrap_or_default()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (at most 30 s) until the standby has replayed everything the primary has written
    /// so far, so that a read on the standby sees it.
    pub async fn wait_caught_up(&self) -> Result<()> {
        let primary = connect(&self.primary.url("postgres")).await?;
        let lsn: String = primary
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .map_err(TestkitError::pg("reading the primary's WAL position"))?
            .get(0);
        let standby = connect(&self.standby.url("postgres")).await?;
        let started = Instant::now();
        loop {
            let caught_up: bool = standby
                .query_one(
                    "SELECT coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, false)",
                    &[&lsn],
                )
                .await
                .map_err(TestkitError::pg("reading the standby's replay position"))?
                .get(0);
            if caught_up {
                return Ok(());
            }
            if started.elapsed() > SYNC_TIMEOUT {
                return Err(TestkitError::Replication(format!(
                    "the standby did not replay up to {lsn} within {SYNC_TIMEOUT:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
