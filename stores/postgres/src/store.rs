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
//!
//! Every statement on a chunk of keys finds each key through the primary key, one look-up
//! per key: its cost follows the keys, not the size of the table. The writes do so through
//! `ON CONFLICT`, whose look-ups are the unique index's own; they are prepared once. The
//! reads (and the updates and deletes that read first) probe each key under `LIMIT 1`
//! (see `probe`) and are planned for each call with the table as it is (an unnamed
//! statement, still one round trip): a prepared plan made while the table was empty
//! would scan it for every key once it has grown.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use deadpool_postgres::Pool;
use tokio_postgres::types::ToSql;
use tokio_postgres::types::Type;

/// Parameter types of statements planned for each call (`query_typed`).
const TEXT: Type = Type::TEXT;
const TEXT_ARRAY: Type = Type::TEXT_ARRAY;

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
    /// Optimistic holders: which keys are done, and which are held by a live lease.
    check: String,
    /// Optimistic holders: the keys written done, in one write each.
    write_done: String,
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
    // `String`, not `str`: a `&String` is a statement parameter as it is.
    scope: Arc<String>,
    holder: Arc<String>,
    /// `name#` when the holder was named: reservations of an earlier life are ours.
    name: Option<Arc<str>>,
    /// Keys this holder marked done in [`commit_with`](PgStore::commit_with) that the
    /// `idempotent` stage has not committed yet: its commit of them has nothing to write.
    done_here: Arc<KeySet>,
    /// Reserve without writing a lease (see [`optimistic`](PgStore::optimistic)).
    optimistic: bool,
    /// Optimistic holders: the keys this handle took and has not committed or released.
    held: Arc<KeySet>,
    /// Leases of this handle's reserve calls that failed: the server may have written them
    /// before the connection dropped, and the keys come back in a later call, which takes
    /// them as its own instead of finding them busy until they expire. Each lease is kept
    /// with the time its reservation could last until: past it, the keys are free anyway.
    failed_leases: Arc<std::sync::Mutex<FailedLeases>>,
}

/// Failed leases remembered at most (past it the oldest is forgotten first: its keys then
/// wait out their reservation, as another holder's would). Expired ones are dropped sooner.
const FAILED_LEASES_MAX: usize = 64;

type FailedLeases = std::collections::VecDeque<(i64, Instant)>;

/// The failed leases whose reservations may still hold keys; the others are forgotten.
fn live_leases(failed: &mut FailedLeases, now: Instant) -> Vec<i64> {
    failed.retain(|(_, until)| *until > now);
    failed.iter().map(|(lease, _)| *lease).collect()
}

/// Keeps a failed reserve call's lease. The server may have written it when the call
/// began, so it holds the keys no longer than the TTL from `now`.
fn remember_failed(failed: &mut FailedLeases, lease: i64, now: Instant, ttl: Duration) {
    if failed.len() == FAILED_LEASES_MAX {
        failed.pop_front();
    }
    // A TTL too long to add to now (Duration::MAX) keeps the lease for a century.
    let until = now
        .checked_add(ttl)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600));
    failed.push_back((lease, until));
}

/// A set of keys a handle keeps in this process: those [`PgStore::commit_with`] marked
/// done, until [`Store::commit`] or [`Store::release`] is called for them (bounded by
/// [`remember`](KeySet::remember): a key forgotten early only costs its commit a statement
/// that finds it already done), or those an optimistic holder took.
#[derive(Default)]
struct KeySet(std::sync::Mutex<HashSet<String>>);

/// Keys remembered at most by [`KeySet::remember`] (a batch of effects in flight is far
/// fewer).
const DONE_HERE_MAX: usize = 1 << 16;

impl KeySet {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remember(&self, keys: &[String]) {
        let mut set = self.lock();
        if set.len() + keys.len() > DONE_HERE_MAX {
            set.clear();
        }
        if keys.len() <= DONE_HERE_MAX {
            set.extend(keys.iter().cloned());
        }
    }

    /// Takes `key` unless it is held already.
    fn insert(&self, key: &str) -> bool {
        let mut set = self.lock();
        !set.contains(key) && set.insert(key.to_string())
    }

    /// The first of `keys` not held, if any.
    fn missing<'k>(&self, keys: &'k [String]) -> Option<&'k String> {
        let set = self.lock();
        keys.iter().find(|k| !set.contains(k.as_str()))
    }

    /// The keys not marked done here; those that were are forgotten.
    fn take_others<'k>(&self, keys: &'k [String]) -> Vec<&'k String> {
        let mut set = self.lock();
        if set.is_empty() {
            return keys.iter().collect();
        }
        keys.iter().filter(|k| !set.remove(k.as_str())).collect()
    }

    /// The keys held here, forgotten as they are returned.
    fn take_held<'k>(&self, keys: &[&'k String]) -> Vec<&'k String> {
        let mut set = self.lock();
        keys.iter()
            .copied()
            .filter(|k| set.remove(k.as_str()))
            .collect()
    }

    fn forget(&self, keys: &[String]) {
        let mut set = self.lock();
        for k in keys {
            set.remove(k.as_str());
        }
    }
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

fn new_holder() -> Arc<String> {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let n = N.fetch_add(1, Ordering::Relaxed);
    Arc::new(format!("{}-{nanos}-{n}", std::process::id()))
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

/// The row of key `k.key` in scope `$1`, found through the primary key, one key at a
/// time. A `key = ANY($2)` condition would leave the plan to the statistics: before the
/// table has any (a new table, or one just emptied), the planner takes `scope = $1` alone
/// for selective, reads every key of the scope and filters, and each call costs time in
/// proportion to the table. A probe under `LIMIT 1` in a lateral join is not flattened:
/// each key is one look-up in the unique index, whatever the statistics say.
fn probe(table: &str, columns: &str) -> String {
    format!("SELECT {columns} FROM {table} WHERE scope = $1 AND key = k.key LIMIT 1")
}

/// The row addresses of keys `$2` in scope `$1`, each found by a [`probe`]: a statement
/// on `ctid = ANY(…)` reads those rows and no others.
fn ctids(table: &str) -> String {
    format!(
        "SELECT t.ctid FROM unnest($2::text[]) AS k(key) CROSS JOIN LATERAL ({}) AS t",
        probe(table, "ctid")
    )
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
        // $1 scope, $2 holder, $3 ttl ms, $4 keys, $5 `name#` of a named holder, $6 lease,
        // $7 leases of this handle's earlier calls that failed. A key is taken when it is
        // new, its reservation expired, it is this very call's (a retry after a dropped
        // connection) or a failed call's of this handle (the caller tries again the keys
        // whose answer it never got), or an earlier life of this named holder held it. Only
        // the keys taken come back.
        let reserve = format!(
            "INSERT INTO {table} AS t (scope, key, state, holder, lease, expires_ms)
             SELECT $1, k, 0, $2, $6, {NOW_MS} + $3 FROM unnest($4::text[]) AS k
             ON CONFLICT (scope, key) DO UPDATE
                SET state = 0, holder = excluded.holder, lease = excluded.lease,
                    expires_ms = excluded.expires_ms
                WHERE t.state = 0 AND (
                      t.expires_ms <= {NOW_MS}
                   OR (t.holder = $2 AND (t.lease = $6 OR t.lease = ANY($7::bigint[])))
                   OR ($5::text IS NOT NULL AND t.holder <> $2 AND (starts_with(t.holder, $5) AND strpos(substr(t.holder, length($5) + 1), '#') = 0)))
             RETURNING key"
        );
        let sql = Sql {
            reserve,
            states: format!(
                "SELECT k.key, t.state FROM unnest($2::text[]) AS k(key)
                 CROSS JOIN LATERAL ({PROBE}) AS t",
                PROBE = probe(&table, "state")
            ),
            commit: format!(
                "UPDATE {table} SET state = 1
                 WHERE ctid = ANY(ARRAY({ctids})) AND holder = $3 AND state = 0",
                ctids = ctids(&table)
            ),
            release: format!(
                "DELETE FROM {table}
                 WHERE ctid = ANY(ARRAY({ctids})) AND holder = $3 AND state = 0",
                ctids = ctids(&table)
            ),
            // Keys not reserved at all are inserted with lease -1 (no reserve call has it),
            // which tells them apart; the call then fails and the transaction rolls back.
            mark_done: format!(
                "INSERT INTO {table} AS t (scope, key, state, holder, lease, expires_ms)
                 SELECT $1, k, 1, $3, -1, 0 FROM unnest($2::text[]) AS k
                 ON CONFLICT (scope, key) DO UPDATE SET state = 1
                    WHERE t.holder = $3 AND t.state = 0
                 RETURNING key, lease"
            ),
            // $1 scope, $2 keys, $3 holder, $4 `name#` of a named holder. A lease is no
            // obstacle when it expired or an earlier life of this named holder took it.
            check: format!(
                "SELECT k.key, t.state = 1,
                        t.expires_ms <= {NOW_MS}
                        OR ($4::text IS NOT NULL AND t.holder <> $3 AND (starts_with(t.holder, $4) AND strpos(substr(t.holder, length($4) + 1), '#') = 0))
                 FROM unnest($2::text[]) AS k(key)
                 CROSS JOIN LATERAL ({PROBE}) AS t",
                PROBE = probe(&table, "state, holder, expires_ms")
            ),
            write_done: format!(
                "INSERT INTO {table} AS t (scope, key, state, holder, lease, expires_ms)
                 SELECT $1, k, 1, $3, 0, 0 FROM unnest($2::text[]) AS k
                 ON CONFLICT (scope, key) DO UPDATE
                    SET state = 1, holder = excluded.holder, lease = 0, expires_ms = 0
                    WHERE t.state = 0 AND (
                          t.holder = $3
                       OR t.expires_ms <= {NOW_MS}
                       OR ($4::text IS NOT NULL AND (starts_with(t.holder, $4) AND strpos(substr(t.holder, length($4) + 1), '#') = 0)))
                 RETURNING key"
            ),
        };
        Ok(PgStore {
            pool,
            table: Arc::from(table),
            sql: Arc::new(sql),
            retry_for: options.retry_for,
            scope: Arc::new("default".to_string()),
            holder: new_holder(),
            name: None,
            done_here: Arc::default(),
            optimistic: false,
            held: Arc::default(),
            failed_leases: Arc::default(),
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
        self.scope = Arc::new(scope.to_string());
        self.done_here = Arc::default();
        self.held = Arc::default();
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
            done_here: Arc::default(),
            held: Arc::default(),
            failed_leases: Arc::default(),
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
        self.holder = Arc::new(format!("{prefix}{}", new_holder()));
        self.name = Some(prefix);
        self.done_here = Arc::default();
        self.held = Arc::default();
        self.failed_leases = Arc::default();
        self
    }

    /// Reserves without writing a lease: `reserve` only reads which keys are done (they
    /// are [`AlreadyDone`](Reservation::AlreadyDone)) or held by another holder's live
    /// reservation ([`Busy`](Reservation::Busy)); the keys it takes are held by this
    /// handle in this process. Each key is then written once, done: by
    /// [`commit_with`](PgStore::commit_with) in the effect's transaction, or by `commit`.
    /// Half the writes of a reservation followed by its commit, and nothing is left behind
    /// by a crash.
    ///
    /// For a holder that is the only one working on its scope's keys (one worker, or
    /// workers on disjoint key ranges). Other holders do not see its keys as taken: if two
    /// holders take the same key at once, `commit_with` still lets only one effect through
    /// (the other call fails and writes nothing), but an effect outside the database,
    /// followed by `commit`, may run twice.
    ///
    /// ```no_run
    /// use flowline::{Reservation, Store};
    /// use flowline_postgres::PgStore;
    /// use std::time::Duration;
    /// # #[tokio::main] async fn main() -> Result<(), flowline::BoxError> {
    /// let store = PgStore::connect("postgresql://flowline@localhost/app").await?.optimistic();
    /// let k = vec!["row-1".to_string()];
    /// assert_eq!(store.reserve(&k, Duration::from_secs(60)).await?, vec![Reservation::Reserved]);
    /// let n = store
    ///     .commit_with(&k, async |tx| tx.execute("insert into sent (id) values (1)", &[]).await)
    ///     .await?;
    /// assert_eq!(store.reserve(&k, Duration::from_secs(60)).await?, vec![Reservation::AlreadyDone]);
    /// # let _ = n; Ok(()) }
    /// ```
    pub fn optimistic(mut self) -> Self {
        self.optimistic = true;
        self.held = Arc::default();
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
        if self.optimistic {
            if let Some(key) = self.held.missing(keys) {
                return Err(self.not_reserved(Some(key)));
            }
        }
        let out = effect(&tx).await.map_err(Into::into)?;
        if !keys.is_empty() {
            let name = self.name.as_deref();
            let rows = if self.optimistic {
                let what = "commit_with (INSERT … ON CONFLICT)";
                let [scope, keys, holder] = self.keys_params(&keys);
                let stmt = tx
                    .prepare_cached(&self.sql.write_done)
                    .await
                    .map_err(|e| sql_failed(table, what, e).into_error())?;
                tx.query(&stmt, &[scope, keys, holder, &name])
                    .await
                    .map_err(|e| sql_failed(table, what, e).into_error())?
            } else {
                let what = "commit_with (INSERT … ON CONFLICT)";
                let stmt = tx
                    .prepare_cached(&self.sql.mark_done)
                    .await
                    .map_err(|e| sql_failed(table, what, e).into_error())?;
                tx.query(&stmt, &self.keys_params(&keys))
                    .await
                    .map_err(|e| sql_failed(table, what, e).into_error())?
            };
            let mut marked = HashSet::with_capacity(rows.len());
            let mut inserted = None;
            for row in &rows {
                // Lease -1: a key no reserve call had, inserted by the statement itself.
                let new = !self.optimistic && row.try_get::<_, i64>(1).ok() == Some(-1);
                match (row.try_get::<_, &str>(0), new) {
                    (Ok(k), false) => {
                        marked.insert(k);
                    }
                    (Ok(k), true) => inserted = inserted.or(Some(k)),
                    (Err(_), _) => {}
                }
            }
            if let Some(key) = inserted {
                // No reserve call had it, so no earlier call can have committed it.
                return Err(self.not_reserved(keys.iter().find(|k| k.as_str() == key)));
            }
            if let Some(key) = keys.iter().find(|k| !marked.contains(k.as_str())) {
                // Dropping `tx` rolls the effect back. Keys this holder committed already
                // were an earlier call's, whose answer was lost with its connection.
                let missing: HashSet<&str> = keys
                    .iter()
                    .map(String::as_str)
                    .filter(|k| !marked.contains(k))
                    .collect();
                if self.done_by_this_holder(&tx, &missing).await? {
                    if self.optimistic {
                        self.held.forget(keys);
                    }
                    return Err(Box::new(AlreadyCommitted {
                        keys: missing.len(),
                    }));
                }
                return Err(self.not_reserved(Some(key)));
            }
        }
        tx.commit()
            .await
            .map_err(|e| sql_failed(table, "commit_with (COMMIT)", e).into_error())?;
        if self.optimistic {
            self.held.forget(keys);
        }
        self.done_here.remember(keys);
        Ok(out)
    }

    /// Whether every key of `keys` is done, and done by this holder.
    async fn done_by_this_holder(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        keys: &HashSet<&str>,
    ) -> Result<bool, BoxError> {
        let keys: Vec<&str> = keys.iter().copied().collect();
        let sql = format!(
            "SELECT count(*) FROM unnest($2::text[]) AS k(key)
             CROSS JOIN LATERAL ({}) AS t WHERE t.state = 1 AND t.holder = $3",
            probe(&self.table, "state, holder")
        );
        let [scope, ks, holder] = self.keys_params(&keys);
        let row = tx
            .query_typed(&sql, &[(scope, TEXT), (ks, TEXT_ARRAY), (holder, TEXT)])
            .await
            .map_err(|e| sql_failed(&self.table, "commit_with (SELECT state)", e).into_error())?;
        let n: i64 = row.first().and_then(|r| r.try_get(0).ok()).unwrap_or(0);
        Ok(n == keys.len() as i64)
    }

    fn failed_leases(&self) -> std::sync::MutexGuard<'_, FailedLeases> {
        self.failed_leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn not_reserved(&self, key: Option<&String>) -> BoxError {
        format!(
            "key {:?} is not reserved by this holder ({}): effect not written",
            key.map_or("", String::as_str),
            self.holder
        )
        .into()
    }

    /// `$1` scope, `$2` keys, `$3` holder.
    fn keys_params<'p, K: ToSql + Sync>(&'p self, keys: &'p K) -> [&'p (dyn ToSql + Sync); 3] {
        [&*self.scope, keys, &*self.holder]
    }

    /// Runs `sql` on `keys` (`$1` scope, `$2` keys, `$3` holder), retried on another
    /// connection when the connection dropped.
    async fn keys_statement(
        &self,
        name: &'static str,
        sql: &str,
        keys: &[&String],
    ) -> Result<(), BoxError> {
        if keys.is_empty() {
            return Ok(());
        }
        let table = &*self.table;
        retrying(self.retry_for, || async {
            let client = self.pool.get().await.map_err(|e| pool_failed(table, e))?;
            let [scope, keys, holder] = self.keys_params(&keys);
            client
                .execute_typed(sql, &[(scope, TEXT), (keys, TEXT_ARRAY), (holder, TEXT)])
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
        if self.optimistic {
            return self.reserve_optimistic(keys).await;
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
        let earlier = live_leases(&mut self.failed_leases(), Instant::now());
        let name = self.name.as_deref();
        let table = &*self.table;
        let answer = retrying(self.retry_for, || async {
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
                        &earlier,
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
            let rest: Vec<&str> = distinct
                .iter()
                .copied()
                .filter(|k| !taken.contains(*k))
                .collect();
            let states = client
                .query_typed(
                    &self.sql.states,
                    &[(&*self.scope, TEXT), (&rest, TEXT_ARRAY)],
                )
                .await
                .map_err(|e| sql_failed(table, what, e))?;
            let states: Vec<(String, i16)> = states
                .iter()
                .filter_map(|r| Some((r.try_get(0).ok()?, r.try_get(1).ok()?)))
                .collect();
            Ok((taken, states))
        })
        .await;
        let (taken, states) = match answer {
            Ok(a) => a,
            Err(e) => {
                remember_failed(&mut self.failed_leases(), lease, Instant::now(), ttl);
                return Err(e);
            }
        };
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

impl PgStore {
    /// [`reserve`](Store::reserve) of an [`optimistic`](PgStore::optimistic) holder: one
    /// read, no write.
    async fn reserve_optimistic(&self, keys: &[String]) -> Result<Vec<Reservation>, BoxError> {
        let mut seen = HashSet::with_capacity(keys.len());
        let distinct: Vec<&str> = keys
            .iter()
            .map(String::as_str)
            .filter(|k| seen.insert(*k))
            .collect();
        let name = self.name.as_deref();
        let table = &*self.table;
        let rows = retrying(self.retry_for, || async {
            let client = self.pool.get().await.map_err(|e| pool_failed(table, e))?;
            let [scope, ks, holder] = self.keys_params(&distinct);
            let params = [
                (scope, TEXT),
                (ks, TEXT_ARRAY),
                (holder, TEXT),
                (&name, TEXT),
            ];
            client
                .query_typed(&self.sql.check, &params)
                .await
                .map_err(|e| sql_failed(table, "reserve (SELECT)", e))
        })
        .await?;
        // Keys found: done, or under a lease that is no obstacle, or held by another.
        let mut found = std::collections::HashMap::with_capacity(rows.len());
        for row in &rows {
            let (Ok(key), Ok(done), Ok(free)) = (
                row.try_get::<_, &str>(0),
                row.try_get::<_, bool>(1),
                row.try_get::<_, Option<bool>>(2),
            ) else {
                continue;
            };
            let r = if done {
                Some(Reservation::AlreadyDone)
            } else if free == Some(true) {
                None
            } else {
                Some(Reservation::Busy)
            };
            found.insert(key, r);
        }
        let mut first = HashSet::with_capacity(keys.len());
        Ok(keys
            .iter()
            .map(|k| {
                let known = found.get(k.as_str()).copied().flatten();
                if !first.insert(k.as_str()) {
                    // A later copy in the same call: busy, as a second copy in flight.
                    return known.unwrap_or(Reservation::Busy);
                }
                match known {
                    Some(r) => r,
                    // Free; busy when this handle holds it already (a duplicate in flight).
                    None if self.held.insert(k) => Reservation::Reserved,
                    None => Reservation::Busy,
                }
            })
            .collect())
    }

    /// `commit` of an [`optimistic`](PgStore::optimistic) holder: the keys it holds,
    /// written done.
    async fn write_done(&self, keys: &[&String]) -> Result<(), BoxError> {
        let mine = self.held.take_held(keys);
        if mine.is_empty() {
            return Ok(());
        }
        let name = self.name.as_deref();
        let table = &*self.table;
        retrying(self.retry_for, || async {
            let client = self.pool.get().await.map_err(|e| pool_failed(table, e))?;
            let what = "commit (INSERT … ON CONFLICT)";
            let stmt = client
                .prepare_cached(&self.sql.write_done)
                .await
                .map_err(|e| sql_failed(table, what, e))?;
            let [scope, ks, holder] = self.keys_params(&mine);
            client
                .execute(&stmt, &[scope, ks, holder, &name])
                .await
                .map_err(|e| sql_failed(table, what, e))
        })
        .await
        .map(|_| ())
    }
}

/// The error of [`PgStore::commit_with`] when every key was committed already, by this
/// holder: an earlier call wrote the effect and the keys, and its answer was lost with its
/// connection. Nothing was written again; the effect is there once. A caller that tries a
/// failed `commit_with` again takes this as success.
///
/// ```no_run
/// use flowline_postgres::{AlreadyCommitted, PgStore};
/// # #[tokio::main] async fn main() -> Result<(), flowline::BoxError> {
/// let store = PgStore::connect("postgresql://flowline@localhost/app").await?;
/// let keys = vec!["row-1".to_string()];
/// match store.commit_with(&keys, async |tx| tx.execute("insert into sent values (1)", &[]).await).await {
///     Ok(_) => {}
///     Err(e) if e.is::<AlreadyCommitted>() => {}   // written by the earlier attempt
///     Err(e) => return Err(e),
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct AlreadyCommitted {
    keys: usize,
}

impl AlreadyCommitted {
    /// How many keys the call was given that were committed already.
    ///
    /// ```no_run
    /// # fn f(e: &flowline_postgres::AlreadyCommitted) { let n = e.keys(); let _ = n; }
    /// ```
    pub fn keys(&self) -> usize {
        self.keys
    }
}

impl std::fmt::Display for AlreadyCommitted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the {} key(s) were committed by this holder already (an earlier call whose answer \
             was lost): effect not written again",
            self.keys
        )
    }
}

impl std::error::Error for AlreadyCommitted {}

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
        Box::pin(async move {
            // Keys marked done by `commit_with` are done already: nothing to write.
            let rest = self.done_here.take_others(keys);
            if self.optimistic {
                return self.write_done(&rest).await;
            }
            self.keys_statement("commit (UPDATE)", &self.sql.commit, &rest)
                .await
        })
    }

    fn release<'a>(&'a self, keys: &'a [String]) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            // A key done by `commit_with` stays done: only the others are released.
            let rest = self.done_here.take_others(keys);
            if self.optimistic {
                // Nothing was written for them: forgetting them releases them.
                self.held.take_held(&rest);
                return Ok(());
            }
            self.keys_statement("release (DELETE)", &self.sql.release, &rest)
                .await
        })
    }

    fn renew<'a>(&'a self, keys: &'a [String], ttl: Duration) -> StoreFuture<'a, Vec<bool>> {
        Box::pin(self.renew_keys(keys, ttl))
    }
}

impl PgStore {
    /// [`Store::renew`]: one `UPDATE … RETURNING key` on the keys this holder reserves (an
    /// optimistic holder wrote no lease: it holds what it took and did not let go of).
    async fn renew_keys(&self, keys: &[String], ttl: Duration) -> Result<Vec<bool>, BoxError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        if self.optimistic {
            let held = self.held.lock();
            return Ok(keys.iter().map(|k| held.contains(k)).collect());
        }
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 4);
        let table = &*self.table;
        let sql = format!(
            "UPDATE {table} SET expires_ms = {NOW_MS} + $4
             WHERE ctid = ANY(ARRAY({ctids})) AND holder = $3 AND state = 0
             RETURNING key",
            ctids = ctids(table)
        );
        let rows = retrying(self.retry_for, || async {
            let client = self.pool.get().await.map_err(|e| pool_failed(table, e))?;
            let [scope, ks, holder] = self.keys_params(&keys);
            client
                .query_typed(
                    &sql,
                    &[
                        (scope, TEXT),
                        (ks, TEXT_ARRAY),
                        (holder, TEXT),
                        (&ttl_ms, Type::INT8),
                    ],
                )
                .await
                .map_err(|e| sql_failed(table, "renew (UPDATE)", e))
        })
        .await?;
        let renewed: HashSet<&str> = rows.iter().filter_map(|r| r.try_get(0).ok()).collect();
        Ok(keys.iter().map(|k| renewed.contains(k.as_str())).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_lease_is_offered_until_its_reservation_could_have_expired() {
        let t0 = Instant::now();
        let mut failed = FailedLeases::new();
        remember_failed(&mut failed, 1, t0, Duration::from_secs(10));
        remember_failed(&mut failed, 2, t0, Duration::from_secs(60));
        remember_failed(&mut failed, 3, t0, Duration::MAX);
        assert_eq!(
            live_leases(&mut failed, t0 + Duration::from_secs(9)),
            [1, 2, 3]
        );
        assert_eq!(
            live_leases(&mut failed, t0 + Duration::from_secs(10)),
            [2, 3]
        );
        assert_eq!(live_leases(&mut failed, t0 + Duration::from_secs(61)), [3]);
        assert_eq!(
            failed.len(),
            1,
            "expired leases are dropped, not kept to the cap"
        );
    }

    #[test]
    fn past_the_cap_the_oldest_failed_lease_is_forgotten() {
        let t0 = Instant::now();
        let mut failed = FailedLeases::new();
        for lease in 0..FAILED_LEASES_MAX as i64 + 3 {
            remember_failed(&mut failed, lease, t0, Duration::from_secs(60));
        }
        let live = live_leases(&mut failed, t0);
        assert_eq!(live.len(), FAILED_LEASES_MAX);
        assert_eq!(live[0], 3);
    }
}
