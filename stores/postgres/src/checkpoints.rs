//! `PgCheckpoints`: checkpoints in a PostgreSQL table shared by the
//! workers of several machines.
//!
//! ```sql
//! CREATE TABLE IF NOT EXISTS flowline_checkpoints (
//!     name       TEXT PRIMARY KEY,
//!     cursor     TEXT NOT NULL,
//!     updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
//! );
//! ```
//!
//! Each call is one statement (its own transaction), retried on another connection when the
//! connection dropped: load, commit and clear are all safe to repeat. An error that outlasts
//! the retries comes back marked [`Transient`](flowline::Transient) (the cursor source waits
//! for the server under the run's outage policy) or [`Permanent`](flowline::Permanent).

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;

use flowline::{BoxError, CheckpointStore, StoreFuture};

use super::pg::{self, PgOptions, pool_failed, retrying, sql_failed};

const STORE: &str = "PgCheckpoints";

struct Sql {
    load: String,
    commit: String,
    clear: String,
}

/// Checkpoints kept in a PostgreSQL table (default `flowline_checkpoints`), created if
/// missing. Cheap to clone; clones share the pool.
///
/// ```no_run
/// use flowline::CheckpointStore;
/// use flowline_postgres::PgCheckpoints;
/// # #[tokio::main] async fn main() -> Result<(), flowline::BoxError> {
/// let store = PgCheckpoints::connect("postgresql://flowline@localhost/app").await?;
/// store.commit("orders", "1000").await?;
/// assert_eq!(store.load("orders").await?.as_deref(), Some("1000"));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PgCheckpoints {
    pool: Pool,
    table: Arc<str>,
    sql: Arc<Sql>,
    retry_for: Duration,
}

impl std::fmt::Debug for PgCheckpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgCheckpoints")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

impl PgCheckpoints {
    /// Connects to `url` (`postgresql://user:password@host:port/db`, or `key=value` pairs)
    /// with a pool of its own, and creates the table `flowline_checkpoints` if missing.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> Result<(), flowline::BoxError> {
    /// let store = flowline_postgres::PgCheckpoints::connect("postgresql://flowline@localhost/app").await?;
    /// # let _ = store; Ok(()) }
    /// ```
    pub async fn connect(url: &str) -> Result<Self, BoxError> {
        Self::connect_with(url, PgOptions::new()).await
    }

    /// [`connect`](PgCheckpoints::connect) with [`PgOptions`]: the table, the pool size, the
    /// retry window.
    ///
    /// ```no_run
    /// use flowline_postgres::{PgCheckpoints, PgOptions};
    /// # #[tokio::main] async fn main() -> Result<(), flowline::BoxError> {
    /// let opts = PgOptions::new().table("etl_checkpoints").pool_size(2);
    /// let store = PgCheckpoints::connect_with("postgresql://flowline@localhost/app", opts).await?;
    /// # let _ = store; Ok(()) }
    /// ```
    pub async fn connect_with(url: &str, options: PgOptions) -> Result<Self, BoxError> {
        // The table name is checked before anything connects.
        let table = pg::table_ident(STORE, table_name(&options))?;
        let pool = pg::pool(STORE, url, options.pool_size)?;
        Self::open(pool, table, options).await
    }

    /// A store on a pool the caller built (to share it with the pipeline's own queries, or
    /// to reach a server through TLS); creates the table if missing.
    ///
    /// ```no_run
    /// use flowline_postgres::{PgCheckpoints, PgOptions, PgStore};
    /// # #[tokio::main] async fn main() -> Result<(), flowline::BoxError> {
    /// let keys = PgStore::connect("postgresql://flowline@localhost/app").await?;
    /// let checkpoints = PgCheckpoints::from_pool(keys.pool().clone(), PgOptions::new()).await?;
    /// # let _ = checkpoints; Ok(()) }
    /// ```
    pub async fn from_pool(pool: Pool, options: PgOptions) -> Result<Self, BoxError> {
        let table = pg::table_ident(STORE, table_name(&options))?;
        Self::open(pool, table, options).await
    }

    async fn open(pool: Pool, table: String, options: PgOptions) -> Result<Self, BoxError> {
        let ddl = format!(
            "CREATE TABLE IF NOT EXISTS {table} (
                 name       TEXT PRIMARY KEY,
                 cursor     TEXT NOT NULL,
                 updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
             )"
        );
        pg::create_table(&pool, &table, options.retry_for, &ddl).await?;
        let sql = Sql {
            load: format!("SELECT cursor FROM {table} WHERE name = $1"),
            commit: format!(
                "INSERT INTO {table} (name, cursor) VALUES ($1, $2)
                 ON CONFLICT (name) DO UPDATE SET cursor = excluded.cursor, updated_at = now()"
            ),
            clear: format!("DELETE FROM {table} WHERE name = $1"),
        };
        Ok(PgCheckpoints {
            pool,
            table: Arc::from(table),
            sql: Arc::new(sql),
            retry_for: options.retry_for,
        })
    }

    /// The pool this store uses.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> Result<(), flowline::BoxError> {
    /// let store = flowline_postgres::PgCheckpoints::connect("postgresql://flowline@localhost/app").await?;
    /// let client = store.pool().get().await?;
    /// client.batch_execute("select 1").await?;
    /// # Ok(()) }
    /// ```
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Runs one statement, retried when the connection dropped.
    async fn one<T>(
        &self,
        name: &'static str,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        read: impl Fn(Vec<tokio_postgres::Row>) -> Result<T, BoxError>,
    ) -> Result<T, BoxError> {
        let table = &*self.table;
        let rows = retrying(self.retry_for, || async {
            let client = self.pool.get().await.map_err(|e| pool_failed(table, e))?;
            let stmt = client
                .prepare_cached(sql)
                .await
                .map_err(|e| sql_failed(table, name, e))?;
            client
                .query(&stmt, params)
                .await
                .map_err(|e| sql_failed(table, name, e))
        })
        .await?;
        read(rows)
    }
}

fn table_name(options: &PgOptions) -> &str {
    options.table.as_deref().unwrap_or("flowline_checkpoints")
}

impl CheckpointStore for PgCheckpoints {
    fn load<'a>(&'a self, name: &'a str) -> StoreFuture<'a, Option<String>> {
        Box::pin(async move {
            let read = |rows: Vec<tokio_postgres::Row>| match rows.first() {
                None => Ok(None),
                Some(row) => row.try_get::<_, String>(0).map(Some).map_err(|e| {
                    let e = format!("PostgreSQL checkpoint load on table {}: {e}", self.table);
                    Box::new(flowline::Permanent::new(e)) as BoxError
                }),
            };
            self.one("checkpoint load (SELECT)", &self.sql.load, &[&name], read)
                .await
        })
    }

    fn commit<'a>(&'a self, name: &'a str, cursor: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let what = "checkpoint commit (INSERT … ON CONFLICT)";
            self.one(what, &self.sql.commit, &[&name, &cursor], |_| Ok(()))
                .await
        })
    }

    fn clear<'a>(&'a self, name: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let what = "checkpoint clear (DELETE)";
            self.one(what, &self.sql.clear, &[&name], |_| Ok(())).await
        })
    }
}
