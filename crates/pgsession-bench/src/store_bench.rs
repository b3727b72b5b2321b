//! The `store` mode: `pgsession::Store::load` and `save` alone (no HTTP) at
//! several numbers of concurrent callers, each beside `pgbench` running the
//! same SQL on the same table with as many clients: PostgreSQL's own limit
//! on this machine.
//!
//! The table is filled first with `--rows` sessions whose ids are `1`,
//! `2`, ...; every operation picks one at random, so that pgbench's
//! `\set sid random(1, rows)` addresses the same rows.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use time::OffsetDateTime;

use crate::report::{MultiRow, StoreOp, StoreRow};

/// The number of callers whose row is compared with pgbench's best
/// single-row rate (over 8, 16 and this many clients) and with the store's
/// own multi-row statement.
const REFERENCE_CALLERS: usize = 32;

/// The session document saved by both sides (as express-session writes it,
/// with a space after each colon: pgbench would read `:name` as a variable).
const DOCUMENT: &str = r#"{"cookie": {"originalMaxAge": null, "expires": null, "httpOnly": true, "path": "/", "sameSite": "lax"}, "user": "bench", "views": 1}"#;

/// `pgsession-bench store`.
#[derive(Debug, clap::Args)]
pub(crate) struct StoreArgs {
    /// Measured time of each run (store and pgbench alike): 10s, 500ms, 1m.
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    duration: Duration,
    /// Unmeasured time before each run.
    #[arg(long, default_value = "2s", value_parser = crate::parse_duration)]
    warmup: Duration,
    /// The measured time is cut into slices of this length (whole
    /// seconds), Store and pgbench in turn, so that other work on the
    /// machine weighs on both alike; 0 runs each in one piece. Long enough
    /// that pgbench's start-up (connections, preparing) does not count.
    #[arg(long, default_value = "5s", value_parser = crate::parse_duration)]
    slice: Duration,
    /// Numbers of concurrent callers (and pgbench clients).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    concurrency: Vec<usize>,
    /// Operations to measure.
    #[arg(long, value_delimiter = ',', default_value = "load,save")]
    ops: Vec<StoreOp>,
    /// Rows inserted before the runs.
    #[arg(long, default_value_t = 10_000)]
    rows: u32,
    /// The throwaway cluster's durability (see `http --help`).
    #[arg(long, value_enum, default_value = "off")]
    durability: crate::Durability,
    #[command(flatten)]
    database: crate::DatabaseArgs,
    /// The pgbench binary [default: `pg_config --bindir`/pgbench, else pgbench on PATH].
    #[arg(long)]
    pgbench: Option<PathBuf>,
}

/// Runs every operation at every concurrency, Store and pgbench in turn.
pub(crate) async fn run(args: StoreArgs) -> anyhow::Result<Vec<StoreRow>> {
    let bench_db = crate::database(&args.database, args.durability).await?;
    eprintln!("durability: {}", bench_db.durability);
    let db = &bench_db.db;
    let config = pgsession::Config::builder().url(db.url()).build()?;
    let store = pgsession::Store::new(config)?;
    store.ready().await.context("creating the session table")?;
    let client = db.client().await?;
    let counter = match crate::statements::StatementCounter::connect(db.url()).await {
        Ok(counter) => Some(counter),
        Err(e) => {
            eprintln!("batch sizes left out: {e:#}");
            None
        }
    };
    client
        .execute(
            "INSERT INTO session_store (sid, sess, expire) \
             SELECT g::text, $1::text::json, (now() AT TIME ZONE 'UTC') + interval '1 day' \
             FROM generate_series(1, $2::int) g",
            &[&DOCUMENT, &(args.rows as i32)],
        )
        .await
        .context("filling the session table")?;
    client.batch_execute("VACUUM ANALYZE session_store").await?;

    let pgbench = args.pgbench.clone().unwrap_or_else(find_pgbench);
    // pgbench counts in whole seconds.
    let slice = Duration::from_secs(crate::slice_of(args.slice, args.duration).as_secs().max(1));
    let scripts = tempfile::tempdir()?;
    let mut rows = Vec::new();
    for &op in &args.ops {
        let script = scripts.path().join(format!("{}.sql", op.name()));
        std::fs::write(&script, pgbench_script(op, args.rows))?;
        for &callers in &args.concurrency {
            eprintln!("{} with {callers} callers ...", op.name());
            let bench = Pgbench {
                program: &pgbench,
                url: db.url(),
                script: &script,
                clients: callers,
            };
            // Warm-up, then alternating slices: Store, pgbench, Store, ...
            run_store(&store, op, callers, args.rows, args.warmup, Duration::ZERO).await;
            if args.warmup >= Duration::from_secs(1) {
                bench.run(args.warmup).await?;
            }
            let (mut ours, mut theirs) = (crate::load::LoadResult::default(), Vec::new());
            let mut statements = crate::statements::Counts::default();
            let mut left = args.duration;
            while !left.is_zero() {
                let window = slice.min(left);
                if let Some(counter) = &counter {
                    counter.reset().await?;
                }
                let part = run_store(&store, op, callers, args.rows, Duration::ZERO, window).await;
                if let Some(counter) = &counter {
                    statements.merge(&counter.read().await?);
                }
                ours.merge(part);
                theirs.push(bench.run(window).await?);
                left -= window;
            }
            let slices = theirs.len() as f64;
            let latencies: Vec<f64> = theirs.iter().filter_map(|r| r.latency_ms).collect();
            let pgbench_tps = theirs.iter().map(|r| r.tps).sum::<f64>() / slices;
            // Rows per statement of the store's kind of statement: its
            // batches' mean size (single-row statements included).
            let rows_per_statement = statements
                .by_kind
                .get(op.statement_kind())
                .filter(|(calls, _)| *calls > 0)
                .map(|(calls, rows)| *rows as f64 / *calls as f64);
            let mut best_single = (pgbench_tps, callers);
            let mut multi_row = None;
            if callers >= REFERENCE_CALLERS {
                // PostgreSQL's best single-row rate, whatever the clients.
                for clients in [8, 16] {
                    let tps = Pgbench { clients, ..bench }.run(slice).await?.tps;
                    if tps > best_single.0 {
                        best_single = (tps, clients);
                    }
                }
                // The batching limit: the store's own multi-row statement,
                // at the batch size it reached, with as many statements in
                // flight as the callers make at that size.
                if let Some(batch) = rows_per_statement.map(|b| b.round() as u32) {
                    let batch = batch.clamp(1, args.rows);
                    let clients = (callers as f64 / f64::from(batch)).round().max(1.0) as usize;
                    let multi = scripts.path().join(format!("{}-{batch}.sql", op.name()));
                    std::fs::write(&multi, multi_row_script(op, args.rows, batch))?;
                    let tps = Pgbench {
                        script: &multi,
                        clients,
                        ..bench
                    }
                    .run(slice)
                    .await?
                    .tps;
                    multi_row = Some(MultiRow {
                        rows_per_sec: tps * f64::from(batch),
                        batch,
                        clients,
                    });
                }
            }
            client.batch_execute("VACUUM session_store").await?;
            rows.push(StoreRow {
                op,
                callers,
                ops_per_sec: ours.rate(),
                p50: ours.quantile(0.5),
                p99: ours.quantile(0.99),
                errors: ours.errors,
                rows_per_statement,
                pgbench_tps,
                pgbench_latency_ms: (!latencies.is_empty())
                    .then(|| latencies.iter().sum::<f64>() / latencies.len() as f64),
                best_single,
                multi_row,
            });
        }
    }
    store.close().await;
    Ok(rows)
}

/// `callers` tasks calling the store in a loop for `warmup + duration`;
/// only calls that end inside the measured window count.
async fn run_store(
    store: &pgsession::Store,
    op: StoreOp,
    callers: usize,
    rows: u32,
    warmup: Duration,
    duration: Duration,
) -> crate::load::LoadResult {
    let measure_from = Instant::now() + warmup;
    let until = measure_from + duration;
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut part = crate::load::LoadResult::default();
                while Instant::now() < until {
                    let sid = rand::random_range(1..=rows).to_string();
                    let started = Instant::now();
                    let ok = match op {
                        StoreOp::Load => store.load(&sid).await.is_ok(),
                        StoreOp::Save => {
                            let expire = OffsetDateTime::now_utc() + time::Duration::DAY;
                            store.save(&sid, DOCUMENT, expire).await.is_ok()
                        }
                    };
                    let done = Instant::now();
                    if done >= measure_from && done <= until {
                        part.requests += 1;
                        part.errors += u64::from(!ok);
                        part.latencies.push(done - started);
                    }
                }
                part
            })
        })
        .collect();
    let mut result = crate::load::LoadResult {
        window: duration,
        ..Default::default()
    };
    for task in tasks {
        if let Ok(part) = task.await {
            result.requests += part.requests;
            result.errors += part.errors;
            result.latencies.extend(part.latencies);
        }
    }
    result.latencies.sort_unstable();
    result
}

/// The pgbench script: the store's statement, with a random existing sid.
fn pgbench_script(op: StoreOp, rows: u32) -> String {
    let sql = match op {
        StoreOp::Load => "SELECT sess::text, expire FROM session_store \
                          WHERE sid = :sid AND expire >= (now() AT TIME ZONE 'UTC');"
            .to_owned(),
        StoreOp::Save => format!(
            "INSERT INTO session_store (sid, sess, expire) \
             VALUES (:sid, '{DOCUMENT}', now() + interval '1 day') \
             ON CONFLICT (sid) DO UPDATE SET sess = EXCLUDED.sess, expire = EXCLUDED.expire;"
        ),
    };
    format!("\\set sid random(1, {rows})\n{sql}\n")
}

/// The pgbench script of the store's multi-row statement (`load_many`,
/// `save_many` in `crates/pgsession/src/schema.rs`, whose text the library
/// does not export) for `batch` distinct existing sids: `b`, `b + step`,
/// ..., always in the same order, so that concurrent upserts lock rows in
/// one order as the store's sorted batches do. The documents and expiries,
/// parameters in the store's statement, are constants of the prepared
/// statement here.
fn multi_row_script(op: StoreOp, rows: u32, batch: u32) -> String {
    let step = (rows / batch).max(1);
    let mut script = format!("\\set b random(1, {step})\n");
    let mut sids = Vec::new();
    for i in 0..batch {
        script.push_str(&format!("\\set s{i} :b + {}\n", i * step));
        sids.push(format!("CAST(:s{i} AS text)"));
    }
    let sids = sids.join(", ");
    let sql = match op {
        StoreOp::Load => format!(
            "SELECT sid, sess::text, expire FROM session_store \
             WHERE sid = ANY(ARRAY[{sids}]) AND expire >= (now() AT TIME ZONE 'UTC');"
        ),
        StoreOp::Save => format!(
            "INSERT INTO session_store (sid, sess, expire) \
             SELECT s, j::json, e FROM unnest(ARRAY[{sids}], \
             array_fill(CAST('{DOCUMENT}' AS text), ARRAY[{batch}]), \
             array_fill(CAST((now() AT TIME ZONE 'UTC') + interval '1 day' AS timestamp), ARRAY[{batch}])) \
             AS u(s, j, e) \
             ON CONFLICT (sid) DO UPDATE SET sess = EXCLUDED.sess, expire = EXCLUDED.expire;"
        ),
    };
    script.push_str(&sql);
    script.push('\n');
    script
}

fn find_pgbench() -> PathBuf {
    std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("pgbench"))
        .filter(|path| path.is_file())
        .unwrap_or_else(|| "pgbench".into())
}

/// What pgbench printed.
#[derive(Debug)]
struct PgbenchResult {
    tps: f64,
    latency_ms: Option<f64>,
}

/// One pgbench set-up: the script, the database and the number of clients.
#[derive(Debug, Clone, Copy)]
struct Pgbench<'a> {
    program: &'a Path,
    url: &'a str,
    script: &'a Path,
    clients: usize,
}

impl Pgbench<'_> {
    /// Runs pgbench for `duration` (whole seconds, at least one).
    async fn run(&self, duration: Duration) -> anyhow::Result<PgbenchResult> {
        let config: tokio_postgres::Config = self.url.parse()?;
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
            _ => "127.0.0.1".to_owned(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let user = config.get_user().unwrap_or("postgres");
        let dbname = config.get_dbname().unwrap_or("postgres");
        let mut command = tokio::process::Command::new(self.program);
        command
            .args(["-M", "prepared", "-n"])
            .arg("-c")
            .arg(self.clients.to_string())
            .arg("-j")
            .arg(self.clients.min(2).to_string())
            .arg("-T")
            .arg(duration.as_secs().max(1).to_string())
            .arg("-f")
            .arg(self.script)
            .args(["-h", &host, "-p", &port.to_string(), "-U", user, dbname])
            .stdin(Stdio::null());
        if let Some(password) = config.get_password() {
            command.env("PGPASSWORD", String::from_utf8_lossy(password).as_ref());
        }
        let output = command
            .output()
            .await
            .with_context(|| format!("running {}", self.program.display()))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            bail!(
                "pgbench failed ({}):\n{stdout}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let number_after = |prefix: &str| {
            stdout
                .lines()
                .find_map(|line| line.trim().strip_prefix(prefix))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse::<f64>().ok())
        };
        let tps = number_after("tps = ").context("no `tps = ` line in pgbench's output")?;
        Ok(PgbenchResult {
            tps,
            latency_ms: number_after("latency average = "),
        })
    }
}
