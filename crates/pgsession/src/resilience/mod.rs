//! What keeps operations working when the database does not: retries with
//! backoff, the circuit breaker, the fallback cache, the on-disk journal
//! that carries accepted writes across a crash, and the dead letters of
//! writes that could not be written back.

pub(crate) mod breaker;
pub mod dead_letter;
pub(crate) mod fallback;
pub(crate) mod journal;
pub(crate) mod retry;
