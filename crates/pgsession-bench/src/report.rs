//! The printed results: Markdown tables (readable in a terminal, pasted as
//! they are into BENCHMARKS.md), with the ratio of pgsession to its
//! reference and whether each target is met.

use std::fmt::Write as _;
use std::time::Duration;

use crate::load::{LoadResult, Workload};
use crate::statements::Counts;

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
    /// axum answering `{"views":1}` with no session at all
    /// (`ceiling-server`): the read workload's ceiling.
    Ceiling,
}

impl ServerKind {
    /// Its name in tables.
    pub(crate) fn name(self) -> &'static str {
        match self {
            ServerKind::Pgsession => "pgsession",
            ServerKind::Peer => "peer",
            ServerKind::Baseline => "baseline",
            ServerKind::Ceiling => "no-store ceiling",
        }
    }
}

/// One server under one workload at one number of connections.
#[derive(Debug)]
pub(crate) struct HttpRow {
    /// The workload.
    pub(crate) workload: Workload,
    /// The server.
    pub(crate) server: ServerKind,
    /// Concurrent connections of the load generator.
    pub(crate) connections: usize,
    /// What the load generator saw.
    pub(crate) load: LoadResult,
    /// The server process's CPU time (user + system) over the measured
    /// slices, per request completed in them, in µs.
    pub(crate) cpu_us_per_request: Option<f64>,
    /// The server's threads' context switches per request: hand-offs
    /// between threads, each a wake-up.
    pub(crate) switches_per_request: Option<f64>,
    /// The statements PostgreSQL ran during the server's slices.
    pub(crate) statements: Option<Counts>,
    /// The server's `VmHWM`, in KiB.
    pub(crate) peak_rss_kib: Option<u64>,
}

/// The target ratio of pgsession's requests/s to the peer's, at every
/// number of connections (issue 14).
const HTTP_TARGET: f64 = 1.2;

/// The target share of the no-store ceiling for the read workload at 32
/// connections.
const CEILING_TARGET: f64 = 0.4;

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

/// `a / b` of two latencies, and whether `a` is no worse.
fn p99_ratio(a: Option<Duration>, b: Option<Duration>) -> (String, &'static str) {
    match (a, b) {
        (Some(a), Some(b)) => (
            format!(
                "{:.2}×",
                a.as_secs_f64() / b.as_secs_f64().max(f64::EPSILON)
            ),
            verdict(a <= b),
        ),
        _ => ("-".into(), "-"),
    }
}

/// The HTTP table of one durability, then the ratios and targets per
/// connections and workload, and the read workload against the ceiling.
pub(crate) fn http_table(rows: &[HttpRow]) -> String {
    let mut out = String::new();
    out.push_str(
        "| conns | workload | server | requests/s | p50 ms | p99 ms | errors (wrong body) | CPU µs/req | ctx switches/req | SQL calls per request | peak RSS MiB |\n",
    );
    out.push_str("|---:|---|---|---:|---:|---:|---:|---:|---:|---|---:|\n");
    for row in rows {
        let mut errors = format!("{} ({})", row.load.errors, row.load.wrong_bodies);
        if row.load.setup_errors > 0 {
            let _ = write!(errors, " +{} in set-up", row.load.setup_errors);
        }
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.0} | {} | {} | {errors} | {} | {} | {} | {} |",
            row.connections,
            row.workload.name(),
            row.server.name(),
            row.load.rate(),
            ms(row.load.quantile(0.5)),
            ms(row.load.quantile(0.99)),
            row.cpu_us_per_request
                .map_or("-".into(), |us| format!("{us:.1}")),
            row.switches_per_request
                .map_or("-".into(), |n| format!("{n:.2}")),
            row.statements
                .as_ref()
                .map_or("-".into(), |s| s.per_request(row.load.requests)),
            mib(row.peak_rss_kib),
        );
    }
    let find = |c, w, s| {
        rows.iter()
            .find(|r| r.connections == c && r.workload == w && r.server == s)
    };
    let mut cases: Vec<(usize, Workload)> =
        rows.iter().map(|r| (r.connections, r.workload)).collect();
    cases.dedup();
    let _ = writeln!(
        out,
        "\n| conns | workload | requests/s pgsession / peer | ≥ {HTTP_TARGET}× | p99 pgsession / peer | p99 no worse | CPU/req pgsession / peer | pgsession peak RSS ≤ 32 MiB |"
    );
    out.push_str("|---:|---|---:|---|---:|---|---:|---|\n");
    for &(c, w) in &cases {
        let (Some(ours), Some(peer)) = (
            find(c, w, ServerKind::Pgsession),
            find(c, w, ServerKind::Peer),
        ) else {
            continue;
        };
        let ratio = ours.load.rate() / peer.load.rate().max(f64::EPSILON);
        let (p99, p99_ok) = p99_ratio(ours.load.quantile(0.99), peer.load.quantile(0.99));
        let cpu = match (ours.cpu_us_per_request, peer.cpu_us_per_request) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
            _ => "-".into(),
        };
        let rss = ours
            .peak_rss_kib
            .map_or("-", |k| verdict(k <= RSS_TARGET_KIB));
        let _ = writeln!(
            out,
            "| {c} | {} | {ratio:.2}× | {} | {p99} | {p99_ok} | {cpu} | {rss} |",
            w.name(),
            verdict(ratio >= HTTP_TARGET),
        );
    }
    let ceilings: Vec<&HttpRow> = rows
        .iter()
        .filter(|r| r.server == ServerKind::Ceiling)
        .collect();
    if !ceilings.is_empty() {
        let _ = writeln!(
            out,
            "\n| conns | no-store ceiling requests/s | pgsession read / ceiling | peer read / ceiling | target (32 conns) ≥ {CEILING_TARGET} |"
        );
        out.push_str("|---:|---:|---:|---:|---|\n");
        for ceiling in ceilings {
            let c = ceiling.connections;
            let share = |server| {
                find(c, Workload::Read, server)
                    .map(|r| r.load.rate() / ceiling.load.rate().max(f64::EPSILON))
            };
            let ours = share(ServerKind::Pgsession);
            let target = match ours {
                Some(share) if c == 32 => verdict(share >= CEILING_TARGET),
                _ => "",
            };
            let show = |share: Option<f64>| share.map_or("-".into(), |s| format!("{s:.2}"));
            let _ = writeln!(
                out,
                "| {c} | {:.0} | {} | {} | {target} |",
                ceiling.load.rate(),
                show(ours),
                show(share(ServerKind::Peer)),
            );
        }
    }
    if cases
        .iter()
        .any(|&(c, w)| find(c, w, ServerKind::Baseline).is_some())
    {
        out.push_str(
            "\n| conns | workload | requests/s pgsession / baseline | p99 pgsession / baseline |\n",
        );
        out.push_str("|---:|---|---:|---:|\n");
        for &(c, w) in &cases {
            let (Some(ours), Some(base)) = (
                find(c, w, ServerKind::Pgsession),
                find(c, w, ServerKind::Baseline),
            ) else {
                continue;
            };
            let ratio = ours.load.rate() / base.load.rate().max(f64::EPSILON);
            let (p99, _) = p99_ratio(ours.load.quantile(0.99), base.load.quantile(0.99));
            let _ = writeln!(out, "| {c} | {} | {ratio:.3}× | {p99} |", w.name());
        }
    }
    out
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

    /// The kind of its statements in `pg_stat_statements` (see
    /// [`crate::statements::kind`]).
    pub(crate) fn statement_kind(self) -> &'static str {
        match self {
            StoreOp::Load => "select",
            StoreOp::Save => "upsert",
        }
    }
}

/// pgbench running the store's own multi-row statement.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MultiRow {
    /// Rows per second (statements/s × rows per statement).
    pub(crate) rows_per_sec: f64,
    /// Rows per statement: the store's mean batch, rounded.
    pub(crate) batch: u32,
    /// pgbench clients: the callers over the batch size.
    pub(crate) clients: usize,
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
    /// Rows per statement of the store's statements (`pg_stat_statements`):
    /// its mean batch size.
    pub(crate) rows_per_statement: Option<f64>,
    /// pgbench's tps (without connection time), as many clients as callers.
    pub(crate) pgbench_tps: f64,
    /// pgbench's average latency.
    pub(crate) pgbench_latency_ms: Option<f64>,
    /// pgbench's best single-row tps over 8, 16 and `callers` clients (at
    /// 32 callers; else the same as `pgbench_tps`), and its clients.
    pub(crate) best_single: (f64, usize),
    /// At 32 callers: pgbench running the store's multi-row statement.
    pub(crate) multi_row: Option<MultiRow>,
}

/// The store table, then the targets.
pub(crate) fn store_table(rows: &[StoreRow]) -> String {
    let mut out = String::new();
    out.push_str(
        "| op | callers | Store ops/s | p50 ms | p99 ms | errors | rows per statement | pgbench tps | pgbench avg ms | Store / pgbench |\n",
    );
    out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for row in rows {
        let ratio = row.ops_per_sec / row.pgbench_tps.max(f64::EPSILON);
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {} | {} | {} | {} | {:.0} | {} | {ratio:.2}× |",
            row.op.name(),
            row.callers,
            row.ops_per_sec,
            ms(row.p50),
            ms(row.p99),
            row.errors,
            row.rows_per_statement
                .map_or("-".into(), |b| format!("{b:.1}")),
            row.pgbench_tps,
            row.pgbench_latency_ms
                .map_or("-".into(), |l| format!("{l:.3}")),
        );
    }
    out.push_str("\n| op | callers | reference | reference rate | Store / reference | target |\n");
    out.push_str("|---|---:|---|---:|---:|---|\n");
    for row in rows {
        let mut line = |reference: String, rate: f64, target: f64| {
            let ratio = row.ops_per_sec / rate.max(f64::EPSILON);
            let _ = writeln!(
                out,
                "| {} | {} | {reference} | {rate:.0} | {ratio:.2}× | ≥ {target}×: {} |",
                row.op.name(),
                row.callers,
                verdict(ratio >= target),
            );
        };
        if row.callers < 32 {
            line(
                format!("pgbench, {} clients, tps", row.callers),
                row.pgbench_tps,
                0.95,
            );
            continue;
        }
        let (best, clients) = row.best_single;
        line(
            format!(
                "pgbench's best single-row tps over 8, 16, {} clients ({clients})",
                row.callers
            ),
            best,
            2.0,
        );
        if let Some(multi) = row.multi_row {
            line(
                format!(
                    "pgbench, the store's multi-row statement, {} rows × {} clients, rows/s",
                    multi.batch, multi.clients
                ),
                multi.rows_per_sec,
                0.6,
            );
        }
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
