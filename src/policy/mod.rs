//! Stage policies: flow control and resilience values, each with its mechanism. They are
//! shareable (an `Arc` inside) and plug into an async stage's options.

pub(crate) mod adaptive;
pub(crate) mod breaker;
pub(crate) mod inflight;
pub(crate) mod rate;
pub(crate) mod retry;
