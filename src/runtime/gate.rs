//! The source gate: one per run. Sources ask it how many items they may pull; `pause`,
//! `resume`, `step(n)`, `stop` and stage-held pauses (a retry backoff with `pause_source`, an
//! open circuit breaker) all act here, so every source of a run obeys them alike.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};

#[derive(Default)]
struct State {
    paused: bool,
    holds: usize,
    permits: u64,
    stopped: bool,
    wakers: Vec<Waker>,
}

impl State {
    fn is_open(&self) -> bool {
        !self.stopped && !self.paused && self.holds == 0
    }
}

pub(crate) struct Gate {
    /// Fast path: true while nothing restricts pulling, so an open gate costs one load.
    open: AtomicBool,
    state: Mutex<State>,
}

impl Gate {
    pub(crate) fn new() -> Self {
        Gate {
            open: AtomicBool::new(true),
            state: Mutex::new(State::default()),
        }
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
        self.open.store(s.is_open(), Ordering::Release);
        for w in s.wakers.drain(..) {
            w.wake();
        }
    }

    /// How many items (at most `want`) a source may pull now; `Ready((0, _))` means stopped.
    /// The flag says the number came from `step` permits: unused ones must be `refund`ed.
    pub(crate) fn poll_admit(&self, cx: &mut Context<'_>, want: usize) -> Poll<(usize, bool)> {
        if self.open.load(Ordering::Acquire) {
            return Poll::Ready((want, false));
        }
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.stopped {
            return Poll::Ready((0, false));
        }
        if s.holds == 0 {
            if !s.paused {
                return Poll::Ready((want, false));
            }
            if s.permits > 0 {
                let k = (want as u64).min(s.permits);
                s.permits -= k;
                return Poll::Ready((k as usize, true));
            }
        }
        Self::register_in(&mut s, cx.waker());
        Poll::Pending
    }

    /// Wakes `waker` on the next change of the gate (a source waiting on its own input
    /// registers here too, so that `stop` ends it promptly).
    pub(crate) fn register(&self, waker: &Waker) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Self::register_in(&mut s, waker);
    }

    fn register_in(s: &mut State, waker: &Waker) {
        if !s.wakers.iter().any(|w| w.will_wake(waker)) {
            s.wakers.push(waker.clone());
        }
    }

    /// Gives back step permits a source was admitted for but did not use.
    pub(crate) fn refund(&self, n: u64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.paused {
            s.permits += n;
        }
    }

    pub(crate) fn pause(&self) {
        self.update(|s| s.paused = true);
    }

    pub(crate) fn resume(&self) {
        self.update(|s| {
            s.paused = false;
            s.permits = 0;
        });
    }

    pub(crate) fn step(&self, n: u64) {
        self.update(|s| s.permits = s.permits.saturating_add(n));
    }

    pub(crate) fn is_paused(&self) -> bool {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.paused || s.holds > 0
    }

    pub(crate) fn stop(&self) {
        self.update(|s| s.stopped = true);
    }

    /// Holds the source paused until the returned guard is dropped (stages use this).
    pub(crate) fn hold(self: &std::sync::Arc<Self>) -> GateHold {
        self.update(|s| s.holds += 1);
        GateHold(self.clone())
    }
}

/// While alive, the source is paused.
pub(crate) struct GateHold(std::sync::Arc<Gate>);

impl Drop for GateHold {
    fn drop(&mut self) {
        self.0.update(|s| s.holds -= 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::task::Waker;

    fn admit(g: &Gate, want: usize) -> Poll<usize> {
        g.poll_admit(&mut Context::from_waker(Waker::noop()), want)
            .map(|(n, _)| n)
    }

    #[test]
    fn step_releases_exactly_n_while_paused() {
        let g = Gate::new();
        assert_eq!(admit(&g, 256), Poll::Ready(256));
        g.pause();
        assert_eq!(admit(&g, 256), Poll::Pending);
        g.step(3);
        assert_eq!(admit(&g, 2), Poll::Ready(2));
        assert_eq!(admit(&g, 256), Poll::Ready(1));
        assert_eq!(admit(&g, 256), Poll::Pending);
        g.resume();
        assert_eq!(admit(&g, 256), Poll::Ready(256));
        g.stop();
        assert_eq!(admit(&g, 256), Poll::Ready(0));
    }

    #[test]
    fn holds_pause_until_every_guard_is_dropped() {
        let g = Arc::new(Gate::new());
        let a = g.hold();
        let b = g.hold();
        assert!(g.is_paused());
        drop(a);
        assert_eq!(admit(&g, 1), Poll::Pending);
        drop(b);
        assert_eq!(admit(&g, 1), Poll::Ready(1));
    }
}
