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
    /// The order is the order the items come from the source. Over a Redis stream read by
    /// a consumer group (`flowline-redis`'s `RedisStream`), that is stream order within
    /// one consumer, connection resets included; across consumers the group splits a
    /// key's entries between them, and an entry taken over from a dead consumer runs after
    /// later entries of its key that were already done. Where one key's order must hold
    /// across machines, route each key to one stream (or one consumer).
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

#[cfg(test)]
mod tests {
    use crate::prelude::*;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    use tokio::time::Instant;

    type Log = Arc<Mutex<Vec<(u32, u32, u64)>>>;

    /// Items `(key, i)`, `i` major, over `keys` keys: key 0 takes `slow` ms a call, the
    /// others 10 ms. Returns when each call ended (`(key, i, ms)`), in output order.
    async fn slow_key_run(
        keys: u32,
        per_key: usize,
        slow: u64,
        workers: usize,
    ) -> Vec<(u32, u32, u64)> {
        let t0 = Instant::now();
        let items = (0..10u32).flat_map(move |i| (0..keys).map(move |k| (k, i)));
        let log: Log = Arc::default();
        let seen = log.clone();
        Pipeline::from_iter(items)
            .map_async("work", move |(k, i)| async move {
                let ms = if k == 0 { slow } else { 10 };
                tokio::time::sleep(Duration::from_millis(ms)).await;
                (k, i, t0.elapsed().as_millis() as u64)
            })
            .workers(workers)
            .key_by(|(k, _)| *k)
            .per_key(per_key)
            .unordered()
            .inspect(move |x| seen.lock().unwrap().push(*x))
            .run()
            .await
            .unwrap();
        std::mem::take(&mut *log.lock().unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_key_does_not_delay_the_other_keys() {
        let log = slow_key_run(5, 1, 100, 8).await;
        assert_eq!(log.len(), 50);
        for (k, i, ms) in log {
            // One call at a time per key, back to back: the fast keys end by 100 ms.
            let per_call = if k == 0 { 100 } else { 10 };
            assert_eq!(ms, u64::from(i + 1) * per_call, "key {k} item {i}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn per_key_two_runs_two_calls_of_a_key_and_keeps_its_order() {
        let log = slow_key_run(2, 2, 100, 8).await;
        let slow: Vec<_> = log
            .iter()
            .filter(|e| e.0 == 0)
            .map(|e| (e.1, e.2))
            .collect();
        // Two at a time: items 2j and 2j+1 end together, (j+1) × 100 ms.
        let want: Vec<_> = (0..10u32)
            .map(|i| (i, u64::from(i / 2 + 1) * 100))
            .collect();
        assert_eq!(slow, want);
        let fast: Vec<_> = log.iter().filter(|e| e.0 == 1).map(|e| e.2).collect();
        assert_eq!(fast, [10, 10, 20, 20, 30, 30, 40, 40, 50, 50]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unordered_stage_holds_a_keys_later_result_for_its_earlier_one() {
        let t0 = Instant::now();
        let out = Pipeline::from_iter([(0u32, 50u64), (0, 10), (1, 20)])
            .map_async("work", move |(k, ms)| async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                (k, ms, t0.elapsed().as_millis() as u64)
            })
            .workers(4)
            .key_by(|(k, _)| *k)
            .per_key(2)
            .unordered()
            .collect()
            .await
            .unwrap();
        // Key 0's second item ended at 10 ms and waited for its first (50 ms); key 1 did not.
        assert_eq!(out, [(1, 20, 20), (0, 50, 50), (0, 10, 10)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retrying_item_keeps_its_keys_later_items_waiting() {
        let t0 = Instant::now();
        let starts: Log = Arc::default();
        let s = starts.clone();
        let report = Pipeline::from_iter([(0u32, 0u32), (0, 1), (1, 0), (0, 2), (1, 1)])
            .try_map_async("work", move |(k, i)| {
                s.lock()
                    .unwrap()
                    .push((k, i, t0.elapsed().as_millis() as u64));
                // Key 0's first item fails twice.
                let fails = (k, i) == (0, 0) && crate::attempt() < 3;
                async move {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    if fails { Err("busy") } else { Ok(i) }
                }
            })
            .workers(4)
            .key_by(|(k, _)| *k)
            .retry(Retry::constant(Duration::from_millis(100)).max_attempts(3))
            .run()
            .await
            .unwrap();
        let starts = starts.lock().unwrap().clone();
        assert_eq!(
            starts,
            [
                (0, 0, 0),
                (1, 0, 0),
                (1, 1, 10),
                (0, 0, 110),
                (0, 0, 220),
                (0, 1, 230),
                (0, 2, 240)
            ]
        );
        let work = report.stage("work").unwrap();
        assert_eq!((work.passed, work.retried, work.key_waits), (5, 2, 3));
        assert!(report.is_balanced(), "{report}");
    }

    /// One key, five items of 100 ms; stopped or cancelled at 150 ms.
    async fn interrupted(cancel: bool) -> (Vec<u32>, Report) {
        let out = Arc::new(Mutex::new(Vec::new()));
        let seen = out.clone();
        let handle = Pipeline::from_iter(0..5u32)
            .map_async("work", |x| async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                x
            })
            .workers(4)
            .key_by(|_| ())
            .inspect(move |x| seen.lock().unwrap().push(*x))
            .spawn();
        tokio::time::sleep(Duration::from_millis(150)).await;
        if cancel {
            handle.cancel();
        } else {
            handle.stop();
        }
        let report = handle.join().await.unwrap_or_else(|e| match e {
            Error::Cancelled { report } => *report,
            e => panic!("{e}"),
        });
        let out = out.lock().unwrap().clone();
        (out, report)
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_leaves_the_waiting_items_unfinished_and_lets_the_call_end() {
        let (out, report) = interrupted(false).await;
        assert_eq!(out, [0, 1]);
        let work = report.stage("work").unwrap();
        assert_eq!((work.passed, work.unfinished, work.key_waits), (2, 3, 4));
        assert!(report.is_balanced(), "{report}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancel_leaves_the_call_and_the_waiting_items_unfinished() {
        let (out, report) = interrupted(true).await;
        assert_eq!(out, [0]);
        let work = report.stage("work").unwrap();
        assert_eq!((work.passed, work.unfinished), (1, 4));
        assert!(report.is_balanced(), "{report}");
    }

    #[tokio::test(start_paused = true)]
    async fn max_waiting_stops_pulling_input() {
        // One key: a call at a time, 10 ms each; at most 3 items wait.
        let pulled = Arc::new(Mutex::new(0u32));
        let p = pulled.clone();
        let handle = Pipeline::from_iter(0..100_000u32)
            .inspect(move |_| *p.lock().unwrap() += 1)
            .map_async("work", |x| async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                x
            })
            .workers(8)
            .key_by(|_| ())
            .max_waiting(3)
            .spawn();
        tokio::time::sleep(Duration::from_millis(55)).await;
        let early = *pulled.lock().unwrap();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let later = *pulled.lock().unwrap();
        handle.cancel();
        let _ = handle.join().await;
        // The stage holds 1 call + 3 waiting + one chunk in its input; the queue before
        // it a few chunks: far from the 100,000 an unbounded stage would pull at once.
        let bound = 4 + 512 * 6;
        assert!(early <= bound, "{early} pulled");
        assert!(later <= bound + 100, "{later} pulled");
        // Exactly: the stage took one chunk and, with 4 items out of it, pulls no other (at
        // the default max_waiting, 1024, it pulls three).
        let chunk = crate::runtime::chunk::CHUNK_CAP as u32;
        assert_eq!((early, later), (chunk, chunk));
    }

    /// Starts of the calls `(key, i, ms)`, each call `ms_each` long, through a keyed stage
    /// that `with` adds its options to.
    async fn keyed_starts(
        items: Vec<(u32, u32)>,
        ms_each: u64,
        with: impl FnOnce(
            crate::AsyncStage<(u32, u32), u32, crate::Fallible<BoxedCall, CallFut>>,
        )
            -> crate::AsyncStage<(u32, u32), u32, crate::Fallible<BoxedCall, CallFut>>,
    ) -> (Vec<(u32, u32, u64)>, Report) {
        let t0 = Instant::now();
        let starts: Log = Arc::default();
        let s = starts.clone();
        let call: BoxedCall = Box::new(move |(k, i): (u32, u32)| {
            s.lock()
                .unwrap()
                .push((k, i, t0.elapsed().as_millis() as u64));
            // Key 0's first item fails at its first attempt (a stage without a copy of its
            // input for another attempt makes only one).
            let fails = (k, i) == (0, 0) && crate::attempt() <= 1;
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(ms_each)).await;
                if fails { Err("503") } else { Ok(i) }
            })
        });
        let stage = Pipeline::from_iter(items)
            .try_map_async("work", call)
            .workers(4)
            .key_by(|(k, _)| *k);
        let report = with(stage).run().await.unwrap();
        let starts = starts.lock().unwrap().clone();
        assert!(report.is_balanced(), "{report}");
        (starts, report)
    }

    type CallFut =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<u32, &'static str>> + Send>>;
    type BoxedCall = Box<dyn Fn((u32, u32)) -> CallFut + Send + Sync>;

    #[tokio::test(start_paused = true)]
    async fn a_pausing_breaker_holds_every_key_and_the_failed_items_key_keeps_its_order() {
        let breaker = Breaker::consecutive_failures(1).cooldown(Duration::from_millis(100));
        let items = vec![(0, 0), (1, 0), (0, 1), (1, 1)];
        let (starts, report) =
            keyed_starts(items, 10, |s| s.circuit_breaker(breaker.clone())).await;
        // Key 0's first call fails at 10 ms: the breaker opens and pauses the whole stage,
        // so key 1's next item waits too, although its key is free. After the cooldown the
        // held item goes first; key 0's next item only after it.
        let key = |k| {
            starts
                .iter()
                .filter(|s| s.0 == k)
                .map(|s| (s.1, s.2))
                .collect::<Vec<_>>()
        };
        assert_eq!(key(0), [(0, 0), (0, 110), (1, 120)]);
        assert_eq!(key(1)[0], (0, 0));
        assert!(key(1)[1].1 >= 110, "{starts:?}");
        // Half-open after the cooldown: key 1's item starts once the held item's call ended.
        assert_eq!(key(1), [(0, 0), (1, 120)], "{starts:?}");
        assert!(!starts.iter().any(|s| s.2 > 10 && s.2 < 110), "{starts:?}");
        assert_eq!(report.stage("work").unwrap().passed, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_limit_keeps_each_keys_order() {
        let items = vec![(0, 0), (0, 1), (1, 0), (0, 2), (1, 1)];
        let (starts, report) =
            keyed_starts(items, 50, |s| s.rate_limit(Rate::per_second(10))).await;
        // One permit per 100 ms. Key 0's second item is ready (its first ended at 50 ms)
        // before key 1's second (150 ms), and each key's items start in their order.
        assert_eq!(
            starts,
            [
                (0, 0, 0),
                (1, 0, 100),
                (0, 1, 200),
                (1, 1, 300),
                (0, 2, 400)
            ]
        );
        assert_eq!(report.stage("work").unwrap().failed, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_adaptive_limit_keeps_one_call_per_key() {
        let items: Vec<(u32, u32)> = (0..6).flat_map(|i| (0..3).map(move |k| (k, i))).collect();
        let limit = Adaptive::aimd(1..=8).initial(3);
        let (starts, report) = keyed_starts(items, 10, |s| s.adaptive(limit)).await;
        // Key 0's first item failed (an overload for the limit's taste or not, it ends):
        // each key's items start one after another, 10 ms apart, in their order.
        for k in 0..3 {
            let of_key: Vec<_> = starts.iter().filter(|s| s.0 == k).collect();
            let is: Vec<u32> = of_key.iter().map(|s| s.1).collect();
            let want: Vec<u32> = (0..6).collect();
            assert_eq!(is, want, "key {k}: {starts:?}");
            for w in of_key.windows(2) {
                assert!(w[1].2 >= w[0].2 + 10, "key {k} overlapped: {starts:?}");
            }
        }
        assert_eq!(report.stage("work").unwrap().passed, 17);
    }

    #[tokio::test(start_paused = true)]
    async fn an_item_skipped_as_done_does_not_hold_its_key() {
        let store = crate::MemoryStore::new();
        let id = |(k, i): &(u32, u32)| format!("{k}/{i}");
        Pipeline::from_iter([(0u32, 0u32)])
            .idempotent(store.clone(), id)
            .run()
            .await
            .unwrap();
        let t0 = Instant::now();
        let starts: Log = Arc::default();
        let s = starts.clone();
        let report = Pipeline::from_iter([(0u32, 0u32), (0, 1), (1, 0), (0, 2)])
            .idempotent(store, id)
            .map_async("work", move |(k, i)| {
                s.lock()
                    .unwrap()
                    .push((k, i, t0.elapsed().as_millis() as u64));
                async move {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .workers(4)
            .key_by(|(k, _)| *k)
            .run()
            .await
            .unwrap();
        // (0, 0) is done from the first run: key 0 starts with its next item at once.
        let starts = starts.lock().unwrap().clone();
        assert_eq!(starts, [(0, 1, 0), (1, 0, 0), (0, 2, 10)]);
        let dropped: u64 = report.stages.iter().map(|s| s.dropped).sum();
        assert_eq!((report.delivered(), dropped), (3, 1));
    }

    #[tokio::test]
    async fn zero_per_key_and_zero_max_waiting_are_named_together() {
        let err = Pipeline::from_iter(0..3u32)
            .map_async("api", |x| async move { x })
            .key_by(|x| *x)
            .per_key(0)
            .max_waiting(0)
            .run()
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("per_key = 0") && text.contains("max_waiting = 0"),
            "{text}"
        );
        assert!(text.contains("api"), "the stage is named: {text}");
        let err = Pipeline::from_iter(0..3u32)
            .map_async("api", |x| async move { x })
            .per_key(2)
            .run()
            .await
            .unwrap_err();
        assert!(err.to_string().contains("key_by only"), "{err}");
        assert!(err.to_string().contains("per_key = 2"), "{err}");
    }

    #[test]
    fn the_default_limits_are_the_documented_ones() {
        let options = |workers: usize, ordered: bool| super::Options {
            workers,
            ordered,
            ..super::Options::default()
        };
        // `max_waiting`: the larger of 4 × workers and 1024; `per_key`: 1.
        for (workers, max_waiting) in [
            (1, 1024),
            (256, 1024),
            (1000, 4000),
            (usize::MAX, usize::MAX),
        ] {
            let l = super::limits(&options(workers, true));
            assert_eq!(
                (l.per_key, l.max_waiting),
                (1, max_waiting),
                "workers {workers}"
            );
            assert!(!l.track_order);
        }
        // Results are tracked per key only on an unordered stage with several calls a key.
        let mut o = options(8, false);
        assert!(!super::limits(&o).track_order);
        o.per_key = Some(2);
        assert!(super::limits(&o).track_order);
        o.ordered = true;
        assert!(!super::limits(&o).track_order);
    }
}
