//! `key_by`, `per_key` and `max_waiting`: the options of keyed concurrency (the part
//! itself is [`keyed`](super::keyed)), and their tests.

use std::hash::Hash;

use crate::policy::Invalid;

use super::builder::{AsyncStage, Options};
use super::call::StageFn;
use super::keyed::{KeyLimits, KeyMap, Keys};

/// `key_by`, `per_key`, `max_waiting`.
impl<T: Send + 'static, U: Send + 'static, S: StageFn<T, U>> AsyncStage<T, U, S> {
    /// Keyed concurrency: the items of one key are called one after another (at most
    /// [`per_key`](AsyncStage::per_key) at once), each key's items start and leave in their
    /// arrival order, and items of different keys run side by side, up to `workers(n)` in
    /// all. An item whose key is busy waits aside (at most
    /// [`max_waiting`](AsyncStage::max_waiting) such items, then the stage stops pulling
    /// input), and the stage goes on with the items of other keys: one slow key holds back
    /// only its own items. Across keys the output order is the stage's (input order, or as
    /// finished with [`unordered`](AsyncStage::unordered)).
    ///
    /// An item that waits for a retry, a pausing breaker or its server keeps its key busy,
    /// so the key's later items stay behind it; a failure routed as an item
    /// ([`results`](AsyncStage::results)) keeps its key's order too. A graceful stop leaves
    /// the waiting items unfinished. The stage's report counts in `key_waits` the items
    /// that waited behind a busy key. A key with nothing in flight and nothing waiting
    /// costs nothing: its entry goes when its last item ends.
    ///
    /// Unlike [`partition`](crate::Flow::partition), which hashes keys into a fixed number
    /// of lanes (a slow key stalls every key of its lane), here only the slow key's own
    /// items wait.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// // (account, amount): one account's updates must apply in order.
    /// let updates = vec![("a", 1), ("b", 1), ("a", 2), ("c", 1), ("a", 3), ("b", 2)];
    /// let t = tokio::time::Instant::now();
    /// let out = Pipeline::from_iter(updates)
    ///     .map_async("apply", |(account, n)| async move {
    ///         let ms = if account == "a" { 100 } else { 10 };   // account a is slow
    ///         tokio::time::sleep(Duration::from_millis(ms)).await;
    ///         (account, n)
    ///     })
    ///     .workers(8)
    ///     .key_by(|(account, _)| *account)
    ///     .unordered()
    ///     .collect().await.unwrap();
    /// let a: Vec<_> = out.iter().filter(|(k, _)| *k == "a").map(|(_, n)| *n).collect();
    /// assert_eq!(a, vec![1, 2, 3]);                          // in order, one at a time
    /// assert_eq!(out[..3], [("b", 1), ("c", 1), ("b", 2)]);  // b and c did not wait for a
    /// assert_eq!(t.elapsed(), Duration::from_millis(300));
    /// # }
    /// ```
    pub fn key_by<K, F>(mut self, key: F) -> Self
    where
        K: Hash + Eq + Send + 'static,
        F: Fn(&T) -> K + Send + 'static,
    {
        self.key = Some(Box::new(move |limits| {
            Box::new(KeyMap::new(key, limits)) as Box<dyn Keys<T>>
        }));
        self
    }

    /// With [`key_by`](AsyncStage::key_by): how many calls of one key may be in flight at
    /// once (default 1). The key's items still start in arrival order, and their results
    /// leave in it too, also on an [`unordered`](AsyncStage::unordered) stage. Must be at
    /// least 1.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let t = tokio::time::Instant::now();
    /// let out = Pipeline::from_iter(0..6u64)
    ///     .map_async("io", |x| async move {
    ///         tokio::time::sleep(Duration::from_millis(10 * (6 - x))).await;
    ///         x
    ///     })
    ///     .workers(8)
    ///     .key_by(|_| "one key")
    ///     .per_key(2)
    ///     .unordered()
    ///     .collect().await.unwrap();
    /// assert_eq!(out, vec![0, 1, 2, 3, 4, 5]);   // the key's order, two at a time
    /// assert_eq!(t.elapsed(), Duration::from_millis(110)); // 0,1 | 1 ends: 2 | 0 ends: 3 | 4,5
    /// # }
    /// ```
    pub fn per_key(mut self, n: usize) -> Self {
        self.options.per_key = Some(n);
        self
    }

    /// With [`key_by`](AsyncStage::key_by): the most items waiting behind a busy key, over
    /// all keys (default: the larger of 4 × `workers` and 1024). When that many wait, the
    /// stage pulls no more input (back-pressure to the source) until a key's call ends.
    /// Must be at least 1.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let report = Pipeline::from_iter(0..100u32)
    ///     .map_async("io", |x| async move { x })
    ///     .workers(4)
    ///     .key_by(|x| x % 3)
    ///     .max_waiting(10)
    ///     .run().await.unwrap();
    /// assert_eq!(report.delivered(), 100);
    /// # }
    /// ```
    pub fn max_waiting(mut self, n: usize) -> Self {
        self.options.max_waiting = Some(n);
        self
    }
}

/// The limits of a keyed stage, from its options.
pub(super) fn limits(options: &Options) -> KeyLimits {
    let per_key = options.per_key.unwrap_or(1).max(1);
    KeyLimits {
        per_key,
        max_waiting: options
            .max_waiting
            .unwrap_or_else(|| options.workers.saturating_mul(4).max(1024))
            .max(1),
        track_order: per_key > 1 && !options.ordered,
    }
}

/// The problems with a stage's key options (`keyed`: `key_by` was given).
pub(super) fn invalid(options: &Options, keyed: bool) -> Vec<Invalid> {
    let mut problems = Vec::new();
    for (option, value) in [
        ("per_key", options.per_key),
        ("max_waiting", options.max_waiting),
    ] {
        match value {
            Some(0) => problems.push((option, "0".to_string(), "must be at least 1")),
            Some(n) if !keyed => {
                problems.push((option, n.to_string(), "applies to stages with key_by only"))
            }
            _ => {}
        }
    }
    problems
}
