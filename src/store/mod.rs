//! Stores a run keeps state in across restarts.
//!
//! (issue 5) Cursor checkpoints: [`CheckpointStore`], in memory or in SQLite.

pub(crate) mod checkpoint;
#[cfg(feature = "sqlite")]
pub(crate) mod checkpoint_sqlite;
