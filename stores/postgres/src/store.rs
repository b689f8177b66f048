//! [`PgStore`]: idempotency state in a PostgreSQL table, shared by
//! workers on several machines. Each call on a chunk of keys is one statement (one round
//! trip), retried on another connection when its connection dropped.
//!
//! ```sql
//! CREATE TABLE IF NOT EXISTS flowline_idempotency (
//!     scope      TEXT     NOT NULL,   -- which pipeline the keys belong to
//!     key        TEXT     NOT NULL,
//!     state      SMALLINT NOT NULL,   -- 0 reserved, 1 done
//!     holder     TEXT     NOT NULL,   -- who holds the reservation
//!     lease      BIGINT   NOT NULL,   -- which reserve call took it (a retried call knows its own)
//!     expires_ms BIGINT   NOT NULL,   -- reservation expiry, Unix ms on the server's clock
//!     PRIMARY KEY (scope, key)
//! ) WITH (fillfactor = 50);   -- room on each page: marking a key done is a HOT update
//! ```
//!
//! Expiry is measured on the server's clock, the one clock every worker shares.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadpool_postgres::Pool;

use flowline::{BoxError, Reservation, Store, StoreFuture};

use super::pg::{self, PgOptions, pool_failed, retrying, sql_failed};

const STORE: &str = "PgStore";
/// The server's clock, in Unix ms, fixed for the statement.
const NOW_MS: &str = "(extract(epoch FROM statement_timestamp()) * 1000)::bigint";

struct Sql {
    reserve: String,
    states: String,
    commit: String,
    release: String,
    mark_done: String,
}

/// A [`Store`] in a PostgreSQL table (default `flowline_idempotency`), created if missing.
/// Cheap to clone; clones are one holder. Mirrors `flowline_sqlite::SqliteStore`:
/// scopes, holders, expiry, named holders that take back an earlier life's reservations —
/// and [`commit_with`](PgStore::commit_with), async here, writes an effect and its keys in
/// one transaction.
///
/// ```no_run
/// use flowline::prelude::*;
/// use flowline_postgres::PgStore;
/// # #[tokio::main] async fn main() -> Result<(), flowline::BoxError> {
/// let store = PgStore::connect("postgresql://flowline@localhost/app").await?.scope("orders");
/// let report = Pipeline::from_iter([1, 2, 3]).idempotent(store, |id| *id).run().await?;
/// println!("{report}");   // a second run of the same ids delivers nothing
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    table: Arc<str>,
    sql: Arc<Sql>,
    retry_for: Duration,
    scope: Arc<str>,
    holder: Arc<str>,
    /// `name#` when the holder was named: reservations of an earlier life are ours.
    name: Option<Arc<str>>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("table", &self.table)
            .field("scope", &self.scope)
            .field("holder", &self.holder)
            .finish_non_exhaustive()
    }
}

fn new_holder() -> Arc<str> {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let n = N.fetch_add(1, Ordering::Relaxed);
    Arc::from(format!("{}-{nanos}-{n}", std::process::id()))
}

/// A number for each reserve call of this process: with the holder, it tells a retried
/// call which reservations it made itself before its connection dropped.
fn next_lease() -> i64 {
    static N: AtomicI64 = AtomicI64::new(1);
    N.fetch_add(1, Ordering::Relaxed)
}

fn table_name(options: &PgOptions) -> &str {
    options.table.as_deref().unwrap_or("flowline_idempotency")
}

impl PgStore {
    /// Connects to `url` (`postgresql://user:password@host:port/db`, or `key=value` pairs)
    /// with a pool of its own, creates `flowline_idempotency` if missing; scope `default`.
    ///
    /// ```no_run
    /// use flowline::{Reservation, Store};
    /// use flowline_postgres::PgStore;
    /// use std::time::Duration;
    /// # #[tokio::main] async fn main() -> Result<(), flowline::BoxError> {
    /// let store = PgStore::connect("postgresql://flowline@localhost/app").await?;
    /// let k = vec!["order-7".to_string()];
    /// assert_eq!(store.reserve(&k, Duration::from_secs(60)).await?, vec![Reservation::Reserved]);
    /// # Ok(()) }
    /// ```
    pub async fn connect(url: &str) -> Result<Self, BoxError> {
        Self::connect_with(url, PgOptions::new()).await
    }

    /// [`connect`](PgStore::connect) with [`PgOptions`]: the table, the pool size, the retry
    /// window.
    ///
    /// ```no_run
    /// use flowline_postgres::{PgOptions, PgStore};
    /// # #[tokio::main] async fn main() -> Result<(), flowline::BoxError> {
    /// let opts = PgOptions::new().table("orders_keys");
    /// let store = PgStore::connect_with("postgresql://flowline@localhost/app", opts).await?;
    /// # let _ = store; Ok(()) }
    /// ```
    pub async fn connect_with(url: &str, options: PgOptions) -> Result<Self, BoxError> {
        let table = pg::table_ident(STORE, table_name(&options))?;
        let pool = pg::pool(STORE, url, options.pool_size)?;
        Self::open(pool, table, options).await
    }

    /// A store on a pool the caller built (shared with the pipeline's own queries and
    /// effects, or reaching a server through TLS); creates the table if missing.
    ///
    /// ```no_run
    /// use flowline_postgres::{PgCheckpoints, PgOptions, PgStore};
    /// # #[tokio::main] async fn main() -> Result<(), flowline::BoxError> {
    /// let checkpoints = PgCheckpoints::connect("postgresql://flowline@localhost/app").await?;
    /// let keys = PgStore::from_pool(checkpoints.pool().clone(), PgOptions::new()).await?;
    /// # let _ = keys; Ok(()) }
    /// ```
    pub async fn from_pool(pool: Pool, options: PgOptions) -> Result<Self, BoxError> {
        let table = pg::table_ident(STORE, table_name(&options))?;
        Self::open(pool, table, options).await
    }

    async fn open(pool: Pool, table: String, options: PgOptions) -> Result<Self, BoxError> {
        let ddl = format!(
            "CREATE TABLE IF NOT EXISTS {table} (
                 scope      TEXT     NOT NULL,
                 key        TEXT     NOT NULL,
                 state      SMALLINT NOT NULL,
                 holder     TEXT     NOT NULL,
                 lease      BIGINT   NOT NULL,
                 expires_ms BIGINT   NOT NULL,
                 PRIMARY KEY (scope, key)
             ) WITH (fillfactor = 50)"
        );
        // fillfactor 50: each row is updated once, reserved to done; with room left on its
        // page the update is HOT (no new index entry), about 6 times cheaper.
        pg::create_table(&pool, &table, options.retry_for, &ddl).await?;
        // $1 scope, $2 holder, $3 ttl ms, $4 keys, $5 `name#` of a named holder, $6 lease.
        // A key is taken when it is new, its reservation expired, it is this very call's
        // (a retry after a dropped connection), or an earlier life of this named holder
        // held it. Only the keys taken come back.
        let reserve = format!(
            "INSERT INTO {table} AS t (scope, key, state, holder, lease, expires_ms)
             SELECT $1, k, 0, $2, $6, {NOW_MS} + $3 FROM unnest($4::text[]) AS k
             ON CONFLICT (scope, key) DO UPDATE
                SET state = 0, holder = excluded.holder, lease = excluded.lease,
                    expires_ms = excluded.expires_ms
                WHERE t.state = 0 AND (
                      t.expires_ms <= {NOW_MS}
                   OR (t.holder = $2 AND t.lease = $6)
                   OR ($5::text IS NOT NULL AND t.holder <> $2 AND starts_with(t.holder, $5)))
             RETURNING key"
        );
        let sql = Sql {
            reserve,
            states: format!("SELECT key, state FROM {table} WHERE scope = $1 AND key = ANY($2)"),
            commit: format!(
                "UPDATE {table} SET state = 1
                 WHERE scope = $1 AND key = ANY($2) AND holder = $3 AND state = 0"
            ),
            release: format!(
                "DELETE FROM {table} WHERE scope = $1 AND key = ANY($2) AND holder = $3 AND state = 0"
            ),
            mark_done: format!(
                "UPDATE {table} SET state = 1
                 WHERE scope = $1 AND key = ANY($2) AND holder = $3 AND state = 0
                 RETURNING key"
            ),
        };
        Ok(PgStore {
            pool,
            table: Arc::from(table),
            sql: Arc::new(sql),
            retry_for: options.retry_for,
            scope: Arc::from("default"),
            holder: new_holder(),
            name: None,
        })
    }

    /// The same table, keys kept apart under `scope` (one scope per pipeline).
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> Result<(), flowline::BoxError> {
    /// let store = flowline_postgres::PgStore::connect("postgresql://flowline@localhost/app").await?;
    /// let orders = store.clone().scope("orders");
    /// let refunds = store.scope("refunds");
    /// # let _ = (orders, refunds); Ok(()) }
    /// ```
    pub fn scope(mut self, scope: &str) -> Self {
        self.scope = Arc::from(scope);
        self
    }

    /// Another holder on the same pool (as a second worker would be): its reservations are
    /// distinct from this one's.
    ///
    /// ```no_run
    /// use flowline::{Reservation, Store};
    /// use flowline_postgres::PgStore;
    /// use std::time::Duration;
    /// # #[tokio::main] async fn main() -> Result<(), flowline::BoxError> {
    /// let store = PgStore::connect("postgresql://flowline@localhost/app").await?;
    /// let other = store.handle();
    /// let k = vec!["order-7".to_string()];
    /// store.reserve(&k, Duration::from_secs(60)).await?;
    /// assert_eq!(other.reserve(&k, Duration::from_secs(60)).await?, vec![Reservation::Busy]);
    /// # Ok(()) }
    /// ```
    pub fn handle(&self) -> Self {
        PgStore {
            holder: new_holder(),
            name: None,
            ..self.clone()
        }
    }

    /// Names this handle's holder (by default each handle gets a unique one). A worker that
    /// restarts under the same name takes back the reservations it still held when it
    /// died, so its in-flight items are processed again at once instead of being skipped as
    /// [`Reservation::Busy`] until they expire. Give each concurrent worker its own name
    /// (the machine and worker number, say).
    ///
    /// ```no_run
    /// use flowline::{Reservation, Store};
    /// use flowline_postgres::PgStore;
    /// use std::time::Duration;
    /// # #[tokio::main] async fn main() -> Result<(), flowline::BoxError> {
    /// let url = "postgresql://flowline@localhost/app";
    /// let k = vec!["row-1".to_string()];
    /// let crashed = PgStore::connect(url).await?.holder("host-a/1");
    /// crashed.reserve(&k, Duration::from_secs(600)).await?;
    /// // The process dies here; its reservation would stand for 10 minutes.
    /// let restarted = PgStore::connect(url).await?.holder("host-a/1");
    /// assert_eq!(restarted.reserve(&k, Duration::from_secs(600)).await?, vec![Reservation::Reserved]);
    /// # Ok(()) }
    /// ```
    pub fn holder(mut self, name: &str) -> Self {
        // `name#<unique id>`: a reservation under the same name from another life is taken
        // back; one from this life (the same key twice in a run) is still busy.
        let prefix: Arc<str> = Arc::from(format!("{name}#"));
        self.holder = Arc::from(format!("{prefix}{}", new_holder()));
        self.name = Some(prefix);
        self
    }

    /// The pool this store uses (for the pipeline's own queries).
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> Result<(), flowline::BoxError> {
    /// let store = flowline_postgres::PgStore::connect("postgresql://flowline@localhost/app").await?;
    /// let client = store.pool().get().await?;
    /// let rows = client.query("select id from items where id > $1 order by id limit 100", &[&0i64]).await?;
    /// # let _ = rows; Ok(()) }
    /// ```
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Runs `effect` and marks `keys` done in one PostgreSQL transaction: both happen or
    /// neither. When an item's effect is a write to the same database, this makes it
    /// exactly-once across crashes: a key is done if and only if its effect is there, and a
    /// done key is never processed again. Each key must be reserved by this holder (as
    /// [`idempotent`](flowline::Flow::idempotent) does when the item enters); if one is not
    /// (its reservation expired and was taken over, or an earlier attempt already
    /// committed it), nothing is written and the call fails.
    ///
    /// Async, so it runs in an async stage. Getting a connection is retried like every
    /// store call; the transaction itself is tried once (the effect runs at most once per
    /// call): a stage's [`retry`](flowline::AsyncStage::retry) may try again, and a key
    /// already committed then fails the call instead of writing the effect twice. An error
    /// of the effect itself comes back as it was (`downcast_ref` finds it).
    ///
    /// ```no_run
    /// use flowline::prelude::*;
    /// use flowline_postgres::PgStore;
    /// # #[tokio::main] async fn main() -> Result<(), flowline::BoxError> {
    /// let store = PgStore::connect("postgresql://flowline@localhost/app").await?.holder("worker-1");
    /// let effects = store.clone();
    /// let report = Pipeline::from_iter([1i64, 2, 3])
    ///     .idempotent(store, |id| *id)
    ///     .try_map_async("write", move |id: i64| {
    ///         let effects = effects.clone();
    ///         async move {
    ///             effects
    ///                 .commit_with(&[id.to_string()], async |tx| {
    ///                     tx.execute("insert into sent (id) values ($1)", &[&id]).await
    ///                 })
    ///                 .await
    ///         }
    ///     })
    ///     .run()
    ///     .await?;
    /// println!("{report}");
    /// # Ok(()) }
    /// ```
    pub async fn commit_with<R, E>(
        &self,
        keys: &[String],
        effect: impl AsyncFnOnce(&tokio_postgres::Transaction<'_>) -> Result<R, E>,
    ) -> Result<R, BoxError>
    where
        E: Into<BoxError>,
    {
        let table = &*self.table;
        let mut backoff = pg::Backoff::new(self.retry_for);
        loop {
            let mut client = retrying(self.retry_for, || async {
                self.pool.get().await.map_err(|e| pool_failed(table, e))
            })
            .await?;
            // A connection that dropped since it was last used fails here, before the
            // effect has run: try again on another.
            let tx = match client.transaction().await {
                Ok(tx) => tx,
                Err(e) => {
                    backoff
                        .wait_or_fail(sql_failed(table, "commit_with (BEGIN)", e))
                        .await?;
                    continue;
                }
            };
            return self.effect_and_keys(tx, keys, effect).await;
        }
    }

    async fn effect_and_keys<R, E>(
        &self,
        tx: deadpool_postgres::Transaction<'_>,
        keys: &[String],
        effect: impl AsyncFnOnce(&tokio_postgres::Transaction<'_>) -> Result<R, E>,
    ) -> Result<R, BoxError>
    where
        E: Into<BoxError>,
    {
        let table = &*self.table;
        let out = effect(&tx).await.map_err(Into::into)?;
        let wanted: HashSet<&str> = keys.iter().map(String::as_str).collect();
        if !wanted.is_empty() {
            let stmt = tx
                .prepare_cached(&self.sql.mark_done)
                .await
                .map_err(|e| sql_failed(table, "commit_with (UPDATE … RETURNING)", e).error)?;
            let rows = tx
                .query(&stmt, &[&&*self.scope, &keys, &&*self.holder])
                .await
                .map_err(|e| sql_failed(table, "commit_with (UPDATE … RETURNING)", e).error)?;
            let mut marked = HashSet::with_capacity(rows.len());
            for row in &rows {
                if let Ok(k) = row.try_get::<_, &str>(0) {
                    marked.insert(k.to_string());
                }
            }
            if let Some(key) = keys.iter().find(|k| !marked.contains(*k)) {
                // Dropping `tx` rolls the effect back.
                return Err(format!(
                    "key {key:?} is not reserved by this holder ({}): effect not written",
                    self.holder
                )
                .into());
            }
        }
        tx.commit()
            .await
            .map_err(|e| sql_failed(table, "commit_with (COMMIT)", e).error)?;
        Ok(out)
    }

    /// Runs `sql` with `keys` as `$2` after the scope, retried on another connection when
    /// the connection dropped.
    async fn keys_statement(
        &self,
        name: &'static str,
        sql: &str,
        keys: &[String],
    ) -> Result<(), BoxError> {
        let table = &*self.table;
        retrying(self.retry_for, || async {
            let client = self.pool.get().await.map_err(|e| pool_failed(table, e))?;
            let stmt = client
                .prepare_cached(sql)
                .await
                .map_err(|e| sql_failed(table, name, e))?;
            client
                .execute(&stmt, &[&&*self.scope, &keys, &&*self.holder])
                .await
                .map_err(|e| sql_failed(table, name, e))
        })
        .await
        .map(|_| ())
    }

    async fn reserve_keys(
        &self,
        keys: &[String],
        ttl: Duration,
    ) -> Result<Vec<Reservation>, BoxError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        // A key twice in one call is reserved once; its later copies are busy, as a second
        // copy in flight would be.
        let mut seen = HashSet::with_capacity(keys.len());
        let distinct: Vec<&str> = keys
            .iter()
            .map(String::as_str)
            .filter(|k| seen.insert(*k))
            .collect();
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 4);
        let lease = next_lease();
        let name = self.name.as_deref();
        let table = &*self.table;
        let (taken, states) = retrying(self.retry_for, || async {
            let client = self.pool.get().await.map_err(|e| pool_failed(table, e))?;
            let what = "reserve (INSERT … ON CONFLICT)";
            let stmt = client
                .prepare_cached(&self.sql.reserve)
                .await
                .map_err(|e| sql_failed(table, what, e))?;
            let rows = client
                .query(
                    &stmt,
                    &[
                        &&*self.scope,
                        &&*self.holder,
                        &ttl_ms,
                        &distinct,
                        &name,
                        &lease,
                    ],
                )
                .await
                .map_err(|e| sql_failed(table, what, e))?;
            let taken: HashSet<String> = rows
                .iter()
                .filter_map(|r| r.try_get::<_, String>(0).ok())
                .collect();
            if taken.len() == distinct.len() {
                return Ok((taken, Vec::new()));
            }
            // Why the others were not taken: done, or someone else's.
            let what = "reserve (SELECT state)";
            let stmt = client
                .prepare_cached(&self.sql.states)
                .await
                .map_err(|e| sql_failed(table, what, e))?;
            let rest: Vec<&str> = distinct
                .iter()
                .copied()
                .filter(|k| !taken.contains(*k))
                .collect();
            let states = client
                .query(&stmt, &[&&*self.scope, &rest])
                .await
                .map_err(|e| sql_failed(table, what, e))?;
            let states: Vec<(String, i16)> = states
                .iter()
                .filter_map(|r| Some((r.try_get(0).ok()?, r.try_get(1).ok()?)))
                .collect();
            Ok((taken, states))
        })
        .await?;
        let done: HashSet<&str> = states
            .iter()
            .filter(|(_, s)| *s == 1)
            .map(|(k, _)| k.as_str())
            .collect();
        let mut first = HashSet::with_capacity(keys.len());
        Ok(keys
            .iter()
            .map(|k| {
                if !first.insert(k.as_str()) {
                    if done.contains(k.as_str()) {
                        Reservation::AlreadyDone
                    } else {
                        Reservation::Busy
                    }
                } else if taken.contains(k) {
                    Reservation::Reserved
                } else if done.contains(k.as_str()) {
                    Reservation::AlreadyDone
                } else {
                    // Reserved by another holder (or released by it a moment ago): skip.
                    Reservation::Busy
                }
            })
            .collect())
    }
}

impl Store for PgStore {
    fn reserve<'a>(
        &'a self,
        keys: &'a [String],
        ttl: Duration,
    ) -> StoreFuture<'a, Vec<Reservation>> {
        Box::pin(self.reserve_keys(keys, ttl))
    }

    fn commit<'a>(&'a self, keys: &'a [String]) -> StoreFuture<'a, ()> {
        // A key whose reservation was taken over is left alone: its new holder decides.
        Box::pin(self.keys_statement("commit (UPDATE)", &self.sql.commit, keys))
    }

    fn release<'a>(&'a self, keys: &'a [String]) -> StoreFuture<'a, ()> {
        Box::pin(self.keys_statement("release (DELETE)", &self.sql.release, keys))
    }
}
