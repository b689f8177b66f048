//! Hedged requests: when a call has not answered after a delay, the stage starts a second
//! call for the same item; the first answer wins and the other call is dropped (cancelled).
//! A budget bounds the extra calls. The delay is fixed ([`Hedge::after`]) or a percentile
//! of the stage's recent call latencies ([`Hedge::percentile`]), after tower's `hedge`
//! middleware and Dean & Barroso, "The Tail at Scale" (2013).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use hdrhistogram::Histogram;

use super::Invalid;

/// Calls a percentile needs to have seen before the stage hedges.
const MIN_SAMPLES: u64 = 20;
/// Calls after which the percentile is taken again.
const UPDATE_EVERY: u64 = 32;
/// Calls a latency window holds before a fresh one starts (the percentile follows the
/// backend's recent latency, not its whole history).
const WINDOW: u64 = 4_096;

/// Hedged requests for an async stage
/// ([`AsyncStage::hedge`](crate::AsyncStage::hedge)): a call that has not answered after a
/// delay gets a second call for the same item; the first answer is the item's, and the
/// other call is dropped. Each item still ends once, with one result.
///
/// The delay is fixed ([`after`](Hedge::after)) or a percentile of the stage's recent call
/// latencies ([`percentile`](Hedge::percentile)): with `0.95`, only the slowest 5 % of calls
/// are hedged, which cuts the tail of a backend with rare slow calls ("The Tail at Scale").
/// A budget ([`max_extra`](Hedge::max_extra), 10 % by default) bounds the extra calls, so a
/// backend that slows down for everyone is not sent twice the load.
///
/// Clones share their counts ([`calls`](Hedge::calls), [`extra_calls`](Hedge::extra_calls));
/// each stage keeps its own latencies and budget.
///
/// ```
/// use flowline::prelude::*;
/// use flowline::Hedge;
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicBool, Ordering};
/// use std::time::Duration;
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let first = Arc::new(AtomicBool::new(true));
/// let hedge = Hedge::after(Duration::from_millis(10)).max_extra(1.0);
/// let out = Pipeline::from_iter([1u32, 2])
///     .map_async("lookup", move |x| {
///         // The first call of item 1 never answers; its hedge does.
///         let hang = x == 1 && first.swap(false, Ordering::SeqCst);
///         async move {
///             if hang {
///                 std::future::pending::<()>().await;
///             }
///             x * 10
///         }
///     })
///     .hedge(hedge.clone())
///     .collect().await.unwrap();
/// assert_eq!(out, vec![10, 20]);
/// assert_eq!((hedge.calls(), hedge.extra_calls()), (2, 1));
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Hedge {
    delay: Delay,
    max_extra: f64,
    counts: Arc<Counts>,
}

#[derive(Debug, Clone, Copy)]
enum Delay {
    After(Duration),
    Percentile(f64),
}

#[derive(Debug, Default)]
struct Counts {
    calls: AtomicU64,
    extra: AtomicU64,
}

impl Hedge {
    /// Hedges a call that has not answered after `delay`. Must be more than zero;
    /// `Duration::MAX` never hedges.
    ///
    /// ```
    /// let h = flowline::Hedge::after(std::time::Duration::from_millis(50));
    /// assert_eq!(h.extra_calls(), 0);
    /// ```
    pub fn after(delay: Duration) -> Self {
        Hedge::new(Delay::After(delay))
    }

    /// Hedges a call that has not answered within the `p` quantile (`0 < p <= 1`, e.g.
    /// `0.95`) of the stage's recent call latencies. No call is hedged until the stage has
    /// seen 20 calls.
    ///
    /// ```
    /// let h = flowline::Hedge::percentile(0.95);
    /// assert_eq!(h.calls(), 0);
    /// ```
    pub fn percentile(p: f64) -> Self {
        Hedge::new(Delay::Percentile(p))
    }

    fn new(delay: Delay) -> Self {
        Hedge {
            delay,
            max_extra: 0.1,
            counts: Arc::default(),
        }
    }

    /// The budget: extra calls at most this fraction of the stage's calls (`0..=1`; 0.1 by
    /// default, so at most 10 % more calls than without hedging).
    ///
    /// ```
    /// let h = flowline::Hedge::percentile(0.9).max_extra(0.05);
    /// # let _ = h;
    /// ```
    pub fn max_extra(mut self, fraction: f64) -> Self {
        self.max_extra = fraction;
        self
    }

    /// Calls made by the stages with this hedge, hedges not included.
    ///
    /// ```
    /// assert_eq!(flowline::Hedge::percentile(0.95).calls(), 0);
    /// ```
    pub fn calls(&self) -> u64 {
        self.counts.calls.load(Relaxed)
    }

    /// Extra calls made (the hedges).
    ///
    /// ```
    /// assert_eq!(flowline::Hedge::percentile(0.95).extra_calls(), 0);
    /// ```
    pub fn extra_calls(&self) -> u64 {
        self.counts.extra.load(Relaxed)
    }

    /// Every invalid setting.
    pub(crate) fn invalid(&self) -> Vec<Invalid> {
        let mut bad = Vec::new();
        match self.delay {
            Delay::After(Duration::ZERO) => {
                bad.push(("hedge", "0ns".to_string(), "must be more than zero"))
            }
            Delay::Percentile(p) if !(p > 0.0 && p <= 1.0) => bad.push((
                "hedge percentile",
                p.to_string(),
                "must be more than 0 and at most 1",
            )),
            _ => {}
        }
        if !(0.0..=1.0).contains(&self.max_extra) {
            bad.push((
                "hedge max_extra",
                self.max_extra.to_string(),
                "must be from 0 to 1",
            ));
        }
        bad
    }

    /// This hedge's state for one stage.
    pub(crate) fn stage(&self) -> HedgeState {
        HedgeState {
            delay: match self.delay {
                Delay::After(d) => Some(d),
                Delay::Percentile(_) => None,
            },
            quantile: match self.delay {
                Delay::After(_) => None,
                Delay::Percentile(p) => Some(p),
            },
            window: crate::report::latency_histogram(),
            max_extra: self.max_extra,
            calls: 0,
            extra: 0,
            counts: self.counts.clone(),
        }
    }
}

/// A stage's hedging: the delay now, the latencies it comes from, and the budget.
pub(crate) struct HedgeState {
    /// `None`: no call is hedged yet (a percentile without enough calls seen).
    delay: Option<Duration>,
    quantile: Option<f64>,
    window: Histogram<u64>,
    max_extra: f64,
    calls: u64,
    extra: u64,
    counts: Arc<Counts>,
}

impl HedgeState {
    /// A call starts: how long it may take before it is hedged.
    pub(crate) fn launched(&mut self) -> Option<Duration> {
        self.calls += 1;
        self.counts.calls.fetch_add(1, Relaxed);
        self.delay
    }

    /// Whether the stage must time its calls for this hedge (a percentile's sample).
    pub(crate) fn needs_latency(&self) -> bool {
        self.quantile.is_some()
    }

    /// A call answered in `latency` (a percentile's sample).
    pub(crate) fn observe(&mut self, latency: Duration) {
        let Some(q) = self.quantile else {
            return;
        };
        let nanos = latency.as_nanos().min(u128::from(u64::MAX / 2)) as u64;
        let _ = self.window.record(nanos.max(1));
        let seen = self.window.len();
        if seen >= MIN_SAMPLES && (seen % UPDATE_EVERY == 0 || self.delay.is_none()) {
            self.delay = Some(Duration::from_nanos(self.window.value_at_quantile(q)));
        }
        if seen >= WINDOW {
            self.window.reset();
        }
    }

    /// A call is due for a hedge: whether the budget allows it (it is then spent).
    pub(crate) fn may_hedge(&mut self) -> bool {
        if (self.extra + 1) as f64 > self.max_extra * self.calls as f64 {
            return false;
        }
        self.extra += 1;
        self.counts.extra.fetch_add(1, Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_settings_are_named_all_at_once() {
        let bad = Hedge::percentile(f64::NAN).max_extra(-0.5).invalid();
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert_eq!((bad[0].0, bad[0].1.as_str()), ("hedge percentile", "NaN"));
        assert_eq!((bad[1].0, bad[1].1.as_str()), ("hedge max_extra", "-0.5"));
        for p in [0.0, -1.0, 1.5, f64::INFINITY] {
            assert_eq!(Hedge::percentile(p).invalid().len(), 1, "{p}");
        }
        assert_eq!(Hedge::percentile(1.0).invalid().len(), 0);
        assert_eq!(Hedge::after(Duration::ZERO).invalid()[0].0, "hedge");
        assert!(Hedge::after(Duration::MAX).invalid().is_empty());
        assert_eq!(
            Hedge::after(Duration::MAX)
                .max_extra(f64::NAN)
                .invalid()
                .len(),
            1
        );
    }

    #[test]
    fn the_budget_caps_the_extra_calls_at_a_fraction_of_the_calls() {
        let hedge = Hedge::after(Duration::from_millis(1));
        let mut s = hedge.stage();
        let mut extra = 0;
        for _ in 0..100 {
            s.launched();
            if s.may_hedge() {
                extra += 1;
            }
        }
        assert_eq!(extra, 10);
        assert_eq!((hedge.calls(), hedge.extra_calls()), (100, 10));
        let mut none = Hedge::after(Duration::from_millis(1))
            .max_extra(0.0)
            .stage();
        none.launched();
        assert!(!none.may_hedge());
    }

    #[test]
    fn a_percentile_hedges_only_after_enough_calls_at_their_quantile() {
        let mut s = Hedge::percentile(0.9).stage();
        for i in 1..MIN_SAMPLES {
            s.observe(Duration::from_millis(i));
            assert_eq!(s.launched(), None);
        }
        s.observe(Duration::from_millis(MIN_SAMPLES));
        let d = s.launched().expect("enough calls seen");
        // The 0.9 quantile of 1..=20 ms is 18 ms (within the histogram's precision).
        assert!(
            d.abs_diff(Duration::from_millis(18)) < Duration::from_micros(20),
            "{d:?}"
        );
    }

    use crate::prelude::*;
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    use tokio::time::Instant;

    /// A backend on the paused clock: the `n`th call (from 1) of item `x` takes
    /// `ms(x, n)` milliseconds and answers `(x, n)`. It counts calls per item, and the
    /// calls dropped before they answered (cancelled).
    #[derive(Clone)]
    struct Backend {
        ms: fn(u32, u32) -> u64,
        calls: Arc<Mutex<HashMap<u32, u32>>>,
        dropped: Arc<Mutex<Vec<(u32, u32)>>>,
    }

    impl Backend {
        fn new(ms: fn(u32, u32) -> u64) -> Self {
            Backend {
                ms,
                calls: Arc::default(),
                dropped: Arc::default(),
            }
        }

        fn call(&self, x: u32) -> impl Future<Output = (u32, u32)> + Send + use<> {
            let n = {
                let mut calls = self.calls.lock().unwrap();
                let n = calls.entry(x).or_default();
                *n += 1;
                *n
            };
            let (ms, dropped) = ((self.ms)(x, n), self.dropped.clone());
            async move {
                struct Guard(Option<(u32, u32)>, Arc<Mutex<Vec<(u32, u32)>>>);
                impl Drop for Guard {
                    fn drop(&mut self) {
                        if let Some(call) = self.0 {
                            self.1.lock().unwrap().push(call);
                        }
                    }
                }
                let mut guard = Guard(Some((x, n)), dropped);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                guard.0 = None;
                (x, n)
            }
        }

        fn total_calls(&self) -> u32 {
            self.calls.lock().unwrap().values().sum()
        }
    }

    async fn run(
        items: u32,
        workers: usize,
        backend: &Backend,
        hedge: Hedge,
    ) -> (Vec<(u32, u32)>, Report, Duration) {
        let b = backend.clone();
        let t0 = Instant::now();
        let out = Arc::new(Mutex::new(Vec::new()));
        let seen = out.clone();
        let report = Pipeline::from_iter(0..items)
            .map_async("call", move |x| b.call(x))
            .workers(workers)
            .hedge(hedge)
            .inspect(move |r| seen.lock().unwrap().push(*r))
            .run()
            .await
            .unwrap();
        let out = out.lock().unwrap().clone();
        (out, report, t0.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_slower_than_the_delay_is_hedged_and_the_first_answer_wins() {
        // Item 3's first call takes 100 ms; every other call 1 ms.
        let backend = Backend::new(|x, n| if (x, n) == (3, 1) { 100 } else { 1 });
        let hedge = Hedge::after(Duration::from_millis(5)).max_extra(1.0);
        let (out, report, took) = run(10, 16, &backend, hedge.clone()).await;
        // In input order, one result an item; item 3's from its hedge (its second call).
        let expected: Vec<(u32, u32)> = (0..10).map(|x| (x, if x == 3 { 2 } else { 1 })).collect();
        assert_eq!(out, expected);
        // The hedge started at 5 ms and answered at 6: the slow call was dropped then.
        assert_eq!(took, Duration::from_millis(6));
        assert_eq!(*backend.dropped.lock().unwrap(), vec![(3, 1)]);
        assert_eq!((hedge.calls(), hedge.extra_calls()), (10, 1));
        assert_eq!(backend.total_calls(), 11);
        let s = report.stage("call").unwrap();
        assert_eq!((s.received, s.passed, s.failed), (10, 10, 0));
        assert!(report.is_balanced(), "{report}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_caps_the_extra_calls() {
        // Every first call is slow, every hedge quick: only the budget stops hedges.
        let backend = Backend::new(|_, n| if n == 1 { 100 } else { 1 });
        let hedge = Hedge::after(Duration::from_millis(5)).max_extra(0.2);
        let (mut out, report, took) = run(10, 16, &backend, hedge.clone()).await;
        assert_eq!((hedge.calls(), hedge.extra_calls()), (10, 2));
        assert_eq!(backend.total_calls(), 12);
        out.sort_unstable();
        let hedged: Vec<u32> = out.iter().filter(|r| r.1 == 2).map(|r| r.0).collect();
        assert_eq!(hedged, vec![0, 1], "the first two due were hedged");
        assert_eq!(out.len(), 10, "one result an item: {out:?}");
        assert_eq!(took, Duration::from_millis(100));
        assert!(report.is_balanced(), "{report}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_percentile_hedges_the_calls_slower_than_the_recent_ones() {
        // One call at a time: 1 ms each, but item 50's first call takes 100 ms.
        let backend = Backend::new(|x, n| if (x, n) == (50, 1) { 100 } else { 1 });
        let hedge = Hedge::percentile(0.95);
        let (out, report, took) = run(100, 1, &backend, hedge.clone()).await;
        assert_eq!((hedge.calls(), hedge.extra_calls()), (100, 1));
        assert_eq!(out[50], (50, 2));
        assert_eq!(out.len(), 100);
        // 99 calls of 1 ms, and item 50 answered 1 ms after its hedge started: at the p95
        // of 1 ms calls (the histogram's 1.000x ms, which the timer wheel rounds up to 2 ms).
        assert_eq!(took, Duration::from_millis(99 + 2 + 1));
        assert!(report.is_balanced(), "{report}");
    }

    #[tokio::test(start_paused = true)]
    async fn no_hedge_starts_after_a_graceful_stop() {
        let backend = Backend::new(|_, n| if n == 1 { 100 } else { 1 });
        let hedge = Hedge::after(Duration::from_millis(50)).max_extra(1.0);
        let b = backend.clone();
        let handle = Pipeline::from_iter(0..1u32)
            .map_async("call", move |x| b.call(x))
            .hedge(hedge.clone())
            .run()
            .spawn();
        tokio::time::sleep(Duration::from_millis(10)).await;
        handle.stop();
        let report = handle.join().await.unwrap();
        assert_eq!(hedge.extra_calls(), 0);
        assert_eq!(backend.total_calls(), 1);
        assert_eq!(
            report.stage("call").unwrap().passed,
            1,
            "the call in flight finished"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_delay_of_duration_max_never_hedges() {
        let backend = Backend::new(|_, _| 1_000);
        let hedge = Hedge::after(Duration::MAX).max_extra(1.0);
        let (out, _, _) = run(3, 4, &backend, hedge.clone()).await;
        assert_eq!((out.len(), hedge.extra_calls()), (3, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn hostile_settings_fail_the_run_before_it_starts_naming_them() {
        let ran = Arc::new(AtomicBool::new(false));
        let r = ran.clone();
        let err = Pipeline::from_iter(0..3u32)
            .map_async("call", move |x| {
                r.store(true, SeqCst);
                async move { x }
            })
            .hedge(Hedge::percentile(f64::NAN).max_extra(2.0))
            .run()
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("hedge percentile") && err.contains("NaN"),
            "{err}"
        );
        assert!(
            err.contains("hedge max_extra") && err.contains('2'),
            "{err}"
        );
        assert!(!ran.load(SeqCst));
    }

    /// A hedge's second call would pass no gate: a stage with one refuses the hedge before
    /// the run starts, instead of letting calls past its rate or in-flight limit.
    #[tokio::test(start_paused = true)]
    async fn a_hedge_beside_a_rate_or_inflight_limit_is_refused_by_name() {
        let err = Pipeline::from_iter(0..3u32)
            .map_async("call", |x| async move { x })
            .rate_limit(crate::Rate::per_second(10))
            .hedge(Hedge::after(Duration::from_millis(5)))
            .run()
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("hedge") && err.contains("rate_limit"), "{err}");
        let shared = crate::Inflight::new(2);
        let err = Pipeline::from_iter(0..3u32)
            .map_async("call", |x| async move { x })
            .inflight(&shared)
            .hedge(Hedge::after(Duration::from_millis(5)))
            .run()
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot be combined"), "{err}");
    }
}
