//! Redis for flowline.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod ack;
mod checkpoints;
mod conn;
mod entry;
mod lease;
mod options;
mod reclaim;
mod sink;
mod source;
mod store;
#[cfg(any(test, feature = "test-server"))]
pub mod test_server;

pub use checkpoints::RedisCheckpoints;
pub use entry::StreamEntry;
pub use sink::StreamSink;
pub use store::RedisStore;
pub use options::StreamOptions;
pub use source::RedisStream;
