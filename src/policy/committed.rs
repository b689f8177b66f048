//! [`Committed`]: the barrier of an [`idempotent`](crate::Flow::idempotent) stage's commits,
//! and a [`Limit`] that starts no call while an item that ended is not yet committed.
//!
//! The stage's committer writes the keys of the items that ended (done, failed or
//! unfinished) in batches, shortly after they end. Between an item's end and that write, a
//! crash would make a rerun do the item again. A stage that must bound what a crash repeats
//! (at most the calls in flight) waits on the barrier before each call: a new call starts
//! only once every item that ended before it is written.
//!
//! Two counters: `ended`, bumped as each item ends (in the same lock as its key is queued
//! for the committer, so the queue's order is the counter's), and `settled`, bumped by the
//! committer once a batch is written (or once the run's outage policy gave up on it: the
//! run is ending, and nobody may wait for it forever).

use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::Limit;
use crate::failure::BoxError;

struct Barrier {
    /// How many items have ended; the lock also orders their keys into the committer's queue.
    ended: Mutex<u64>,
    /// How many of them the committer has written.
    settled: watch::Sender<u64>,
}

/// The commits of one [`Idempotent`](crate::Idempotent) stage, from
/// [`Idempotent::committed`](crate::Idempotent::committed): [`wait`](Committed::wait)
/// resolves once every item that ended before the call has its key written to the store
/// (committed as done, marked failed, or released). Cheap to clone; clones share the stage.
///
/// As a [`Limit`] given to a later stage ([`AsyncStage::limit`](crate::AsyncStage::limit)),
/// no call of that stage starts while an item that ended is not written: after a crash, at
/// most the calls in flight run again. Together with
/// [`done_if`](crate::AsyncStage::done_if) on a stage that writes its own results, the
/// items end (and are waited for) the moment their calls end.
///
/// ```
/// use flowline::prelude::*;
/// use flowline::MemoryStore;
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let stage = Pipeline::from_iter(0..100u32).idempotent(MemoryStore::new(), |x| *x);
/// let committed = stage.committed();
/// let report = stage
///     .map_async("write", |x| async move { x })
///     .workers(4)
///     .limit(committed.clone())     // no call starts before the ended items are written
///     .run().await.unwrap();
/// assert_eq!(report.delivered(), 100);
/// committed.wait().await;           // nothing pending: at once
/// # }
/// ```
#[derive(Clone)]
pub struct Committed(Arc<Barrier>);

impl std::fmt::Debug for Committed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Committed")
            .field(
                "ended",
                &*self.0.ended.lock().unwrap_or_else(|p| p.into_inner()),
            )
            .field("settled", &*self.0.settled.borrow())
            .finish()
    }
}

impl Committed {
    pub(crate) fn new() -> Self {
        Committed(Arc::new(Barrier {
            ended: Mutex::new(0),
            settled: watch::Sender::new(0),
        }))
    }

    /// An item ended: `queue` hands its key to the committer, under the lock that orders
    /// the count.
    pub(crate) fn ended(&self, queue: impl FnOnce()) {
        let mut ended = self.0.ended.lock().unwrap_or_else(|p| p.into_inner());
        queue();
        *ended += 1;
    }

    /// The committer wrote the keys of `n` more items (in the order they were queued).
    pub(crate) fn settled(&self, n: usize) {
        self.0.settled.send_modify(|s| *s += n as u64);
    }

    /// Resolves once every item that ended before this call is written to the store; at
    /// once when none is pending. Items that end later are not waited for.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use flowline::MemoryStore;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let store = MemoryStore::new();
    /// let stage = Pipeline::from_iter(["a", "b"]).idempotent(store, |s| s.to_string());
    /// let committed = stage.committed();
    /// stage.run().await.unwrap();
    /// committed.wait().await;   // "a" and "b" are committed
    /// # }
    /// ```
    pub fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        let target = *self.0.ended.lock().unwrap_or_else(|p| p.into_inner());
        let mut settled = self.0.settled.subscribe();
        async move {
            // The committer's sender lives in the barrier, so this never ends early.
            let _ = settled.wait_for(|s| *s >= target).await;
        }
    }
}

impl Limit for Committed {
    type Permit = ();

    fn acquire(&self) -> impl Future<Output = Result<(), BoxError>> + Send + 'static {
        let wait = self.wait();
        async move {
            wait.await;
            Ok(())
        }
    }
}
