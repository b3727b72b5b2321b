//! What `doctor` found, and its two renderings: the text an operator reads
//! (`Display`) and the JSON a script reads (`--json`, the same fields).

use std::fmt;
use std::time::Duration;

use serde::Serialize;

use super::STEPS;

/// How a step went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Verdict {
    /// Fine.
    Ok,
    /// Works, but something deserves a look (slow, unverified, unusual).
    Warn,
    /// Does not work: the session store would fail here.
    Fail,
    /// Not run, because an earlier step failed.
    Skip,
}

impl Verdict {
    fn label(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "skip",
        }
    }
}

/// One step of the report.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Step {
    pub(crate) name: &'static str,
    pub(crate) verdict: Verdict,
    #[serde(rename = "took_ms", serialize_with = "millis")]
    pub(crate) took: Option<Duration>,
    /// What was found.
    pub(crate) detail: String,
    /// For a warning or a failure: the likely cause and what to change.
    pub(crate) hint: Option<String>,
}

/// What a server of a multi-host URL is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Role {
    /// Accepts writes (`pg_is_in_recovery()` is false).
    Primary,
    /// A read-only standby (in recovery).
    Standby,
    /// Could not be asked.
    Unreachable,
}

/// One host of a multi-host URL: its role and how far behind it is.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct HostReport {
    /// `host:port/db`, as [`pgsession::Config::target`] writes it.
    pub(crate) host: String,
    pub(crate) role: Role,
    /// Why it could not be asked.
    pub(crate) error: Option<String>,
    /// On a standby: its replay lag.
    pub(crate) standby: Option<StandbyLag>,
    /// On a primary: the standbys streaming from it.
    pub(crate) replicas: Vec<Replica>,
}

/// A standby's own view of its lag.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct StandbyLag {
    /// `now() - pg_last_xact_replay_timestamp()`: the age of the last
    /// transaction replayed (grows while the primary writes nothing).
    pub(crate) replay_lag_seconds: Option<f64>,
    /// WAL received from the primary.
    pub(crate) received_lsn: Option<String>,
    /// WAL replayed (visible to readers).
    pub(crate) replayed_lsn: Option<String>,
    /// WAL received and not yet replayed.
    pub(crate) unreplayed_bytes: Option<f64>,
}

/// A standby as its primary sees it (`pg_stat_replication`).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Replica {
    pub(crate) name: String,
    pub(crate) address: String,
    pub(crate) state: String,
    pub(crate) sync_state: String,
    /// `replay_lag`: NULL (none) once the standby is idle and caught up.
    pub(crate) replay_lag_seconds: Option<f64>,
    /// WAL written on the primary and not yet replayed there.
    pub(crate) behind_bytes: Option<f64>,
}

/// What `doctor` found.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Report {
    /// The database, password hidden.
    pub(crate) target: String,
    pub(crate) steps: Vec<Step>,
    /// Direct connection or behind a pooler, when it could be told.
    pub(crate) mode: Option<String>,
    /// For a multi-host URL: every host, in the URL's order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) hosts: Vec<HostReport>,
}

impl Report {
    /// The step called `name`, if it was reported.
    pub(crate) fn step(&self, name: &str) -> Option<&Step> {
        self.steps.iter().find(|s| s.name == name)
    }

    /// Steps that failed.
    pub(crate) fn failures(&self) -> usize {
        self.count(Verdict::Fail)
    }

    fn count(&self, verdict: Verdict) -> usize {
        self.steps.iter().filter(|s| s.verdict == verdict).count()
    }

    pub(crate) fn push(
        &mut self,
        name: &'static str,
        verdict: Verdict,
        took: Option<Duration>,
        detail: impl Into<String>,
        hint: Option<String>,
    ) {
        self.steps.push(Step {
            name,
            verdict,
            took,
            detail: detail.into(),
            hint,
        });
    }

    pub(crate) fn ok(&mut self, name: &'static str, took: Duration, detail: impl Into<String>) {
        self.push(name, Verdict::Ok, Some(took), detail, None);
    }

    pub(crate) fn fail(
        &mut self,
        name: &'static str,
        took: Option<Duration>,
        detail: impl Into<String>,
        hint: impl Into<String>,
    ) {
        self.push(name, Verdict::Fail, took, detail, Some(hint.into()));
    }

    /// Marks every step of [`STEPS`] not reported yet as not run.
    pub(crate) fn skip_rest(&mut self) {
        let failed = self
            .steps
            .iter()
            .rev()
            .find(|s| s.verdict == Verdict::Fail)
            .map_or("an earlier step", |s| s.name);
        let reason = format!("not run: {failed} failed");
        for name in STEPS {
            if self.step(name).is_none() {
                self.push(name, Verdict::Skip, None, reason.clone(), None);
            }
        }
    }

    /// The report as JSON: the same fields as the text, plus `result`.
    pub(crate) fn to_json(&self) -> String {
        #[derive(Serialize)]
        struct Json<'a> {
            result: &'static str,
            failures: usize,
            warnings: usize,
            #[serde(flatten)]
            report: &'a Report,
        }
        let json = Json {
            result: if self.failures() > 0 { "failed" } else { "ok" },
            failures: self.failures(),
            warnings: self.count(Verdict::Warn),
            report: self,
        };
        serde_json::to_string_pretty(&json).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }
}

fn millis<S: serde::Serializer>(took: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match took {
        Some(d) => s.serialize_some(&(d.as_secs_f64() * 1000.0)),
        None => s.serialize_none(),
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "pgsession doctor: {}", self.target)?;
        writeln!(f)?;
        let width = STEPS.iter().map(|s| s.len()).max().unwrap_or(0);
        for step in &self.steps {
            let took = step.took.map(format_duration).unwrap_or_default();
            writeln!(
                f,
                "  {:<4}  {:<width$}  {:>9}  {}",
                step.verdict.label(),
                step.name,
                took,
                step.detail
            )?;
            if let Some(hint) = &step.hint {
                let label = match step.verdict {
                    Verdict::Ok => "note",
                    _ => "hint",
                };
                writeln!(f, "  {:<4}  {:<width$}  {:>9}  {label}: {hint}", "", "", "")?;
            }
        }
        if !self.hosts.is_empty() {
            writeln!(f)?;
            writeln!(f, "hosts:")?;
            for host in &self.hosts {
                writeln!(f, "  {host}")?;
            }
        }
        writeln!(f)?;
        if let Some(mode) = &self.mode {
            writeln!(f, "mode: {mode}")?;
        }
        let (failures, warnings) = (self.failures(), self.count(Verdict::Warn));
        let checks = self.steps.len() - self.count(Verdict::Skip);
        if failures > 0 {
            writeln!(
                f,
                "result: FAILED: {failures} of {checks} checks failed{}",
                plural_warnings(warnings)
            )
        } else {
            writeln!(
                f,
                "result: ok: {checks} checks passed{}",
                plural_warnings(warnings)
            )
        }
    }
}

/// `127.0.0.1:5433/db  standby; replay lag 1.2 ms, received 0/3000060, replayed 0/3000060`.
impl fmt::Display for HostReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}  ", self.host)?;
        match self.role {
            Role::Unreachable => write!(
                f,
                "unreachable: {}",
                self.error.as_deref().unwrap_or("no answer")
            ),
            Role::Standby => {
                write!(f, "standby")?;
                if let Some(lag) = &self.standby {
                    let replay = match lag.replay_lag_seconds {
                        Some(s) => format_duration(Duration::from_secs_f64(s.max(0.0))),
                        None => "unknown (nothing replayed yet)".to_owned(),
                    };
                    let lsn = |l: &Option<String>| l.clone().unwrap_or_else(|| "-".to_owned());
                    write!(
                        f,
                        "; replay lag {replay} (age of the last replayed transaction), \
                         received {}, replayed {} ({} bytes received and not replayed)",
                        lsn(&lag.received_lsn),
                        lsn(&lag.replayed_lsn),
                        bytes(lag.unreplayed_bytes)
                    )?;
                }
                Ok(())
            }
            Role::Primary => {
                write!(f, "primary")?;
                match self.replicas.len() {
                    0 => write!(f, "; no standby streams from it"),
                    n => {
                        write!(f, "; {n} standby{}:", if n == 1 { "" } else { "s" })?;
                        for (i, r) in self.replicas.iter().enumerate() {
                            let lag = match r.replay_lag_seconds {
                                Some(s) => format_duration(Duration::from_secs_f64(s.max(0.0))),
                                None => "none".to_owned(),
                            };
                            write!(
                                f,
                                "{} {} ({}) {}, {}, replay lag {lag}, {} bytes not replayed",
                                if i == 0 { "" } else { ";" },
                                r.name,
                                r.address,
                                r.state,
                                r.sync_state,
                                bytes(r.behind_bytes)
                            )?;
                        }
                        Ok(())
                    }
                }
            }
        }
    }
}

/// A byte count from the server (`pg_wal_lsn_diff` is numeric), or `?`.
fn bytes(count: Option<f64>) -> String {
    count.map_or("?".to_owned(), |b| format!("{b:.0}"))
}

fn plural_warnings(n: usize) -> String {
    match n {
        0 => String::new(),
        1 => ", 1 warning".to_owned(),
        n => format!(", {n} warnings"),
    }
}

/// `12.3 ms`, `3.02 s`.
pub(crate) fn format_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 0.999_95 {
        format!("{:.1} ms", s * 1000.0)
    } else {
        format!("{s:.2} s")
    }
}

/// `1s`, `500ms`, `2m`: as the settings are written.
pub(crate) fn humantime(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        "0".to_owned()
    } else if ms.is_multiple_of(86_400_000) {
        format!("{}d", ms / 86_400_000)
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}
