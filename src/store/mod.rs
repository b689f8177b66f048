//! Stores that keep state across runs (idempotency keys, checkpoints): the traits and the
//! in-memory stores. The database stores are crates of their own (`flowline-sqlite`,
//! `flowline-postgres`), built on the same traits; each kind of state has its own table,
//! prefixed `flowline_`, so one database can hold every kind.

pub(crate) mod checkpoint;
pub(crate) mod guarded;
mod memory;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::failure::BoxError;

pub use memory::MemoryStore;

/// A boxed future, as returned by the methods of [`Store`] (which stays object safe).
///
/// ```
/// use flowline::{BoxError, StoreFuture};
/// fn nothing<'a>() -> StoreFuture<'a, ()> { Box::pin(async { Ok::<(), BoxError>(()) }) }
/// # let _ = nothing();
/// ```
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send + 'a>>;

/// What [`Store::reserve`] found for a key.
///
/// ```
/// use flowline::{MemoryStore, Reservation, Store};
/// use std::time::Duration;
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let a = MemoryStore::new();
/// let k = vec!["k".to_string()];
/// let b = a.handle();                                   // a second holder of a's state
/// a.reserve(&k, Duration::from_secs(9)).await.unwrap();
/// assert_eq!(b.reserve(&k, Duration::from_secs(9)).await.unwrap(), vec![Reservation::Busy]);
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// The key is now reserved by this store handle: process the item.
    Reserved,
    /// The key was processed to the end before: skip the item.
    AlreadyDone,
    /// Another holder reserved the key and its reservation has not expired: skip the item.
    Busy,
}

/// Idempotency state: two-phase, so that a key counts as done only once its item has
/// finished. Calls take a whole chunk of keys, so a store that does I/O makes one round
/// trip per chunk, not per item.
///
/// A reservation is a lease: it expires after its `ttl` unless its holder
/// [`renew`](Store::renew)s it, and an expired reservation (its holder crashed, or never
/// finished) is taken over by the next `reserve`. The `idempotent` stage renews the
/// reservations of the items it is still working on every third of the TTL, so a short TTL
/// keeps a live holder's keys and frees a crashed holder's soon. `commit`, `release` and
/// `renew` act only on reservations this handle holds, so a holder whose reservation was
/// taken over cannot commit another's work.
///
/// ```
/// use flowline::{MemoryStore, Reservation, Store};
/// use std::time::Duration;
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let store = MemoryStore::new();
/// let keys = vec!["a".to_string()];
/// let ttl = Duration::from_secs(60);
/// assert_eq!(store.reserve(&keys, ttl).await.unwrap(), vec![Reservation::Reserved]);
/// store.commit(&keys).await.unwrap();
/// assert_eq!(store.reserve(&keys, ttl).await.unwrap(), vec![Reservation::AlreadyDone]);
/// # }
/// ```
pub trait Store: Send + Sync + 'static {
    /// Reserves each key for `ttl` unless it is done or reserved by someone else.
    fn reserve<'a>(
        &'a self,
        keys: &'a [String],
        ttl: Duration,
    ) -> StoreFuture<'a, Vec<Reservation>>;
    /// Marks keys this handle reserved as done, for good.
    fn commit<'a>(&'a self, keys: &'a [String]) -> StoreFuture<'a, ()>;
    /// Gives up this handle's reservations of keys (their items failed): they may be
    /// processed again.
    fn release<'a>(&'a self, keys: &'a [String]) -> StoreFuture<'a, ()>;
    /// Extends this handle's reservations of `keys` to `ttl` from now (a lease renewal),
    /// including one that expired but was not taken over yet. Keys it no longer holds (taken
    /// over by another holder, committed, released, or never reserved) are left alone.
    /// Returns, for each key in order, whether this handle still holds it (and so renewed
    /// it).
    ///
    /// ```
    /// use flowline::{MemoryStore, Reservation, Store};
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let store = MemoryStore::new();
    /// let other = store.handle();
    /// let k = vec!["a".to_string(), "b".to_string()];
    /// let ttl = Duration::from_secs(30);
    /// store.reserve(&k[..1], ttl).await.unwrap();
    /// other.reserve(&k[1..], ttl).await.unwrap();
    /// tokio::time::advance(Duration::from_secs(20)).await;
    /// assert_eq!(store.renew(&k, ttl).await.unwrap(), vec![true, false]);  // "b" is not ours
    /// tokio::time::advance(Duration::from_secs(20)).await;                 // 40 s after reserve
    /// assert_eq!(other.reserve(&k[..1], ttl).await.unwrap(), vec![Reservation::Busy]);
    /// # }
    /// ```
    fn renew<'a>(&'a self, keys: &'a [String], ttl: Duration) -> StoreFuture<'a, Vec<bool>>;

    /// Gives up this handle's reservations of keys whose items *failed* (not of those left
    /// unfinished, which are [`release`](Store::release)d): they may be processed again. A
    /// store may also remember them as failed, to be listed for a run of the failures only
    /// (`flowline_sqlite::SqliteStore` does). By default, the same as `release`.
    ///
    /// ```
    /// use flowline::{MemoryStore, Reservation, Store};
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let store = MemoryStore::new();
    /// let k = vec!["a".to_string()];
    /// store.reserve(&k, Duration::from_secs(60)).await.unwrap();
    /// store.fail(&k).await.unwrap();
    /// assert_eq!(store.handle().reserve(&k, Duration::from_secs(60)).await.unwrap(), vec![Reservation::Reserved]);
    /// # }
    /// ```
    fn fail<'a>(&'a self, keys: &'a [String]) -> StoreFuture<'a, ()> {
        self.release(keys)
    }
}

impl<S: Store + ?Sized> Store for std::sync::Arc<S> {
    fn reserve<'a>(
        &'a self,
        keys: &'a [String],
        ttl: Duration,
    ) -> StoreFuture<'a, Vec<Reservation>> {
        (**self).reserve(keys, ttl)
    }
    fn commit<'a>(&'a self, keys: &'a [String]) -> StoreFuture<'a, ()> {
        (**self).commit(keys)
    }
    fn release<'a>(&'a self, keys: &'a [String]) -> StoreFuture<'a, ()> {
        (**self).release(keys)
    }
    fn renew<'a>(&'a self, keys: &'a [String], ttl: Duration) -> StoreFuture<'a, Vec<bool>> {
        (**self).renew(keys, ttl)
    }
    fn fail<'a>(&'a self, keys: &'a [String]) -> StoreFuture<'a, ()> {
        (**self).fail(keys)
    }
}
