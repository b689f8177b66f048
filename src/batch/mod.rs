//! Batching and lookups (issue 4): `batch`, `unbatch`, `batch_dedup_by`, `dedup_by`,
//! `debounce`, the [`Loader`] and [`Gather`].

#[allow(clippy::module_inception)]
pub(crate) mod batch;
pub(crate) mod batch_dedup;
pub(crate) mod debounce;
pub(crate) mod dedup;
pub mod gather;
pub mod loader;
pub(crate) mod ttl_map;
pub(crate) mod unbatch;

pub use debounce::Debounce;
pub use dedup::Window;
pub use gather::{Gather, Gathered, Incomplete};
pub use loader::{LoadError, Loader};
