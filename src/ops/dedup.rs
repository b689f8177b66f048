//! `dedup_by(key, window)`: drops an item whose key already passed within the window.
//!
//! Its own chunk source rather than a plain fused step so that it reads the clock once per
//! chunk, not once per item.

use std::hash::Hash;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::Error;
use crate::ops::fuse;
use crate::plan::Pipeline;
use crate::runtime::chunk::{Chunk, Emit, Processed, process};
use crate::runtime::fused::ChunkOp;
use crate::runtime::ttl_map::TtlMap;

/// Keys a TTL window remembers at most, unless [`Window::max_keys`] says otherwise.
pub(crate) const DEFAULT_MAX_KEYS: usize = 1 << 20;

/// How long [`dedup_by`](crate::Flow::dedup_by) remembers a key. Memory is bounded either way.
///
/// ```
/// use flowline::Window;
/// use std::time::Duration;
/// let w = Window::ttl(Duration::from_secs(60)).max_keys(100_000); // time, with a bound
/// let l = Window::last(1_000);                                    // the last 1,000 keys
/// # let _ = (w, l);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "an option set does nothing until it is passed to a stage or source"]
pub struct Window {
    ttl: Option<Duration>,
    max_keys: usize,
}

impl Window {
    /// A key that passed is remembered for `ttl` (measured from when it passed; a dropped
    /// duplicate does not extend it), and at most 2^20 keys are remembered (the oldest is
    /// forgotten first; see [`max_keys`](Window::max_keys)).
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let out = Pipeline::from_iter(["a", "a"]).dedup_by(|s| *s, Window::ttl(Duration::from_secs(1))).collect().await.unwrap();
    /// assert_eq!(out, vec!["a"]);
    /// # }
    /// ```
    pub fn ttl(ttl: Duration) -> Self {
        Window {
            ttl: Some(ttl),
            max_keys: DEFAULT_MAX_KEYS,
        }
    }

    /// The last `n` distinct keys that passed are remembered; the oldest is forgotten first.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let out = Pipeline::from_iter([1, 2, 1]).dedup_by(|x| *x, Window::last(1)).collect().await.unwrap();
    /// assert_eq!(out, vec![1, 2, 1]);   // with one key remembered, 1 was forgotten for 2
    /// # }
    /// ```
    pub fn last(n: usize) -> Self {
        Window {
            ttl: None,
            max_keys: n,
        }
    }

    /// Bounds how many keys are remembered (the oldest is forgotten first).
    ///
    /// ```
    /// use flowline::Window;
    /// use std::time::Duration;
    /// let w = Window::ttl(Duration::from_secs(600)).max_keys(10_000);
    /// # let _ = w;
    /// ```
    pub fn max_keys(mut self, n: usize) -> Self {
        self.max_keys = n;
        self
    }

    fn check(&self) -> Option<Error> {
        if self.ttl.is_some_and(|d| d.is_zero()) {
            return Some(Error::config(
                "dedup",
                "window.ttl",
                self.ttl.unwrap_or_default(),
                "must be more than zero",
            ));
        }
        if self.max_keys == 0 {
            let option = if self.ttl.is_some() {
                "window.max_keys"
            } else {
                "window.last"
            };
            return Some(Error::config(
                "dedup",
                option,
                self.max_keys,
                "must be at least 1",
            ));
        }
        None
    }
}

/// The items [`Dedup::exempt`] lets pass unchecked.
type Exempt<T> = Box<dyn FnMut(&T) -> bool + Send>;
/// What [`Dedup::on_duplicate`] is handed a dropped duplicate with.
type OnDuplicate<T> = Box<dyn FnMut(T) + Send>;

/// A dedup stage being configured; returned by [`Flow::dedup_by`](crate::Flow::dedup_by).
/// Add [`exempt`](Dedup::exempt) or [`on_duplicate`](Dedup::on_duplicate), then go on with
/// any operator.
///
/// ```
/// use flowline::prelude::*;
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let out = Pipeline::from_iter(["a", "b", "a"])
///     .dedup_by(|s| *s, Window::last(100))
///         .on_duplicate(|s| println!("{s} again"))
///     .collect().await.unwrap();
/// assert_eq!(out, vec!["a", "b"]);
/// # }
/// ```
#[must_use = "a stage builder does nothing until its pipeline is run by a terminal"]
pub struct Dedup<T, K, F> {
    p: Pipeline<T>,
    key: F,
    window: Window,
    exempt: Option<Exempt<T>>,
    on_duplicate: Option<OnDuplicate<T>>,
    _key: std::marker::PhantomData<fn() -> K>,
}

impl<T, K, F> Dedup<T, K, F> {
    /// Lets the items for which `exempt` is true pass unchecked: their key is not taken and
    /// not remembered, so they neither are dropped nor make a later item a duplicate (items
    /// that only pass through the stage, such as markers).
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// // Negative numbers are markers: never dropped, never remembered.
    /// let out = Pipeline::from_iter([-1, 1, -1, 1, 2])
    ///     .dedup_by(|x: &i32| x.abs(), Window::last(100))
    ///         .exempt(|x| *x < 0)
    ///     .collect().await.unwrap();
    /// assert_eq!(out, vec![-1, 1, -1, 2]);
    /// # }
    /// ```
    pub fn exempt(mut self, exempt: impl FnMut(&T) -> bool + Send + 'static) -> Self {
        self.exempt = Some(Box::new(exempt));
        self
    }

    /// Hands each dropped duplicate to `f` (to record it as done, say) before it is
    /// dropped; it is counted as dropped either way.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use std::sync::{Arc, Mutex};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let dropped = Arc::new(Mutex::new(Vec::new()));
    /// let d = dropped.clone();
    /// let out = Pipeline::from_iter([1, 2, 1, 1])
    ///     .dedup_by(|x| *x, Window::last(100))
    ///         .on_duplicate(move |x| d.lock().unwrap().push(x))
    ///     .collect().await.unwrap();
    /// assert_eq!(out, vec![1, 2]);
    /// assert_eq!(*dropped.lock().unwrap(), vec![1, 1]);
    /// # }
    /// ```
    pub fn on_duplicate(mut self, f: impl FnMut(T) + Send + 'static) -> Self {
        self.on_duplicate = Some(Box::new(f));
        self
    }
}

/// The dedup step: one clock read and one eviction per chunk, then a per-item check. Run by
/// the shared fused-operator machinery (`stage::fused`).
struct DedupOp<T, K, F> {
    key: F,
    seen: TtlMap<K, ()>,
    exempt: Option<Exempt<T>>,
    on_duplicate: Option<OnDuplicate<T>>,
}

impl<T, K, F> ChunkOp<T, T> for DedupOp<T, K, F>
where
    K: Hash + Eq + Clone + Send,
    F: FnMut(&T) -> K + Send,
{
    fn apply(&mut self, chunk: Chunk<T>) -> Processed<T> {
        let now = Instant::now();
        self.seen.evict(now);
        let DedupOp {
            key,
            seen,
            exempt,
            on_duplicate,
        } = self;
        process::<T, T, true>(chunk, &mut |item: T, out: &mut Emit<T>| {
            if exempt.as_mut().is_some_and(|exempt| exempt(&item)) {
                out.push(item);
                return;
            }
            let k = key(&item);
            if seen.get(&k, now).is_none() {
                seen.insert(k, (), now);
                out.push(item);
            } else if let Some(f) = on_duplicate {
                f(item);
            }
        })
    }
}

pub(crate) fn dedup_by<T, K, F>(mut p: Pipeline<T>, key: F, window: Window) -> Dedup<T, K, F> {
    if let Some(e) = window.check() {
        p.settings.errors.push(e);
    }
    Dedup {
        p,
        key,
        window,
        exempt: None,
        on_duplicate: None,
        _key: std::marker::PhantomData,
    }
}

impl<T, K, F> crate::IntoPipeline for Dedup<T, K, F>
where
    T: Send + 'static,
    K: Hash + Eq + Clone + Send + 'static,
    F: FnMut(&T) -> K + Send + 'static,
{
    type Item = T;

    fn into_pipeline(self) -> Pipeline<T> {
        let seen = TtlMap::new(self.window.ttl, self.window.max_keys);
        let op = DedupOp {
            key: self.key,
            seen,
            exempt: self.exempt,
            on_duplicate: self.on_duplicate,
        };
        fuse(self.p, "dedup", op)
    }
}

#[cfg(test)]
mod tests {
    use crate::Window;
    use crate::prelude::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_key_passes_again_once_its_ttl_expired() {
        // one item per 10 ms: key x % 3 -> keys 0,1,2,0,1,2,... at 10,20,30,40,...
        let (out, report) = Pipeline::from_iter(0..12u64)
            .map_async("tick", |x| async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                x
            })
            .dedup_by(|x| x % 3, Window::ttl(Duration::from_millis(45)))
            .collect_with_report()
            .await
            .unwrap();
        // key 0 passes at 10 ms (item 0); item 3 at 40 ms is within 45 ms; item 6 at 70 ms
        // is past 55 ms: passes again (remembered until 115 ms), item 9 at 100 ms dropped.
        assert_eq!(out, vec![0, 1, 2, 6, 7, 8]);
        let d = report.stage("dedup").unwrap();
        assert_eq!((d.received, d.passed, d.dropped), (12, 6, 6));
        assert!(report.is_balanced());
    }

    #[tokio::test(start_paused = true)]
    async fn the_exact_ttl_boundary_lets_the_key_through() {
        let out = Pipeline::from_iter(0..4u64)
            .map_async("tick", |x| async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                x
            })
            .dedup_by(|_| "same", Window::ttl(Duration::from_millis(20)))
            .collect()
            .await
            .unwrap();
        // passes at 10; 20 dropped; 30 = 10 + 20: expired, passes; 40 dropped
        assert_eq!(out, vec![0, 2]);
    }

    #[tokio::test]
    async fn last_n_forgets_the_oldest_key() {
        let out = Pipeline::from_iter([1, 2, 3, 1, 4, 1, 2])
            .dedup_by(|x| *x, Window::last(3))
            .collect()
            .await
            .unwrap();
        // 1,2,3 pass; 1 dup; 4 passes and evicts 1; 1 passes (evicts 2); 2 passes
        assert_eq!(out, vec![1, 2, 3, 4, 1, 2]);
    }

    #[tokio::test]
    async fn memory_bound_holds_with_many_distinct_keys() {
        // a bound of 100 keys: a repeat of a key seen 1,000 keys ago passes again
        let out = Pipeline::from_iter((0..1000u32).chain(0..1000))
            .dedup_by(|x| *x, Window::ttl(Duration::from_secs(3600)).max_keys(100))
            .collect()
            .await
            .unwrap();
        assert_eq!(out.len(), 2000);
        let out = Pipeline::from_iter((0..100u32).chain(0..100))
            .dedup_by(|x| *x, Window::ttl(Duration::from_secs(3600)).max_keys(100))
            .collect()
            .await
            .unwrap();
        assert_eq!(out.len(), 100);
    }

    #[tokio::test]
    async fn zero_windows_are_rejected() {
        let err = Pipeline::from_iter(0..3)
            .dedup_by(|x| *x, Window::ttl(Duration::ZERO))
            .run()
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: stage `dedup`: window.ttl = 0ns: must be more than zero"
        );
        let err = Pipeline::from_iter(0..3)
            .dedup_by(|x| *x, Window::last(0))
            .run()
            .await
            .unwrap_err();
        assert!(err.to_string().contains("window.last = 0"), "{err}");
    }

    #[tokio::test]
    async fn exempt_items_pass_and_are_not_remembered() {
        // Odd numbers are exempt: 1 passes three times and never counts against a window of
        // one key, so 2 is still remembered when it comes again.
        let report = Pipeline::from_iter([2, 1, 1, 2, 1, 4])
            .dedup_by(|x| *x, Window::last(1))
            .exempt(|x| x % 2 == 1)
            .collect_with_report()
            .await
            .unwrap();
        assert_eq!(report.0, vec![2, 1, 1, 1, 4]);
        let d = report.1.stage("dedup").unwrap();
        assert_eq!((d.received, d.passed, d.dropped), (6, 5, 1));
        assert!(report.1.is_balanced());
    }

    #[tokio::test]
    async fn each_dropped_duplicate_is_handed_over_once() {
        let dropped = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let d = dropped.clone();
        let (out, report) = Pipeline::from_iter((0..1000u32).map(|x| x % 10))
            .dedup_by(|x| *x, Window::last(10))
            .on_duplicate(move |x| d.lock().unwrap().push(x))
            .collect_with_report()
            .await
            .unwrap();
        assert_eq!(out, (0..10).collect::<Vec<_>>());
        let dropped = dropped.lock().unwrap();
        assert_eq!(dropped.len(), 990);
        assert_eq!(dropped[..3], [0, 1, 2]);
        assert_eq!(report.stage("dedup").unwrap().dropped, 990);
    }

    #[tokio::test]
    async fn an_exempt_item_is_not_handed_over_as_a_duplicate() {
        let handed = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let h = handed.clone();
        let out = Pipeline::from_iter([5, 5, 5])
            .dedup_by(|x| *x, Window::last(10))
            .exempt(|_| true)
            .on_duplicate(move |_| {
                h.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            })
            .collect()
            .await
            .unwrap();
        assert_eq!(out, vec![5, 5, 5]);
        assert_eq!(handed.load(std::sync::atomic::Ordering::Relaxed), 0);
    }
}
