//! Every metric the library records, in one place: its name, kind, unit,
//! labels with every value they take, and what it means. The library's
//! code names them through the constants below, and a program that
//! installs a recorder (as `pgsession serve` installs Prometheus') calls
//! [`describe`] and [`register_at_zero`] instead of copying the list.
//!
//! ```
//! // Every series starts at zero, so that a rate over a counter that has
//! // not moved yet is 0, not "no data".
//! pgsession::metrics::describe();
//! pgsession::metrics::register_at_zero();
//! assert!(pgsession::metrics::ALL.iter().any(|m| m.name == "pgsession_operations_total"));
//! ```

use ::metrics::Unit;

use crate::dead_letter::Conflict;
use crate::error::ErrorKind;

/// Connections open in the session pool.
pub const POOL_SIZE: &str = "pgsession_pool_size";
/// Open connections not in use.
pub const POOL_IDLE: &str = "pgsession_pool_idle";
/// Connections handed out.
pub const POOL_IN_USE: &str = "pgsession_pool_in_use";
/// Callers waiting for a connection.
pub const POOL_WAITING: &str = "pgsession_pool_waiting";
/// The pool's current maximum.
pub const POOL_MAX: &str = "pgsession_pool_max";
/// Time to get a connection.
pub const POOL_ACQUIRE_SECONDS: &str = "pgsession_pool_acquire_seconds";
/// Resizes of the self-sizing pool, by `direction`.
pub const POOL_RESIZES: &str = "pgsession_pool_resizes_total";
/// Duration of a store operation, by `op`.
pub const QUERY_SECONDS: &str = "pgsession_query_seconds";
/// Store operations by `op` and `outcome`.
pub const OPERATIONS: &str = "pgsession_operations_total";
/// Attempts retried, by `op`.
pub const RETRIES: &str = "pgsession_retries_total";
/// Failed operations by `kind`.
pub const ERRORS: &str = "pgsession_errors_total";
/// The breaker: 0 closed, 1 half-open, 2 open.
pub const BREAKER_STATE: &str = "pgsession_breaker_state";
/// Duration of the last health check.
pub const HEALTH_CHECK_SECONDS: &str = "pgsession_health_check_seconds";
/// Sessions waiting in the journal.
pub const JOURNAL_ENTRIES: &str = "pgsession_journal_entries";
/// Bytes the journal's waiting writes take on disk.
pub const JOURNAL_BYTES: &str = "pgsession_journal_bytes";
/// `fsync` calls of the journal.
pub const JOURNAL_FSYNCS: &str = "pgsession_journal_fsyncs_total";
/// Write-back conflicts, by `kind`.
pub const WRITEBACK_CONFLICTS: &str = "pgsession_writeback_conflicts_total";
/// Writes kept as dead letters, by `kind`.
pub const DEAD_LETTERS: &str = "pgsession_dead_letters_total";

/// The `op` label of [`QUERY_SECONDS`], [`OPERATIONS`] and [`RETRIES`]:
/// the session operations, the health check and the write-back.
pub const QUERY_OPS: &[&str] = &[
    "load",
    "save",
    "touch",
    "destroy",
    "insert",
    "prune",
    "health",
    "writeback",
];
/// The operations [`OPERATIONS`] counts (the health check and the
/// write-back are timed, not counted).
pub const COUNTED_OPS: &[&str] = &["load", "save", "touch", "destroy", "insert", "prune"];
/// How an operation ended: `ok`; `error`; `fallback`, served by the cache
/// or the journal.
pub const OUTCOMES: &[&str] = &["ok", "error", "fallback"];
/// The `direction` of [`POOL_RESIZES`].
pub const RESIZE_DIRECTIONS: &[&str] = &["up", "down"];
/// The `kind` of [`ERRORS`]: every [`ErrorKind`]'s label.
pub const ERROR_KINDS: &[&str] = &ErrorKind::LABELS;
/// The `kind` of [`WRITEBACK_CONFLICTS`] and [`DEAD_LETTERS`]: every
/// [`Conflict`]'s label.
pub const CONFLICT_KINDS: &[&str] = &Conflict::LABELS;

/// What a metric counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// A value now.
    Gauge,
    /// A distribution (with buckets, when the recorder is Prometheus').
    Histogram,
}

/// One metric: its name, kind, unit, labels and meaning.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    /// The series name.
    pub name: &'static str,
    /// What it counts.
    pub kind: Kind,
    /// Its unit, if any.
    pub unit: Option<Unit>,
    /// The `# HELP` text.
    pub help: &'static str,
    /// Its labels, each with every value it takes.
    pub labels: &'static [(&'static str, &'static [&'static str])],
}

const fn metric(
    name: &'static str,
    kind: Kind,
    unit: Option<Unit>,
    help: &'static str,
    labels: &'static [(&'static str, &'static [&'static str])],
) -> Metric {
    Metric {
        name,
        kind,
        unit,
        help,
        labels,
    }
}

/// Every metric the library records.
pub const ALL: &[Metric] = &[
    metric(POOL_SIZE, Kind::Gauge, Some(Unit::Count), "Connections open in the session pool", &[]),
    metric(POOL_IDLE, Kind::Gauge, Some(Unit::Count), "Open session-pool connections not in use", &[]),
    metric(POOL_IN_USE, Kind::Gauge, Some(Unit::Count), "Session-pool connections handed out", &[]),
    metric(POOL_WAITING, Kind::Gauge, Some(Unit::Count), "Callers waiting for a session-pool connection", &[]),
    metric(
        POOL_MAX,
        Kind::Gauge,
        Some(Unit::Count),
        "Current maximum size of the session pool (it resizes itself under load)",
        &[],
    ),
    metric(
        POOL_ACQUIRE_SECONDS,
        Kind::Histogram,
        Some(Unit::Seconds),
        "Time to get a connection from the session pool, a new connection included",
        &[],
    ),
    metric(
        POOL_RESIZES,
        Kind::Counter,
        Some(Unit::Count),
        "Resizes of the self-sizing pool, by direction (up, down)",
        &[("direction", RESIZE_DIRECTIONS)],
    ),
    metric(
        QUERY_SECONDS,
        Kind::Histogram,
        Some(Unit::Seconds),
        "Duration of a store operation, retries included, by operation",
        &[("op", QUERY_OPS)],
    ),
    metric(
        OPERATIONS,
        Kind::Counter,
        Some(Unit::Count),
        "Store operations by operation and outcome (ok, error, fallback: served by the cache or journal)",
        &[("op", COUNTED_OPS), ("outcome", OUTCOMES)],
    ),
    metric(
        RETRIES,
        Kind::Counter,
        Some(Unit::Count),
        "Attempts retried after a transient error, by operation",
        &[("op", QUERY_OPS)],
    ),
    metric(
        ERRORS,
        Kind::Counter,
        Some(Unit::Count),
        "Failed store operations by error kind",
        &[("kind", ERROR_KINDS)],
    ),
    metric(BREAKER_STATE, Kind::Gauge, None, "Circuit breaker: 0 closed, 1 half-open, 2 open", &[]),
    metric(
        HEALTH_CHECK_SECONDS,
        Kind::Gauge,
        Some(Unit::Seconds),
        "Duration of the last health check",
        &[],
    ),
    metric(
        JOURNAL_ENTRIES,
        Kind::Gauge,
        Some(Unit::Count),
        "Sessions whose writes wait in the journal for the database",
        &[],
    ),
    metric(
        JOURNAL_BYTES,
        Kind::Gauge,
        Some(Unit::Bytes),
        "Bytes the journal's waiting writes take on disk (limit: journal_max_bytes)",
        &[],
    ),
    metric(
        JOURNAL_FSYNCS,
        Kind::Counter,
        Some(Unit::Count),
        "fsync calls of the journal (one serves every write waiting: group commit)",
        &[],
    ),
    metric(
        WRITEBACK_CONFLICTS,
        Kind::Counter,
        Some(Unit::Count),
        "Journaled writes that found the row changed, destroyed or taken at write-back, by kind",
        &[("kind", CONFLICT_KINDS)],
    ),
    metric(
        DEAD_LETTERS,
        Kind::Counter,
        Some(Unit::Count),
        "Journaled writes kept aside in dead-letters.jsonl (pgsession journal list), by kind",
        &[("kind", CONFLICT_KINDS)],
    ),
];

/// Gives the installed recorder the `# HELP` and unit of every metric.
pub fn describe() {
    for m in ALL {
        let help = m.help;
        match (m.kind, m.unit) {
            (Kind::Counter, Some(unit)) => ::metrics::describe_counter!(m.name, unit, help),
            (Kind::Counter, None) => ::metrics::describe_counter!(m.name, help),
            (Kind::Gauge, Some(unit)) => ::metrics::describe_gauge!(m.name, unit, help),
            (Kind::Gauge, None) => ::metrics::describe_gauge!(m.name, help),
            (Kind::Histogram, Some(unit)) => ::metrics::describe_histogram!(m.name, unit, help),
            (Kind::Histogram, None) => ::metrics::describe_histogram!(m.name, help),
        }
    }
}

/// Registers every series (each combination of label values) without
/// changing a value already recorded, so that each is in the recorder's
/// output from the start.
pub fn register_at_zero() {
    for m in ALL {
        for labels in combinations(m.labels) {
            let labels: Vec<::metrics::Label> = labels
                .into_iter()
                .map(|(k, v)| ::metrics::Label::new(k, v))
                .collect();
            match m.kind {
                Kind::Counter => ::metrics::counter!(m.name, labels).increment(0),
                Kind::Gauge => ::metrics::gauge!(m.name, labels).increment(0.0),
                // Registering a histogram makes the exporter render it.
                Kind::Histogram => drop(::metrics::histogram!(m.name, labels)),
            }
        }
    }
}

/// Every combination of the labels' values (one empty one without labels).
fn combinations(
    labels: &[(&'static str, &'static [&'static str])],
) -> Vec<Vec<(&'static str, &'static str)>> {
    labels
        .iter()
        .fold(vec![Vec::new()], |sets, (name, values)| {
            sets.iter()
                .flat_map(|set| {
                    values.iter().map(move |value| {
                        let mut set = set.clone();
                        set.push((*name, *value));
                        set
                    })
                })
                .collect()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_combinations_cover_every_pair() {
        let sets = combinations(&[("op", &["a", "b"]), ("outcome", &["x", "y", "z"])]);
        assert_eq!(sets.len(), 6);
        assert!(sets.contains(&vec![("op", "b"), ("outcome", "z")]));
        assert_eq!(combinations(&[]), vec![Vec::new()]);
    }

    #[test]
    fn names_are_unique_and_prometheus_shaped() {
        let mut names: Vec<&str> = ALL.iter().map(|m| m.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL.len());
        for m in ALL {
            assert!(m.name.starts_with("pgsession_"), "{}", m.name);
            assert_eq!(
                m.kind == Kind::Counter,
                m.name.ends_with("_total"),
                "{}",
                m.name
            );
        }
    }
}

/// The handles of the per-operation series ([`QUERY_SECONDS`] and
/// [`OPERATIONS`] for each of [`COUNTED_OPS`]), registered once with the
/// recorder installed at that moment and then reused: a labelled
/// `counter!` looks its key up in the recorder's registry on every call
/// (about 1.5 % of `serve`'s CPU per request, BENCHMARKS.md). The store
/// registers them at its first operation, so a program installs its
/// recorder before it serves, as it must for any metric.
#[derive(Debug)]
pub(crate) struct OperationMetrics {
    ops: Vec<OperationHandles>,
}

#[derive(Debug)]
struct OperationHandles {
    op: &'static str,
    seconds: ::metrics::Histogram,
    /// By outcome, in the order of [`OUTCOMES`].
    outcomes: [::metrics::Counter; 3],
}

impl OperationMetrics {
    pub(crate) fn register() -> OperationMetrics {
        let ops = COUNTED_OPS
            .iter()
            .map(|&op| OperationHandles {
                op,
                seconds: ::metrics::histogram!(QUERY_SECONDS, "op" => op),
                outcomes: std::array::from_fn(
                    |i| ::metrics::counter!(OPERATIONS, "op" => op, "outcome" => OUTCOMES[i]),
                ),
            })
            .collect();
        OperationMetrics { ops }
    }

    /// Times and counts one operation; `outcome` is one of [`OUTCOMES`].
    pub(crate) fn record(&self, op: &'static str, elapsed: std::time::Duration, outcome: &str) {
        match self.ops.iter().find(|h| h.op == op) {
            Some(handles) => {
                handles.seconds.record(elapsed);
                if let Some(i) = OUTCOMES.iter().position(|o| *o == outcome) {
                    handles.outcomes[i].increment(1);
                }
            }
            None => {
                ::metrics::histogram!(QUERY_SECONDS, "op" => op).record(elapsed);
                ::metrics::counter!(OPERATIONS, "op" => op, "outcome" => outcome.to_owned())
                    .increment(1);
            }
        }
    }
}
