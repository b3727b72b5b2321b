//! What keeps operations working when the database does not: retries with
//! backoff, the circuit breaker, the fallback cache and journal, and the
//! spool file that carries the journal across a restart.

pub(crate) mod breaker;
pub(crate) mod fallback;
pub(crate) mod retry;
pub(crate) mod spool;
