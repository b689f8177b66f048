//! The driver's tight loops for a plain stage (no policy, retry, kept input, result routing
//! or call span): [`Driver::start_plain`], and [`Driver::start_plain_keyed`] with `key_by`.

use std::task::{Context, Poll};
use std::time::Duration;

use crate::failure::ItemError;

use super::super::call::{Meta, StageFn, make};
use super::super::inflight::{First, Launched};
use super::super::keyed::Probe;
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
            if let Err(moved) = self.plain_ready(cx, started) {
                return moved;
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
                    self.plain_slow(seq, ticket, 0, Err(e), None);
                    continue;
                }
            };
            let timed = self.latency.times(seq);
            let first = First {
                seq,
                ticket,
                key: 0,
            };
            match self.inflight.launch(fut, timed, first, cx) {
                Launched::Ready(Ok(u), latency, first) if in_order => {
                    self.plain_out(seq, u, latency, first.ticket);
                }
                Launched::Ready(result, latency, first) => {
                    self.plain_slow(seq, first.ticket, 0, result, latency)
                }
                Launched::Waiting => self.reorder.open(),
            }
        }
    }

    /// [`start_plain`](Self::start_plain) for a keyed stage. Each new item's key is hashed
    /// once ([`Probe`]): a busy key's item waits in its key's queue; a key with room starts
    /// it; a key with nothing out starts it without an entry in the key map, which the key
    /// gets only if the call does not end at once. Items made ready when their key's
    /// previous item ended (in this turn, before this loop) start first, ahead of new
    /// input, so a key's next call starts in the turn its previous one ended. True if an
    /// item started or waits.
    pub(super) fn start_plain_keyed(&mut self, cx: &mut Context<'_>) -> bool {
        let mut moved = false;
        loop {
            let Some(keys) = self.keys.as_mut() else {
                return moved;
            };
            let ready = keys.ready() > 0;
            if !ready && (keys.full() || (self.input.is_empty() && !self.pull(cx))) {
                return moved;
            }
            if !self.can_start() {
                return moved;
            }
            if let Err(moved) = self.plain_ready(cx, moved) {
                return moved;
            }
            moved = true;
            let Some(keys) = self.keys.as_mut() else {
                return moved;
            };
            if ready {
                if let Some((item, meta)) = keys.pop() {
                    self.start(item, meta, cx);
                }
                continue;
            }
            let Some((item, ticket)) = self.input.pop() else {
                return moved;
            };
            let seq = self.reorder.assign();
            let key = match keys.probe(&item, seq) {
                Probe::Free(key) => key,
                Probe::Start(key) => {
                    self.reorder.open();
                    self.start(item, Meta::keyed(seq, ticket, key), cx);
                    continue;
                }
                Probe::Wait(key) => {
                    self.reorder.open();
                    keys.wait(item, Meta::keyed(seq, ticket, key), &self.stats);
                    continue;
                }
            };
            let in_order = self.reorder.is_clear();
            let call = &mut self.call;
            let made = make(|| call.call(item));
            let launched = match made {
                Ok(fut) => {
                    let timed = self.latency.times(seq);
                    let first = First { seq, ticket, key };
                    self.inflight.launch(fut, timed, first, cx)
                }
                Err(e) => Launched::Ready(Err(e), None, First { seq, ticket, key }),
            };
            match launched {
                Launched::Ready(Ok(u), latency, first) if in_order => {
                    // Its key never became busy: no entry to make or remove.
                    self.plain_out(seq, u, latency, first.ticket);
                }
                Launched::Ready(result, latency, first) => {
                    self.occupy(seq, key);
                    self.plain_slow(seq, first.ticket, key, result, latency);
                }
                Launched::Waiting => {
                    self.occupy(seq, key);
                    self.reorder.open();
                }
            }
        }
    }

    /// Whether the next call of a plain stage may start: a service must be ready before each
    /// call (a closure always is). `Err`: the loop ends, with whether it moved (`moved`, or
    /// true if the service failed: the general path then fails every item left with it).
    fn plain_ready(&mut self, cx: &mut Context<'_>, moved: bool) -> Result<(), bool> {
        if S::ALWAYS_READY {
            return Ok(());
        }
        match self.poll_ready(cx) {
            Poll::Ready(Ok(())) => Ok(()),
            Poll::Ready(Err(error)) => {
                self.service_failed(error);
                Err(true)
            }
            Poll::Pending => Err(moved),
        }
    }

    /// Pulls a chunk of input into an empty buffer; true if items came.
    fn pull(&mut self, cx: &mut Context<'_>) -> bool {
        self.input.fill(cx, &self.stats);
        !self.input.is_empty()
    }

    /// The key of the item `seq` just launched, kept aside by its probe, gets its entry at
    /// `key`, the slot the probe gave (and the call carries).
    fn occupy(&mut self, seq: u64, key: u32) {
        if let Some(k) = self.keys.as_mut() {
            let at = k.occupy(seq);
            debug_assert_eq!(at, key, "the slot the probe gave");
        }
    }

    /// A plain stage's call that finished at once in input order goes straight out.
    #[inline]
    fn plain_out(
        &mut self,
        seq: u64,
        u: U,
        latency: Option<Duration>,
        ticket: crate::runtime::chunk::Ticket,
    ) {
        if let Some(l) = latency {
            self.latency.record(seq, l, &self.stats);
        }
        self.output.push(u, ticket);
        self.reorder.passed();
    }

    /// A plain stage's call that finished at once but cannot go straight out (it failed,
    /// or an earlier item is still in flight): the general path. `key`: the slot of its key
    /// (0 without `key_by`).
    pub(super) fn plain_slow(
        &mut self,
        seq: u64,
        ticket: crate::runtime::chunk::Ticket,
        key: u32,
        result: Result<U, ItemError>,
        latency: Option<Duration>,
    ) {
        self.reorder.open();
        let mut meta = Meta::keyed(seq, ticket, key);
        meta.attempts = 1;
        self.complete(meta, result, latency, None, true);
    }
}
