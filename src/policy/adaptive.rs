//! `Adaptive`: a concurrency limit that follows the backend, like TCP congestion control.
//!
//! Two algorithms, both updated once per window of about `limit` finished calls (one round
//! trip), not per call, so a burst of completions moves the limit by one step, not by many:
//! - AIMD: +1 per window while the stage uses at least half its limit; × `backoff` (0.9)
//!   on overload (an error the user classifies as overload, a timeout, or an average latency
//!   above `latency_limit`).
//! - Vegas (after Netflix concurrency-limits): estimates the calls queued at the backend as
//!   `limit × (1 − base / rtt)` (`rtt`: the window's average latency, `base`: the latency
//!   without a queue); grows while fewer than `alpha` are queued (doubling until it first has
//!   to shrink, like TCP slow start, then `+log10(limit)`), shrinks beyond `beta`, halves on
//!   overload. `alpha` and `beta` are `3·log10(limit)` and `6·log10(limit)` (at least 3 and
//!   6). A queue seen in one window only moves the limit down by one step; a queue that
//!   persists over two windows is halved towards `beta` at once.
//!
//! Vegas's `base` is what a single fast answer must not capture: one cache hit or an
//! instant "404" taken as the backend's latency reads every normal call as queued and pins
//! the limit near its minimum. So only successful calls are timed (an error's latency says
//! nothing about the service), a window's `base` candidate is a low quantile of its
//! latencies (the 10th percentile, and never the fastest call alone), and the base only
//! moves down on those. It moves up only through a probe: the limit drops to 0.9 × the calls
//! the backend serves without a queue (`limit × base / rtt`) until the calls started before
//! have finished and as many again have been timed; the queue has drained by then, and that
//! second window's quantile becomes the base (the window after it, at the restored limit,
//! does not move the limit: its calls started during the probe). A probe runs every
//! [`PROBE_EVERY`] windows, and before cutting a queue that persists (at most every
//! [`PROBE_GAP`] windows): a backend that became slower for good is relearned in a few
//! round trips, instead of reading as a queue forever.
//!
//! The stage reads the limit before starting each call; a lower limit only stops new calls,
//! it never cancels calls in flight.

use std::fmt;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use crate::failure::ItemError;
use crate::policy::{Admission, Finished, Invalid, Policy, TimesCalls, Verdict};

type Predicate = Arc<dyn Fn(&ItemError) -> bool + Send + Sync>;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Algo {
    Aimd {
        backoff: f64,
        latency_limit: Option<Duration>,
    },
    Vegas,
}

/// Vegas: grow while fewer than `VEGAS_ALPHA × log10(limit)` calls are queued, shrink beyond
/// `VEGAS_BETA × log10(limit)` (log10 at least 1). Why scale with the limit: the queue estimate
/// `limit × (1 − base / rtt)` carries the backend's latency jitter times the limit (base is
/// a fast call, rtt an average), so a fixed threshold that suits 10 calls in flight
/// reads plain jitter as a queue at 100 and pins the limit below capacity. Netflix
/// concurrency-limits scales them the same way.
const VEGAS_ALPHA: f64 = 3.0;
const VEGAS_BETA: f64 = 6.0;

/// Vegas: a probe for the no-queue latency every this many windows.
const PROBE_EVERY: u32 = 64;
/// Vegas: a queue that persists is probed first, unless a probe ended fewer than this many
/// windows ago.
const PROBE_GAP: u32 = 8;
/// Vegas: a probe drains the queue to this share of the calls served without a queue (the
/// estimate is noisy; a little below makes sure the backend's queue is empty).
const PROBE_DRAIN: f64 = 0.9;

/// One finished call, as the limit sees it.
#[derive(Debug, Clone, Copy)]
struct Sample {
    latency: Duration,
    /// It failed (its latency is not the service's).
    error: bool,
    overload: bool,
    /// Calls in flight when it finished (itself included).
    inflight: usize,
}

#[derive(Default)]
struct Tally {
    samples: usize,
    ok: u32,
    rtt_sum: Duration,
    /// The latencies of the successful calls (Vegas: for the window's low quantile).
    latencies: Vec<Duration>,
    max_inflight: usize,
    overload: bool,
}

impl Tally {
    /// A low quantile of the window's latencies: the 10th percentile, and at least the
    /// second fastest, so that no single call sets it. `None` with fewer than 2 timed calls.
    fn low(&mut self) -> Option<Duration> {
        let k = (self.latencies.len() / 10).max(2);
        if self.latencies.len() < k {
            return None;
        }
        let (_, kth, _) = self.latencies.select_nth_unstable(k - 1);
        Some(*kth)
    }

    /// Empties the tally, keeping its buffer.
    fn reset(&mut self) {
        let mut latencies = std::mem::take(&mut self.latencies);
        latencies.clear();
        *self = Tally {
            latencies,
            ..Tally::default()
        };
    }
}

/// Vegas: a probe for the latency without a queue.
#[derive(Debug, Clone, Copy)]
struct Probe {
    /// The limit to go back to.
    restore: f64,
    /// Windows finished since it started: the first is the calls started before it, the
    /// second the calls it started (timed), the third (at the restored limit) ends it.
    windows: u32,
}

struct State {
    limit: f64,
    /// Vegas: doubling until the first sign of a queue (like TCP slow start).
    slow_start: bool,
    window: Tally,
    /// Vegas: the latency without a queue.
    base: Option<Duration>,
    /// Vegas: the queue estimated in the previous window (0 before the first).
    last_queued: f64,
    probe: Option<Probe>,
    /// Vegas: windows since the last probe ended.
    since_probe: u32,
}

impl State {
    fn new(limit: f64) -> Self {
        State {
            limit,
            slow_start: true,
            window: Tally::default(),
            base: None,
            last_queued: 0.0,
            probe: None,
            since_probe: 0,
        }
    }
}

struct Inner {
    algo: Algo,
    min: usize,
    max: usize,
    overload_if: Option<Predicate>,
    limit: AtomicUsize,
    state: Mutex<State>,
    /// An option given to an algorithm that has none (rejected rather than lost).
    stray: Option<(&'static str, String)>,
}

/// An adaptive concurrency limit for an async stage
/// ([`AsyncStage::adaptive`](crate::AsyncStage::adaptive)): the number of calls in flight
/// moves between `min` and `max` with the backend's latency and overload errors. Clones
/// share one limit.
///
/// ```
/// use flowline::prelude::*;
/// use std::time::Duration;
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let limit = Adaptive::vegas(1..=64).initial(4);
/// let report = Pipeline::from_iter(0..2_000u32)
///     .map_async("call", |x| async move { tokio::time::sleep(Duration::from_millis(5)).await; x })
///     .adaptive(limit.clone())
///     .run().await.unwrap();
/// assert_eq!(report.delivered(), 2_000);
/// assert!(limit.limit() > 4);          // no latency rise seen: it grew
/// # }
/// ```
#[derive(Clone)]
pub struct Adaptive(Arc<Inner>);

impl fmt::Debug for Adaptive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Adaptive")
            .field("algo", &self.0.algo)
            .field("min", &self.0.min)
            .field("max", &self.0.max)
            .field("limit", &self.limit())
            .finish()
    }
}

impl Adaptive {
    fn build(algo: Algo, range: RangeInclusive<usize>) -> Self {
        let (min, max) = (*range.start(), *range.end());
        let initial = min.max(1);
        Adaptive(Arc::new(Inner {
            algo,
            min,
            max,
            overload_if: None,
            stray: None,
            limit: AtomicUsize::new(initial),
            state: Mutex::new(State::new(initial as f64)),
        }))
    }

    /// Additive increase, multiplicative decrease between `min` and `max` calls in flight.
    ///
    /// ```
    /// let a = flowline::Adaptive::aimd(1..=64);
    /// assert_eq!(a.limit(), 1);
    /// ```
    pub fn aimd(range: RangeInclusive<usize>) -> Self {
        Adaptive::build(
            Algo::Aimd {
                backoff: 0.9,
                latency_limit: None,
            },
            range,
        )
    }

    /// A latency-based limit (TCP Vegas, as in Netflix concurrency-limits).
    ///
    /// ```
    /// let a = flowline::Adaptive::vegas(2..=256);
    /// assert_eq!(a.limit(), 2);
    /// ```
    pub fn vegas(range: RangeInclusive<usize>) -> Self {
        Adaptive::build(Algo::Vegas, range)
    }

    fn modify(self, f: impl FnOnce(&mut Inner)) -> Self {
        let (algo, min, max, overload_if, limit) = (
            self.0.algo,
            self.0.min,
            self.0.max,
            self.0.overload_if.clone(),
            self.limit(),
        );
        let mut inner = Inner {
            algo,
            min,
            max,
            overload_if,
            stray: self.0.stray.clone(),
            limit: AtomicUsize::new(limit),
            state: Mutex::new(State::new(limit as f64)),
        };
        f(&mut inner);
        Adaptive(Arc::new(inner))
    }

    /// The starting limit (default `min`), clamped to the range.
    ///
    /// ```
    /// assert_eq!(flowline::Adaptive::aimd(1..=64).initial(16).limit(), 16);
    /// ```
    #[must_use]
    pub fn initial(self, n: usize) -> Self {
        self.modify(|i| {
            let n = n.clamp(i.min.max(1), i.max.max(1));
            i.limit.store(n, Ordering::Relaxed);
            i.state.get_mut().unwrap_or_else(|p| p.into_inner()).limit = n as f64;
        })
    }

    /// Which errors mean "overloaded" (e.g. HTTP 429 or 503). Timeouts always do.
    ///
    /// ```
    /// let a = flowline::Adaptive::aimd(1..=64).overload_if(|e| e.to_string().starts_with("429"));
    /// # let _ = a;
    /// ```
    #[must_use]
    pub fn overload_if(self, f: impl Fn(&ItemError) -> bool + Send + Sync + 'static) -> Self {
        let f: Predicate = Arc::new(f);
        self.modify(|i| i.overload_if = Some(f))
    }

    /// AIMD only: an average latency above `limit` in a window counts as overload.
    ///
    /// ```
    /// let a = flowline::Adaptive::aimd(1..=64).latency_limit(std::time::Duration::from_millis(50));
    /// # let _ = a;
    /// ```
    #[must_use]
    pub fn latency_limit(self, limit: Duration) -> Self {
        self.modify(|i| {
            if let Algo::Aimd { backoff, .. } = i.algo {
                i.algo = Algo::Aimd {
                    backoff,
                    latency_limit: Some(limit),
                };
            } else {
                i.stray = Some(("adaptive.latency_limit", format!("{limit:?}")));
            }
        })
    }

    /// AIMD only: the factor the limit is multiplied by on overload (default 0.9, within 0..1).
    ///
    /// ```
    /// let a = flowline::Adaptive::aimd(1..=64).backoff(0.5);
    /// # let _ = a;
    /// ```
    #[must_use]
    pub fn backoff(self, factor: f64) -> Self {
        self.modify(|i| {
            if let Algo::Aimd { latency_limit, .. } = i.algo {
                i.algo = Algo::Aimd {
                    backoff: factor,
                    latency_limit,
                };
            } else {
                i.stray = Some(("adaptive.backoff", format!("{factor}")));
            }
        })
    }

    /// The limit now.
    pub fn limit(&self) -> usize {
        self.0.limit.load(Ordering::Relaxed)
    }

    fn is_overload(&self, e: &ItemError) -> bool {
        matches!(e, ItemError::Timeout(_)) || self.0.overload_if.as_ref().is_some_and(|f| f(e))
    }

    fn check(&self) -> Option<Invalid> {
        let i = &*self.0;
        if i.min == 0 {
            return Some(("adaptive.min", "0".into(), "must be at least 1"));
        }
        if i.max < i.min {
            return Some((
                "adaptive",
                format!("{}..={}", i.min, i.max),
                "max must be at least min",
            ));
        }
        if let Algo::Aimd {
            backoff,
            latency_limit,
        } = i.algo
        {
            if !(backoff > 0.0 && backoff < 1.0) {
                return Some((
                    "adaptive.backoff",
                    format!("{backoff}"),
                    "must be within 0..1",
                ));
            }
            if latency_limit.is_some_and(|l| l.is_zero()) {
                return Some((
                    "adaptive.latency_limit",
                    "0ns".into(),
                    "must be more than zero",
                ));
            }
        }
        if let Some((option, value)) = &i.stray {
            return Some((option, value.clone(), "only AIMD has this option"));
        }
        None
    }

    /// Feeds finished calls; updates the limit at the end of each window.
    fn record(&self, samples: &[Sample]) {
        if samples.is_empty() {
            return;
        }
        let i = &*self.0;
        let vegas = i.algo == Algo::Vegas;
        let mut s = i.state.lock().unwrap_or_else(|p| p.into_inner());
        for x in samples {
            let w = &mut s.window;
            w.samples += 1;
            w.max_inflight = w.max_inflight.max(x.inflight);
            w.overload |= x.overload;
            if !x.error {
                w.ok += 1;
                w.rtt_sum += x.latency;
                if vegas {
                    w.latencies.push(x.latency);
                }
            }
            // A probe's first window lets the calls started before it finish (about the
            // limit it restores); its second times the calls it started.
            let window_len = match s.probe {
                Some(p) if p.windows == 0 => p.restore as usize,
                _ => s.limit as usize,
            }
            .max(4);
            if s.window.samples >= window_len {
                let mut w = std::mem::take(&mut s.window);
                let next = if vegas {
                    self.vegas_window(&mut s, &mut w)
                } else {
                    Some(self.next_limit(&mut s, &w))
                };
                w.reset();
                s.window = w;
                if let Some(next) = next {
                    if next < s.limit && s.probe.is_none() {
                        s.slow_start = false;
                    }
                    s.limit = next.clamp(i.min as f64, i.max as f64);
                }
                i.limit.store(s.limit.round() as usize, Ordering::Relaxed);
            }
        }
    }

    /// Vegas at the end of window `w`: the base, the probe, then the limit (`None`: keep
    /// the limit as set, a probe's).
    fn vegas_window(&self, s: &mut State, w: &mut Tally) -> Option<f64> {
        let low = w.low();
        if let Some(mut p) = s.probe {
            p.windows += 1;
            if w.overload {
                // Overloaded even with the queue drained: no time to measure.
                s.probe = None;
                s.since_probe = 0;
                s.limit = p.restore;
                return Some(self.next_limit(s, w));
            }
            return match p.windows {
                1 => {
                    s.probe = Some(p);
                    None
                }
                2 => {
                    // The queue has drained: this window saw the backend's own latency.
                    if let Some(low) = low {
                        s.base = Some(low);
                    }
                    s.probe = Some(p);
                    Some(p.restore)
                }
                _ => {
                    // Calls started during the probe ended in this window: it says nothing
                    // about the restored limit.
                    s.probe = None;
                    s.since_probe = 0;
                    s.last_queued = 0.0;
                    None
                }
            };
        }
        if let Some(low) = low {
            s.base = Some(s.base.map_or(low, |b| b.min(low)));
        }
        s.since_probe = s.since_probe.saturating_add(1);
        let (Some(base), Some(rtt)) = (s.base, w.avg()) else {
            return Some(self.next_limit(s, w));
        };
        let queued = s.limit * (1.0 - base.as_secs_f64() / rtt.as_secs_f64());
        let persists = queued.min(s.last_queued) > vegas_beta(s.limit);
        let due = s.since_probe >= PROBE_EVERY || (persists && s.since_probe >= PROBE_GAP);
        if due && !w.overload && !s.slow_start {
            // Drain to below what the backend serves without a queue, then measure.
            let served = s.limit * (base.as_secs_f64() / rtt.as_secs_f64()).min(1.0);
            s.probe = Some(Probe {
                restore: s.limit,
                windows: 0,
            });
            s.last_queued = 0.0;
            return Some((served * PROBE_DRAIN).floor().max(1.0));
        }
        Some(self.next_limit(s, w))
    }

    fn next_limit(&self, s: &mut State, w: &Tally) -> f64 {
        let limit = s.limit;
        let used = w.max_inflight as f64 * 2.0 >= limit;
        let avg = w.avg();
        match self.0.algo {
            Algo::Aimd {
                backoff,
                latency_limit,
            } => {
                let slow = matches!((avg, latency_limit), (Some(a), Some(l)) if a > l);
                if w.overload || slow {
                    (limit * backoff).floor()
                } else if used {
                    limit + 1.0
                } else {
                    limit
                }
            }
            Algo::Vegas => {
                if w.overload {
                    return (limit / 2.0).floor();
                }
                let (Some(rtt), Some(base)) = (avg, s.base) else {
                    return limit;
                };
                let queued = limit * (1.0 - base.as_secs_f64() / rtt.as_secs_f64());
                // A standing queue shows in consecutive windows; one slow window (a pause of
                // the caller's or the backend's, another process on the CPU) does not mean
                // the backend is past capacity, and cutting the limit on it costs throughput
                // for several round trips while the limit climbs back.
                let steady = queued.min(s.last_queued);
                s.last_queued = queued;
                let step = limit.log10().max(1.0);
                let (alpha, beta) = (VEGAS_ALPHA * step, vegas_beta(limit));
                if queued < alpha {
                    match (used, s.slow_start) {
                        (false, _) => limit,
                        (true, true) => limit * 2.0,
                        (true, false) => limit + step,
                    }
                } else if steady > beta {
                    // Halve the excess: converges in a few round trips from far above.
                    limit - ((steady - beta) / 2.0).max(step).floor()
                } else if queued > beta {
                    limit - step
                } else {
                    limit
                }
            }
        }
    }
}

/// Vegas's `beta` at `limit`: the queue beyond which it shrinks.
fn vegas_beta(limit: f64) -> f64 {
    VEGAS_BETA * limit.log10().max(1.0)
}

impl Tally {
    /// The average latency of the window's successful calls.
    fn avg(&self) -> Option<Duration> {
        (self.ok > 0 && !self.rtt_sum.is_zero()).then(|| self.rtt_sum / self.ok)
    }
}

/// Samples batched before they are reported (each report takes the limit's lock).
const SAMPLE_BATCH: usize = 16;

impl Policy for Adaptive {
    fn invalid(&self) -> Option<Invalid> {
        self.check()
    }

    fn admission(&self) -> Box<dyn Admission> {
        Box::new(Limit {
            adaptive: self.clone(),
            samples: Vec::new(),
        })
    }

    fn gauge(&self) -> Option<(&'static str, f64)> {
        Some(("flowline_adaptive_limit", self.limit() as f64))
    }

    fn moves_limit(&self) -> bool {
        true
    }
}

/// An adaptive limit as one stage uses it: it admits every call (the stage keeps its calls in
/// flight within [`Admission::limit`]) and learns from every finished one.
struct Limit {
    adaptive: Adaptive,
    samples: Vec<Sample>,
}

impl Limit {
    fn report(&mut self) {
        self.adaptive.record(&self.samples);
        self.samples.clear();
    }
}

impl Admission for Limit {
    fn poll_admit(&mut self, _cx: &mut Context<'_>, _call: u64, _want: usize) -> Poll<Verdict> {
        Poll::Ready(Verdict::Go)
    }

    fn finished(&mut self, call: &Finished<'_>) {
        let overload = call.error.is_some_and(|e| self.adaptive.is_overload(e));
        self.samples.push(Sample {
            latency: call.latency.unwrap_or_default(),
            error: call.error.is_some(),
            overload,
            inflight: call.in_flight,
        });
        // Overload acts before the next start; a full batch keeps the limit current when
        // calls finish inline, many in one turn.
        if overload || self.samples.len() >= SAMPLE_BATCH {
            self.report();
        }
    }

    fn poll_pause(&mut self, _cx: &mut Context<'_>) -> bool {
        self.report();
        false
    }

    fn times_calls(&self) -> Option<&dyn TimesCalls> {
        Some(self)
    }
}

impl TimesCalls for Limit {
    fn limit(&self) -> usize {
        self.adaptive.limit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(a: &Adaptive, n: usize, ms: u64, overload: bool) {
        let inflight = a.limit();
        let s = Sample {
            latency: Duration::from_millis(ms),
            error: overload,
            overload,
            inflight,
        };
        a.record(&vec![s; n]);
    }

    #[test]
    fn aimd_adds_one_per_window_and_multiplies_down() {
        let a = Adaptive::aimd(1..=100).initial(10);
        feed(&a, 10, 5, false);
        assert_eq!(a.limit(), 11);
        feed(&a, 11, 5, true);
        assert_eq!(a.limit(), 9); // floor(11 * 0.9)
    }

    #[test]
    fn aimd_does_not_grow_when_the_stage_is_not_using_its_limit() {
        let a = Adaptive::aimd(1..=100).initial(10);
        a.record(&vec![
            Sample {
                latency: Duration::from_millis(5),
                error: false,
                overload: false,
                inflight: 2
            };
            10
        ]);
        assert_eq!(a.limit(), 10);
    }

    #[test]
    fn vegas_halves_a_standing_queue_towards_beta() {
        let a = Adaptive::vegas(1..=100).initial(40);
        feed(&a, 40, 5, false); // base = 5 ms, no queue: grows (slow start doubles)
        assert_eq!(a.limit(), 80);
        feed(&a, 80, 10, false); // half the calls are queued (40), first seen: one step
        assert_eq!(a.limit(), 78); // 80 - log10(80)
        feed(&a, 78, 10, false); // still queued: the excess over beta is halved
        assert_eq!(a.limit(), 65); // 78.1 - floor((39.05 - 6 * log10(78.1)) / 2)
        feed(&a, 65, 5, false); // no queue again: + log10(limit), slow start is over
        assert_eq!(a.limit(), 67);
    }

    #[test]
    fn vegas_takes_one_step_only_for_one_slow_window() {
        let a = Adaptive::vegas(1..=100).initial(40);
        feed(&a, 40, 5, false);
        assert_eq!(a.limit(), 80);
        feed(&a, 80, 10, false); // a hiccup, not a standing queue
        assert_eq!(a.limit(), 78);
        feed(&a, 78, 5, false); // gone: the step is won back at once
        assert_eq!(a.limit(), 80);
    }

    #[test]
    fn vegas_thresholds_scale_with_the_limit() {
        // 100 in flight, 3 in 4 calls at 5 ms and 1 in 4 at 6 ms: the estimate, 4.8 queued,
        // is jitter (100 × (1 − 5 / 5.25)); alpha is 3 × log10(100) = 6, so it still grows.
        let a = Adaptive::vegas(1..=400).initial(100);
        let at = |ms| Sample {
            latency: Duration::from_millis(ms),
            error: false,
            overload: false,
            inflight: 100,
        };
        let mut window = vec![at(5); 75];
        window.extend(vec![at(6); 25]);
        a.record(&window);
        assert_eq!(a.limit(), 200);
    }

    fn at(ms: u64, inflight: usize) -> Sample {
        Sample {
            latency: Duration::from_millis(ms),
            error: false,
            overload: false,
            inflight,
        }
    }

    #[test]
    fn vegas_is_not_captured_by_one_instant_answer() {
        let a = Adaptive::vegas(1..=400).initial(40);
        feed(&a, 40, 5, false);
        assert_eq!(a.limit(), 80);
        // One cache hit among calls that take 5 ms: no queue, slow start goes on.
        let mut window = vec![at(5, 80); 79];
        window.push(at(0, 80));
        a.record(&window);
        assert_eq!(a.limit(), 160);
        feed(&a, 160, 5, false);
        assert_eq!(a.limit(), 320);
    }

    #[test]
    fn vegas_does_not_time_errors() {
        let a = Adaptive::vegas(1..=400).initial(40);
        feed(&a, 40, 5, false);
        // Instant "404"s (errors, not overload) say nothing about the service's latency.
        let mut window = vec![at(5, 80); 60];
        window.extend(vec![
            Sample {
                latency: Duration::ZERO,
                error: true,
                overload: false,
                inflight: 80,
            };
            20
        ]);
        a.record(&window);
        assert_eq!(a.limit(), 160);
    }

    #[test]
    fn vegas_probes_and_relearns_a_slower_backend() {
        let a = Adaptive::vegas(1..=400).initial(40);
        feed(&a, 40, 5, false); // base 5 ms, slow start: 80
        feed(&a, 80, 5, false); // 160
        feed(&a, 160, 15, false); // queue 107: one step (158)
        assert_eq!(a.limit(), 158);
        // Service is 10 ms from now on; the limit is cut twice while it reads as a queue.
        feed(&a, 158, 15, false);
        let mut cuts = vec![a.limit()];
        for _ in 0..12 {
            let l = a.limit();
            feed(&a, l, if l > 100 { 15 } else { 10 }, false);
            cuts.push(a.limit());
        }
        // A persistent queue is probed (8 windows after the start): the limit drains to
        // 0.9 × the calls served, then the base is 10 ms and the limit is restored.
        let s = a.0.state.lock().unwrap();
        assert_eq!(s.base, Some(Duration::from_millis(10)), "{cuts:?}");
        assert!(s.probe.is_none(), "{cuts:?}");
    }

    #[test]
    fn vegas_halves_on_overload() {
        let a = Adaptive::vegas(1..=100).initial(40);
        feed(&a, 40, 5, true);
        assert_eq!(a.limit(), 20);
        feed(&a, 20, 5, true);
        assert_eq!(a.limit(), 10);
    }

    #[test]
    fn invalid_ranges_are_named() {
        #[allow(clippy::reversed_empty_ranges)]
        let bad = Adaptive::aimd(8..=4);
        assert_eq!(bad.invalid().unwrap().1, "8..=4");
        assert_eq!(Adaptive::vegas(0..=4).invalid().unwrap().0, "adaptive.min");
        assert_eq!(
            Adaptive::aimd(1..=4).backoff(1.5).invalid().unwrap().0,
            "adaptive.backoff"
        );
    }

    mod stage {
        use crate::prelude::*;
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        use std::sync::{Arc, Mutex};
        use std::time::Duration;

        const C: usize = 32;
        const BASE: Duration = Duration::from_millis(5);

        /// A backend with capacity C: 5 ms up to C calls at once, slower in proportion beyond
        /// (calls queue), and "503 overloaded" at once past 2C. Returns the limits the stage
        /// ran with, one per call.
        async fn settle(limit: Adaptive, items: u32) -> Vec<usize> {
            let busy = Arc::new(AtomicUsize::new(0));
            let seen = Arc::new(Mutex::new(Vec::new()));
            let (b, s, l) = (busy.clone(), seen.clone(), limit.clone());
            Pipeline::from_iter(0..items)
                .try_map_async("backend", move |x| {
                    let (busy, seen, limit) = (b.clone(), s.clone(), l.clone());
                    async move {
                        seen.lock().unwrap().push(limit.limit());
                        let c = busy.fetch_add(1, SeqCst) + 1;
                        if c > 2 * C {
                            busy.fetch_sub(1, SeqCst);
                            return Err("503 overloaded");
                        }
                        tokio::time::sleep(BASE.mul_f64((c as f64 / C as f64).max(1.0))).await;
                        busy.fetch_sub(1, SeqCst);
                        Ok(x)
                    }
                })
                .unordered()
                .adaptive(limit)
                .run()
                .await
                .unwrap();
            seen.lock().unwrap().clone()
        }

        /// At least 95% of the calls in the last quarter started with the limit within
        /// `lo..=hi`, and all of them within 0.8 × `lo` ..= 1.1 × `hi` (a probe for the
        /// no-queue latency dips below for about two round trips, and the limit it restores
        /// may take a step before the queue shows again).
        fn assert_mostly_within(seen: &[usize], lo: usize, hi: usize) {
            let tail = &seen[seen.len() * 3 / 4..];
            let (min, max) = (*tail.iter().min().unwrap(), *tail.iter().max().unwrap());
            let outside = tail.iter().filter(|l| !(lo..=hi).contains(l)).count();
            assert!(
                min * 10 >= lo * 8 && max * 10 <= hi * 11 && outside * 100 <= tail.len() * 5,
                "limit {min}..={max} not within {lo}..={hi} ({outside} of {} outside)",
                tail.len()
            );
        }

        /// Near capacity: from 3/4 of it up to a queue of beta (6 × log10(42) ≈ 9.7).
        fn assert_settled(seen: &[usize]) {
            assert_mostly_within(seen, C * 3 / 4, C + 10);
        }

        fn overload(e: &ItemError) -> bool {
            e.to_string().starts_with("503")
        }

        #[tokio::test(start_paused = true)]
        async fn vegas_settles_near_capacity_from_below() {
            assert_settled(
                &settle(
                    Adaptive::vegas(1..=512).initial(1).overload_if(overload),
                    20_000,
                )
                .await,
            );
        }

        #[tokio::test(start_paused = true)]
        async fn vegas_settles_near_capacity_from_above() {
            assert_settled(
                &settle(
                    Adaptive::vegas(1..=512).initial(256).overload_if(overload),
                    20_000,
                )
                .await,
            );
        }

        #[tokio::test(start_paused = true)]
        async fn aimd_settles_near_capacity_from_below() {
            let a = Adaptive::aimd(1..=512)
                .initial(1)
                .latency_limit(BASE.mul_f64(1.2))
                .overload_if(overload);
            assert_settled(&settle(a, 20_000).await);
        }

        #[tokio::test(start_paused = true)]
        async fn aimd_settles_near_capacity_from_above() {
            let a = Adaptive::aimd(1..=512)
                .initial(256)
                .latency_limit(BASE.mul_f64(1.2))
                .overload_if(overload);
            assert_settled(&settle(a, 20_000).await);
        }

        /// A server with C slots (a FIFO semaphore) and 5 ms of service per call: above
        /// capacity calls wait in the queue (latency grows, throughput does not), never an
        /// error. Returns the limits the stage ran with, one per call, and the run's time.
        async fn settle_queue(limit: Adaptive, items: u32) -> (Vec<usize>, Duration) {
            serve(limit, items, |_| Some(BASE)).await
        }

        /// The queueing server of [`settle_queue`] where `service(x)` is call `x`'s service
        /// time, `None` for an answer at once (a cache hit: no slot, no wait). Returns the
        /// limits the stage ran with, one per call, and the run's time.
        async fn serve(
            limit: Adaptive,
            items: u32,
            service: impl Fn(u32) -> Option<Duration> + Send + Sync + 'static,
        ) -> (Vec<usize>, Duration) {
            let slots = Arc::new(tokio::sync::Semaphore::new(C));
            let seen = Arc::new(Mutex::new(Vec::new()));
            let service = Arc::new(service);
            let (s, l) = (seen.clone(), limit.clone());
            let t = tokio::time::Instant::now();
            Pipeline::from_iter(0..items)
                .map_async("backend", move |x| {
                    let (slots, seen, limit, service) =
                        (slots.clone(), s.clone(), l.clone(), service.clone());
                    async move {
                        seen.lock().unwrap().push(limit.limit());
                        if let Some(d) = service(x) {
                            let _slot = slots.acquire().await.unwrap();
                            tokio::time::sleep(d).await;
                        }
                        x
                    }
                })
                .unordered()
                .adaptive(limit)
                .run()
                .await
                .unwrap();
            let seen = seen.lock().unwrap().clone();
            (seen, t.elapsed())
        }

        #[tokio::test(start_paused = true)]
        async fn vegas_does_not_collapse_on_instant_answers() {
            // 1 call in 100 is answered at once; the rest queue at a server of C slots.
            let (seen, took) = serve(Adaptive::vegas(1..=512).initial(4), 20_000, |x| {
                (x % 100 != 7).then_some(BASE)
            })
            .await;
            let ideal = BASE * (20_000 - 200) / C as u32;
            assert!(
                took <= ideal.mul_f64(1.03),
                "took {took:?}, ideal {ideal:?}"
            );
            let tail = &seen[seen.len() / 2..];
            assert!(
                *tail.iter().min().unwrap() >= C * 3 / 4,
                "{:?}",
                tail.iter().min()
            );
        }

        #[tokio::test(start_paused = true)]
        async fn vegas_relearns_a_backend_that_became_slower() {
            // Service doubles half way: the first base (5 ms) must not read as a queue forever.
            let (seen, took) = serve(Adaptive::vegas(1..=512).initial(4), 20_000, |x| {
                Some(if x < 10_000 { BASE } else { BASE * 2 })
            })
            .await;
            let ideal = BASE * 10_000 / C as u32 + BASE * 2 * 10_000 / C as u32;
            assert!(
                took <= ideal.mul_f64(1.05),
                "took {took:?}, ideal {ideal:?}"
            );
            let tail = &seen[seen.len() * 3 / 4..];
            let median = {
                let mut t = tail.to_vec();
                t.sort();
                t[t.len() / 2]
            };
            assert!(median >= C, "{median}");
        }

        /// Settled at or above capacity (the server never idles) with a queue of at most
        /// beta (6 × log10(42) ≈ 9.7), and within 2% of the ideal run time (items / C × 5 ms).
        fn assert_saturates(items: u32, (seen, took): (Vec<usize>, Duration)) {
            assert_mostly_within(&seen, C, C + 10);
            let ideal = BASE * items / C as u32;
            assert!(
                took <= ideal.mul_f64(1.02),
                "took {took:?}, ideal {ideal:?}"
            );
        }

        #[tokio::test(start_paused = true)]
        async fn vegas_saturates_a_queueing_server_from_below() {
            let a = Adaptive::vegas(1..=512).initial(1);
            assert_saturates(20_000, settle_queue(a, 20_000).await);
        }

        #[tokio::test(start_paused = true)]
        async fn vegas_saturates_a_queueing_server_from_above() {
            let a = Adaptive::vegas(1..=512).initial(256);
            assert_saturates(20_000, settle_queue(a, 20_000).await);
        }

        #[tokio::test(start_paused = true)]
        async fn a_shrinking_limit_never_cancels_calls_in_flight() {
            // Everything is overloaded: the limit falls to 1 while 64 calls are in flight;
            // each of them still finishes (delivered), none is cancelled.
            let a = Adaptive::aimd(1..=64).initial(64).overload_if(|_| true);
            let report = Pipeline::from_iter(0..64u32)
                .map_async("slow", |x| async move {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    x
                })
                .unordered()
                .adaptive(a)
                .run()
                .await
                .unwrap();
            assert_eq!(report.delivered(), 64);
        }

        #[tokio::test]
        async fn max_below_min_is_rejected_naming_the_values() {
            #[allow(clippy::reversed_empty_ranges)]
            let bad = Adaptive::aimd(16..=4);
            let err = Pipeline::from_iter(0..3u32)
                .map_async("api", |x| async move { x })
                .adaptive(bad)
                .run()
                .await
                .unwrap_err();
            assert_eq!(
                err.to_string(),
                "invalid configuration: stage `api`: adaptive = 16..=4: max must be at least min"
            );
        }
    }
}
