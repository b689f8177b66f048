//! [`MemoryStore`]: idempotency state in this process (tests, single runs, or several runs
//! of one process). Reservations expire on tokio's clock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::{Reservation, Store, StoreFuture};
use crate::util::time::after;

#[derive(Clone, Copy)]
enum Entry {
    Reserved {
        holder: u64,
        /// The holder's name (0: unnamed), interned.
        name: u64,
        until: Instant,
    },
    Done,
}

/// An in-memory [`Store`]. Clones share the same state *and* the same holder identity; use
/// [`MemoryStore::handle`] for a second holder (as a second process would be).
///
/// ```
/// use flowline::prelude::*;
/// use flowline::MemoryStore;
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let store = MemoryStore::new();
/// let first = Pipeline::from_iter([1, 2, 3]).idempotent(store.clone(), |x| *x).run().await.unwrap();
/// let again = Pipeline::from_iter([2, 3, 4]).idempotent(store.clone(), |x| *x).run().await.unwrap();
/// assert_eq!((first.delivered(), again.delivered()), (3, 1));   // only 4 is new
/// # }
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    entries: Arc<Mutex<HashMap<String, Entry>>>,
    holder: u64,
    /// The interned name of a named holder (0: unnamed).
    name: u64,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("holder", &self.holder)
            .finish_non_exhaustive()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

static HOLDERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn next_holder() -> u64 {
    HOLDERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// One number per holder name in this process, so that entries stay `Copy`.
fn intern(name: &str) -> u64 {
    static NAMES: Mutex<Option<HashMap<String, u64>>> = Mutex::new(None);
    let mut names = NAMES.lock().unwrap_or_else(|p| p.into_inner());
    let names = names.get_or_insert_with(HashMap::new);
    let next = names.len() as u64 + 1;
    *names.entry(name.to_string()).or_insert(next)
}

impl MemoryStore {
    /// An empty store.
    ///
    /// ```
    /// use flowline::{MemoryStore, Reservation, Store};
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let store = MemoryStore::new();
    /// let other = store.handle();
    /// let k = vec!["job-1".to_string()];
    /// assert_eq!(store.reserve(&k, Duration::from_secs(5)).await.unwrap(), vec![Reservation::Reserved]);
    /// assert_eq!(other.reserve(&k, Duration::from_secs(5)).await.unwrap(), vec![Reservation::Busy]);
    /// # }
    /// ```
    pub fn new() -> Self {
        MemoryStore {
            entries: Arc::default(),
            holder: next_holder(),
            name: 0,
        }
    }

    /// Another holder of the same state (its reservations are distinct from this one's).
    ///
    /// ```
    /// use flowline::{MemoryStore, Reservation, Store};
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let store = MemoryStore::new();
    /// let other = store.handle();
    /// let k = vec!["job-1".to_string()];
    /// assert_eq!(store.reserve(&k, Duration::from_secs(5)).await.unwrap(), vec![Reservation::Reserved]);
    /// assert_eq!(other.reserve(&k, Duration::from_secs(5)).await.unwrap(), vec![Reservation::Busy]);
    /// # }
    /// ```
    #[must_use]
    pub fn handle(&self) -> Self {
        MemoryStore {
            entries: self.entries.clone(),
            holder: next_holder(),
            name: 0,
        }
    }

    /// Names this handle's holder, as `flowline_sqlite::SqliteStore::holder` does: a
    /// handle with the same name (a worker restarted within the process) takes back the
    /// reservations an earlier handle of that name still held; the same key twice under
    /// one handle is still busy.
    ///
    /// ```
    /// use flowline::{MemoryStore, Reservation, Store};
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let state = MemoryStore::new();
    /// let k = vec!["row-1".to_string()];
    /// let crashed = state.handle().holder("worker-1");
    /// crashed.reserve(&k, Duration::from_secs(600)).await.unwrap();
    /// let restarted = state.handle().holder("worker-1");
    /// assert_eq!(restarted.reserve(&k, Duration::from_secs(600)).await.unwrap(), vec![Reservation::Reserved]);
    /// # }
    /// ```
    pub fn holder(mut self, name: &str) -> Self {
        self.holder = next_holder();
        self.name = intern(name);
        self
    }

    fn update(&self, keys: &[String], f: impl Fn(Option<Entry>) -> Option<Entry>) {
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        for k in keys {
            let cur = map.get(k).copied();
            match f(cur) {
                Some(e) => {
                    map.insert(k.clone(), e);
                }
                None => {
                    map.remove(k);
                }
            }
        }
    }
}

impl Store for MemoryStore {
    fn reserve<'a>(
        &'a self,
        keys: &'a [String],
        ttl: Duration,
    ) -> StoreFuture<'a, Vec<Reservation>> {
        let now = Instant::now();
        let (me, my_name) = (self.holder, self.name);
        // A reservation from an earlier handle of this named holder is ours again.
        let earlier_life = |holder: u64, name: u64| my_name != 0 && name == my_name && holder != me;
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let out = keys
            .iter()
            .map(|k| match map.get(k) {
                Some(Entry::Done) => Reservation::AlreadyDone,
                Some(Entry::Reserved {
                    until,
                    holder,
                    name,
                }) if *until > now && !earlier_life(*holder, *name) => Reservation::Busy,
                _ => {
                    map.insert(
                        k.clone(),
                        Entry::Reserved {
                            holder: me,
                            name: my_name,
                            until: after(now, ttl),
                        },
                    );
                    Reservation::Reserved
                }
            })
            .collect();
        Box::pin(std::future::ready(Ok(out)))
    }

    fn commit<'a>(&'a self, keys: &'a [String]) -> StoreFuture<'a, ()> {
        let me = self.holder;
        self.update(keys, |e| match e {
            Some(Entry::Reserved { holder, .. }) if holder == me => Some(Entry::Done),
            other => other,
        });
        Box::pin(std::future::ready(Ok(())))
    }

    fn release<'a>(&'a self, keys: &'a [String]) -> StoreFuture<'a, ()> {
        let me = self.holder;
        self.update(keys, |e| match e {
            Some(Entry::Reserved { holder, .. }) if holder == me => None,
            other => other,
        });
        Box::pin(std::future::ready(Ok(())))
    }

    fn renew<'a>(&'a self, keys: &'a [String], ttl: Duration) -> StoreFuture<'a, Vec<bool>> {
        let me = self.holder;
        let until = after(Instant::now(), ttl);
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let out = keys
            .iter()
            .map(|k| match map.get_mut(k) {
                Some(Entry::Reserved {
                    holder, until: u, ..
                }) if *holder == me => {
                    *u = until;
                    true
                }
                _ => false,
            })
            .collect();
        Box::pin(std::future::ready(Ok(out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(k: &[&str]) -> Vec<String> {
        k.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_reservation_is_taken_over_and_the_old_holder_cannot_commit() {
        let a = MemoryStore::new();
        let b = a.handle();
        let k = keys(&["k"]);
        let ttl = Duration::from_secs(30);
        assert_eq!(
            a.reserve(&k, ttl).await.unwrap(),
            vec![Reservation::Reserved]
        );
        tokio::time::advance(Duration::from_millis(29_999)).await;
        assert_eq!(b.reserve(&k, ttl).await.unwrap(), vec![Reservation::Busy]);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(
            b.reserve(&k, ttl).await.unwrap(),
            vec![Reservation::Reserved]
        );
        a.commit(&k).await.unwrap(); // no longer a's: ignored
        assert_eq!(a.reserve(&k, ttl).await.unwrap(), vec![Reservation::Busy]);
        b.commit(&k).await.unwrap();
        assert_eq!(
            a.reserve(&k, ttl).await.unwrap(),
            vec![Reservation::AlreadyDone]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewed_reservation_outlives_its_first_ttl_and_only_the_holder_renews() {
        let a = MemoryStore::new();
        let b = a.handle();
        let k = keys(&["k", "gone"]);
        let ttl = Duration::from_secs(30);
        a.reserve(&k, ttl).await.unwrap();
        a.release(&k[1..]).await.unwrap();
        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(a.renew(&k, ttl).await.unwrap(), vec![true, false]);
        assert_eq!(b.renew(&k, ttl).await.unwrap(), vec![false, false]);
        // 58 s after the reservation, 29 s after the renewal: still a's.
        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(
            b.reserve(&k[..1], ttl).await.unwrap(),
            vec![Reservation::Busy]
        );
        // Not renewed again: taken over at 30 s after the renewal, and a's renewal of it
        // then fails.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            b.reserve(&k[..1], ttl).await.unwrap(),
            vec![Reservation::Reserved]
        );
        assert_eq!(a.renew(&k[..1], ttl).await.unwrap(), vec![false]);
        // The released key was not brought back by a's renewal.
        assert_eq!(
            b.reserve(&k[1..], ttl).await.unwrap(),
            vec![Reservation::Reserved]
        );
    }

    #[tokio::test]
    async fn release_frees_the_key() {
        let a = MemoryStore::new();
        let k = keys(&["x", "y"]);
        let ttl = Duration::from_secs(30);
        a.reserve(&k, ttl).await.unwrap();
        a.release(&k[..1]).await.unwrap();
        assert_eq!(
            a.reserve(&k, ttl).await.unwrap(),
            vec![Reservation::Reserved, Reservation::Busy]
        );
    }
}
