//! [`SqliteStore`]: idempotency state in one SQLite file, created on first use.
//! Calls run on tokio's blocking pool, one transaction per chunk of keys.
//!
//! Schema (tables are prefixed `flowline_` so that other state, such as cursor
//! checkpoints, can share the file):
//!
//! ```sql
//! CREATE TABLE flowline_idempotency (
//!     scope      TEXT    NOT NULL,   -- which pipeline the keys belong to
//!     key        TEXT    NOT NULL,
//!     state      INTEGER NOT NULL,   -- 0 reserved, 1 done, 2 failed (free to reserve again)
//!     holder     TEXT    NOT NULL,   -- who holds the reservation (who failed it)
//!     expires_ms INTEGER NOT NULL,   -- reservation expiry, Unix ms (wall clock: shared by
//!                                    -- processes); when failed, the time it failed
//!     PRIMARY KEY (scope, key)
//! );
//! ```

use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};

use flowline::{BoxError, Permanent, Reservation, Store, StoreFuture};

use crate::transient::classify;

const RESERVED: i64 = 0;
const DONE: i64 = 1;
/// Failed: free to reserve again, and listed by [`SqliteStore::failed_keys`].
const FAILED: i64 = 2;
/// The longest reservation: thirty years, the horizon flowline caps its timers at. A longer
/// `ttl` (up to `Duration::MAX`) would overflow the expiry, an `i64` of Unix milliseconds.
const FAR: Duration = Duration::from_secs(86_400 * 365 * 30);

struct Inner {
    conn: Mutex<Connection>,
    /// Added to the wall clock (tests simulate a later time with it).
    skew_ms: AtomicI64,
}

/// A [`Store`] in one SQLite file. Cheap to clone; clones are one holder. Reservations
/// expire on the wall clock, since they must mean the same to another process.
///
/// ```
/// use flowline::prelude::*;
/// use flowline_sqlite::SqliteStore;
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let dir = tempfile::tempdir().unwrap();
/// let store = SqliteStore::open(dir.path().join("state.db")).unwrap();
/// let first = Pipeline::from_iter([1, 2]).idempotent(store.clone(), |x| *x).run().await.unwrap();
/// let again = Pipeline::from_iter([1, 2, 3]).idempotent(store, |x| *x).run().await.unwrap();
/// assert_eq!((first.delivered(), again.delivered()), (2, 1));
/// # }
/// ```
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
    scope: Arc<str>,
    holder: Arc<str>,
    /// `name#` when the holder was named: reservations of an earlier life are ours.
    name: Option<Arc<str>>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("scope", &self.scope)
            .field("holder", &self.holder)
            .finish_non_exhaustive()
    }
}

/// Marks every key of `keys` that `holder` reserves as done; returns the first one it does
/// not reserve (taken over, or never reserved), if any.
fn mark_done<'k>(
    tx: &rusqlite::Transaction<'_>,
    scope: &str,
    holder: &str,
    keys: &'k [String],
) -> rusqlite::Result<Option<&'k String>> {
    let mut upd = tx.prepare_cached(
        "UPDATE flowline_idempotency SET state = 1 WHERE scope = ?1 AND key = ?2 AND holder = ?3 AND state = 0",
    )?;
    let mut first_missing = None;
    for key in keys {
        if upd.execute(params![scope, key, holder])? != 1 && first_missing.is_none() {
            first_missing = Some(key);
        }
    }
    Ok(first_missing)
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

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path`, with the scope `default`.
    /// The file and its table are created on first use.
    ///
    /// ```
    /// use flowline::{Reservation, Store};
    /// use flowline_sqlite::SqliteStore;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let dir = tempfile::tempdir().unwrap();
    /// let store = SqliteStore::open(dir.path().join("state.db")).unwrap().scope("orders");
    /// let other = store.handle();
    /// let k = vec!["order-7".to_string()];
    /// assert_eq!(store.reserve(&k, Duration::from_secs(60)).await.unwrap(), vec![Reservation::Reserved]);
    /// assert_eq!(other.reserve(&k, Duration::from_secs(60)).await.unwrap(), vec![Reservation::Busy]);
    /// # }
    /// ```
    pub fn open(path: impl AsRef<Path>) -> Result<Self, BoxError> {
        let path = path.as_ref();
        let conn =
            Connection::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        conn.busy_timeout(crate::BUSY_TIMEOUT)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS flowline_idempotency (
                 scope      TEXT    NOT NULL,
                 key        TEXT    NOT NULL,
                 state      INTEGER NOT NULL,
                 holder     TEXT    NOT NULL,
                 expires_ms INTEGER NOT NULL,
                 PRIMARY KEY (scope, key)
             ) WITHOUT ROWID;",
        )
        .map_err(|e| format!("cannot set up {}: {e}", path.display()))?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                conn: Mutex::new(conn),
                skew_ms: AtomicI64::new(0),
            }),
            scope: Arc::from("default"),
            holder: new_holder(),
            name: None,
        })
    }

    /// The same file, keys kept apart under `scope` (one scope per pipeline sharing a file).
    ///
    /// ```
    /// use flowline::{Reservation, Store};
    /// use flowline_sqlite::SqliteStore;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let dir = tempfile::tempdir().unwrap();
    /// let store = SqliteStore::open(dir.path().join("state.db")).unwrap().scope("orders");
    /// let other = store.handle();
    /// let k = vec!["order-7".to_string()];
    /// assert_eq!(store.reserve(&k, Duration::from_secs(60)).await.unwrap(), vec![Reservation::Reserved]);
    /// assert_eq!(other.reserve(&k, Duration::from_secs(60)).await.unwrap(), vec![Reservation::Busy]);
    /// # }
    /// ```
    #[must_use]
    pub fn scope(mut self, scope: &str) -> Self {
        self.scope = Arc::from(scope);
        self
    }

    /// How long a call waits for a lock another connection or process holds before it
    /// fails with `SQLITE_BUSY` (default 5 s), for every handle on this connection. The run's
    /// [`Outage`](flowline::Outage) policy then tries the call again: a shorter wait makes
    /// the outage seen (and logged) sooner.
    ///
    /// ```
    /// use flowline_sqlite::SqliteStore;
    /// use std::time::Duration;
    /// let dir = tempfile::tempdir().unwrap();
    /// let store = SqliteStore::open(dir.path().join("state.db")).unwrap()
    ///     .busy_timeout(Duration::from_secs(1))
    ///     .unwrap();
    /// # let _ = store;
    /// ```
    pub fn busy_timeout(self, wait: Duration) -> Result<Self, BoxError> {
        self.inner
            .conn
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .busy_timeout(wait)?;
        Ok(self)
    }

    /// Another holder on the same connection (as a second process would be).
    ///
    /// ```
    /// use flowline::{Reservation, Store};
    /// use flowline_sqlite::SqliteStore;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let dir = tempfile::tempdir().unwrap();
    /// let store = SqliteStore::open(dir.path().join("state.db")).unwrap().scope("orders");
    /// let other = store.handle();
    /// let k = vec!["order-7".to_string()];
    /// assert_eq!(store.reserve(&k, Duration::from_secs(60)).await.unwrap(), vec![Reservation::Reserved]);
    /// assert_eq!(other.reserve(&k, Duration::from_secs(60)).await.unwrap(), vec![Reservation::Busy]);
    /// # }
    /// ```
    #[must_use]
    pub fn handle(&self) -> Self {
        SqliteStore {
            inner: self.inner.clone(),
            scope: self.scope.clone(),
            holder: new_holder(),
            name: None,
        }
    }

    /// Names this handle's holder (by default each handle gets a unique one). A worker that
    /// restarts under the same name takes back the reservations it still held when it
    /// crashed, so the items that were in flight are processed again at once instead of
    /// being skipped as [`Reservation::Busy`] until their reservations expire (which, under
    /// a cursor source, would let the checkpoint pass them). Give each concurrent worker a
    /// name of its own.
    ///
    /// ```
    /// use flowline::{Reservation, Store};
    /// use flowline_sqlite::SqliteStore;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().join("state.db");
    /// let k = vec!["row-1".to_string()];
    /// let crashed = SqliteStore::open(&path).unwrap().holder("worker-1");
    /// crashed.reserve(&k, Duration::from_secs(600)).await.unwrap();
    /// // The process dies here; its reservation would stand for 10 minutes.
    /// let restarted = SqliteStore::open(&path).unwrap().holder("worker-1");
    /// let r = restarted.reserve(&k, Duration::from_secs(600)).await.unwrap();
    /// assert_eq!(r, vec![Reservation::Reserved]);
    /// # }
    /// ```
    #[must_use]
    pub fn holder(mut self, name: &str) -> Self {
        // `name#<this handle's unique id>`: a reservation under the same name from another
        // life of the worker is taken back; one from this life (the same key twice in a
        // run) is still busy.
        let prefix: Arc<str> = Arc::from(format!("{name}#"));
        self.holder = Arc::from(format!("{prefix}{}", new_holder()));
        self.name = Some(prefix);
        self
    }

    /// Runs `effect` and marks `keys` done in one SQLite transaction on this store's file:
    /// both happen or neither. When an item's effect is a write to the same database (a row
    /// of one of your tables), this makes it exactly-once across crashes: a key is done if
    /// and only if its effect is there, and a done key is never processed again. Each key
    /// must be reserved by this holder (as [`idempotent`](flowline::Flow::idempotent) does
    /// when the item enters); if one is not, nothing is written and the call fails.
    /// Blocking: call it from a synchronous stage or `spawn_blocking`. The file locked by
    /// another connection past the busy timeout fails the call before the effect has run,
    /// with an error [`is_transient`](crate::is_transient) knows: try it again. An error of
    /// the effect itself comes back as it was.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use flowline_sqlite::SqliteStore;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let dir = tempfile::tempdir().unwrap();
    /// let store = SqliteStore::open(dir.path().join("state.db")).unwrap();
    /// store.commit_with(&[], |tx| tx.execute_batch("create table sent (id integer)")).unwrap();
    /// let effects = store.clone();
    /// let report = Pipeline::from_iter([1, 2, 3])
    ///     .idempotent(store.clone(), |id| *id)
    ///     .map(move |id: i64| {
    ///         effects
    ///             .commit_with(&[id.to_string()], |tx| tx.execute("insert into sent values (?1)", [id]))
    ///             .unwrap();
    ///         id
    ///     })
    ///     .run()
    ///     .await
    ///     .unwrap();
    /// assert_eq!(report.delivered(), 3);
    /// # }
    /// ```
    pub fn commit_with<R>(
        &self,
        keys: &[String],
        effect: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<R>,
    ) -> Result<R, BoxError> {
        let mut conn = self.inner.conn.lock().unwrap_or_else(|p| p.into_inner());
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(classify)?;
        let out = effect(&tx)?;
        if let Some(key) = mark_done(&tx, &self.scope, &self.holder, keys).map_err(classify)? {
            // Dropping `tx` rolls the effect back.
            return Err(format!(
                "key {key:?} is not reserved by this holder ({}): effect not written",
                self.holder
            )
            .into());
        }
        tx.commit().map_err(classify)?;
        Ok(out)
    }

    /// The keys whose items failed (through [`Store::fail`], as the
    /// [`idempotent`](flowline::Flow::idempotent) stage reports a failed item) and that have
    /// not been reserved since, in this store's scope, in the order they failed (the latest
    /// failure of each). For a run of the failures only. Blocking: it reads the file.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use flowline_sqlite::SqliteStore;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let dir = tempfile::tempdir().unwrap();
    /// let store = SqliteStore::open(dir.path().join("state.db")).unwrap();
    /// let report = Pipeline::from_iter([1, 2, 3])
    ///     .idempotent(store.clone(), |x| *x)
    ///     .try_map_async("work", |x| async move { if x == 2 { Err("no") } else { Ok(x) } })
    ///     .run().await.unwrap();
    /// assert_eq!(report.failures, 1);
    /// assert_eq!(store.failed_keys().unwrap(), vec!["2".to_string()]);
    /// # }
    /// ```
    pub fn failed_keys(&self) -> Result<Vec<String>, BoxError> {
        let conn = self.inner.conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut st = conn
            .prepare(
                "SELECT key FROM flowline_idempotency WHERE scope = ?1 AND state = ?2 ORDER BY expires_ms, key",
            )
            .map_err(classify)?;
        let keys = st
            .query_map(params![&*self.scope, FAILED], |r| r.get::<_, String>(0))
            .map_err(classify)?
            .collect::<rusqlite::Result<Vec<String>>>()
            .map_err(classify)?;
        Ok(keys)
    }

    #[cfg(test)]
    pub(crate) fn skew(&self, by: Duration) {
        self.inner
            .skew_ms
            .fetch_add(by.as_millis() as i64, Ordering::Relaxed);
    }

    fn now_ms(&self) -> i64 {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as i64;
        wall + self.inner.skew_ms.load(Ordering::Relaxed)
    }

    /// Runs `f` in one transaction on the blocking pool.
    fn blocking<'a, T: Send + 'static>(
        &'a self,
        keys: &'a [String],
        f: impl FnOnce(&rusqlite::Transaction<'_>, &str, &str, i64, Vec<String>) -> rusqlite::Result<T>
        + Send
        + 'static,
    ) -> StoreFuture<'a, T> {
        let inner = self.inner.clone();
        let scope = self.scope.clone();
        let holder = self.holder.clone();
        let now = self.now_ms();
        let keys = keys.to_vec();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let mut conn = inner.conn.lock().unwrap_or_else(|p| p.into_inner());
                // IMMEDIATE: take the write lock up front, so that another connection's
                // writes (the checkpoints, a second process) make this wait on the busy
                // timeout instead of failing with SQLITE_BUSY when a read upgrades.
                let tx =
                    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let out = f(&tx, &scope, &holder, now, keys)?;
                tx.commit()?;
                Ok::<T, rusqlite::Error>(out)
            })
            .await
            .map_err(|e| BoxError::from(Permanent::new(e.to_string())))?
            .map_err(classify)
        })
    }
}

impl Store for SqliteStore {
    fn reserve<'a>(
        &'a self,
        keys: &'a [String],
        ttl: Duration,
    ) -> StoreFuture<'a, Vec<Reservation>> {
        // Capped like every timer of the crate, so `Duration::MAX` means "never expires"
        // and the expiry column cannot overflow.
        let ttl_ms = ttl.min(FAR).as_millis() as i64;
        let name = self.name.clone();
        self.blocking(keys, move |tx, scope, holder, now, keys| {
            // `name#id`: the holder `w1#2#id` is not an earlier life of `w1`.
            let earlier_life = |h: &str| {
                h != holder
                    && name
                        .as_deref()
                        .and_then(|n| h.strip_prefix(n))
                        .is_some_and(|id| !id.contains('#'))
            };
            let mut get = tx.prepare_cached(
                "SELECT state, expires_ms, holder FROM flowline_idempotency WHERE scope = ?1 AND key = ?2",
            )?;
            let mut put = tx.prepare_cached(
                "INSERT OR REPLACE INTO flowline_idempotency (scope, key, state, holder, expires_ms) VALUES (?1, ?2, 0, ?3, ?4)",
            )?;
            let mut out = Vec::with_capacity(keys.len());
            for key in &keys {
                let row: Option<(i64, i64, String)> = get
                    .query_row(params![scope, key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                    .optional()?;
                out.push(match row {
                    Some((DONE, _, _)) => Reservation::AlreadyDone,
                    // A reservation from an earlier life of this named worker is ours again.
                    Some((RESERVED, expires, h)) if expires > now && !earlier_life(&h) => {
                        Reservation::Busy
                    }
                    _ => {
                        put.execute(params![scope, key, holder, now + ttl_ms])?;
                        Reservation::Reserved
                    }
                });
            }
            Ok(out)
        })
    }

    fn commit<'a>(&'a self, keys: &'a [String]) -> StoreFuture<'a, ()> {
        // A key whose reservation was taken over is left alone: its new holder decides.
        self.blocking(keys, |tx, scope, holder, _, keys| {
            mark_done(tx, scope, holder, &keys).map(|_| ())
        })
    }

    fn release<'a>(&'a self, keys: &'a [String]) -> StoreFuture<'a, ()> {
        self.blocking(keys, |tx, scope, holder, _, keys| {
            let mut del = tx.prepare_cached(
                "DELETE FROM flowline_idempotency WHERE scope = ?1 AND key = ?2 AND holder = ?3 AND state = 0",
            )?;
            for key in &keys {
                del.execute(params![scope, key, holder])?;
            }
            Ok(())
        })
    }

    fn fail<'a>(&'a self, keys: &'a [String]) -> StoreFuture<'a, ()> {
        // Kept, as failed, so that `failed_keys` can list it; free to reserve again.
        self.blocking(keys, |tx, scope, holder, now, keys| {
            let mut upd = tx.prepare_cached(
                "UPDATE flowline_idempotency SET state = 2, expires_ms = ?4 WHERE scope = ?1 AND key = ?2 AND holder = ?3 AND state = 0",
            )?;
            for key in &keys {
                upd.execute(params![scope, key, holder, now])?;
            }
            Ok(())
        })
    }

    fn renew<'a>(&'a self, keys: &'a [String], ttl: Duration) -> StoreFuture<'a, Vec<bool>> {
        let ttl_ms = ttl.min(FAR).as_millis() as i64;
        self.blocking(keys, move |tx, scope, holder, now, keys| {
            // Only this holder's reservations: a key taken over, done or released is not
            // brought back.
            let mut upd = tx.prepare_cached(
                "UPDATE flowline_idempotency SET expires_ms = ?4 WHERE scope = ?1 AND key = ?2 AND holder = ?3 AND state = 0",
            )?;
            keys.iter()
                .map(|key| Ok(upd.execute(params![scope, key, holder, now + ttl_ms])? == 1))
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowline::prelude::*;
    use std::collections::HashMap;

    fn keys(k: &[&str]) -> Vec<String> {
        k.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn an_expired_reservation_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let a = SqliteStore::open(dir.path().join("s.db")).unwrap();
        // a second process on the same file
        let b = SqliteStore::open(dir.path().join("s.db")).unwrap();
        let k = keys(&["k"]);
        let ttl = Duration::from_secs(60);
        assert_eq!(
            a.reserve(&k, ttl).await.unwrap(),
            vec![Reservation::Reserved]
        );
        assert_eq!(b.reserve(&k, ttl).await.unwrap(), vec![Reservation::Busy]);
        b.skew(Duration::from_secs(61)); // b's clock is now past a's reservation
        assert_eq!(
            b.reserve(&k, ttl).await.unwrap(),
            vec![Reservation::Reserved]
        );
        a.commit(&k).await.unwrap(); // taken over: a's commit is ignored
        assert_eq!(b.reserve(&k, ttl).await.unwrap(), vec![Reservation::Busy]);
        b.commit(&k).await.unwrap();
        assert_eq!(
            a.reserve(&k, ttl).await.unwrap(),
            vec![Reservation::AlreadyDone]
        );
    }

    #[tokio::test]
    async fn a_named_holder_takes_back_its_earlier_life_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let ttl = Duration::from_secs(600);
        let (k, k2) = (keys(&["k"]), keys(&["k2"]));
        let crashed = SqliteStore::open(&path).unwrap().holder("w1");
        crashed.reserve(&k, ttl).await.unwrap();
        crashed.reserve(&k2, ttl).await.unwrap();
        let other = SqliteStore::open(&path).unwrap().holder("w10");
        assert_eq!(
            other.reserve(&k, ttl).await.unwrap(),
            vec![Reservation::Busy]
        );
        // `w1#2` is another worker, not a life of `w1`: `w1` does not take its keys.
        let k3 = keys(&["k3"]);
        let hashed = SqliteStore::open(&path).unwrap().holder("w1#2");
        hashed.reserve(&k3, ttl).await.unwrap();
        assert_eq!(
            SqliteStore::open(&path)
                .unwrap()
                .holder("w1")
                .reserve(&k3, ttl)
                .await
                .unwrap(),
            vec![Reservation::Busy]
        );
        let restarted = SqliteStore::open(&path).unwrap().holder("w1");
        assert_eq!(
            restarted.reserve(&k, ttl).await.unwrap(),
            vec![Reservation::Reserved]
        );
        // The same key twice in one life is still busy (a duplicate in flight).
        assert_eq!(
            restarted.reserve(&k, ttl).await.unwrap(),
            vec![Reservation::Busy]
        );
        // The crashed life can no longer write an effect for it.
        let err = crashed.commit_with(&k, |tx| tx.execute_batch("create table t (x)"));
        assert!(err.unwrap_err().to_string().contains("not reserved"));
        let c = rusqlite::Connection::open(&path).unwrap();
        let tables: i64 = c
            .query_row(
                "select count(*) from sqlite_master where name = 't'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(tables, 0, "the effect was rolled back");
        restarted
            .commit_with(&k, |tx| tx.execute_batch("create table t (x)"))
            .unwrap();
        assert_eq!(
            other.reserve(&k, ttl).await.unwrap(),
            vec![Reservation::AlreadyDone]
        );
    }

    #[tokio::test]
    async fn failed_keys_are_listed_in_the_order_they_failed_until_reserved_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let a = SqliteStore::open(&path).unwrap();
        let other_scope = SqliteStore::open(&path).unwrap().scope("other");
        let ttl = Duration::from_secs(60);
        let k = keys(&["z", "y", "x", "w"]);
        a.reserve(&k, ttl).await.unwrap();
        other_scope.reserve(&k[..1], ttl).await.unwrap();
        other_scope.fail(&k[..1]).await.unwrap();
        a.fail(&k[..1]).await.unwrap();
        a.skew(Duration::from_millis(5));
        a.fail(&k[2..3]).await.unwrap();
        a.skew(Duration::from_millis(5));
        a.fail(&k[1..2]).await.unwrap();
        a.commit(&k[3..]).await.unwrap();
        // A handle that does not hold the key cannot fail it.
        a.handle().fail(&k[3..]).await.unwrap();
        assert_eq!(a.failed_keys().unwrap(), keys(&["z", "x", "y"]));
        assert_eq!(other_scope.failed_keys().unwrap(), keys(&["z"]));
        // Reserved again (by anyone): no longer failed; done or failed anew from there.
        let b = a.handle();
        assert_eq!(
            b.reserve(&k[..3], ttl).await.unwrap(),
            vec![Reservation::Reserved; 3]
        );
        assert_eq!(a.failed_keys().unwrap(), Vec::<String>::new());
        b.commit(&k[..1]).await.unwrap();
        b.fail(&k[1..2]).await.unwrap();
        b.release(&k[2..3]).await.unwrap();
        assert_eq!(a.failed_keys().unwrap(), keys(&["y"]));
    }

    /// 1,000 items, stopped gracefully half way, then run again: every key is processed
    /// exactly once across both runs; an item that failed in the first run is retried.
    #[tokio::test(start_paused = true)]
    async fn exactly_once_across_a_graceful_stop_and_a_rerun() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let seen: Arc<Mutex<HashMap<u32, u32>>> = Arc::default();
        let pipeline = |run: u32, seen: Arc<Mutex<HashMap<u32, u32>>>| {
            let store = SqliteStore::open(&path).unwrap();
            Pipeline::from_iter(0..1000u32)
                .idempotent(store, |x| *x)
                .try_map_async("process", move |x| {
                    let seen = seen.clone();
                    async move {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        if run == 1 && x == 7 {
                            return Err("flaky");
                        }
                        *seen.lock().unwrap().entry(x).or_default() += 1;
                        Ok(x)
                    }
                })
                .workers(8)
        };
        let handle = pipeline(1, seen.clone()).spawn();
        while seen.lock().unwrap().len() < 500 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        handle.stop();
        let first = handle.join().await.unwrap();
        assert_eq!(first.outcome, RunOutcome::Stopped);
        assert_eq!(first.failures, 1);
        let done_first = seen.lock().unwrap().len();
        assert!((500..1000).contains(&done_first), "{done_first}");
        assert!(!seen.lock().unwrap().contains_key(&7));

        let second = pipeline(2, seen.clone()).run().await.unwrap();
        let counts = seen.lock().unwrap().clone();
        assert_eq!(counts.len(), 1000);
        assert!(
            counts.values().all(|&c| c == 1),
            "a key was processed twice"
        );
        assert!(counts.contains_key(&7), "the failed key was retried");
        let skipped = second.stage("idempotent").unwrap().dropped as usize;
        assert_eq!(skipped, done_first);
        assert_eq!(second.delivered() as usize, 1000 - done_first);
    }
}
