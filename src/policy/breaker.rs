//! `Breaker`: a circuit breaker shared by the stages it is given to. Closed: calls go through
//! and outcomes are counted. Open (tripped): no calls for a cooldown; the stage either pauses
//! its run's source ([`OnOpen::Pause`], the default) or fails items fast ([`OnOpen::FailFast`]).
//! Half-open: a few probe calls decide between closing and opening again.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use crate::failure::ItemError;
use crate::policy::{Admission, Finished, Held, Holds, Invalid, Policy, Verdict};

/// The state of a circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// Tripped: no calls until the cooldown ends.
    Open,
    /// Cooldown over: probe calls decide.
    HalfOpen,
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half-open",
        })
    }
}

/// What a stage does with its items while its breaker is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OnOpen {
    /// Pause the job until a probe succeeds (the default): the run's source pulls nothing,
    /// the stage starts no call, and the items whose calls failed while the breaker opened
    /// (the calls that tripped it, calls that ended after it opened, failed probes) are not
    /// failed: they wait for the breaker and are tried again. An outage that ends costs no
    /// item. The bound for an item that keeps failing is
    /// [`Breaker::hold_attempts`].
    #[default]
    Pause,
    /// Fail each item at once with [`ItemError::CircuitOpen`](crate::ItemError::CircuitOpen)
    /// (it goes to the dead letters).
    FailFast,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Trip {
    Consecutive(u32),
    Ratio {
        ratio: f64,
        window: usize,
        min_calls: usize,
    },
}

/// What a breaker did, for a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BreakerReport {
    /// Times it opened (tripped, or a probe failed).
    pub opened: u64,
    /// Times it went half-open.
    pub half_opened: u64,
    /// Times it closed again.
    pub closed: u64,
    /// Calls refused while open (failed fast or held).
    pub rejected: u64,
    /// Successful and failed calls it counted.
    pub calls: u64,
}

type OnChange = Arc<dyn Fn(BreakerState, BreakerState) + Send + Sync>;
type Classifier = Arc<dyn Fn(&ItemError) -> bool + Send + Sync>;

/// Attempts an item may make in all while a pausing breaker holds it (see
/// [`Breaker::hold_attempts`]).
const HOLD_ATTEMPTS: u32 = 10;

struct State {
    state: BreakerState,
    consecutive: u32,
    window: VecDeque<bool>,
    window_failures: usize,
    open_until: Option<Instant>,
    probes_started: u32,
    probes_ok: u32,
    wakers: Vec<Waker>,
    report: BreakerReport,
}

impl State {
    /// A new breaker's state: closed, nothing seen.
    fn closed() -> Self {
        State {
            state: BreakerState::Closed,
            consecutive: 0,
            window: VecDeque::new(),
            window_failures: 0,
            open_until: None,
            probes_started: 0,
            probes_ok: 0,
            wakers: Vec::new(),
            report: BreakerReport::default(),
        }
    }
}

struct Inner {
    trip: Trip,
    cooldown: Duration,
    probes: u32,
    on_open: OnOpen,
    on_change: Option<OnChange>,
    /// Which errors count as failures (`None`: every error but a policy's refusal).
    counts: Option<Classifier>,
    hold_attempts: u32,
    /// `BreakerState as u8`: lets a closed breaker admit a call with one load.
    fast: AtomicU8,
    rejected: AtomicU64,
    state: Mutex<State>,
}

/// A circuit breaker. Trips on `n` consecutive failures, or on a failure ratio over the last
/// `window` calls once at least `min_calls` were made; stays open for a cooldown (default
/// 10 s); then lets `probes` calls through (default 1) — if they all succeed it closes, if
/// one fails it opens again. Clones share one state (one backend, several stages).
///
/// Every state change calls [`on_state_change`](Breaker::on_state_change) and is logged;
/// [`report`](Breaker::report) counts them. Errors classified as
/// [`ItemError::CircuitOpen`](crate::ItemError::CircuitOpen) and
/// [`ItemError::Refused`](crate::ItemError::Refused) (a policy refused the item, no call was
/// made) are not counted as failures.
///
/// ```
/// use flowline::prelude::*;
/// use std::time::Duration;
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let breaker = Breaker::consecutive_failures(3)
///     .cooldown(Duration::from_secs(5))
///     .on_open(OnOpen::FailFast);
/// let report = Pipeline::from_iter(0..10u32)
///     .try_map_async("down", |_| async { Err::<u32, _>("503") })
///     .circuit_breaker(breaker.clone())
///     .run().await.unwrap();
/// assert_eq!(report.failures, 10);
/// assert_eq!(breaker.state(), BreakerState::Open);
/// assert_eq!(breaker.report().rejected, 7);        // 3 real calls, 7 refused
/// # }
/// ```
#[derive(Clone)]
pub struct Breaker(Arc<Inner>);

impl fmt::Debug for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breaker")
            .field("trip", &self.0.trip)
            .field("cooldown", &self.0.cooldown)
            .field("probes", &self.0.probes)
            .field("on_open", &self.0.on_open)
            .field("state", &self.state())
            .finish()
    }
}

/// Whether a call may start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admit {
    Call,
    Probe,
    /// Refused; retry at this time (or when woken by a state change).
    Refused(Option<Instant>),
}

impl Breaker {
    fn build(trip: Trip) -> Self {
        Breaker(Arc::new(Inner {
            trip,
            cooldown: Duration::from_secs(10),
            probes: 1,
            on_open: OnOpen::Pause,
            on_change: None,
            counts: None,
            hold_attempts: HOLD_ATTEMPTS,
            fast: AtomicU8::new(0),
            rejected: AtomicU64::new(0),
            state: Mutex::new(State::closed()),
        }))
    }

    /// Trips after `n` failures in a row (`n` ≥ 1).
    ///
    /// ```
    /// let b = flowline::Breaker::consecutive_failures(5);
    /// assert_eq!(b.state(), flowline::BreakerState::Closed);
    /// ```
    pub fn consecutive_failures(n: u32) -> Self {
        Breaker::build(Trip::Consecutive(n))
    }

    /// Trips when at least `ratio` (within `0..=1`, more than 0) of the last `window` calls
    /// failed, once at least `window / 2` calls were made (see [`min_calls`](Breaker::min_calls)).
    ///
    /// ```
    /// let b = flowline::Breaker::failure_ratio(0.5, 20).min_calls(10);
    /// # let _ = b;
    /// ```
    pub fn failure_ratio(ratio: f64, window: usize) -> Self {
        Breaker::build(Trip::Ratio {
            ratio,
            window,
            min_calls: window.div_ceil(2).max(1),
        })
    }

    fn modify(self, f: impl FnOnce(&mut Inner)) -> Self {
        let mut inner = Arc::try_unwrap(self.0).unwrap_or_else(|shared| Inner {
            trip: shared.trip,
            cooldown: shared.cooldown,
            probes: shared.probes,
            on_open: shared.on_open,
            on_change: shared.on_change.clone(),
            counts: shared.counts.clone(),
            hold_attempts: shared.hold_attempts,
            fast: AtomicU8::new(0),
            rejected: AtomicU64::new(0),
            state: Mutex::new(State::closed()),
        });
        f(&mut inner);
        Breaker(Arc::new(inner))
    }

    /// For a ratio breaker: calls needed in the window before it may trip (≤ window).
    #[must_use]
    pub fn min_calls(self, n: usize) -> Self {
        self.modify(|i| {
            if let Trip::Ratio { ratio, window, .. } = i.trip {
                i.trip = Trip::Ratio {
                    ratio,
                    window,
                    min_calls: n,
                };
            }
        })
    }

    /// How long it stays open before probing (default 10 s; more than zero).
    ///
    /// ```
    /// let b = flowline::Breaker::consecutive_failures(5).cooldown(std::time::Duration::from_secs(30));
    /// # let _ = b;
    /// ```
    #[must_use]
    pub fn cooldown(self, d: Duration) -> Self {
        self.modify(|i| i.cooldown = d)
    }

    /// Probe calls let through when half-open (default 1); all must succeed to close.
    ///
    /// ```
    /// let b = flowline::Breaker::consecutive_failures(5).probes(3);
    /// # let _ = b;
    /// ```
    #[must_use]
    pub fn probes(self, n: u32) -> Self {
        self.modify(|i| i.probes = n)
    }

    /// What stages do while it is open (default [`OnOpen::Pause`]).
    ///
    /// ```
    /// use flowline::{Breaker, OnOpen};
    /// let b = Breaker::consecutive_failures(5).on_open(OnOpen::FailFast);
    /// # let _ = b;
    /// ```
    #[must_use]
    pub fn on_open(self, mode: OnOpen) -> Self {
        self.modify(|i| i.on_open = mode)
    }

    /// Which errors count as failures toward tripping the breaker (default: every error
    /// but a policy's refusal: [`ItemError::CircuitOpen`], [`ItemError::Refused`]). An error
    /// that does not count shows that the backend
    /// answered (a "404 not found" is the item's own failure, not an outage): it counts as a
    /// success, and a pausing breaker never holds its item.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let breaker = Breaker::consecutive_failures(2)
    ///     .counts(|e| !e.to_string().starts_with("404"));
    /// let report = Pipeline::from_iter(0..10u32)
    ///     .try_map_async("api", |_| async { Err::<u32, _>("404 not found") })
    ///     .circuit_breaker(breaker.clone())
    ///     .run().await.unwrap();
    /// assert_eq!(report.failures, 10);                   // each item's own failure
    /// assert_eq!(breaker.report().opened, 0);            // the backend is fine
    /// # }
    /// ```
    #[must_use]
    pub fn counts(self, f: impl Fn(&ItemError) -> bool + Send + Sync + 'static) -> Self {
        let f: Classifier = Arc::new(f);
        self.modify(|i| i.counts = Some(f))
    }

    /// In pause mode: the attempts an item may make in all while the breaker holds it
    /// (default 10, at least 1). An item whose failure counts is held while the breaker is
    /// open or until the breaker shows the failure was the item's own (a later call
    /// succeeded while it stayed closed: the item then fails). A held item is tried again
    /// when calls may go through (held items take turns as probes); at its `n`-th attempt
    /// a failure fails it, so an item that trips the breaker each time it closes ends in
    /// the dead letters after `n` attempts. Each held item's turn as a probe spends one
    /// attempt: an outage is waited out without a loss as long as it is shorter than about
    /// `(n − 1) × held items × cooldown`.
    ///
    /// ```
    /// let b = flowline::Breaker::consecutive_failures(5).hold_attempts(3);
    /// # let _ = b;
    /// ```
    #[must_use]
    pub fn hold_attempts(self, n: u32) -> Self {
        self.modify(|i| i.hold_attempts = n)
    }

    /// Calls `f(from, to)` on every state change (synchronously; keep it short).
    ///
    /// ```
    /// use flowline::Breaker;
    /// let b = Breaker::consecutive_failures(5).on_state_change(|from, to| println!("breaker {from} -> {to}"));
    /// # let _ = b;
    /// ```
    #[must_use]
    pub fn on_state_change(
        self,
        f: impl Fn(BreakerState, BreakerState) + Send + Sync + 'static,
    ) -> Self {
        let f: OnChange = Arc::new(f);
        self.modify(|i| i.on_change = Some(f))
    }

    /// The state now (an open breaker whose cooldown is over still reads `Open` until a
    /// call asks to go through).
    pub fn state(&self) -> BreakerState {
        self.lock().state
    }

    /// Counts of what it did.
    pub fn report(&self) -> BreakerReport {
        let mut r = self.lock().report;
        r.rejected = self.0.rejected.load(Ordering::Relaxed);
        r
    }

    fn mode(&self) -> OnOpen {
        self.0.on_open
    }

    /// Whether `e` counts as a failure.
    fn is_failure(&self, e: &ItemError) -> bool {
        match &self.0.counts {
            Some(f) => f(e),
            None => !e.is_refusal(),
        }
    }

    fn opened(&self) -> u64 {
        self.lock().report.opened
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check(&self) -> Option<Invalid> {
        match self.0.trip {
            Trip::Consecutive(0) => {
                return Some((
                    "breaker.consecutive_failures",
                    "0".into(),
                    "must be at least 1",
                ));
            }
            Trip::Ratio {
                ratio,
                window,
                min_calls,
            } => {
                if !(ratio > 0.0 && ratio <= 1.0) {
                    return Some((
                        "breaker.ratio",
                        format!("{ratio}"),
                        "must be within 0..=1 and more than 0",
                    ));
                }
                if window == 0 {
                    return Some(("breaker.window", "0".into(), "must be at least 1 call"));
                }
                if min_calls == 0 || min_calls > window {
                    return Some((
                        "breaker.min_calls",
                        format!("{min_calls}"),
                        "must be within 1..=window",
                    ));
                }
            }
            _ => {}
        }
        if self.0.cooldown.is_zero() {
            return Some(("breaker.cooldown", "0ns".into(), "must be more than zero"));
        }
        if self.0.probes == 0 {
            return Some(("breaker.probes", "0".into(), "must be at least 1"));
        }
        if self.0.hold_attempts == 0 {
            return Some(("breaker.hold_attempts", "0".into(), "must be at least 1"));
        }
        None
    }

    fn set(&self, s: &mut State, to: BreakerState) {
        let from = s.state;
        if from == to {
            return;
        }
        s.state = to;
        self.0.fast.store(to as u8, Ordering::Release);
        match to {
            BreakerState::Open => {
                s.report.opened += 1;
                s.open_until = Some(crate::util::time::after(Instant::now(), self.0.cooldown));
            }
            BreakerState::HalfOpen => {
                s.report.half_opened += 1;
                s.probes_started = 0;
                s.probes_ok = 0;
            }
            BreakerState::Closed => {
                s.report.closed += 1;
                s.consecutive = 0;
                s.window.clear();
                s.window_failures = 0;
            }
        }
        tracing::info!(%from, %to, "circuit breaker state change");
        if let Some(f) = &self.0.on_change {
            f(from, to);
        }
        for w in s.wakers.drain(..) {
            w.wake();
        }
    }

    /// Asks to start a call. A refused caller is woken on the next state change (register
    /// with `waker`) and should come back at the returned time at the latest.
    fn admit(&self, waker: Option<&Waker>) -> Admit {
        if self.0.fast.load(Ordering::Acquire) == BreakerState::Closed as u8 {
            return Admit::Call;
        }
        let mut s = self.lock();
        let now = Instant::now();
        if s.state == BreakerState::Open && s.open_until.is_some_and(|u| now >= u) {
            self.set(&mut s, BreakerState::HalfOpen);
        }
        let verdict = match s.state {
            BreakerState::Closed => Admit::Call,
            BreakerState::HalfOpen if s.probes_started < self.0.probes => {
                s.probes_started += 1;
                Admit::Probe
            }
            BreakerState::HalfOpen => Admit::Refused(None),
            BreakerState::Open => Admit::Refused(s.open_until),
        };
        if let (Admit::Refused(_), Some(w)) = (verdict, waker) {
            if !s.wakers.iter().any(|x| x.will_wake(w)) {
                s.wakers.push(w.clone());
            }
        }
        verdict
    }

    /// Whether a paused stage must keep its source paused: `None` when calls (or probes) may
    /// go through; else until when (`None` inside: until a state change, which wakes `waker`).
    fn blocked(&self, waker: &Waker) -> Option<Option<Instant>> {
        if self.0.fast.load(Ordering::Acquire) == BreakerState::Closed as u8 {
            return None;
        }
        let mut s = self.lock();
        if s.state == BreakerState::Open && s.open_until.is_some_and(|u| Instant::now() >= u) {
            self.set(&mut s, BreakerState::HalfOpen);
        }
        let until = match s.state {
            BreakerState::Closed => return None,
            BreakerState::HalfOpen if s.probes_started < self.0.probes => return None,
            BreakerState::HalfOpen => None,
            BreakerState::Open => s.open_until,
        };
        if !s.wakers.iter().any(|x| x.will_wake(waker)) {
            s.wakers.push(waker.clone());
        }
        Some(until)
    }

    /// Counts refused calls.
    fn count_rejected(&self, n: u64) {
        self.0.rejected.fetch_add(n, Ordering::Relaxed);
    }

    /// Records finished calls: `(failed, was_probe)` for each, in completion order.
    fn record(&self, outcomes: &[(bool, bool)]) {
        if outcomes.is_empty() {
            return;
        }
        let mut s = self.lock();
        for &(failed, probe) in outcomes {
            s.report.calls += 1;
            match s.state {
                BreakerState::HalfOpen if probe => {
                    if failed {
                        self.set(&mut s, BreakerState::Open);
                    } else {
                        s.probes_ok += 1;
                        if s.probes_ok >= self.0.probes {
                            self.set(&mut s, BreakerState::Closed);
                        }
                    }
                }
                BreakerState::Closed => self.count_closed(&mut s, failed),
                // Calls that started before it opened: their outcome no longer matters.
                _ => {}
            }
        }
    }

    /// A probe that was let through will not be made: its place goes to the next call.
    fn cancel_probe(&self) {
        let mut s = self.lock();
        if s.state == BreakerState::HalfOpen && s.probes_started > 0 {
            s.probes_started -= 1;
            for w in s.wakers.drain(..) {
                w.wake();
            }
        }
    }

    fn count_closed(&self, s: &mut State, failed: bool) {
        match self.0.trip {
            Trip::Consecutive(n) => {
                s.consecutive = if failed { s.consecutive + 1 } else { 0 };
                if s.consecutive >= n {
                    self.set(s, BreakerState::Open);
                }
            }
            Trip::Ratio {
                ratio,
                window,
                min_calls,
            } => {
                s.window.push_back(failed);
                s.window_failures += failed as usize;
                if s.window.len() > window {
                    let old = s.window.pop_front().unwrap_or(false);
                    s.window_failures -= old as usize;
                }
                let calls = s.window.len();
                if calls >= min_calls && s.window_failures as f64 >= ratio * calls as f64 {
                    self.set(s, BreakerState::Open);
                }
            }
        }
    }
}

impl Policy for Breaker {
    fn invalid(&self) -> Option<Invalid> {
        self.check()
    }

    /// 0 closed, 1 half-open, 2 open.
    fn gauge(&self) -> Option<(&'static str, f64)> {
        let state = match self.state() {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 1.0,
            BreakerState::Open => 2.0,
        };
        Some(("flowline_breaker_state", state))
    }

    fn admission(&self) -> Box<dyn Admission> {
        Box::new(Guard {
            breaker: self.clone(),
            sleep: None,
            outcomes: Vec::new(),
            probes: Vec::new(),
            holding: None,
            answered: false,
        })
    }
}

/// A breaker as one stage uses it.
struct Guard {
    breaker: Breaker,
    /// Wakes the stage when the cooldown ends.
    sleep: Option<Pin<Box<Sleep>>>,
    /// Outcomes not yet reported: (failed, probe). Reporting takes the breaker's lock, so
    /// successes are batched per driver turn; what may change the state is reported at once.
    outcomes: Vec<(bool, bool)>,
    /// Calls let through as probes and not finished yet (at most `probes` of them).
    probes: Vec<u64>,
    /// While the stage holds items for this breaker: how many times it had opened when
    /// the first of them was held.
    holding: Option<u64>,
    /// A call succeeded (or failed in a way that does not count) since items were held.
    answered: bool,
}

impl Guard {
    fn report(&mut self) {
        self.breaker.record(&self.outcomes);
        self.outcomes.clear();
    }
}

impl Admission for Guard {
    fn poll_admit(&mut self, cx: &mut Context<'_>, call: u64, _want: usize) -> Poll<Verdict> {
        loop {
            match self.breaker.admit(Some(cx.waker())) {
                Admit::Call => return Poll::Ready(Verdict::Go),
                Admit::Probe => {
                    self.probes.push(call);
                    return Poll::Ready(Verdict::Go);
                }
                Admit::Refused(until) => {
                    if self.breaker.mode() == OnOpen::FailFast {
                        self.breaker.count_rejected(1);
                        return Poll::Ready(Verdict::Refuse(ItemError::CircuitOpen));
                    }
                    // Paused: `poll_pause` holds the source; wait for the cooldown's end or
                    // a state change (the breaker wakes its refused callers).
                    let Some(until) = until else {
                        return Poll::Pending;
                    };
                    if !poll_sleep(&mut self.sleep, until, cx) {
                        return Poll::Pending;
                    }
                }
            }
        }
    }

    fn cancel(&mut self, call: u64) {
        if let Some(i) = self.probes.iter().position(|&p| p == call) {
            self.probes.swap_remove(i);
            self.breaker.cancel_probe();
        }
    }

    fn finished(&mut self, call: &Finished<'_>) {
        let failed = call.error.is_some_and(|e| self.breaker.is_failure(e));
        if !failed {
            self.answered = true;
        }
        let probe = match self.probes.iter().position(|&p| p == call.call) {
            Some(i) => {
                self.probes.swap_remove(i);
                true
            }
            None => false,
        };
        self.outcomes.push((failed, probe));
        if failed || probe {
            self.report();
        }
    }

    fn holds(&mut self) -> Option<&mut dyn Holds> {
        Some(self)
    }

    /// Pause: the source stops as soon as the breaker opens, and goes on when a call may go
    /// through again (a probe needs an item to probe with).
    fn poll_pause(&mut self, cx: &mut Context<'_>) -> bool {
        self.report();
        if self.breaker.mode() != OnOpen::Pause {
            return false;
        }
        // A fired timer means the cooldown is over: the second look finds it half-open.
        for _ in 0..2 {
            match self.breaker.blocked(cx.waker()) {
                None => return false,
                Some(None) => return true,
                Some(Some(until)) => {
                    if !poll_sleep(&mut self.sleep, until, cx) {
                        return true;
                    }
                }
            }
        }
        true
    }
}

impl Holds for Guard {
    fn hold(&mut self, call: &Finished<'_>) -> bool {
        let counts = call.error.is_some_and(|e| self.breaker.is_failure(e));
        if self.breaker.mode() != OnOpen::Pause
            || !counts
            || call.attempts >= self.breaker.0.hold_attempts
        {
            return false;
        }
        if self.holding.is_none() {
            // `finished` has reported this failure: if it tripped the breaker, that counts.
            self.holding = Some(
                self.breaker.opened() - u64::from(self.breaker.state() != BreakerState::Closed),
            );
            self.answered = false;
        }
        true
    }

    /// Held items go again once the breaker opened since they were held and lets calls
    /// through now; they fail if it stayed closed and answered another call meanwhile.
    fn poll_held(&mut self, cx: &mut Context<'_>) -> Held {
        let Some(mark) = self.holding else {
            return Held::Fail;
        };
        self.report();
        let opened = self.breaker.opened() > mark || self.breaker.state() != BreakerState::Closed;
        let decided = if opened {
            match self.breaker.blocked(cx.waker()) {
                None => Held::Again,
                Some(_) => return Held::Wait,
            }
        } else if self.answered {
            Held::Fail
        } else {
            return Held::Undecided;
        };
        self.holding = None;
        decided
    }
}

/// Polls a reusable timer set to `at`; true once it has fired.
fn poll_sleep(slot: &mut Option<Pin<Box<Sleep>>>, at: Instant, cx: &mut Context<'_>) -> bool {
    use std::future::Future;
    let sleep = slot.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
    if sleep.deadline() != at {
        sleep.as_mut().reset(at);
    }
    sleep.as_mut().poll(cx).is_ready()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn every_transition_in_order() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let b = Breaker::consecutive_failures(2)
            .cooldown(Duration::from_secs(1))
            .probes(2)
            .on_state_change(move |f, t| s.lock().unwrap().push((f, t)));
        assert_eq!(b.admit(None), Admit::Call);
        b.record(&[(true, false), (false, false), (true, false)]);
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "a success resets the count"
        );
        b.record(&[(true, false)]);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(matches!(b.admit(None), Admit::Refused(Some(_))));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(b.admit(None), Admit::Probe);
        assert_eq!(b.admit(None), Admit::Probe);
        assert_eq!(b.admit(None), Admit::Refused(None), "only two probes");
        b.record(&[(true, true)]);
        assert_eq!(b.state(), BreakerState::Open, "a failed probe reopens");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(b.admit(None), Admit::Probe);
        assert_eq!(b.admit(None), Admit::Probe);
        b.record(&[(false, true)]);
        assert_eq!(
            b.state(),
            BreakerState::HalfOpen,
            "one of two probes is not enough"
        );
        b.record(&[(false, true)]);
        assert_eq!(b.state(), BreakerState::Closed);
        use BreakerState::*;
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                (Closed, Open),
                (Open, HalfOpen),
                (HalfOpen, Open),
                (Open, HalfOpen),
                (HalfOpen, Closed)
            ]
        );
        let r = b.report();
        assert_eq!((r.opened, r.half_opened, r.closed), (2, 2, 1));
    }

    #[test]
    fn ratio_waits_for_min_calls_then_trips() {
        let b = Breaker::failure_ratio(0.5, 10).min_calls(4);
        b.record(&[(true, false), (true, false), (true, false)]);
        assert_eq!(b.state(), BreakerState::Closed, "3 calls < min_calls");
        b.record(&[(false, false)]);
        assert_eq!(b.state(), BreakerState::Open, "3 of 4 failed");
    }

    #[test]
    fn ratio_window_slides() {
        let b = Breaker::failure_ratio(0.5, 4).min_calls(4);
        b.record(&[
            (true, false),
            (false, false),
            (false, false),
            (false, false),
        ]);
        b.record(&[(false, false), (true, false)]); // the first failure slid out: 1 of 4
        assert_eq!(b.state(), BreakerState::Closed);
        b.record(&[(true, false)]); // 2 of the last 4
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn invalid_settings_are_named() {
        assert_eq!(
            Breaker::consecutive_failures(0).invalid().unwrap().0,
            "breaker.consecutive_failures"
        );
        assert_eq!(Breaker::failure_ratio(1.5, 10).invalid().unwrap().1, "1.5");
        assert_eq!(
            Breaker::failure_ratio(0.5, 10)
                .min_calls(11)
                .invalid()
                .unwrap()
                .0,
            "breaker.min_calls"
        );
        assert_eq!(
            Breaker::consecutive_failures(1)
                .cooldown(Duration::ZERO)
                .invalid()
                .unwrap()
                .0,
            "breaker.cooldown"
        );
    }

    mod stage {
        use crate::prelude::*;
        use std::sync::{Arc, Mutex};
        use std::time::Duration;
        use tokio::time::Instant;

        type Log = Arc<Mutex<Vec<(BreakerState, BreakerState, u64)>>>;

        fn logged(b: Breaker, t0: Instant) -> (Breaker, Log) {
            let log: Log = Arc::new(Mutex::new(Vec::new()));
            let l = log.clone();
            let b = b.on_state_change(move |f, t| {
                l.lock()
                    .unwrap()
                    .push((f, t, t0.elapsed().as_millis() as u64))
            });
            (b, log)
        }

        /// A backend that fails every call made before `healthy_at` ms.
        async fn run_against(breaker: Breaker, healthy_at: u64, t0: Instant) -> Report {
            Pipeline::from_iter(0..10u32)
                .try_map_async("api", move |x| {
                    let down = t0.elapsed().as_millis() < healthy_at as u128;
                    async move {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        if down { Err("503") } else { Ok(x) }
                    }
                })
                .circuit_breaker(breaker)
                .run()
                .await
                .unwrap()
        }

        #[tokio::test(start_paused = true)]
        async fn pause_holds_the_items_until_a_probe_succeeds() {
            let t0 = Instant::now();
            let (b, log) = logged(
                Breaker::consecutive_failures(3).cooldown(Duration::from_secs(1)),
                t0,
            );
            let report = run_against(b.clone(), 3, t0).await;
            use BreakerState::*;
            assert_eq!(
                *log.lock().unwrap(),
                vec![
                    (Closed, Open, 3),
                    (Open, HalfOpen, 1003),
                    (HalfOpen, Closed, 1004)
                ]
            );
            // The three calls that tripped it were held and tried again: nothing failed.
            assert_eq!((report.failures, report.delivered()), (0, 10));
            assert_eq!(b.report().rejected, 0);
            assert!(report.is_balanced());
        }

        #[tokio::test(start_paused = true)]
        async fn a_failed_probe_opens_it_again() {
            let t0 = Instant::now();
            let (b, log) = logged(
                Breaker::consecutive_failures(3).cooldown(Duration::from_secs(1)),
                t0,
            );
            let report = run_against(b, 1500, t0).await;
            use BreakerState::*;
            let states: Vec<_> = log
                .lock()
                .unwrap()
                .iter()
                .map(|(f, t, _)| (*f, *t))
                .collect();
            assert_eq!(
                states,
                vec![
                    (Closed, Open),
                    (Open, HalfOpen),
                    (HalfOpen, Open),
                    (Open, HalfOpen),
                    (HalfOpen, Closed)
                ]
            );
            assert_eq!((report.failures, report.delivered()), (0, 10));
        }

        #[tokio::test(start_paused = true)]
        async fn an_outage_that_ends_costs_no_item() {
            let t0 = Instant::now();
            let calls = Arc::new(Mutex::new(Vec::new()));
            let c = calls.clone();
            let breaker = Breaker::consecutive_failures(3).cooldown(Duration::from_secs(1));
            let out = Collected::new();
            let report = Graph::new()
                .collect(
                    Pipeline::from_iter(0..40u32)
                        .try_map_async("api", move |x| {
                            let at = t0.elapsed().as_millis() as u64;
                            c.lock().unwrap().push(at);
                            async move {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                                if at < 2500 { Err("503") } else { Ok(x) }
                            }
                        })
                        .workers(4)
                        .circuit_breaker(breaker.clone()),
                    &out,
                )
                .run()
                .await
                .unwrap();
            assert_eq!(out.take(), (0..40).collect::<Vec<_>>());
            assert_eq!((report.failures, report.delivered()), (0, 40));
            assert!(report.is_balanced());
            // Four calls failed at once; one probe a second until the backend was back.
            let calls = calls.lock().unwrap().clone();
            assert_eq!(calls[..7], [0, 0, 0, 0, 1010, 2020, 3030]);
            assert_eq!(calls.len(), 40 + 6);
            assert_eq!(breaker.state(), BreakerState::Closed);
        }

        /// Item 5 always fails; the others succeed. Returns the report and the calls made
        /// for item 5.
        async fn one_bad_item(breaker: Breaker) -> (Report, u32) {
            let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
            let c = calls.clone();
            let report = Pipeline::from_iter(0..10u32)
                .try_map_async("api", move |x| {
                    if x == 5 {
                        c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    async move {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        if x == 5 { Err("500") } else { Ok(x) }
                    }
                })
                .circuit_breaker(breaker)
                .run()
                .await
                .unwrap();
            assert!(report.is_balanced());
            let n = calls.load(std::sync::atomic::Ordering::SeqCst);
            (report, n)
        }

        #[tokio::test(start_paused = true)]
        async fn an_item_that_keeps_failing_fails_after_hold_attempts() {
            // It trips the breaker each time: held, then a failed probe, then it fails.
            let b = Breaker::consecutive_failures(1)
                .cooldown(Duration::from_secs(1))
                .hold_attempts(3);
            let (report, calls) = one_bad_item(b.clone()).await;
            assert_eq!((report.failures, report.delivered(), calls), (1, 9, 3));
            assert_eq!(report.failure_sample[0].attempts, 3);
            assert_eq!(b.state(), BreakerState::Closed);
            // It does not trip it: the next item's success shows the failure is its own.
            let b = Breaker::consecutive_failures(3).cooldown(Duration::from_secs(1));
            let (report, calls) = one_bad_item(b.clone()).await;
            assert_eq!((report.failures, report.delivered(), calls), (1, 9, 1));
            assert_eq!(b.report().opened, 0);
        }

        #[tokio::test(start_paused = true)]
        async fn errors_that_do_not_count_never_open_it() {
            let b = Breaker::consecutive_failures(2)
                .cooldown(Duration::from_secs(1))
                .counts(|e| !e.to_string().starts_with("404"));
            let report = Pipeline::from_iter(0..10u32)
                .try_map_async("api", |x| async move {
                    if x % 2 == 0 {
                        Err::<u32, _>("404 not found")
                    } else {
                        Err("404 gone")
                    }
                })
                .circuit_breaker(b.clone())
                .run()
                .await
                .unwrap();
            assert_eq!(report.failures, 10);
            assert!(report.failure_sample.iter().all(|f| f.attempts == 1));
            assert_eq!((b.report().opened, b.state()), (0, BreakerState::Closed));
            assert!(b.clone().hold_attempts(0).check().is_some());
        }

        #[tokio::test(start_paused = true)]
        async fn pause_stops_the_source() {
            let t0 = Instant::now();
            let pulls = Arc::new(Mutex::new(Vec::new()));
            let p = pulls.clone();
            let mut n = 0u32;
            let breaker = Breaker::consecutive_failures(1).cooldown(Duration::from_secs(1));
            let report = Pipeline::from_fn(move || {
                p.lock().unwrap().push(t0.elapsed().as_millis() as u64);
                n += 1;
                let k = n;
                async move {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    (k <= 5).then_some(k)
                }
            })
            .try_map_async("api", move |x| async move {
                if x == 1 { Err("503") } else { Ok(x) }
            })
            .circuit_breaker(breaker)
            .run()
            .await
            .unwrap();
            assert_eq!((report.failures, report.delivered()), (1, 4));
            let pulls = pulls.lock().unwrap().clone();
            assert!(pulls.iter().all(|t| *t <= 10 || *t >= 1010), "{pulls:?}");
        }

        #[tokio::test(start_paused = true)]
        async fn fail_fast_dead_letters_the_items_with_circuit_open() {
            let t0 = Instant::now();
            let b = Breaker::consecutive_failures(3)
                .cooldown(Duration::from_secs(60))
                .on_open(OnOpen::FailFast);
            let report = run_against(b.clone(), u64::MAX, t0).await;
            assert_eq!(report.failures, 10);
            let kinds: Vec<_> = report
                .failure_sample
                .iter()
                .map(|f| f.error.kind())
                .collect();
            assert_eq!(kinds.iter().filter(|k| **k == "error").count(), 3);
            assert_eq!(kinds.iter().filter(|k| **k == "circuit_open").count(), 7);
            assert_eq!(b.report().rejected, 7);
            assert_eq!(report.stage("api").unwrap().failed, 10);
        }

        #[tokio::test]
        async fn a_bad_ratio_names_the_stage_field_and_value() {
            let err = Pipeline::from_iter(0..3u32)
                .map_async("api", |x| async move { x })
                .circuit_breaker(Breaker::failure_ratio(1.5, 10))
                .run()
                .await
                .unwrap_err();
            assert_eq!(
                err.to_string(),
                "invalid configuration: stage `api`: breaker.ratio = 1.5: must be within 0..=1 and more than 0"
            );
        }
    }
}
