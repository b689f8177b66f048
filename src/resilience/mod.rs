//! Resilience: retries with backoff and circuit breakers for async stages.

pub(crate) mod breaker;
pub(crate) mod retry;
