//! Integration tests of the store engine against a real PostgreSQL: a
//! throwaway cluster started by the test kit, or `DATABASE_URL` when set.

// Helpers shared by the modules below.
mod common;

// The operations and what they leave in the table.
mod operations;
// Table creation, existing tables, names.
mod schema;
// Start-up with the database away, and many instances at once.
mod startup;
// Pruning of expired rows.
mod prune;
// The pool: maximum uses, idle timeout, warm minimum.
mod pool;
// The HTTP layer on the real store.
mod http;
// Concurrent operations combined into one statement.
mod batching;
// Hostile input and secrets: limits, session ids, fixation, signatures,
// rotation, rows written by others, nothing secret in logs or errors.
mod security;
// TLS to the database: verification under each sslmode, the insecure opt-in.
mod tls;
// Behind PgBouncer in transaction mode: configured or detected, every
// operation, table creation, and pruners that never run at once.
mod pooler;
// Several hosts with target_session_attrs=read-write: the primary found,
// a write on a read-only server, the new primary found after a failover.
mod failover;
// Failures with the database up (terminated backends, a connection limit,
// configuration errors): the breaker stays closed, nothing is journaled.
mod not_away;
// Every setting of `Config` reaches what it configures, one test each.
mod config_reach;
// The README's "Using the library" app: lifetime, pruning, restarts.
mod readme_app;
