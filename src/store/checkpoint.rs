//! `CheckpointStore`: where a cursor source keeps the cursor it may resume from.
//!
//! The trait is object safe (`Arc<dyn CheckpointStore>`) and async, so a networked store
//! (PostgreSQL, Redis) fits behind it later. Cursors are stored as text under a name, one per
//! pipeline; a commit overwrites the previous one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::store::StoreFuture;

/// Keeps the last committed cursor of each named pipeline.
///
/// ```
/// use flowline::{CheckpointStore, MemoryCheckpoints};
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let store = MemoryCheckpoints::new();
/// assert_eq!(store.load("orders").await.unwrap(), None);
/// store.commit("orders", "1000").await.unwrap();
/// assert_eq!(store.load("orders").await.unwrap().as_deref(), Some("1000"));
/// # }
/// ```
pub trait CheckpointStore: Send + Sync + 'static {
    /// The cursor last committed under `name`, if any.
    fn load<'a>(&'a self, name: &'a str) -> StoreFuture<'a, Option<String>>;

    /// Makes `cursor` the one `name` resumes from. Once the future has resolved `Ok`, the
    /// cursor must survive a crash of the process (for a durable store).
    fn commit<'a>(&'a self, name: &'a str, cursor: &'a str) -> StoreFuture<'a, ()>;

    /// Forgets the cursor of `name`, so the next run starts from the beginning.
    fn clear<'a>(&'a self, name: &'a str) -> StoreFuture<'a, ()>;
}

impl<S: CheckpointStore + ?Sized> CheckpointStore for Arc<S> {
    fn load<'a>(&'a self, name: &'a str) -> StoreFuture<'a, Option<String>> {
        (**self).load(name)
    }
    fn commit<'a>(&'a self, name: &'a str, cursor: &'a str) -> StoreFuture<'a, ()> {
        (**self).commit(name, cursor)
    }
    fn clear<'a>(&'a self, name: &'a str) -> StoreFuture<'a, ()> {
        (**self).clear(name)
    }
}

/// Checkpoints in memory: for tests, and for runs that only need to resume within one
/// process. Clones share the same map.
///
/// ```
/// use flowline::{CheckpointStore, MemoryCheckpoints};
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let a = MemoryCheckpoints::new();
/// let b = a.clone();
/// a.commit("job", "42").await.unwrap();
/// assert_eq!(b.get("job").as_deref(), Some("42"));
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct MemoryCheckpoints {
    map: Arc<Mutex<HashMap<String, String>>>,
}

impl MemoryCheckpoints {
    /// An empty store.
    ///
    /// ```
    /// let store = flowline::MemoryCheckpoints::new();
    /// assert_eq!(store.get("x"), None);
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// The cursor committed under `name`, read synchronously.
    ///
    /// ```
    /// let store = flowline::MemoryCheckpoints::new();
    /// assert_eq!(store.get("never"), None);
    /// ```
    pub fn get(&self, name: &str) -> Option<String> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }
}

impl CheckpointStore for MemoryCheckpoints {
    fn load<'a>(&'a self, name: &'a str) -> StoreFuture<'a, Option<String>> {
        let v = self.get(name);
        Box::pin(async move { Ok(v) })
    }

    fn commit<'a>(&'a self, name: &'a str, cursor: &'a str) -> StoreFuture<'a, ()> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), cursor.to_string());
        Box::pin(async { Ok(()) })
    }

    fn clear<'a>(&'a self, name: &'a str) -> StoreFuture<'a, ()> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_store_overwrites_and_clears_per_name() {
        let s: Arc<dyn CheckpointStore> = Arc::new(MemoryCheckpoints::new());
        s.commit("a", "1").await.unwrap();
        s.commit("a", "2").await.unwrap();
        s.commit("b", "9").await.unwrap();
        assert_eq!(s.load("a").await.unwrap().as_deref(), Some("2"));
        s.clear("a").await.unwrap();
        assert_eq!(s.load("a").await.unwrap(), None);
        assert_eq!(s.load("b").await.unwrap().as_deref(), Some("9"));
    }
}
