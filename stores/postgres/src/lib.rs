//! # flowline-postgres
//!
//! PostgreSQL stores for [flowline] pipelines, shared by workers on several
//! machines, over a connection pool:
//!
//! - [`PgCheckpoints`]: a [`CheckpointStore`](flowline::CheckpointStore), where
//!   [`Pipeline::from_cursor`](flowline::Pipeline::from_cursor) keeps the cursor it resumes
//!   from after a crash;
//! - [`PgStore`]: a [`Store`](flowline::Store) of idempotency keys for
//!   [`Flow::idempotent`](flowline::Flow::idempotent), with
//!   [`commit_with`](PgStore::commit_with) to write an effect in the same transaction as its
//!   keys (exactly once across crashes);
//! - [`PgOptions`]: the table, pool size and how long to retry a dropped connection.
//!
//! Each call is one statement (one round trip) per chunk of keys, retried on another
//! connection when its connection dropped.
//!
//! Faults of the server (a connection killed, a restart, a server stopped for a while) are
//! not failures of items: a dead connection is replaced, a restarted server is found again,
//! and an error the stores give back is marked [`Transient`](flowline::Transient) or
//! [`Permanent`](flowline::Permanent), so the run's [`Outage`](flowline::Outage) policy
//! waits for the server. [`is_transient`] tells the same of the errors of your own
//! queries and effects (for a stage's `retry_if`), [`classify`] marks them (for a cursor
//! source's fetch), and a [`commit_with`](PgStore::commit_with) tried again after its
//! answer was lost says [`AlreadyCommitted`] instead of writing the effect twice. No TLS: a server that requires it is reached
//! through a pool the caller builds, handed to `from_pool`.
//!
//! ```no_run
//! use flowline::prelude::*;
//! use flowline_postgres::{PgCheckpoints, PgOptions, PgStore};
//! # #[tokio::main] async fn main() -> Result<(), flowline::BoxError> {
//! let url = "postgresql://flowline@localhost/app";
//! let checkpoints = PgCheckpoints::connect(url).await?;
//! // The keys share the checkpoints' pool: one set of connections for both.
//! let keys = PgStore::from_pool(checkpoints.pool().clone(), PgOptions::new()).await?;
//! let fetch = |after: Option<i64>| async move {
//!     let after = after.unwrap_or(0);
//!     let page: Vec<i64> = (after + 1..=(after + 100).min(1_000)).collect();
//!     Ok::<_, flowline::BoxError>(match page.last() {
//!         Some(&last) => flowline::Page::next(page, last),
//!         None => flowline::Page::end(page),
//!     })
//! };
//! let report = Pipeline::from_cursor(checkpoints, "rows", fetch)
//!     .idempotent(keys.scope("rows"), |id| *id)
//!     .map_async("work", |id| async move { id * 2 })
//!     .workers(8)
//!     .run()
//!     .await?;
//! println!("{report}");
//! # Ok(()) }
//! ```
//!
//! `examples/pg_cursor.rs` pages through a table the same way, can be killed at any point and
//! run again, and with `--exactly-once` writes each row's effect exactly once:
//!
//! ```text
//! FLOWLINE_PG_URL=postgresql://postgres@127.0.0.1:5432/app \
//!   cargo run -p flowline-postgres --example pg_cursor -- [--url URL] [--rows N] [--stop-after N] [--exactly-once]
//! ```

#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod checkpoints;
mod pg;
mod store;
mod transient;

pub use checkpoints::PgCheckpoints;
pub use pg::PgOptions;
pub use store::{AlreadyCommitted, PgStore};
pub use transient::{classify, is_transient, is_transient_error};

/// The connection pool the stores use, re-exported for [`PgStore::from_pool`] and
/// [`PgCheckpoints::from_pool`].
///
/// ```no_run
/// # #[tokio::main] async fn main() -> Result<(), flowline::BoxError> {
/// let store = flowline_postgres::PgStore::connect("postgresql://flowline@localhost/app").await?;
/// let pool: flowline_postgres::deadpool_postgres::Pool = store.pool().clone();
/// # let _ = pool; Ok(()) }
/// ```
pub use deadpool_postgres;
/// The PostgreSQL client the stores are built on, re-exported so that an effect given to
/// [`PgStore::commit_with`] names the same `Transaction` type.
///
/// ```no_run
/// # async fn f(tx: &flowline_postgres::tokio_postgres::Transaction<'_>) -> Result<(), flowline_postgres::tokio_postgres::Error> {
/// tx.execute("insert into sent (id) values ($1)", &[&1i64]).await?;
/// # Ok(()) }
/// ```
pub use tokio_postgres;
