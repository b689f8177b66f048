//! Small utilities every part of the crate uses and that depend on no other part: instants
//! computed safely from user durations, and jitter for waits.

pub(crate) mod jitter;
pub(crate) mod time;
