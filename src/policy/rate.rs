//! `Rate`: a GCRA rate limiter on tokio's clock, shareable by several stages and pipelines.
//!
//! Why not governor: governor keeps its own clock, so paused-clock tests cannot drive it, and
//! it grants one permit per wake-up. tokio's timer has a 1 ms resolution, so at 10,000/s a
//! limiter that releases one permit per wake-up delivers a fraction of the rate. This one
//! hands a waiting caller every permit whose slot has passed while it waited (bounded by
//! [`CATCH_UP`]), so the long-run rate is exact and no burst beyond what was asked for is
//! ever released to a caller that was not already waiting.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use crate::policy::{Admission, Invalid, Policy, Verdict};

/// How far back a late wake-up may claim the slots it was owed. Covers timer granularity
/// (1 ms) and ordinary scheduling delays, and no more: what a late wake-up releases at once
/// is at most 2 ms of the rate, so any 10 ms window holds at most 1.2× its share, and a
/// longer stall costs those slots instead of turning into a burst. (10 ms here let a
/// 3 ms scheduling hiccup on a loaded machine put 1.35× the rate into one window.)
const CATCH_UP: Duration = Duration::from_millis(2);

struct Inner {
    count: u64,
    period: Duration,
    burst: u64,
    /// The time between two permits (`period / count`).
    interval: Duration,
    /// How far ahead of its slot a permit may go: `(burst - 1) * interval`.
    tolerance: Duration,
    /// The theoretical arrival time of the next permit (GCRA's TAT).
    tat: Mutex<Option<Instant>>,
}

/// A rate: at most `count` items per `period`, evenly spaced (GCRA). Without
/// [`burst`](Rate::burst) no two items are closer than `period / count`; a rate limit delays
/// items, it never drops them.
///
/// A `Rate` is a handle: clones share one budget, so a `Rate` given to two stages (or two
/// pipelines) holds their sum to the rate. It runs on tokio's clock, so it works (exactly)
/// under a paused clock in tests.
///
/// ```
/// use flowline::prelude::*;
/// use std::time::Duration;
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let start = tokio::time::Instant::now();
/// let report = Pipeline::from_iter(0..11u32)
///     .map_async("call", |x| async move { x })
///     .rate_limit(Rate::per_second(10))
///     .run()
///     .await
///     .unwrap();
/// assert_eq!(report.delivered(), 11);
/// assert_eq!(start.elapsed(), Duration::from_secs(1)); // 11 items, 10 gaps of 100 ms
/// # }
/// ```
#[derive(Clone)]
pub struct Rate(Arc<Inner>);

impl fmt::Debug for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Rate({} per {:?}, burst {})",
            self.0.count, self.0.period, self.0.burst
        )
    }
}

impl Rate {
    /// `count` items per second, no burst.
    ///
    /// ```
    /// let r = flowline::Rate::per_second(100);
    /// assert_eq!(r.interval(), std::time::Duration::from_millis(10));
    /// ```
    pub fn per_second(count: u64) -> Self {
        Rate::per(count, Duration::from_secs(1))
    }

    /// `count` items per `period`, no burst.
    ///
    /// ```
    /// use std::time::Duration;
    /// let r = flowline::Rate::per(3, Duration::from_millis(30));
    /// assert_eq!(r.interval(), Duration::from_millis(10));
    /// ```
    pub fn per(count: u64, period: Duration) -> Self {
        Rate::build(count, period, 1)
    }

    /// Lets up to `burst` items pass at once after an idle time (default 1: no burst). The
    /// long-run rate is unchanged. Configure before cloning: the result is a new budget.
    ///
    /// ```
    /// let r = flowline::Rate::per_second(100).burst(20);
    /// assert_eq!(r.burst_size(), 20);
    /// ```
    #[must_use]
    pub fn burst(self, burst: u64) -> Self {
        Rate::build(self.0.count, self.0.period, burst)
    }

    fn build(count: u64, period: Duration, burst: u64) -> Self {
        let interval = if count == 0 {
            Duration::ZERO
        } else {
            let nanos = period.as_nanos() / count as u128;
            Duration::from_nanos(nanos.min(u64::MAX as u128) as u64)
        };
        let tolerance =
            interval.saturating_mul(burst.saturating_sub(1).min(u32::MAX as u64) as u32);
        Rate(Arc::new(Inner {
            count,
            period,
            burst,
            interval,
            tolerance,
            tat: Mutex::new(None),
        }))
    }

    /// The time between two items when no burst is allowed.
    pub fn interval(&self) -> Duration {
        self.0.interval
    }

    /// The burst size (1 = no burst).
    pub fn burst_size(&self) -> u64 {
        self.0.burst
    }

    /// The first invalid setting, as (option, value, reason).
    pub(crate) fn invalid(&self) -> Option<Invalid> {
        let i = &self.0;
        if i.count == 0 {
            return Some((
                "rate",
                format!("0 per {:?}", i.period),
                "count must be at least 1",
            ));
        }
        if i.period.is_zero() || i.interval.is_zero() {
            return Some((
                "rate",
                format!("{} per {:?}", i.count, i.period),
                "the period must be more than zero and at least 1 ns per item",
            ));
        }
        if i.burst == 0 {
            return Some(("burst", "0".into(), "must be at least 1"));
        }
        if i.interval > crate::runtime::time::FAR {
            // A run would wait forever for its second item: a mistake, not a meaning.
            return Some((
                "rate",
                format!("{} per {:?}", i.count, i.period),
                "at least one item per 30 years",
            ));
        }
        None
    }

    /// Takes up to `want` permits at `now` for a caller that has been waiting since `since`.
    /// Returns how many were granted and when the next one is due.
    fn take(&self, now: Instant, since: Instant, want: usize) -> (usize, Instant) {
        let i = &*self.0;
        let floor = since.max(now.checked_sub(CATCH_UP).unwrap_or(now));
        let mut tat = i.tat.lock().unwrap_or_else(|p| p.into_inner());
        let mut granted = 0;
        loop {
            let t = tat.unwrap_or(floor);
            // The earliest time this permit conforms, for a caller waiting since `floor`.
            let slot = t.checked_sub(i.tolerance).unwrap_or(t).max(floor);
            if granted == want || slot > now {
                return (granted, slot);
            }
            *tat = Some(t.max(slot) + i.interval);
            granted += 1;
        }
    }

    /// Polls for up to `want` (≥ 1) permits; `Ready(n)` with `1 ≤ n ≤ want`.
    pub(crate) fn poll_take(
        &self,
        cx: &mut Context<'_>,
        want: usize,
        w: &mut RateWait,
    ) -> Poll<usize> {
        loop {
            let now = Instant::now();
            let since = *w.since.get_or_insert(now);
            let (n, next) = self.take(now, since, want.max(1));
            if n > 0 {
                // `since` stays until the caller says it is idle: while its demand goes on,
                // a late wake-up still gets every slot it was owed, across chunk boundaries.
                return Poll::Ready(n);
            }
            let sleep = w
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(next)));
            sleep.as_mut().reset(next);
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }

    /// Waits for one permit.
    ///
    /// ```
    /// use flowline::Rate;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let rate = Rate::per_second(2);
    /// let t = tokio::time::Instant::now();
    /// for _ in 0..3 { rate.acquire().await; }
    /// assert_eq!(t.elapsed(), std::time::Duration::from_secs(1));
    /// # }
    /// ```
    pub async fn acquire(&self) {
        let mut w = RateWait::default();
        std::future::poll_fn(|cx| self.poll_take(cx, 1, &mut w)).await;
    }
}

/// One caller's waiting state: since when it has wanted a permit, and its timer.
#[derive(Default)]
pub(crate) struct RateWait {
    since: Option<Instant>,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl RateWait {
    /// The caller has nothing to send (or no room): it is owed nothing for the time until
    /// it asks again, so an idle caller never comes back to a burst.
    pub(crate) fn idle(&mut self) {
        self.since = None;
    }
}

impl Policy for Rate {
    fn invalid(&self) -> Option<Invalid> {
        Rate::invalid(self)
    }

    fn admission(&self) -> Box<dyn Admission> {
        Box::new(Permits {
            rate: self.clone(),
            wait: RateWait::default(),
            granted: 0,
        })
    }
}

/// A rate as one stage uses it: permits are taken in batches (as many as could start), and
/// the ones not used yet are kept for the next calls.
struct Permits {
    rate: Rate,
    wait: RateWait,
    granted: usize,
}

impl Admission for Permits {
    fn poll_admit(&mut self, cx: &mut Context<'_>, _call: u64, want: usize) -> Poll<Verdict> {
        if self.granted == 0 {
            match self.rate.poll_take(cx, want, &mut self.wait) {
                Poll::Ready(n) => self.granted = n,
                Poll::Pending => return Poll::Pending,
            }
        }
        self.granted -= 1;
        Poll::Ready(Verdict::Go)
    }

    fn idle(&mut self) {
        self.wait.idle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn no_burst_spaces_every_permit() {
        let r = Rate::per_second(50);
        let t = Instant::now();
        for _ in 0..51 {
            r.acquire().await;
        }
        assert_eq!(t.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn burst_passes_b_at_once_then_the_rate() {
        let r = Rate::per_second(10).burst(5);
        let t = Instant::now();
        for _ in 0..5 {
            r.acquire().await;
        }
        assert_eq!(t.elapsed(), Duration::ZERO);
        r.acquire().await;
        assert_eq!(t.elapsed(), Duration::from_millis(100));
    }

    #[test]
    fn a_late_wake_claims_every_owed_slot_but_no_more() {
        let r = Rate::per_second(100_000); // 10 µs apart
        let t0 = Instant::now();
        assert_eq!(r.take(t0, t0, 1000).0, 1);
        // Woken 1 ms late, waiting since t0: 100 slots passed (t0+10µs ..= t0+1ms).
        let now = t0 + Duration::from_millis(1);
        assert_eq!(r.take(now, t0, 1000).0, 100);
        assert_eq!(r.take(now, now, 1000).0, 0);
    }

    #[test]
    fn an_idle_limiter_does_not_bank_a_burst() {
        let r = Rate::per_second(1000);
        let t0 = Instant::now();
        assert_eq!(r.take(t0, t0, 10).0, 1);
        let later = t0 + Duration::from_secs(5);
        assert_eq!(r.take(later, later, 10).0, 1);
    }

    #[test]
    fn invalid_settings_are_named() {
        assert_eq!(Rate::per_second(0).invalid().unwrap().0, "rate");
        assert_eq!(Rate::per(1, Duration::ZERO).invalid().unwrap().0, "rate");
        assert_eq!(Rate::per_second(1).burst(0).invalid().unwrap().0, "burst");
        assert!(Rate::per_second(1).invalid().is_none());
    }

    mod stage {
        use crate::prelude::*;
        use std::sync::{Arc, Mutex};
        use std::time::Duration;
        use tokio::time::Instant;

        /// A call that records when it started (ms since `t0`).
        fn recorder(
            t0: Instant,
            log: Arc<Mutex<Vec<u64>>>,
        ) -> impl Fn(u32) -> std::future::Ready<u32> + Send + Clone + 'static {
            move |x| {
                log.lock().unwrap().push(t0.elapsed().as_millis() as u64);
                std::future::ready(x)
            }
        }

        #[tokio::test(start_paused = true)]
        async fn n_items_at_r_per_second_take_n_minus_one_over_r() {
            let t0 = Instant::now();
            let log = Arc::new(Mutex::new(Vec::new()));
            let report = Pipeline::from_iter(0..41u32)
                .map_async("call", recorder(t0, log.clone()))
                .workers(8)
                .rate_limit(Rate::per_second(20))
                .run()
                .await
                .unwrap();
            assert_eq!(t0.elapsed(), Duration::from_secs(2));
            assert_eq!(
                *log.lock().unwrap(),
                (0..41).map(|k| k * 50).collect::<Vec<u64>>()
            );
            assert_eq!(report.delivered(), 41);
        }

        #[tokio::test(start_paused = true)]
        async fn burst_b_passes_the_first_b_at_once() {
            let t0 = Instant::now();
            let log = Arc::new(Mutex::new(Vec::new()));
            Pipeline::from_iter(0..7u32)
                .map_async("call", recorder(t0, log.clone()))
                .workers(8)
                .rate_limit(Rate::per_second(10).burst(4))
                .run()
                .await
                .unwrap();
            assert_eq!(*log.lock().unwrap(), vec![0, 0, 0, 0, 100, 200, 300]);
        }

        #[tokio::test(start_paused = true)]
        async fn one_rate_shared_by_two_stages_holds_their_sum() {
            let t0 = Instant::now();
            let log = Arc::new(Mutex::new(Vec::new()));
            let rate = Rate::per_second(100);
            let a = Pipeline::from_iter(0..50u32)
                .map_async("a", recorder(t0, log.clone()))
                .workers(4)
                .rate_limit(rate.clone())
                .run();
            let b = Pipeline::from_iter(0..50u32)
                .map_async("b", recorder(t0, log.clone()))
                .workers(4)
                .rate_limit(rate)
                .run();
            let (ra, rb) = tokio::join!(a, b);
            assert_eq!(ra.unwrap().delivered() + rb.unwrap().delivered(), 100);
            let mut times = log.lock().unwrap().clone();
            times.sort();
            // 100 calls in 100 distinct 10 ms slots: never two at once, none early.
            assert_eq!(times, (0..100).map(|k| k * 10).collect::<Vec<u64>>());
        }

        #[tokio::test]
        async fn a_bad_rate_names_the_stage_field_and_value() {
            let err = Pipeline::from_iter(0..3u32)
                .map_async("call", |x| async move { x })
                .rate_limit(Rate::per(5, Duration::ZERO))
                .run()
                .await
                .unwrap_err();
            assert_eq!(
                err.to_string(),
                "invalid configuration: stage `call`: rate = 5 per 0ns: the period must be more than zero and at least 1 ns per item"
            );
        }
    }
}
