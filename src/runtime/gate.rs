//! The source gate: one per run. Sources ask it how many items they may pull; `pause`,
//! `resume`, `step(n)`, `stop` and stage-held pauses (a retry backoff with `pause_source`, an
//! open circuit breaker) all act here, so every source of a run obeys them alike.
//!
//! The gate also knows each source by itself ([`SourceStop`]), so that a stage that wants no
//! more input (`take`, an operator returning `Step::Done`) can stop the sources that feed it
//! and only those: the other pipelines of a graph, and the other outputs of a split, go on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
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
    /// Only touched while the plan is built, and when a source is stopped by a stage.
    sources: Mutex<Sources>,
}

/// One source's own stop switch: the source ends at its next pull, as if exhausted. Only
/// that source: the gate (pause, step, the run-wide stop) is untouched.
#[derive(Clone)]
pub(crate) struct SourceStop {
    stopped: Arc<AtomicBool>,
    gate: Weak<Gate>,
}

impl SourceStop {
    pub(crate) fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Stops the source and wakes it, wherever it waits (on the gate or on its own input:
    /// both register with the gate).
    pub(crate) fn stop(&self) {
        match self.gate.upgrade() {
            // Set under the gate's lock so that a source checking the flag after it
            // registered its waker cannot miss both the flag and the wake-up.
            Some(gate) => gate.update(|_| self.stopped.store(true, Ordering::Release)),
            None => self.stopped.store(true, Ordering::Release),
        }
    }
}

/// Where the sources of a run were built, relative to the splits (forks) of the plan.
#[derive(Default)]
struct Sources {
    /// Every source, in build order, with the splits its items go through.
    list: Vec<(SourceStop, Vec<usize>)>,
    /// The outputs taken from splits, in build order (by split id).
    takes: Vec<usize>,
    /// How many outputs each split has.
    outputs: HashMap<usize, usize>,
}

/// A point in the build of a plan (see [`Gate::mark`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct BuildMark {
    sources: usize,
    takes: usize,
}

impl Gate {
    pub(crate) fn new() -> Self {
        Gate {
            open: AtomicBool::new(true),
            state: Mutex::new(State::default()),
            sources: Mutex::new(Sources::default()),
        }
    }

    fn sources(&self) -> std::sync::MutexGuard<'_, Sources> {
        self.sources.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new source of this run: its own stop switch.
    pub(crate) fn register_source(self: &Arc<Self>) -> SourceStop {
        let stop = SourceStop {
            stopped: Arc::new(AtomicBool::new(false)),
            gate: Arc::downgrade(self),
        };
        self.sources().list.push((stop.clone(), Vec::new()));
        stop
    }

    /// The current point of the build: what is built after it (until [`exclusive_since`])
    /// is the upstream of the stage being built.
    ///
    /// [`exclusive_since`]: Gate::exclusive_since
    pub(crate) fn mark(&self) -> BuildMark {
        let s = self.sources();
        BuildMark {
            sources: s.list.len(),
            takes: s.takes.len(),
        }
    }

    /// The sources built since `mark` feed split `split` (which has `outputs` outputs): they
    /// feed one stage alone only if every output of the split is upstream of that stage.
    pub(crate) fn shared_since(&self, mark: BuildMark, split: usize, outputs: usize) {
        let mut s = self.sources();
        s.outputs.insert(split, outputs);
        for (_, splits) in &mut s.list[mark.sources..] {
            splits.push(split);
        }
    }

    /// One output of split `split` was taken (built into the plan).
    pub(crate) fn took(&self, split: usize) {
        self.sources().takes.push(split);
    }

    /// The sources built since `mark` whose every item reaches the stage built next: a
    /// source behind a split counts only if all the split's outputs were built since `mark`
    /// too (they all lead here, as after a `partition`); otherwise another output still
    /// wants its items.
    pub(crate) fn exclusive_since(&self, mark: BuildMark) -> Vec<SourceStop> {
        let s = self.sources();
        let mut taken: HashMap<usize, usize> = HashMap::new();
        for split in &s.takes[mark.takes..] {
            *taken.entry(*split).or_default() += 1;
        }
        let enclosed = |split: &usize| taken.get(split) == s.outputs.get(split);
        s.list[mark.sources..]
            .iter()
            .filter(|(_, splits)| splits.iter().all(enclosed))
            .map(|(stop, _)| stop.clone())
            .collect()
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

    #[allow(dead_code)]
    pub(crate) fn is_stopped(&self) -> bool {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).stopped
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
    #[allow(dead_code)]
    pub(crate) fn hold(self: &Arc<Self>) -> GateHold {
        self.update(|s| s.holds += 1);
        GateHold(self.clone())
    }
}

/// While alive, the source is paused.
pub(crate) struct GateHold(Arc<Gate>);

impl Drop for GateHold {
    fn drop(&mut self) {
        self.0.update(|s| s.holds -= 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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

    #[test]
    fn a_split_source_is_exclusive_only_when_every_output_is_enclosed() {
        let g = Arc::new(Gate::new());
        let before = g.mark();
        let a = g.register_source();
        let trunk = g.mark();
        let shared = g.register_source();
        g.shared_since(trunk, 7, 2);
        g.took(7);
        // one output of split 7 so far: only `a` feeds this stage alone
        let got = g.exclusive_since(before);
        assert_eq!(got.len(), 1);
        assert!(Arc::ptr_eq(&got[0].stopped, &a.stopped));
        g.took(7);
        // both outputs lead here (a partition merged back): the shared source counts too
        assert_eq!(g.exclusive_since(before).len(), 2);
        // a stage on one output of a split, built first (so it built the trunk): the
        // trunk's source also feeds the other output, so it is not this stage's to stop
        let branch = g.mark();
        let trunk = g.mark();
        g.register_source();
        g.shared_since(trunk, 8, 2);
        g.took(8);
        assert!(g.exclusive_since(branch).is_empty());
        shared.stop();
        assert!(shared.is_stopped() && !a.is_stopped());
        assert_eq!(admit(&g, 4), Poll::Ready(4), "the gate itself stays open");
    }
}
