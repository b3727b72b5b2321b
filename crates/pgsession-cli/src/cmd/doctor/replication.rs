//! The step of `doctor` for a multi-host URL: every host asked on its own
//! (as the pool connects, whatever its role), which one is the primary
//! (`pg_is_in_recovery()`), and how far behind the standbys are, from the
//! standby's side (age of the last replayed transaction, WAL received and
//! replayed) and from the primary's (`pg_stat_replication`).

use std::time::Instant;

use pgsession::{Config, DoctorQueries};

use super::report::{HostReport, Replica, Role, StandbyLag, Verdict};
use super::{Doctor, HOSTS};

impl Doctor {
    /// Asks every host of the URL, in order, and reports them.
    pub(super) async fn hosts(&mut self) {
        let started = Instant::now();
        let queries = self.queries();
        let mut hosts = Vec::new();
        for one in pgsession::each_host(&self.config) {
            hosts.push(self.host(&one, &queries).await);
        }
        let with = |role| -> Vec<&str> {
            hosts
                .iter()
                .filter(|h| h.role == role)
                .map(|h| h.host.as_str())
                .collect()
        };
        let (primaries, standbys, unreachable) = (
            with(Role::Primary),
            with(Role::Standby),
            with(Role::Unreachable),
        );
        let mut detail = format!(
            "primary: {}; standby: {}",
            list(&primaries),
            list(&standbys)
        );
        if !unreachable.is_empty() {
            detail.push_str(&format!("; unreachable: {}", unreachable.join(", ")));
        }
        let took = Some(started.elapsed());
        if primaries.is_empty() {
            self.report.fail(
                HOSTS,
                took,
                detail,
                "no host accepts writes: every save fails until a standby is promoted (or the \
                 primary is back); check the HA manager",
            );
        } else if primaries.len() > 1 {
            self.report.fail(
                HOSTS,
                took,
                detail,
                "more than one host accepts writes (a split brain, or unrelated servers in one \
                 URL): sessions written to each would diverge; fence the old primary",
            );
        } else if !unreachable.is_empty() {
            self.report.push(
                HOSTS,
                Verdict::Warn,
                took,
                detail,
                Some(
                    "a host of the URL does not answer: the pool skips it, but a failover to \
                     it would fail"
                        .to_owned(),
                ),
            );
        } else {
            self.report.ok(HOSTS, started.elapsed(), detail);
        }
        self.report.hosts = hosts;
    }

    /// One host: connected to as the pool connects, then asked its role
    /// and its lag, within the connect and query timeouts.
    async fn host(&self, one: &Config, q: &DoctorQueries) -> HostReport {
        let mut report = HostReport {
            host: one.target(),
            role: Role::Unreachable,
            error: None,
            standby: None,
            replicas: Vec::new(),
        };
        let connect = pgsession::connect_one(one);
        let client = match tokio::time::timeout(one.connect_budget(), connect).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => {
                report.error = Some(e.to_string());
                return report;
            }
            Err(_) => {
                report.error = Some("no answer within the connect timeout".to_owned());
                return report;
            }
        };
        let ask = async {
            let in_recovery: bool = client.query_one(&q.in_recovery, &[]).await?.get(0);
            if in_recovery {
                let row = client.query_one(&q.standby_lag, &[]).await?;
                let lag = StandbyLag {
                    replay_lag_seconds: row.get(0),
                    received_lsn: row.get(1),
                    replayed_lsn: row.get(2),
                    unreplayed_bytes: row.get(3),
                };
                return Ok::<_, tokio_postgres::Error>((Role::Standby, Some(lag), Vec::new()));
            }
            let replicas = client
                .query(&q.primary_lag, &[])
                .await?
                .iter()
                .map(|r| Replica {
                    name: r.get(0),
                    address: r.get(1),
                    state: r.get(2),
                    sync_state: r.get(3),
                    replay_lag_seconds: r.get(4),
                    behind_bytes: r.get(5),
                })
                .collect();
            Ok((Role::Primary, None, replicas))
        };
        match tokio::time::timeout(one.query_timeout(), ask).await {
            Ok(Ok((role, standby, replicas))) => {
                report.role = role;
                report.standby = standby;
                report.replicas = replicas;
            }
            Ok(Err(e)) => report.error = Some(pgsession::Error::Postgres(e).to_string()),
            Err(_) => report.error = Some("no answer within the query timeout".to_owned()),
        }
        report
    }
}

fn list(hosts: &[&str]) -> String {
    if hosts.is_empty() {
        "none".to_owned()
    } else {
        hosts.join(", ")
    }
}
