//! Stages: fused synchronous operators (one file each), the async stage and `buffer`.

pub(crate) mod buffer;
pub(crate) mod filter;
pub(crate) mod filter_map;
pub(crate) mod flat_map;
pub(crate) mod fused;
pub(crate) mod inspect;
pub(crate) mod map;
pub mod map_async;
