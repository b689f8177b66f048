//! The driver's items to be tried again: parked for a retry ([`RetryQueue`]), held for an
//! admission (a pausing breaker, [`HeldItems`]), and a slow call's second call (a hedge).
//!
//! [`RetryQueue`]: super::RetryQueue
//! [`HeldItems`]: super::HeldItems

use std::task::{Context, Poll};
use std::time::Duration;

use crate::failure::ItemError;
use crate::policy::hedge::HedgeState;
use crate::policy::{Again, Failed, Finished, Held};
use crate::report::StageStats;

use super::super::call::{Call, Meta, StageFn, make};
use super::super::routed::with_attempt;
use super::Driver;

impl<T, U, S> Driver<T, U, S>
where
    T: Send + 'static,
    U: Send + 'static,
    S: StageFn<T, U>,
{
    /// Holds the run's source paused while some admission wants it. True if the pause ended.
    pub(super) fn poll_pause(&mut self, cx: &mut Context<'_>) -> bool {
        self.chain.poll_pause(cx, &self.run.gate)
    }

    /// Whether an admission holds the item of a failed call to be tried again.
    pub(super) fn holds(
        &mut self,
        meta: &Meta,
        error: &ItemError,
        latency: Option<Duration>,
    ) -> bool {
        self.chain.holds(&Finished {
            call: meta.call,
            error: Some(error),
            latency,
            in_flight: self.inflight.len() + 1,
            attempts: meta.attempts,
        })
    }

    /// Decides on the items held for an admission (a pausing breaker): tried again, failed,
    /// or kept. `idle`: nothing else in the stage can decide it (an undecided hold goes
    /// again). True if they moved.
    pub(super) fn poll_held(&mut self, cx: &mut Context<'_>, idle: bool) -> bool {
        match self.chain.poll_held(cx) {
            Held::Wait => false,
            Held::Undecided if !idle => false,
            Held::Undecided | Held::Again => {
                for (item, meta, _) in self.held.take_all() {
                    self.retry_queue.push_due(item, meta);
                }
                true
            }
            Held::Fail => {
                let held: Vec<_> = self.held.take_all().collect();
                for (item, meta, error) in held {
                    self.complete(meta, Err(error), None, Some(item), false);
                }
                true
            }
        }
    }

    /// Parks a failed call's item for another attempt if the retry policy allows; else
    /// gives its meta and its copy back, with the error to fail it with instead of the
    /// call's own, if the policy gave one.
    pub(super) fn park(
        &mut self,
        meta: Meta,
        error: &ItemError,
        again: Option<T>,
    ) -> Option<(Meta, Option<T>, Option<ItemError>)> {
        let Some(r) = self.retry.as_mut() else {
            return Some((meta, again, None));
        };
        let failed = Failed {
            attempts: meta.attempts,
            first_at: meta.first_at(),
            error,
        };
        let at = match r.again(&failed) {
            Again::At(at) => at,
            Again::No => return Some((meta, again, None)),
            Again::GiveUp(instead) => return Some((meta, again, Some(instead))),
        };
        let Some(item) = again else {
            return Some((meta, again, None));
        };
        if self.stopping {
            // No call starts after a stop: the item is left unfinished, not failed.
            self.leave(meta);
            self.stats.left(1);
            return None;
        }
        StageStats::add(&self.stats.retried, 1);
        self.retry_queue.park(at, item, meta, &self.run.gate);
        None
    }

    /// A call has not answered by its hedge delay: a second call for its item starts if
    /// the budget allows (never after a stop, nor while the service is not ready), and the
    /// first answer wins; else the call goes on alone.
    pub(super) fn hedge(&mut self, call: Call<S::Future, T>, cx: &mut Context<'_>) {
        let (Some(copy), Some(item)) = (self.copy, call.again()) else {
            return self.inflight.resume(call);
        };
        if self.stopping
            || (!S::ALWAYS_READY && !matches!(self.poll_ready(cx), Poll::Ready(Ok(()))))
            || !self.hedge.as_mut().is_some_and(HedgeState::may_hedge)
        {
            return self.inflight.resume(call);
        }
        let item = copy(item);
        let c = &mut self.call;
        match with_attempt(call.attempts(), || make(|| c.call(item))) {
            Ok(twin) => {
                if let Some(done) = self.inflight.hedge(call, twin, cx) {
                    self.completed(done);
                }
            }
            // The hedge panicked when made: the call goes on alone.
            Err(_) => self.inflight.resume(call),
        }
    }
}
