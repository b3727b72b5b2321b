//! Faults of what stands around PostgreSQL, with `pgsession serve` run as a process and driven
//! over HTTP under concurrent load, as in the fault suite (`tests/faults`, whose helpers this
//! binary shares): PgBouncer in transaction mode restarted, and a primary replaced by its
//! promoted standby. Each scenario asserts that nothing acknowledged is lost and prints one
//! `FIGURES <scenario> k=v ...` line (see RELIABILITY.md):
//!
//! ```text
//! cargo test -p pgsession-cli --test failover -- --nocapture
//! ```
//!
//! They need Debian's `pgbouncer` and the PostgreSQL binaries (with `pg_basebackup`), and
//! fail, never skip, without them.

#[path = "../common/mod.rs"]
mod common;
// The fault suite's load, monitor, "nothing lost" check and figures; not every helper is used.
#[allow(dead_code)]
#[path = "../faults/support.rs"]
mod support;

// PgBouncer restarted, twice, under load.
mod pgbouncer_restart;
// The primary stopped and its synchronous standby promoted, under load.
mod primary_failover;
