//! The admission chain of an async stage: its policies, asked in the order they were given
//! before each call, told how each call ended, and asked whether the run's source should be
//! paused.

use std::sync::Arc;
use std::task::{Context, Poll};

use crate::failure::ItemError;
use crate::policy::{Admission, Finished, Held, Verdict};
use crate::runtime::Gate;
use crate::runtime::gate::GateHold;

use super::held::decide;

/// What the admissions said about the next call.
#[derive(Debug)]
pub(super) enum Admitted {
    /// Every admission let it through: it starts under this id.
    Go(u64),
    /// An admission refused it: the item fails with the admission's error.
    Refuse(ItemError),
    /// Not yet: admission `usize` is what the call waits for.
    Wait(usize),
}

/// The stage's admissions and where the next call is in asking them.
pub(super) struct Chain {
    admissions: Vec<Box<dyn Admission>>,
    /// `admissions[..granted]` have let the next call through.
    granted: usize,
    /// The id the next call is admitted under.
    next_call: u64,
    /// Some admission times every call and sets the limit on calls in flight (instead of
    /// `workers`).
    times_calls: bool,
    /// Held while an admission wants the run's source paused.
    pause: Option<GateHold>,
}

impl Chain {
    pub(super) fn new(admissions: Vec<Box<dyn Admission>>) -> Self {
        Chain {
            times_calls: admissions.iter().any(|a| a.times_calls().is_some()),
            admissions,
            granted: 0,
            next_call: 0,
            pause: None,
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.admissions.is_empty()
    }

    pub(super) fn times_calls(&self) -> bool {
        self.times_calls
    }

    /// The limit on calls in flight: the least an admission sets, else `workers`.
    #[inline]
    pub(super) fn limit(&self, workers: usize) -> usize {
        if !self.times_calls {
            return workers;
        }
        self.admissions
            .iter()
            .filter_map(|a| a.times_calls().map(|t| t.limit()))
            .min()
            .unwrap_or(workers)
    }

    /// Asks the admissions, in order, to let the next call through (`want`: how many could
    /// start now). An admission's leave is kept until the call starts; if one refuses, the
    /// ones before it are told.
    pub(super) fn admit(&mut self, cx: &mut Context<'_>, want: usize) -> Admitted {
        let call = self.next_call;
        while let Some(a) = self.admissions.get_mut(self.granted) {
            match a.poll_admit(cx, call, want) {
                Poll::Ready(Verdict::Go) => self.granted += 1,
                Poll::Ready(Verdict::Refuse(error)) => {
                    for a in &mut self.admissions[..self.granted] {
                        a.cancel(call);
                    }
                    self.granted = 0;
                    self.next_call += 1;
                    return Admitted::Refuse(error);
                }
                Poll::Pending => return Admitted::Wait(self.granted),
            }
        }
        self.granted = 0;
        self.next_call += 1;
        for a in &mut self.admissions {
            a.started(call);
        }
        Admitted::Go(call)
    }

    /// A call that every admission let through has ended.
    pub(super) fn finished(&mut self, finished: &Finished<'_>) {
        for a in &mut self.admissions {
            a.finished(finished);
        }
    }

    /// Whether an admission holds the item of a failed call to be tried again.
    pub(super) fn holds(&mut self, finished: &Finished<'_>) -> bool {
        let mut hold = false;
        for h in self.admissions.iter_mut().filter_map(|a| a.holds()) {
            hold |= h.hold(finished);
        }
        hold
    }

    /// What to do with the held items now.
    pub(super) fn poll_held(&mut self, cx: &mut Context<'_>) -> Held {
        let verdicts: Vec<Held> = self
            .admissions
            .iter_mut()
            .map(|a| a.holds().map_or(Held::Fail, |h| h.poll_held(cx)))
            .collect();
        decide(verdicts)
    }

    /// Every admission but the one the next call waits for is owed nothing for the time
    /// until it is asked again.
    pub(super) fn idle_but(&mut self, waits_on: Option<usize>) {
        for (i, a) in self.admissions.iter_mut().enumerate() {
            if let (true, Some(a)) = (waits_on != Some(i), a.idles()) {
                a.idle();
            }
        }
    }

    /// Holds the run's source paused while some admission wants it. True if the pause ended.
    pub(super) fn poll_pause(&mut self, cx: &mut Context<'_>, gate: &Arc<Gate>) -> bool {
        let mut wanted = false;
        for a in &mut self.admissions {
            wanted |= a.poll_pause(cx);
        }
        match (wanted, self.pause.is_some()) {
            (true, false) => {
                self.pause = Some(gate.hold());
                false
            }
            (false, true) => {
                self.pause = None;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Idles, TimesCalls};
    use futures_util::task::noop_waker_ref;
    use std::sync::Mutex;

    /// An admission that answers from a script and writes down what it is told.
    struct Scripted {
        name: char,
        answers: Vec<Poll<Verdict>>,
        limit: Option<usize>,
        pause: bool,
        log: Arc<Mutex<Vec<String>>>,
    }

    impl Admission for Scripted {
        fn poll_admit(&mut self, _cx: &mut Context<'_>, call: u64, want: usize) -> Poll<Verdict> {
            self.log
                .lock()
                .unwrap()
                .push(format!("{} ask {call} {want}", self.name));
            if self.answers.is_empty() {
                Poll::Ready(Verdict::Go)
            } else {
                self.answers.remove(0)
            }
        }
        fn cancel(&mut self, call: u64) {
            self.log
                .lock()
                .unwrap()
                .push(format!("{} cancel {call}", self.name));
        }
        fn started(&mut self, call: u64) {
            self.log
                .lock()
                .unwrap()
                .push(format!("{} start {call}", self.name));
        }
        fn poll_pause(&mut self, _cx: &mut Context<'_>) -> bool {
            self.pause
        }
        fn idles(&mut self) -> Option<&mut dyn Idles> {
            Some(self)
        }
        fn times_calls(&self) -> Option<&dyn TimesCalls> {
            self.limit.map(|_| self as &dyn TimesCalls)
        }
    }

    impl Idles for Scripted {
        fn idle(&mut self) {
            self.log.lock().unwrap().push(format!("{} idle", self.name));
        }
    }

    impl TimesCalls for Scripted {
        fn limit(&self) -> usize {
            self.limit.unwrap_or(usize::MAX)
        }
    }

    fn chain(
        scripts: Vec<(char, Vec<Poll<Verdict>>, Option<usize>)>,
    ) -> (Chain, Arc<Mutex<Vec<String>>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let admissions = scripts
            .into_iter()
            .map(|(name, answers, limit)| {
                Box::new(Scripted {
                    name,
                    answers,
                    limit,
                    pause: false,
                    log: log.clone(),
                }) as Box<dyn Admission>
            })
            .collect();
        (Chain::new(admissions), log)
    }

    fn taken(log: &Mutex<Vec<String>>) -> Vec<String> {
        std::mem::take(&mut *log.lock().unwrap())
    }

    #[test]
    fn a_leave_is_kept_while_a_later_admission_makes_the_call_wait() {
        let (mut c, log) = chain(vec![('a', vec![], None), ('b', vec![Poll::Pending], None)]);
        let mut cx = Context::from_waker(noop_waker_ref());
        assert!(matches!(c.admit(&mut cx, 3), Admitted::Wait(1)));
        assert_eq!(taken(&log), ["a ask 0 3", "b ask 0 3"]);
        c.idle_but(Some(1));
        assert_eq!(taken(&log), ["a idle"]);
        // `a` is not asked again for the same call.
        assert!(matches!(c.admit(&mut cx, 3), Admitted::Go(0)));
        assert_eq!(taken(&log), ["b ask 0 3", "a start 0", "b start 0"]);
        assert!(matches!(c.admit(&mut cx, 1), Admitted::Go(1)));
    }

    #[test]
    fn a_refusal_gives_back_the_earlier_leaves_and_moves_to_the_next_call() {
        let (mut c, log) = chain(vec![
            ('a', vec![], None),
            (
                'b',
                vec![Poll::Ready(Verdict::Refuse(ItemError::user("b says no")))],
                None,
            ),
            ('c', vec![], None),
        ]);
        let mut cx = Context::from_waker(noop_waker_ref());
        // The item fails with the refusing policy's own error.
        let Admitted::Refuse(e) = c.admit(&mut cx, 1) else {
            panic!("refused");
        };
        assert_eq!(e.to_string(), "b says no");
        assert_eq!(taken(&log), ["a ask 0 1", "b ask 0 1", "a cancel 0"]);
        assert!(matches!(c.admit(&mut cx, 1), Admitted::Go(1)));
    }

    #[test]
    fn the_least_limit_of_the_admissions_replaces_the_workers() {
        let (c, _) = chain(vec![('a', vec![], None)]);
        assert!(!c.times_calls());
        assert_eq!(c.limit(8), 8);
        let (c, _) = chain(vec![('a', vec![], Some(5)), ('b', vec![], Some(3))]);
        assert!(c.times_calls());
        assert_eq!(c.limit(8), 3);
        assert_eq!(c.limit(2), 3, "an adaptive limit may go above the workers");
    }

    #[test]
    fn the_source_is_held_paused_while_an_admission_wants_it() {
        let gate = Arc::new(Gate::new());
        let log = Arc::new(Mutex::new(Vec::new()));
        let scripted = |pause| Scripted {
            name: 'a',
            answers: vec![],
            limit: None,
            pause,
            log: log.clone(),
        };
        let mut cx = Context::from_waker(noop_waker_ref());
        let mut c = Chain::new(vec![Box::new(scripted(true))]);
        assert!(!c.poll_pause(&mut cx, &gate));
        assert!(gate.is_paused());
        c.admissions[0] = Box::new(scripted(false));
        assert!(c.poll_pause(&mut cx, &gate), "the pause ended");
        assert!(!gate.is_paused());
    }
}
