//! The fault suite: `pgsession serve` run as a process, driven over HTTP
//! under concurrent load while the test kit's fault proxy or cluster makes
//! the database slow to wake, drop its connections, go away, restart, or
//! swallow packets. Each scenario asserts what the design promises and
//! prints one `FIGURES <scenario> k=v ...` line (see RELIABILITY.md):
//!
//! ```text
//! cargo test -p pgsession-cli --test faults -- --nocapture <name>
//! ```
//!
//! Each scenario has a cluster, a proxy and a server of its own, so they
//! run in parallel; the machine this was measured on has two cores, and
//! the default (one test thread per core) suits it.
//!
//! "Nothing lost": after the fault heals and the server has written its
//! journal back (`/health`: breaker closed, journal empty), every session
//! holds in `sess->>'views'` exactly the number of `POST /counter` its user
//! got a 2xx for (each user's requests are sequential).

#[path = "../common/mod.rs"]
mod common;
mod support;

// A database that takes 8 s (and 25 s) to accept a connection.
mod cold_start;
// Every connection reset, five times, under load.
mod transient_drop;
// The database away for 30 s under load: cluster stopped, or refused.
mod unavailable;
// PostgreSQL restarted under load.
mod restart;
// PostgreSQL crashed (`pg_ctl stop -m immediate`) under load, durable settings on.
mod postgres_crash;
// Packets vanish for 20 s.
mod blackhole;
// The session pool held; an application pool exhausted beside it.
mod pool_exhausted;
// SIGTERM while the database is away: the journal file and its write-back.
mod sigterm_journal;
// SIGKILL while the database is away, and during the write-back.
mod kill;
// The journal full, on a full disk, unusable at start; the fallback off.
mod journal_limits;
// Starting while the database is away.
mod startup_away;
// Three servers on one database.
mod three_servers;
// Two servers on one table, one cut off: conflicts, logouts, regenerate.
mod two_instances;
