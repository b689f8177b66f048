//! Flow control: limits that delay or drop items — rates, throttles, concurrency bounds.
//! Each limit is a value with an `Arc` inside, shareable by several stages and pipelines.

pub(crate) mod adaptive;
pub(crate) mod inflight;
pub(crate) mod rate;
pub(crate) mod rate_limit;
pub(crate) mod throttle;
