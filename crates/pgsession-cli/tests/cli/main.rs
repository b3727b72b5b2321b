//! Integration tests of the `pgsession` binary, run as a process against a
//! real PostgreSQL from the test kit. One binary, one module per concept.

#[path = "../common/mod.rs"]
mod common;

// The reference server's HTTP contract.
mod contract;
// SIGTERM with requests in flight.
mod shutdown;
// Starting without a reachable database, with an embedded one, in memory.
mod startup;
// `migrate`, `prune`, and the command line itself.
mod commands;
// `/metrics`, `/health` and the dashboard page as served.
mod observability;
// `/dashboard` in headless Chromium, through a database outage.
mod dashboard;
// `pgsession doctor` against a good, a stopped and a slow database.
mod doctor;
// `pgsession journal`: dead letters listed, replayed, discarded.
mod journal;
