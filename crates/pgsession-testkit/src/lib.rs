//! Test support for pgsession: throwaway PostgreSQL clusters ([`TestCluster`]), fresh test
//! databases ([`TestDb`]), a TCP proxy that injects network faults ([`FaultProxy`]), PgBouncer
//! in front of a server ([`PgBouncer`], needs the `pgbouncer` binary) and a primary with a
//! synchronous streaming standby ([`ReplicaPair`]).
//!
//! [`server::Binaries`] is the layer under the clusters: finding the server programs, `initdb`,
//! `pg_ctl` start, stop and status, as the `postgres` user when run as root. `pgsession serve`
//! makes its embedded PostgreSQL with it too, so that there is one way to do each.
//!
//! [`TestDb::new`] uses the server in `DATABASE_URL` when that is set; otherwise, like
//! [`TestCluster`], it needs the PostgreSQL server binaries (`initdb`, `pg_ctl`) on `PATH` or in
//! `pg_config --bindir`, and fails with [`TestkitError::BinariesNotFound`] when they are missing.
//! When run as root, the servers run as the `postgres` user.
//!
//! ```no_run
//! use std::time::Duration;
//! use pgsession_testkit::{FaultProxy, TestDb};
//!
//! # async fn demo() -> Result<(), pgsession_testkit::TestkitError> {
//! let db = TestDb::throwaway().await?;
//! let cluster = db.cluster().expect("a throwaway database has a cluster");
//! let proxy = FaultProxy::start(cluster.socket_addr()).await?;
//!
//! let (client, connection) = tokio_postgres::connect(&proxy.url_for(db.name()), tokio_postgres::NoTls)
//!     .await
//!     .expect("connect through the proxy");
//! tokio::spawn(connection);
//! proxy.latency(Duration::from_millis(50));
//! client.simple_query("SELECT 1").await.expect("slow but fine");
//!
//! cluster.restart().await?;
//! assert!(client.simple_query("SELECT 1").await.is_err());
//! # Ok(())
//! # }
//! ```

mod cluster;
mod db;
mod error;
pub mod patroni;
mod pgbouncer;
mod proxy;
mod replica;
pub mod server;

pub use cluster::{ClusterOptions, TestCluster};
pub use db::TestDb;
pub use error::{Result, TestkitError};
pub use pgbouncer::{PgBouncer, PgBouncerOptions};
pub use proxy::FaultProxy;
pub use replica::{ReplicaPair, STANDBY_NAME};
