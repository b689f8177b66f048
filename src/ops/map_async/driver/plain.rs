//! The driver's tight loop for a plain stage (no policy, retry, kept input, result routing,
//! key or call span): [`Driver::start_plain`].

use std::task::{Context, Poll};
use std::time::Duration;

use crate::error::ItemError;

use super::super::call::{Meta, StageFn, make};
use super::super::inflight::{First, Launched};
use super::Driver;

impl<T, U, S> Driver<T, U, S>
where
    T: Send + 'static,
    U: Send + 'static,
    S: StageFn<T, U>,
{
    /// Starts calls of a plain stage while the limits allow and input waits: the work of
    /// `pop_input`, `start` and `complete` for the common case in one loop, without the
    /// per-item questions a plain stage always answers the same way. A call ready at its
    /// first poll in input order goes straight to the output; any other takes the general
    /// path (`complete`, the in-flight set). True if an item started.
    pub(super) fn start_plain(&mut self, cx: &mut Context<'_>) -> bool {
        let mut started = false;
        loop {
            if !self.can_start() || (self.input.is_empty() && self.available(cx) == 0) {
                return started;
            }
            // A service must be ready before each call; a closure always is.
            if !S::ALWAYS_READY {
                match self.poll_ready(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(error)) => {
                        // The general path fails every item left with it.
                        self.service_failed(error);
                        return true;
                    }
                    Poll::Pending => return started,
                }
            }
            let Some((item, ticket)) = self.input.pop() else {
                return started;
            };
            started = true;
            let seq = self.reorder.assign();
            // Ordered: nothing started before it is still out, so it may go out at once.
            let in_order = self.reorder.is_clear();
            let call = &mut self.call;
            let fut = match make(|| call.call(item)) {
                Ok(fut) => fut,
                Err(e) => {
                    self.plain_slow(seq, ticket, Err(e), None);
                    continue;
                }
            };
            let timed = self.latency.times(seq);
            match self.inflight.launch(fut, timed, First { seq, ticket }, cx) {
                Launched::Ready(Ok(u), latency, first) if in_order => {
                    if let Some(l) = latency {
                        self.latency.record(seq, l, &self.stats);
                    }
                    self.output.push(u, first.ticket);
                    self.reorder.passed();
                }
                Launched::Ready(result, latency, first) => {
                    self.plain_slow(seq, first.ticket, result, latency)
                }
                Launched::Waiting => self.reorder.open(),
            }
        }
    }

    /// A plain stage's call that finished at once but cannot go straight out (it failed,
    /// or an earlier item is still in flight): the general path.
    pub(super) fn plain_slow(
        &mut self,
        seq: u64,
        ticket: crate::runtime::chunk::Ticket,
        result: Result<U, ItemError>,
        latency: Option<Duration>,
    ) {
        self.reorder.open();
        let mut meta = Meta::new(seq, ticket);
        meta.attempts = 1;
        self.complete(meta, result, latency, None, true);
    }
}
