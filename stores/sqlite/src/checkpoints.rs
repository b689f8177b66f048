//! `SqliteCheckpoints`: checkpoints in one SQLite file (embedded, no server).
//!
//! The file is created on first use with a table `flowline_checkpoints(name primary key,
//! cursor, updated_at)`. The same file may hold other tables (the data being read, the
//! idempotency keys). Calls are short single-row statements on one connection; they run on
//! tokio's blocking pool so a slow disk never stalls the runtime's workers. A call that finds
//! the file locked by another connection waits up to the busy timeout, then fails with an
//! error marked [`Transient`](flowline::Transient): the cursor source waits and tries again
//! under the run's outage policy.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};

use flowline::{BoxError, CheckpointStore, StoreFuture};

/// Checkpoints kept in a SQLite file.
///
/// ```
/// use flowline::CheckpointStore;
/// use flowline_sqlite::SqliteCheckpoints;
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("state.db");
/// let store = SqliteCheckpoints::open(&path).unwrap();
/// store.commit("orders", "1000").await.unwrap();
/// drop(store);
/// let again = SqliteCheckpoints::open(&path).unwrap();   // survives a restart
/// assert_eq!(again.load("orders").await.unwrap().as_deref(), Some("1000"));
/// # }
/// ```
#[derive(Clone)]
pub struct SqliteCheckpoints {
    conn: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for SqliteCheckpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteCheckpoints").finish_non_exhaustive()
    }
}

impl SqliteCheckpoints {
    /// Opens (creating if needed) the SQLite file at `path` and its checkpoint table.
    ///
    /// ```
    /// let dir = tempfile::tempdir().unwrap();
    /// let store = flowline_sqlite::SqliteCheckpoints::open(dir.path().join("c.db")).unwrap();
    /// # let _ = store;
    /// ```
    pub fn open(path: impl AsRef<Path>) -> Result<Self, BoxError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(crate::BUSY_TIMEOUT)?;
        // WAL: a commit is one append, and readers of the same file are not blocked.
        let _: String = conn.query_row("pragma journal_mode = wal", [], |r| r.get(0))?;
        // In WAL mode `normal` skips the fsync per commit: a commit survives a crash of the
        // process, and a power loss can only roll the checkpoint back, which replays rows
        // (at-least-once) but never skips one.
        conn.execute_batch("pragma synchronous = normal")?;
        conn.execute_batch(
            "create table if not exists flowline_checkpoints (
                name text primary key,
                cursor text not null,
                updated_at text not null default (datetime('now'))
            )",
        )?;
        Ok(SqliteCheckpoints {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> StoreFuture<'static, T> {
        let conn = self.conn.clone();
        Box::pin(async move {
            let run = move || {
                let c = conn.lock().unwrap_or_else(|p| p.into_inner());
                f(&c)
            };
            let r = tokio::task::spawn_blocking(run)
                .await
                .map_err(|e| BoxError::from(flowline::Permanent::new(e.to_string())))?;
            r.map_err(crate::transient::classify)
        })
    }
}

impl CheckpointStore for SqliteCheckpoints {
    fn load<'a>(&'a self, name: &'a str) -> StoreFuture<'a, Option<String>> {
        let name = name.to_string();
        self.call(move |c| {
            c.query_row(
                "select cursor from flowline_checkpoints where name = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()
        })
    }

    fn commit<'a>(&'a self, name: &'a str, cursor: &'a str) -> StoreFuture<'a, ()> {
        let (name, cursor) = (name.to_string(), cursor.to_string());
        // A cursor source commits once per page: the statement is parsed once per connection.
        self.call(move |c| {
            c.prepare_cached(
                "insert into flowline_checkpoints (name, cursor) values (?1, ?2)
                 on conflict(name) do update set cursor = excluded.cursor,
                                                updated_at = datetime('now')",
            )?
            .execute(params![name, cursor])
            .map(|_| ())
        })
    }

    fn clear<'a>(&'a self, name: &'a str) -> StoreFuture<'a, ()> {
        let name = name.to_string();
        self.call(move |c| {
            c.execute(
                "delete from flowline_checkpoints where name = ?1",
                params![name],
            )
            .map(|_| ())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn commits_survive_reopening_and_names_are_separate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp.db");
        let s = SqliteCheckpoints::open(&path).unwrap();
        assert_eq!(s.load("a").await.unwrap(), None);
        s.commit("a", "1").await.unwrap();
        s.commit("a", "2").await.unwrap();
        s.commit("b", "x").await.unwrap();
        drop(s);
        let s = SqliteCheckpoints::open(&path).unwrap();
        assert_eq!(s.load("a").await.unwrap().as_deref(), Some("2"));
        s.clear("b").await.unwrap();
        assert_eq!(s.load("b").await.unwrap(), None);
    }
}
