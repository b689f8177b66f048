//! # flowline-sqlite
//!
//! SQLite stores for [flowline] pipelines, in one embedded file (no server):
//!
//! - [`SqliteCheckpoints`]: a [`CheckpointStore`](flowline::CheckpointStore), where
//!   [`Pipeline::from_cursor`](flowline::Pipeline::from_cursor) keeps the cursor it resumes
//!   from after a crash;
//! - [`SqliteStore`]: a [`Store`](flowline::Store) of idempotency keys for
//!   [`Flow::idempotent`](flowline::Flow::idempotent), with
//!   [`commit_with`](SqliteStore::commit_with) to write an effect in the same transaction as
//!   its keys (exactly once across crashes).
//!
//! - [`Keyset`]: the rows of a query paged by a key column, read-only, as the fetch of
//!   [`Pipeline::from_cursor`](flowline::Pipeline::from_cursor) (its cursor, a [`Key`],
//!   is what the checkpoint keeps).
//!
//! Both stores may share one file, beside the data being read: each keeps its own table, prefixed
//! `flowline_`. Calls run on tokio's blocking pool, so a slow disk never stalls the runtime.
//!
//! The file locked by another connection or process (a backup, a long write) is not a
//! failure of items: a call waits up to a busy timeout of 5 s, then fails with an error
//! marked [`Transient`](flowline::Transient), and the run's [`Outage`](flowline::Outage)
//! policy tries it again until the lock is gone. [`is_transient`] tells the same of the
//! errors of your own statements and effects (`SQLITE_BUSY`, `SQLITE_LOCKED`), for a
//! stage's `retry_if`; [`classify`] marks them, for a cursor source's fetch.
//!
//! ```
//! use flowline::prelude::*;
//! use flowline::Page;
//! use flowline_sqlite::{SqliteCheckpoints, SqliteStore};
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let dir = tempfile::tempdir().unwrap();
//! let file = dir.path().join("state.db");
//! let rows: Vec<u64> = (1..=25).collect();
//! let fetch = move |after: Option<u64>| {
//!     let after = after.unwrap_or(0);
//!     let page: Vec<u64> = rows.iter().copied().filter(|&id| id > after).take(10).collect();
//!     async move {
//!         Ok::<_, std::convert::Infallible>(match page.last() {
//!             Some(&last) => Page::next(page, last),
//!             None => Page::end(page),
//!         })
//!     }
//! };
//! let run = |fetch| {
//!     let checkpoints = SqliteCheckpoints::open(&file).unwrap();
//!     let keys = SqliteStore::open(&file).unwrap().scope("rows");
//!     Pipeline::from_cursor(checkpoints, "rows", fetch)
//!         .idempotent(keys, |id| *id)
//!         .map_async("work", |id| async move { id * 2 })
//!         .workers(4)
//!         .run()
//! };
//! assert_eq!(run(fetch.clone()).await.unwrap().delivered(), 25);
//! // Run again (another process would do the same): it resumes after row 25.
//! assert_eq!(run(fetch).await.unwrap().delivered(), 0);
//! # }
//! ```
//!
//! `examples/sql_cursor.rs` pages through a SQLite table, can be killed at any point and run
//! again, and with `--exactly-once` writes each row's effect exactly once:
//!
//! ```text
//! cargo run -p flowline-sqlite --example sql_cursor -- <db> [rows] [stop_after] [--exactly-once]
//! ```

#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod checkpoints;
mod keyset;
mod store;
mod transient;

pub use checkpoints::SqliteCheckpoints;
pub use keyset::{Key, KeyParseError, Keyset, PageFuture};
pub use store::SqliteStore;
pub use transient::{classify, is_transient, is_transient_error};

/// How long a store call waits for a lock another connection holds before it fails with
/// `SQLITE_BUSY` (marked transient: the run's outage policy tries again).
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The SQLite library the stores are built on, re-exported so that an effect given to
/// [`SqliteStore::commit_with`] names the same `Transaction` type.
///
/// ```
/// fn effect(tx: &flowline_sqlite::rusqlite::Transaction<'_>) -> flowline_sqlite::rusqlite::Result<usize> {
///     tx.execute("insert into sent (id) values (?1)", [7])
/// }
/// # let _ = effect;
/// ```
pub use rusqlite;
