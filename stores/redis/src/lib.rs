//! # flowline-redis
//!
//! Redis for [flowline] pipelines, so that one job runs on several processes or machines:
//!
//! - [`RedisStream`]: a source reading a stream through a consumer group. An entry is
//!   acknowledged only once its item has finished (delivered, dropped by an operator, or
//!   failed *and* written to the dead-letter stream); a cancelled item stays pending. A
//!   restarted consumer re-reads its own pending entries first; idle entries of dead
//!   consumers are reclaimed after `min_idle` (`XAUTOCLAIM`); a live consumer renews its
//!   in-flight entries' leases so a long call is not stolen; an entry delivered more than
//!   `max_deliveries` times goes to the dead letters ([`StreamOptions`]).
//! - [`StreamSink`]: a pipeline that ends in a stream (`XADD`, pipelined per batch), so stages
//!   chain across processes.
//! - [`RedisStore`] (idempotency keys) and [`RedisCheckpoints`] (cursor checkpoints), the
//!   same traits as the SQLite and PostgreSQL stores.
//!
//! ```no_run
//! use flowline::prelude::*;
//! use flowline_redis::{RedisStream, StreamOptions};
//! use std::time::Duration;
//! # #[tokio::main] async fn main() -> Result<(), flowline::Error> {
//! // The same program on every machine; only the consumer name differs.
//! let name = std::env::var("WORKER").unwrap_or_else(|_| "worker-1".into());
//! let opts = StreamOptions::new().min_idle(Duration::from_secs(30)).max_deliveries(5);
//! let report = RedisStream::new("redis://10.0.0.5/", "{jobs}", "workers", &name, opts)?
//!     .pipeline()
//!     .map_async("work", |e| async move { e.get_str("url").map(str::to_owned) })
//!     .workers(32)
//!     .run()
//!     .await?;
//! println!("{report}");
//! # Ok(()) }
//! ```
//!
//! ## On N machines
//!
//! Every worker points at the same Redis and reads the same stream in the same group, each
//! under a name of its own that it keeps across restarts (the host name, a pod's stable
//! name). Redis hands each entry to one consumer; throughput grows with workers until Redis
//! (one core: some 100,000 small entries/s read and acknowledged) or the service the stages
//! call saturates. A machine that dies leaves its entries pending; they run elsewhere after
//! `min_idle` (plus at most a second), or on that machine when it comes back under its name.
//! Consumers are never deleted: a consumer's name holds its pending entries.
//!
//! **Redis Cluster**: a stream lives on one node, so put the stream and every key that goes
//! with it under one hash tag — the stream `{jobs}`, its dead letters `{jobs}:dead`
//! ([`StreamOptions::dead_letter_stream`]), checkpoints `{jobs}:checkpoints`
//! ([`RedisCheckpoints::key`]); the idempotency keys of a scope are one hash,
//! `flowline:{scope}:idempotency`. The scripts (dead-lettering, lease renewal, reservations)
//! then touch one slot each. One stream is one node's throughput: to go past it, shard the
//! job over several streams (`{jobs-0}`, `{jobs-1}`, ...) with a source per stream.
//!
//! **Limits**:
//! - Delivery is at least once. An entry runs twice when its consumer dies (or is cut off
//!   from Redis longer than `min_idle`) with it in flight, or when the acknowledgement is lost
//!   with the process; the window is the entries in flight. For effects done once, key the
//!   stage with [`Flow::idempotent`](flowline::Flow::idempotent) over a [`RedisStore`] whose
//!   reservation `ttl` is shorter than `min_idle` (so a reclaimed entry's reservation has
//!   expired), or make the effect itself idempotent.
//! - `min_idle` must exceed the longest pause of a live worker (a GC-free Rust process rarely
//!   pauses, but a machine can be cut off); leases are renewed every `min_idle / 3`.
//! - Acknowledgements survive a Redis restart only as far as its persistence does: run Redis
//!   with AOF (`appendfsync everysec` repeats at most a second of work after a crash of the
//!   server; `always` repeats none). Without persistence a restart loses the stream itself.
//! - A failed item's dead letter holds the entry's fields, id, delivery count and reason;
//!   the error text goes to the run's own [`DeadLetter`](flowline::DeadLetter) target.
//!
//! Tests, examples and benchmarks start their own server with [`test_server`] (feature
//! `test-server`). `examples/redis_workers.rs` shows three workers sharing a job, one killed.

#![warn(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

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
#[cfg_attr(docsrs, doc(cfg(feature = "test-server")))]
pub mod test_server;

pub use checkpoints::RedisCheckpoints;
pub use entry::StreamEntry;
pub use options::StreamOptions;
pub use sink::StreamSink;
pub use source::RedisStream;
pub use store::RedisStore;
