//! What keeps operations working when the database does not: retries with
//! backoff (and, as the design grows, the circuit breaker and fallback).

pub(crate) mod retry;
