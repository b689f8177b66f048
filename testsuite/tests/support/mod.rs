//! Shared by the integration tests (each test crate uses a part).
#![allow(dead_code)]

pub mod busy;
pub mod interrupt;
pub mod pg;
