//! The printed results: Markdown tables (readable in a terminal, pasted as
//! they are into BENCHMARKS.md), with the ratio of pgsession to its
//! reference and whether each target is met.

use std::fmt::Write as _;
use std::time::Duration;

use crate::load::{LoadResult, Workload};

/// Which server a run drove.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ServerKind {
    /// `pgsession serve`.
    Pgsession,
    /// axum + tower-sessions + tower-sessions-sqlx-store (`peer-server`).
    Peer,
    /// Another `pgsession` binary (`--baseline-bin`): an earlier build,
    /// measured in the same run to show what a change costs.
    Baseline,
}

impl ServerKind {
    /// Its name in tables.
    pub(crate) fn name(self) -> &'static str {
        match self {
            ServerKind::Pgsession => "pgsession",
            ServerKind::Peer => "peer",
            ServerKind::Baseline => "baseline",
        }
    }
}

/// One server under one workload.
#[derive(Debug)]
pub(crate) struct HttpRow {
    /// The workload.
    pub(crate) workload: Workload,
    /// The server.
    pub(crate) server: ServerKind,
    /// What the load generator saw.
    pub(crate) load: LoadResult,
    /// The server's `VmHWM`, in KiB.
    pub(crate) peak_rss_kib: Option<u64>,
}

/// The target ratio of pgsession's requests/s to the peer's.
fn http_target(workload: Workload) -> f64 {
    match workload {
        Workload::Read => 1.3,
        Workload::Rolling => 3.0,
        Workload::Write | Workload::Login => 1.5,
    }
}

/// Peak RSS allowed to the reference server.
const RSS_TARGET_KIB: u64 = 32 * 1024;

fn ms(latency: Option<Duration>) -> String {
    latency.map_or("-".into(), |d| format!("{:.2}", d.as_secs_f64() * 1e3))
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("-".into(), |k| format!("{:.1}", k as f64 / 1024.0))
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "NOT met"
    }
}

/// The HTTP table, then one line per workload with the ratios and targets.
pub(crate) fn http_table(rows: &[HttpRow]) -> String {
    let mut out = String::new();
    out.push_str("| workload | server | requests/s | p50 ms | p99 ms | errors | peak RSS MiB |\n");
    out.push_str("|---|---|---:|---:|---:|---:|---:|\n");
    for row in rows {
        let errors = if row.load.setup_errors > 0 {
            format!("{} (+{} in set-up)", row.load.errors, row.load.setup_errors)
        } else {
            row.load.errors.to_string()
        };
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {} | {} | {} | {} |",
            row.workload.name(),
            row.server.name(),
            row.load.rate(),
            ms(row.load.quantile(0.5)),
            ms(row.load.quantile(0.99)),
            errors,
            mib(row.peak_rss_kib),
        );
    }
    let mut workloads: Vec<Workload> = rows.iter().map(|r| r.workload).collect();
    workloads.dedup();
    let find = |w, s| rows.iter().find(|r| r.workload == w && r.server == s);
    out.push_str(
        "\n| workload | requests/s pgsession / peer | target | p99 pgsession / peer | p99 no worse | pgsession peak RSS ≤ 32 MiB |\n",
    );
    out.push_str("|---|---:|---|---:|---|---|\n");
    for w in workloads {
        let (Some(ours), Some(peer)) = (find(w, ServerKind::Pgsession), find(w, ServerKind::Peer))
        else {
            continue;
        };
        let ratio = ours.load.rate() / peer.load.rate().max(f64::EPSILON);
        let target = http_target(w);
        let (p99_ratio, p99_ok) = match (ours.load.quantile(0.99), peer.load.quantile(0.99)) {
            (Some(a), Some(b)) => (
                format!(
                    "{:.2}×",
                    a.as_secs_f64() / b.as_secs_f64().max(f64::EPSILON)
                ),
                verdict(a <= b),
            ),
            _ => ("-".into(), "-"),
        };
        let rss = ours
            .peak_rss_kib
            .map_or("-", |k| verdict(k <= RSS_TARGET_KIB));
        let _ = writeln!(
            out,
            "| {} | {ratio:.2}× | ≥ {target}×: {} | {p99_ratio} | {p99_ok} | {rss} |",
            w.name(),
            verdict(ratio >= target),
        );
    }
    if workloads_of(rows).any(|w| find(w, ServerKind::Baseline).is_some()) {
        out.push_str(
            "\n| workload | requests/s pgsession / baseline | p99 pgsession / baseline |\n",
        );
        out.push_str("|---|---:|---:|\n");
        for w in workloads_of(rows) {
            let (Some(ours), Some(base)) = (
                find(w, ServerKind::Pgsession),
                find(w, ServerKind::Baseline),
            ) else {
                continue;
            };
            let ratio = ours.load.rate() / base.load.rate().max(f64::EPSILON);
            let p99 = match (ours.load.quantile(0.99), base.load.quantile(0.99)) {
                (Some(a), Some(b)) => format!(
                    "{:.2}×",
                    a.as_secs_f64() / b.as_secs_f64().max(f64::EPSILON)
                ),
                _ => "-".into(),
            };
            let _ = writeln!(out, "| {} | {ratio:.3}× | {p99} |", w.name());
        }
    }
    out
}

/// The workloads of `rows`, in order, once each.
fn workloads_of(rows: &[HttpRow]) -> impl Iterator<Item = Workload> {
    let mut workloads: Vec<Workload> = rows.iter().map(|r| r.workload).collect();
    workloads.dedup();
    workloads.into_iter()
}

/// A store operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum StoreOp {
    /// `Store::load` / the SELECT.
    Load,
    /// `Store::save` / the upsert.
    Save,
}

impl StoreOp {
    /// Its name in tables and file names.
    pub(crate) fn name(self) -> &'static str {
        match self {
            StoreOp::Load => "load",
            StoreOp::Save => "save",
        }
    }
}

/// One operation at one concurrency, store and pgbench.
#[derive(Debug)]
pub(crate) struct StoreRow {
    /// The operation.
    pub(crate) op: StoreOp,
    /// Concurrent callers (pgbench clients).
    pub(crate) callers: usize,
    /// `pgsession::Store` operations per second.
    pub(crate) ops_per_sec: f64,
    /// Their median latency.
    pub(crate) p50: Option<Duration>,
    /// Their 99th percentile.
    pub(crate) p99: Option<Duration>,
    /// Failed store calls.
    pub(crate) errors: u64,
    /// pgbench's tps (without connection time).
    pub(crate) pgbench_tps: f64,
    /// pgbench's average latency.
    pub(crate) pgbench_latency_ms: Option<f64>,
}

/// The store table; targets are for 32 callers.
pub(crate) fn store_table(rows: &[StoreRow]) -> String {
    let mut out = String::new();
    out.push_str(
        "| op | callers | Store ops/s | p50 ms | p99 ms | errors | pgbench tps | pgbench avg ms | Store / pgbench | target |\n",
    );
    out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
    for row in rows {
        let ratio = row.ops_per_sec / row.pgbench_tps.max(f64::EPSILON);
        let target = match (row.op, row.callers) {
            (StoreOp::Save, 32) => format!("≥ 2×: {}", verdict(ratio >= 2.0)),
            (StoreOp::Load, 32) => format!("≥ 0.9×: {}", verdict(ratio >= 0.9)),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {} | {} | {} | {:.0} | {} | {ratio:.2}× | {target} |",
            row.op.name(),
            row.callers,
            row.ops_per_sec,
            ms(row.p50),
            ms(row.p99),
            row.errors,
            row.pgbench_tps,
            row.pgbench_latency_ms
                .map_or("-".into(), |l| format!("{l:.3}")),
        );
    }
    out
}

/// nproc, memory, CPU model and load average, from /proc.
pub(crate) fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|r| r.trim_start_matches([' ', '\t', ':']))
        })
        .unwrap_or("unknown");
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|r| r.split_whitespace().next()?.parse::<f64>().ok())
        .map_or("?".into(), |kib| format!("{:.1}", kib / 1024.0 / 1024.0));
    // Other work on the machine skews every figure: show how busy it was.
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!(
        "machine: {cpus} CPUs ({model}), {mem_gib} GiB memory; load average {}",
        load.join(" ")
    )
}
