//! `Rate`: a rate limiter on tokio's clock, shareable by several stages and pipelines.
//!
//! Two rules, both kept for every start:
//! - spacing (GCRA): starts are `period / count` apart, `burst` of them may go at once after
//!   an idle time;
//! - the sliding bound: never more than `count + burst - 1` starts (`count` without a burst)
//!   in any window of one period, measured on the instants the starts were let through (a
//!   call's start; for a `pace`, the end of the handling of its items by the operators
//!   fused after it). A log of the last period's starts enforces it.
//!
//! Why both: tokio's timer has a 1 ms resolution and a loaded machine wakes tasks late, so a
//! limiter that releases one permit per wake-up delivers a fraction of the rate. A waiting
//! caller is therefore handed every permit whose slot passed while it waited (its catch-up,
//! bounded by [`CATCH_UP_SHARE`]); the long-run rate stays exact. A catch-up alone would put a late
//! start and the start `count` slots after it (on time) into one period; the log holds that
//! one back until the late start is one full period ago. Why not governor: it keeps its own
//! clock, so paused-clock tests cannot drive it, and it grants one permit per wake-up.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{Notify, futures::OwnedNotified};
use tokio::time::{Instant, Sleep};

use crate::policy::{Admission, Idles, Invalid, Policy, Verdict, gcra};
use crate::util::time::after;

/// How far back a late wake-up may claim the slots it was owed: [`CATCH_UP_SHARE`] of the
/// period, at least [`CATCH_UP_MIN`]. A wake-up on a loaded machine (other threads on every
/// core) often comes 5–20 ms late; a catch-up shorter than that loses those slots for good,
/// a few per cent of the rate. The sliding bound holds whatever this is: it only trades
/// evenness (what one late wake-up may release at once, at most this share of a period's
/// items) against the rate kept under load; a longer stall costs its slots.
const CATCH_UP_SHARE: u32 = 20;
/// See [`CATCH_UP_SHARE`]: covers the timer's 1 ms granularity at any rate.
const CATCH_UP_MIN: Duration = Duration::from_millis(2);

/// Starts let through within `period / LOG_MERGE` of each other share one record of the log,
/// so the log holds at most about this many records whatever the rate. A record counts its
/// starts at the latest of them (never earlier than they were), so the bound stays strict;
/// the cost is at most `period / LOG_MERGE` of extra wait, once per period.
const LOG_MERGE: u32 = 2048;

/// Starts let through at about one instant.
struct Record {
    /// The first start in it.
    opened: Instant,
    /// The last start in it: the instant all of them count at.
    at: Instant,
    count: u64,
}

struct State {
    params: Params,
    /// The theoretical arrival time of the next permit (GCRA's TAT).
    tat: Option<Instant>,
    /// The starts of the last period, oldest first.
    log: VecDeque<Record>,
    /// The id of `log[0]` (records are numbered in order).
    first: u64,
    /// Starts in the log.
    total: u64,
}

impl State {
    /// Forgets the starts that are one full period old at `now`.
    fn expire(&mut self, now: Instant, period: Duration) {
        while let Some(r) = self.log.front() {
            if after(r.at, period) > now {
                break;
            }
            self.total -= r.count;
            self.log.pop_front();
            self.first += 1;
        }
    }

    /// Logs `count` starts at `now`; returns the id of their record.
    fn push(&mut self, now: Instant, count: u64, merge: Duration) -> u64 {
        self.total += count;
        if let Some(b) = self.log.back_mut() {
            let at = now.max(b.at);
            if at < b.opened + merge {
                b.at = at;
                b.count += count;
                return self.first + self.log.len() as u64 - 1;
            }
        }
        let at = self.log.back().map_or(now, |b| now.max(b.at));
        self.log.push_back(Record {
            opened: at,
            at,
            count,
        });
        self.first + self.log.len() as u64 - 1
    }

    /// Takes up to `count` starts out of record `id` (if it is still in the log).
    fn remove(&mut self, id: u64, count: u64) {
        if let Some(r) = id
            .checked_sub(self.first)
            .and_then(|i| self.log.get_mut(i as usize))
        {
            let n = count.min(r.count);
            r.count -= n;
            self.total -= n;
        }
    }

    /// `count` starts of record `id` happen only at `now`: they count from then.
    fn restamp(
        &mut self,
        id: u64,
        count: u64,
        now: Instant,
        period: Duration,
        merge: Duration,
    ) -> u64 {
        self.remove(id, count);
        self.expire(now, period);
        self.push(now, count, merge)
    }

    /// When the oldest start in the log is one period old.
    fn frees_at(&self, period: Duration) -> Option<Instant> {
        self.log
            .iter()
            .find(|r| r.count > 0)
            .map(|r| after(r.at, period))
    }
}

/// A rate's settings, and what follows from them.
#[derive(Clone, Copy)]
struct Params {
    count: u64,
    period: Duration,
    burst: u64,
    /// The time between two permits (`period / count`).
    interval: Duration,
    /// How far ahead of its slot a permit may go: `(burst - 1) * interval`.
    tolerance: Duration,
    /// Starts allowed in any window of one period: `count + burst - 1`.
    cap: u64,
    /// See [`LOG_MERGE`].
    merge: Duration,
    /// See [`CATCH_UP_SHARE`].
    catch_up: Duration,
}

impl Params {
    fn new(count: u64, period: Duration, burst: u64) -> Self {
        let interval = if count == 0 {
            Duration::ZERO
        } else {
            let nanos = period.as_nanos() / count as u128;
            Duration::from_nanos(nanos.min(u64::MAX as u128) as u64)
        };
        Params {
            count,
            period,
            burst,
            interval,
            tolerance: interval.saturating_mul(burst.saturating_sub(1).min(u32::MAX as u64) as u32),
            cap: count.saturating_add(burst.saturating_sub(1)),
            merge: period / LOG_MERGE,
            catch_up: (period / CATCH_UP_SHARE).max(CATCH_UP_MIN),
        }
    }
}

/// The settings live under the same lock as the budget, so that [`Rate::set`] changes them
/// between two takes, never during one.
struct Inner {
    state: Mutex<State>,
    /// Notified when the settings change: a raised rate may let a waiting caller go sooner
    /// than the timer it sleeps on. A caller that stops waiting drops its registration.
    changed: Arc<Notify>,
}

/// What one take granted.
struct Grant {
    /// Permits granted (0: wait until `next`).
    n: usize,
    /// When the next permit may be due.
    next: Instant,
    /// The log record the granted permits were counted in.
    record: u64,
    /// The TAT right after this grant.
    tat: Option<Instant>,
}

/// A rate: at most `count` items per `period`, evenly spaced. Without
/// [`burst`](Rate::burst) items are `period / count` apart and no window of one period (a
/// sliding one, starting anywhere) ever holds more than `count` of them, however late the
/// runtime wakes; with a burst `b`, `b` may pass at once after an idle time and no window
/// of one period holds more than `count + b - 1`. A rate limit delays items, it never drops
/// them.
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
        let p = self.params();
        write!(f, "Rate({} per {:?}, burst {})", p.count, p.period, p.burst)
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
    /// long-run rate is unchanged; a window of one period holds at most `count + burst - 1`
    /// items. Configure before cloning: the result is a new budget.
    ///
    /// ```
    /// let r = flowline::Rate::per_second(100).burst(20);
    /// assert_eq!(r.burst_size(), 20);
    /// ```
    #[must_use]
    pub fn burst(self, burst: u64) -> Self {
        let p = self.params();
        Rate::build(p.count, p.period, burst)
    }

    fn build(count: u64, period: Duration, burst: u64) -> Self {
        Rate(Arc::new(Inner {
            state: Mutex::new(State {
                params: Params::new(count, period, burst),
                tat: None,
                log: VecDeque::new(),
                first: 0,
                total: 0,
            }),
            changed: Arc::new(Notify::new()),
        }))
    }

    fn params(&self) -> Params {
        self.state().params
    }

    /// The time between two items when no burst is allowed.
    pub fn interval(&self) -> Duration {
        self.params().interval
    }

    /// The burst size (1 = no burst).
    pub fn burst_size(&self) -> u64 {
        self.params().burst
    }

    /// The rate as (count, period): `count` items per `period`.
    ///
    /// ```
    /// use std::time::Duration;
    /// assert_eq!(flowline::Rate::per_second(5).count_per(), (5, Duration::from_secs(1)));
    /// ```
    pub fn count_per(&self) -> (u64, Duration) {
        let p = self.params();
        (p.count, p.period)
    }

    /// Changes this rate, for every stage and pipeline that shares it, while they run: from
    /// the next permit on, the settings of `to` (count, period and burst) hold. The next
    /// permit comes `to`'s interval after the last one (sooner for a raised rate, later for
    /// a lowered one), but not before the change; no window of one new period starting at
    /// or after the change holds more than `to` allows (a window across the change may hold
    /// starts of both rates). Waiting callers are woken to see the new rate. A rate
    /// [`check`](Rate::check) refuses is refused here, and this rate keeps its settings.
    ///
    /// ```
    /// use flowline::Rate;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let api = Rate::per_second(1);
    /// api.acquire().await.unwrap();
    /// api.set(&Rate::per_second(100)).unwrap();
    /// let t = tokio::time::Instant::now();
    /// api.acquire().await.unwrap();                          // 10 ms after the last, not 1 s
    /// assert_eq!(t.elapsed(), Duration::from_millis(10));
    /// assert!(api.set(&Rate::per_second(0)).is_err());
    /// assert_eq!(api.interval(), Duration::from_millis(10)); // kept
    /// # }
    /// ```
    pub fn set(&self, to: &Rate) -> Result<(), crate::Error> {
        to.check()?;
        let new = to.params();
        {
            let mut st = self.state();
            let old = std::mem::replace(&mut st.params, new);
            let now = Instant::now();
            // The next permit is the new interval after the last one, and never before the
            // change: a raised rate owes nothing for the time before it.
            st.tat = st.tat.map(|t| match t.checked_sub(old.interval) {
                Some(last) => (last + new.interval).max(now),
                None => t,
            });
            // The windows the new rate bounds start now: the starts before the change count
            // no more (a lowered rate would else wait out a full period of the old one's).
            // Their records' ids fall below `first`, so a restamp of one is a no-op.
            st.first += st.log.len() as u64;
            st.log.clear();
            st.total = 0;
        }
        self.0.changed.notify_waiters();
        Ok(())
    }

    /// The first invalid setting, as (option, value, reason).
    pub(crate) fn invalid(&self) -> Option<Invalid> {
        let i = self.params();
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
        if i.interval > crate::util::time::FAR {
            // A run would wait forever for its second item: a mistake, not a meaning.
            return Some((
                "rate",
                format!("{} per {:?}", i.count, i.period),
                "at least one item per 30 years",
            ));
        }
        None
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes up to `want` permits at `now` for a caller that has been waiting since `since`.
    #[cfg(test)]
    fn take(&self, now: Instant, since: Instant, want: usize) -> Grant {
        self.take_at(&mut self.state(), now, since, want)
    }

    /// Takes up to `want` permits at `now` for a caller that has been waiting since `since`:
    /// each one whose slot has passed (no further back than the catch-up) and that keeps
    /// the last period within the cap. The permits granted are logged at `now`.
    fn take_at(&self, st: &mut State, now: Instant, since: Instant, want: usize) -> Grant {
        let i = st.params;
        let floor = since.max(now.checked_sub(i.catch_up).unwrap_or(now));
        st.expire(now, i.period);
        let room = i.cap.saturating_sub(st.total);
        let mut granted = 0u64;
        let next = loop {
            let decision = gcra::decide(st.tat, i.interval, i.tolerance, floor, now);
            // The earliest time this permit conforms, for a caller waiting since `floor`.
            let slot = decision.conforms_at();
            if granted == room {
                // Full: the next permit waits for the oldest start to be a period old too.
                // An empty log with no room is a rate of 0 per period: nothing ever passes.
                break match st.frees_at(i.period) {
                    Some(f) => f.max(slot),
                    None => after(now, crate::util::time::FAR),
                };
            }
            match decision {
                gcra::Decision::Admit { tat, .. } if (granted as usize) < want => {
                    st.tat = Some(tat);
                    granted += 1;
                }
                _ => break slot,
            }
        };
        let record = if granted > 0 {
            st.push(now, granted, i.merge)
        } else {
            0
        };
        Grant {
            n: granted as usize,
            next,
            record,
            tat: st.tat,
        }
    }

    /// Polls for up to `want` (≥ 1) permits; `Ready` with `1 ≤ n ≤ want`.
    fn poll_grant(&self, cx: &mut Context<'_>, want: usize, w: &mut RateWait) -> Poll<Grant> {
        loop {
            let g = {
                let mut st = self.state();
                // Read under the lock: the instant logged is never before one a concurrent
                // caller logged, and the start follows it at once.
                let now = Instant::now();
                if let Some((record, count)) = w.handed.take() {
                    let p = st.params;
                    st.restamp(record, count, now, p.period, p.merge);
                }
                let since = *w.since.get_or_insert(now);
                let g = self.take_at(&mut st, now, since, want.max(1));
                if g.n == 0 && w.changed.is_none() {
                    // Made under the lock: a change after this take completes it. Kept
                    // across grants, so that a caller waits without an allocation each time.
                    w.changed = Some(Box::pin(self.0.changed.clone().notified_owned()));
                }
                g
            };
            if g.n > 0 {
                // `since` stays until the caller says it is idle: while its demand goes on,
                // a late wake-up still gets every slot it was owed, across chunk boundaries.
                return Poll::Ready(g);
            }
            if let Some(changed) = &mut w.changed
                && changed.as_mut().poll(cx).is_ready()
            {
                // The settings changed since this caller's registration: take again.
                w.changed = None;
                continue;
            }
            let sleep = w
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(g.next)));
            sleep.as_mut().reset(g.next);
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }

    /// Polls for up to `want` (≥ 1) permits for items handed on at once; `Ready(n)` with
    /// `1 ≤ n ≤ want`. The permits count from the caller's next poll (or
    /// [`settle`](Rate::settle)), see [`RateWait::handed`].
    pub(crate) fn poll_take(
        &self,
        cx: &mut Context<'_>,
        want: usize,
        w: &mut RateWait,
    ) -> Poll<usize> {
        self.poll_grant(cx, want, w).map(|g| {
            w.handed = Some((g.record, g.n as u64));
            g.n
        })
    }

    /// Polls for one permit for a caller that starts its call later (a tower service
    /// between `poll_ready` and `call`); `Ready` with the record to pass to
    /// [`restamp`](Rate::restamp) when the call starts.
    #[cfg(feature = "tower")]
    pub(crate) fn poll_permit(&self, cx: &mut Context<'_>, w: &mut RateWait) -> Poll<u64> {
        self.poll_grant(cx, 1, w).map(|g| g.record)
    }

    /// A permit of record `record` is used only now: it counts from now.
    pub(crate) fn restamp(&self, record: u64) -> u64 {
        let mut st = self.state();
        let now = Instant::now();
        let p = st.params;
        st.restamp(record, 1, now, p.period, p.merge)
    }

    /// The permits handed out by the last [`poll_take`](Rate::poll_take) of `w` count from
    /// now: the caller is done with their items (see [`RateWait::handed`]).
    pub(crate) fn settle(&self, w: &mut RateWait) {
        if let Some((record, count)) = w.handed.take() {
            let mut st = self.state();
            let now = Instant::now();
            let p = st.params;
            st.restamp(record, count, now, p.period, p.merge);
        }
    }

    /// `count` permits of record `record` will not be used: they no longer count, and if
    /// no one has taken a permit since (`tat` unchanged), their slots are free again.
    fn give_back(&self, record: u64, count: usize, tat: Option<Instant>) {
        let mut st = self.state();
        st.remove(record, count as u64);
        if st.tat == tat {
            let back = st
                .params
                .interval
                .saturating_mul(count.min(u32::MAX as usize) as u32);
            st.tat = tat.map(|t| t.checked_sub(back).unwrap_or(t));
        }
    }

    /// Checks the rate as a stage does before a run: a count of 0, a period of zero (or less
    /// than 1 ns per item: `1 per 0` would mean no limit at all), a burst of 0 or an interval
    /// over 30 years are refused with [`Error::Config`](crate::Error::Config) naming the
    /// option and the value.
    ///
    /// The constructors take plain integers rather than `NonZeroU64` so that
    /// `Rate::per_second(100)` reads as it says; a bad value is caught here, by every stage
    /// given the rate, and by [`acquire`](Rate::acquire).
    ///
    /// ```
    /// use flowline::Rate;
    /// use std::time::Duration;
    /// assert!(Rate::per_second(10).check().is_ok());
    /// let err = Rate::per(1, Duration::ZERO).check().unwrap_err().to_string();
    /// assert!(err.contains("rate") && err.contains("1 per 0ns"), "{err}");
    /// assert!(Rate::per_second(5).burst(0).check().unwrap_err().to_string().contains("burst"));
    /// ```
    pub fn check(&self) -> Result<(), crate::Error> {
        match self.invalid() {
            Some((option, value, reason)) => {
                Err(crate::Error::config_text("Rate", option, value, reason))
            }
            None => Ok(()),
        }
    }

    /// Waits for one permit. A rate a stage would refuse (see [`check`](Rate::check)) is
    /// refused here too, at once, rather than waiting forever (0 per second) or not at all
    /// (`1 per 0`).
    ///
    /// ```
    /// use flowline::Rate;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let rate = Rate::per_second(2);
    /// let t = tokio::time::Instant::now();
    /// for _ in 0..3 { rate.acquire().await.unwrap(); }
    /// assert_eq!(t.elapsed(), std::time::Duration::from_secs(1));
    /// assert!(Rate::per_second(0).acquire().await.is_err());
    /// # }
    /// ```
    pub async fn acquire(&self) -> Result<(), crate::Error> {
        self.check()?;
        let mut w = RateWait::default();
        std::future::poll_fn(|cx| self.poll_take(cx, 1, &mut w)).await;
        Ok(())
    }
}

/// One caller's waiting state: since when it has wanted a permit, and its timer.
#[derive(Default)]
pub(crate) struct RateWait {
    since: Option<Instant>,
    sleep: Option<Pin<Box<Sleep>>>,
    /// Completed by [`Rate::set`]; made when the caller first has to wait.
    changed: Option<Pin<Box<OwnedNotified>>>,
    /// The record and count of the permits [`Rate::poll_take`] handed out last. Their items
    /// go on to the operators fused after the caller, which handle them (and whatever the
    /// user measures there: a call's start, a timestamp) before the caller is polled again.
    /// Counting the permits from the grant would let any delay between grant and handling
    /// (a preempted thread, the rest of a chunk) put `count + 1` handlings into one period
    /// even though the grants were strictly spaced: when the log is full, the next grant
    /// comes exactly one period after the oldest. Counting them from the next poll makes
    /// the bound hold for what happens downstream too.
    handed: Option<(u64, u64)>,
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

    fn rate(&self) -> Option<&Rate> {
        Some(self)
    }

    fn admission(&self) -> Box<dyn Admission> {
        Box::new(Permits {
            rate: self.clone(),
            wait: RateWait::default(),
            granted: 0,
            record: 0,
            tat: None,
            handed: None,
        })
    }
}

/// A permit handed to a call that has not started yet.
struct Handed {
    call: u64,
    record: u64,
    /// Taken in the same turn as the call starts, with no other call started in between:
    /// the instant it was logged at is the call's start.
    fresh: bool,
}

/// A rate as one stage uses it: permits are taken in batches (as many as could start), and
/// the ones not used yet are kept for the next calls of the same turn. A permit counts from
/// the instant its call starts: one used after other calls started, or after the call
/// waited for a later admission, is logged again when the call starts; the ones left when
/// the stage goes idle are given back.
struct Permits {
    rate: Rate,
    wait: RateWait,
    granted: usize,
    record: u64,
    tat: Option<Instant>,
    handed: Option<Handed>,
}

impl Admission for Permits {
    fn poll_admit(&mut self, cx: &mut Context<'_>, call: u64, want: usize) -> Poll<Verdict> {
        let fresh = self.granted == 0;
        if fresh {
            match self.rate.poll_grant(cx, want, &mut self.wait) {
                Poll::Ready(g) => {
                    self.granted = g.n;
                    self.record = g.record;
                    self.tat = g.tat;
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        self.granted -= 1;
        self.handed = Some(Handed {
            call,
            record: self.record,
            fresh,
        });
        Poll::Ready(Verdict::Go)
    }

    fn cancel(&mut self, call: u64) {
        // The permit is spent (the call was refused by a later admission), logged when taken.
        if self.handed.as_ref().is_some_and(|h| h.call == call) {
            self.handed = None;
        }
    }

    fn started(&mut self, call: u64) {
        if let Some(h) = self.handed.take() {
            if h.call == call && !h.fresh {
                self.rate.restamp(h.record);
            }
        }
    }

    fn idles(&mut self) -> Option<&mut dyn Idles> {
        Some(self)
    }
}

impl Idles for Permits {
    fn idle(&mut self) {
        self.wait.idle();
        if let Some(h) = &mut self.handed {
            // Its call waits for another admission: it starts later than it was logged.
            h.fresh = false;
        }
        if self.granted > 0 {
            self.rate.give_back(self.record, self.granted, self.tat);
            self.granted = 0;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn no_burst_spaces_every_permit() {
        let r = Rate::per_second(50);
        let t = Instant::now();
        for _ in 0..51 {
            r.acquire().await.unwrap();
        }
        assert_eq!(t.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn burst_passes_b_at_once_then_the_rate() {
        let r = Rate::per_second(10).burst(5);
        let t = Instant::now();
        for _ in 0..5 {
            r.acquire().await.unwrap();
        }
        assert_eq!(t.elapsed(), Duration::ZERO);
        r.acquire().await.unwrap();
        assert_eq!(t.elapsed(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_raise_wakes_a_caller_waiting_on_the_old_rate() {
        let r = Rate::per(1, Duration::from_secs(3600));
        r.acquire().await.unwrap();
        let t = Instant::now();
        let waiter = tokio::spawn({
            let r = r.clone();
            async move {
                r.acquire().await.unwrap();
                t.elapsed()
            }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        r.set(&Rate::per_second(10)).unwrap();
        // Woken by the change: it goes at once (its slot, 100 ms after the last, is past).
        assert_eq!(waiter.await.unwrap(), Duration::from_secs(1));
        r.acquire().await.unwrap();
        assert_eq!(t.elapsed(), Duration::from_millis(1100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_change_keeps_the_rate() {
        let r = Rate::per_second(10).burst(3);
        for bad in [
            Rate::per_second(0),
            Rate::per(5, Duration::ZERO),
            Rate::per(u64::MAX, Duration::from_secs(1)),
            Rate::per_second(5).burst(0),
        ] {
            assert!(r.set(&bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            (r.count_per(), r.burst_size()),
            ((10, Duration::from_secs(1)), 3)
        );
    }

    /// Takes up to `want` permits as a pace does; returns how many and when.
    async fn pace_take(r: &Rate, w: &mut RateWait, want: usize) -> (usize, Instant) {
        let n = std::future::poll_fn(|cx| r.poll_take(cx, want, w)).await;
        (n, Instant::now())
    }

    #[tokio::test(start_paused = true)]
    async fn a_pace_permit_counts_until_its_items_are_handled() {
        let r = Rate::per(2, Duration::from_millis(100)); // 50 ms apart, 2 per 100 ms
        let mut w = RateWait::default();
        let t0 = Instant::now();
        assert_eq!(pace_take(&r, &mut w, 1).await.0, 1);
        // The operators after the pace handle the item 30 ms later (a late thread): a
        // timestamp taken there reads 30 ms.
        tokio::time::advance(Duration::from_millis(30)).await;
        let (n, at) = pace_take(&r, &mut w, 1).await;
        assert_eq!((n, at - t0), (1, Duration::from_millis(50)));
        // Counted from the grant, the third would pass at 100 ms: 3 handlings (30, 50, 100)
        // in [30, 130). Counted from its handling it waits for 130 ms.
        let (n, at) = pace_take(&r, &mut w, 1).await;
        assert_eq!((n, at - t0), (1, Duration::from_millis(130)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_settled_pace_counts_its_permits_from_the_settling() {
        let r = Rate::per(1, Duration::from_millis(100));
        let mut w = RateWait::default();
        let t0 = Instant::now();
        pace_take(&r, &mut w, 1).await;
        // Its item is handled by 40 ms, when the pace finds its input empty.
        tokio::time::advance(Duration::from_millis(40)).await;
        r.settle(&mut w);
        w.idle();
        // More input at 60 ms: the slot is at 100 ms, the log holds the first until 140 ms
        // (not 100: counted from the grant; not 160: counted from this pull).
        tokio::time::advance(Duration::from_millis(20)).await;
        let (_, at) = pace_take(&r, &mut w, 1).await;
        assert_eq!(at - t0, Duration::from_millis(140));
    }

    #[test]
    fn a_late_wake_claims_every_owed_slot_but_no_more() {
        let r = Rate::per_second(100_000); // 10 µs apart
        let t0 = Instant::now();
        assert_eq!(r.take(t0, t0, 1000).n, 1);
        // Woken 1 ms late, waiting since t0: 100 slots passed (t0+10µs ..= t0+1ms).
        let now = t0 + Duration::from_millis(1);
        assert_eq!(r.take(now, t0, 1000).n, 100);
        assert_eq!(r.take(now, now, 1000).n, 0);
    }

    #[test]
    fn an_idle_limiter_does_not_bank_a_burst() {
        let r = Rate::per_second(1000);
        let t0 = Instant::now();
        assert_eq!(r.take(t0, t0, 10).n, 1);
        let later = t0 + Duration::from_secs(5);
        assert_eq!(r.take(later, later, 10).n, 1);
    }

    /// The most starts within any half-open period `[t, t + period)`, `t` at a start.
    pub(crate) fn max_in_period(times: &[Duration], period: Duration) -> usize {
        let mut t = times.to_vec();
        t.sort();
        let (mut best, mut j) = (0, 0);
        for i in 0..t.len() {
            while j < t.len() && t[j] < t[i] + period {
                j += 1;
            }
            best = best.max(j - i);
        }
        best
    }

    /// Stalls the runtime: every `every` of its own time, the clock jumps `by` at once, so
    /// timers due inside the jump fire late (a loaded machine, a coarse timer).
    pub(crate) fn stall_every(every: Duration, by: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                tokio::time::advance(by).await;
            }
        })
    }

    /// When each of `n` acquires returned (since the start), with the runtime stalled.
    async fn acquire_times(rate: &Rate, n: usize) -> Vec<Duration> {
        let stall = stall_every(Duration::from_millis(30), Duration::from_millis(3));
        let t0 = Instant::now();
        let mut out = Vec::new();
        for _ in 0..n {
            rate.acquire().await.unwrap();
            out.push(t0.elapsed());
        }
        stall.abort();
        out
    }

    #[tokio::test(start_paused = true)]
    async fn late_wakes_never_let_n_plus_one_into_a_sliding_period() {
        let times = acquire_times(&Rate::per_second(20), 121).await;
        assert_eq!(max_in_period(&times, Duration::from_secs(1)), 20);
        // 6 s of the rate (120 gaps of 50 ms) with the stalls costing a few ms at most.
        let last = *times.last().unwrap();
        assert!(last <= Duration::from_millis(6_010), "{last:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_then_the_rate_never_more_than_n_plus_b_minus_1_per_period() {
        let times = acquire_times(&Rate::per_second(10).burst(4), 64).await;
        assert_eq!(times[..4], [Duration::ZERO; 4]);
        assert_eq!(times[4], Duration::from_millis(100));
        assert_eq!(max_in_period(&times, Duration::from_secs(1)), 13);
    }

    #[tokio::test(start_paused = true)]
    async fn acquire_refuses_what_a_stage_refuses_and_names_the_value() {
        let cases = [
            (Rate::per_second(0), "rate", "0 per 1s"),
            (Rate::per(1, Duration::ZERO), "rate", "1 per 0ns"),
            (
                Rate::per(u64::MAX, Duration::from_secs(1)),
                "rate",
                "per 1s",
            ),
            (Rate::per_second(1).burst(0), "burst", "0"),
            (
                Rate::per(1, Duration::MAX),
                "rate",
                "1 per 18446744073709551615.999999999s",
            ),
        ];
        for (rate, option, value) in cases {
            // Refused at once: no wait, no hang.
            let t = Instant::now();
            let err = rate.acquire().await.unwrap_err();
            assert_eq!(t.elapsed(), Duration::ZERO);
            let crate::Error::Config { problems } = &err else {
                panic!("{err:?}")
            };
            assert_eq!(problems[0].option, option, "{err}");
            assert!(problems[0].value.contains(value), "{err}");
        }
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

        /// A call that records when it started (since `t0`).
        fn stamp(
            t0: Instant,
            log: Arc<Mutex<Vec<Duration>>>,
        ) -> impl Fn(u32) -> std::future::Ready<u32> + Send + Clone + 'static {
            move |x| {
                log.lock().unwrap().push(t0.elapsed());
                std::future::ready(x)
            }
        }

        #[tokio::test(start_paused = true)]
        async fn a_stage_holds_n_per_sliding_period_despite_late_wakes() {
            let stall = super::stall_every(Duration::from_millis(30), Duration::from_millis(3));
            let t0 = Instant::now();
            let log = Arc::new(Mutex::new(Vec::new()));
            let report = Pipeline::from_iter(0..121u32)
                .map_async("call", stamp(t0, log.clone()))
                .workers(8)
                .rate_limit(Rate::per_second(20))
                .run()
                .await
                .unwrap();
            stall.abort();
            assert_eq!(report.delivered(), 121);
            let times = log.lock().unwrap().clone();
            assert_eq!(super::max_in_period(&times, Duration::from_secs(1)), 20);
            let last = *times.iter().max().unwrap();
            assert!(last <= Duration::from_millis(6_010), "{last:?}");
        }

        #[tokio::test(start_paused = true)]
        async fn a_call_held_by_a_later_limit_counts_from_when_it_starts() {
            // Call 0 holds the only in-flight slot for 150 ms: the rate lets call 1 through
            // at 100 ms, but it starts at 150 ms; 10 calls later the rate must count from
            // then, or [150 ms, 1150 ms) holds 11 starts.
            let t0 = Instant::now();
            let log = Arc::new(Mutex::new(Vec::new()));
            let l = log.clone();
            let bound = Inflight::new(1);
            Pipeline::from_iter(0..25u32)
                .map_async("call", move |x| {
                    l.lock().unwrap().push(t0.elapsed());
                    async move {
                        if x == 0 {
                            tokio::time::sleep(Duration::from_millis(150)).await;
                        }
                        x
                    }
                })
                .workers(8)
                .rate_limit(Rate::per_second(10))
                .inflight(&bound)
                .run()
                .await
                .unwrap();
            let times = log.lock().unwrap().clone();
            assert_eq!(times[..3], [0, 150, 200].map(Duration::from_millis));
            assert_eq!(times[11], Duration::from_millis(1150));
            assert_eq!(super::max_in_period(&times, Duration::from_secs(1)), 10);
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
