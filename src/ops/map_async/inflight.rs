//! The in-flight set of an async stage: where every call is launched and polled.
//!
//! A call is polled once right where it is launched, in a reused slot: a call ready at once
//! gives its result back at once and leaves the slot to the next call (no allocation per
//! item); only a call that must wait takes the slot into the set, with the stage timeout and
//! (while a stall watchdog asks) its age.

use std::future::Future;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt as _};
use tokio::time::Instant;

use crate::failure::{BoxError, ItemError};
use crate::runtime::chunk::Ticket;

use super::call::{Call, Completion, Meta, Polled, Slot, poll_slot};
use super::call_ages::CallAges;

/// What goes with a call into the set if it has to wait: the item's bookkeeping and the
/// copy of its input for another attempt. Made only for a call that waits.
pub(super) trait Carry<T> {
    fn into_call(self) -> (Meta, Option<T>);
    fn seq(&self) -> u64;
}

impl<T> Carry<T> for (Meta, Option<T>) {
    #[inline]
    fn into_call(self) -> (Meta, Option<T>) {
        self
    }
    #[inline]
    fn seq(&self) -> u64 {
        self.0.seq
    }
}

/// A new item's first attempt in a stage that keeps nothing else with it.
pub(super) struct First {
    pub(super) seq: u64,
    pub(super) ticket: Ticket,
    /// A keyed stage: the slot its key takes if the call waits.
    pub(super) key: u32,
}

impl<T> Carry<T> for First {
    #[inline]
    fn into_call(self) -> (Meta, Option<T>) {
        let mut meta = Meta::keyed(self.seq, self.ticket, self.key);
        meta.attempts = 1;
        (meta, None)
    }
    #[inline]
    fn seq(&self) -> u64 {
        self.seq
    }
}

/// A launched call.
pub(super) enum Launched<U, C> {
    /// Ready at its first poll: its result, its latency if timed, and what it carries.
    Ready(Result<U, ItemError>, Option<Duration>, C),
    /// In the set: its completion comes from [`InFlight::poll_next`].
    Waiting,
}

/// The calls that wait, and the slot of the last call that did not.
pub(super) struct InFlight<F, T> {
    set: FuturesUnordered<Call<F, T>>,
    spare: Option<Slot<F>>,
    timeout: Option<Duration>,
    /// How long the next launched call may take before it is due for a hedge.
    hedge_after: Option<Duration>,
    ages: CallAges,
}

impl<F, T> InFlight<F, T> {
    pub(super) fn new(timeout: Option<Duration>) -> Self {
        InFlight {
            set: FuturesUnordered::new(),
            spare: None,
            timeout,
            hedge_after: None,
            ages: CallAges::default(),
        }
    }

    #[inline]
    pub(super) fn len(&self) -> usize {
        self.set.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// The next calls launched are due for a hedge after `after` (`None`: not hedged).
    pub(super) fn hedge_after(&mut self, after: Option<Duration>) {
        self.hedge_after = after;
    }

    /// The calls' ages, for the stall watchdog.
    pub(super) fn ages(&mut self) -> &mut CallAges {
        &mut self.ages
    }

    /// Launches a call: polls `fut` once in a reused slot (timed if `timed`); a call that is
    /// not ready goes into the set with what it carries.
    // Always: with two plain loops calling it, `#[inline]` alone left it a call, and an
    // instant call's cost went from 16 to 30 ns (`flowline-bench core workers16`).
    #[inline(always)]
    pub(super) fn launch<U, C>(
        &mut self,
        fut: F,
        timed: bool,
        carry: C,
        cx: &mut Context<'_>,
    ) -> Launched<U, C>
    where
        F: Future<Output = Result<U, BoxError>>,
        C: Carry<T>,
    {
        let mut slot = match self.spare.take() {
            Some(mut slot) => {
                slot.as_mut().set(Some(fut));
                slot
            }
            None => Box::pin(Some(fut)),
        };
        let start = timed.then(Instant::now);
        match poll_slot(&mut slot, cx) {
            Poll::Ready(result) => {
                self.spare = Some(slot);
                Launched::Ready(result, start.map(|s| s.elapsed()), carry)
            }
            Poll::Pending => {
                let seq = carry.seq();
                let (meta, again) = carry.into_call();
                let mut call =
                    Call::waiting(slot, meta, again, self.timeout, start, self.hedge_after);
                if let Some(at) = self.ages.began(seq) {
                    call.mark_waiting(at);
                }
                self.set.push(call);
                Launched::Waiting
            }
        }
    }

    /// The next call in the set to finish, or to be due for a hedge.
    pub(super) fn poll_next<U>(&mut self, cx: &mut Context<'_>) -> Poll<Option<Polled<F, T, U>>>
    where
        F: Future<Output = Result<U, BoxError>>,
    {
        if self.set.is_empty() {
            return Poll::Ready(None);
        }
        match self.set.poll_next_unpin(cx) {
            Poll::Ready(Some(Polled::Done(mut c))) => {
                self.ended(&mut c.meta);
                Poll::Ready(Some(Polled::Done(c)))
            }
            other => other,
        }
    }

    fn ended(&mut self, meta: &mut Meta) {
        if let Some(at) = meta.take_waiting_since() {
            self.ages.ended(at, meta.seq);
        }
    }

    /// Starts `twin` as the hedge of `call` (due for one): polled once here; if it answers
    /// at once, that is the item's completion (and `call` is dropped: cancelled), else the
    /// two go on together and the first to answer wins.
    pub(super) fn hedge<U>(
        &mut self,
        call: Call<F, T>,
        twin: F,
        cx: &mut Context<'_>,
    ) -> Option<Completion<T, U>>
    where
        F: Future<Output = Result<U, BoxError>>,
    {
        let mut slot = Box::pin(Some(twin));
        match poll_slot(&mut slot, cx) {
            Poll::Ready(result) => {
                let mut c = call.finish(result)?;
                self.ended(&mut c.meta);
                Some(c)
            }
            Poll::Pending => {
                self.set.push(call.hedged(slot));
                None
            }
        }
    }

    /// A call due for a hedge goes on alone.
    pub(super) fn resume(&mut self, call: Call<F, T>) {
        self.set.push(call);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::future::BoxFuture;
    use futures_util::task::noop_waker_ref;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};

    type Fut = BoxFuture<'static, Result<u32, BoxError>>;

    fn ready(x: u32) -> Fut {
        Box::pin(async move { Ok(x) })
    }

    fn after(ms: u64, x: u32) -> Fut {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(x)
        })
    }

    fn done(p: Option<Polled<Fut, u32, u32>>) -> Completion<u32, u32> {
        match p {
            Some(Polled::Done(c)) => c,
            _ => panic!("a completion"),
        }
    }

    fn first(seq: u64) -> First {
        First {
            seq,
            ticket: Ticket::none(),
            key: 0,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_ready_at_once_gives_its_slot_to_the_next() {
        let mut f: InFlight<Fut, u32> = InFlight::new(None);
        let mut cx = Context::from_waker(noop_waker_ref());
        let Launched::Ready(Ok(1), Some(latency), c) = f.launch(ready(1), true, first(0), &mut cx)
        else {
            panic!("ready at once");
        };
        assert_eq!((latency, c.seq), (Duration::ZERO, 0));
        let slot = f.spare.as_ref().map(|s| &**s as *const Option<Fut>);
        let Launched::Ready(Ok(2), None, _) = f.launch(ready(2), false, first(1), &mut cx) else {
            panic!("ready at once");
        };
        assert_eq!(f.spare.as_ref().map(|s| &**s as *const Option<Fut>), slot);
        assert!(f.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_call_comes_back_with_what_it_carries() {
        let mut f: InFlight<Fut, u32> = InFlight::new(None);
        let t0 = Instant::now();
        std::future::poll_fn(|cx| {
            assert!(matches!(
                f.launch(
                    after(10, 7),
                    true,
                    (Meta::new(4, Ticket::none()), Some(70)),
                    cx
                ),
                Launched::Waiting
            ));
            assert!(matches!(
                f.launch(after(5, 8), false, first(5), cx),
                Launched::Waiting
            ));
            Poll::Ready(())
        })
        .await;
        assert_eq!(f.len(), 2);
        let c = done(std::future::poll_fn(|cx| f.poll_next::<u32>(cx)).await);
        assert_eq!(
            (c.meta.seq, c.meta.attempts, c.again, c.latency),
            (5, 1, None, None)
        );
        assert_eq!(c.result.unwrap(), 8);
        let c = done(std::future::poll_fn(|cx| f.poll_next::<u32>(cx)).await);
        assert_eq!((c.meta.seq, c.again), (4, Some(70)));
        assert_eq!(c.latency, Some(Duration::from_millis(10)));
        assert_eq!(t0.elapsed(), Duration::from_millis(10));
        assert!(
            std::future::poll_fn(|cx| f.poll_next::<u32>(cx))
                .await
                .is_none()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_call_times_out_at_the_stage_timeout() {
        let mut f: InFlight<Fut, u32> = InFlight::new(Some(Duration::from_millis(3)));
        let t0 = Instant::now();
        std::future::poll_fn(|cx| {
            let _ = f.launch(after(10, 7), false, first(0), cx);
            Poll::Ready(())
        })
        .await;
        let c = done(std::future::poll_fn(|cx| f.poll_next::<u32>(cx)).await);
        assert!(matches!(c.result, Err(ItemError::Timeout(d)) if d == Duration::from_millis(3)));
        assert_eq!(t0.elapsed(), Duration::from_millis(3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_watched_waiting_call_has_an_age_until_it_ends() {
        let mut f: InFlight<Fut, u32> = InFlight::new(None);
        f.ages().watch();
        let t0 = Instant::now();
        std::future::poll_fn(|cx| {
            let _ = f.launch(ready(1), false, first(0), cx);
            let _ = f.launch(after(10, 2), false, first(1), cx);
            Poll::Ready(())
        })
        .await;
        assert_eq!(f.ages().oldest(), Some(Some(t0)));
        let _ = std::future::poll_fn(|cx| f.poll_next::<u32>(cx)).await;
        assert_eq!(f.ages().oldest(), Some(None));
    }

    #[tokio::test(start_paused = true)]
    async fn a_panic_in_a_call_is_its_error() {
        let mut f: InFlight<Fut, u32> = InFlight::new(None);
        let mut cx = Context::from_waker(noop_waker_ref());
        let boom: Fut = Box::pin(async { panic!("boom") });
        let Launched::Ready(Err(e), ..) = f.launch(boom, false, first(0), &mut cx) else {
            panic!("ready at once");
        };
        assert_eq!(e.kind(), "panic");
    }

    /// A future that answers `x` after `ms` and notes in `dropped` if it is dropped first.
    fn watched(ms: u64, x: u32, dropped: Arc<AtomicBool>) -> Fut {
        struct OnDrop(Arc<AtomicBool>, bool);
        impl Drop for OnDrop {
            fn drop(&mut self) {
                if !self.1 {
                    self.0.store(true, SeqCst);
                }
            }
        }
        Box::pin(async move {
            let mut guard = OnDrop(dropped, false);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            guard.1 = true;
            Ok(x)
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_call_is_due_for_a_hedge_and_the_first_answer_wins() {
        let mut f: InFlight<Fut, u32> = InFlight::new(None);
        f.hedge_after(Some(Duration::from_millis(5)));
        let t0 = Instant::now();
        let slow_dropped = Arc::new(AtomicBool::new(false));
        let mut slow = Some(watched(100, 1, slow_dropped.clone()));
        std::future::poll_fn(|cx| {
            let carry = (Meta::new(0, Ticket::none()), Some(1u32));
            let slow = slow.take().unwrap();
            assert!(matches!(f.launch(slow, true, carry, cx), Launched::Waiting));
            Poll::Ready(())
        })
        .await;
        let Some(Polled::HedgeDue(call)) = std::future::poll_fn(|cx| f.poll_next::<u32>(cx)).await
        else {
            panic!("due for a hedge");
        };
        assert_eq!(t0.elapsed(), Duration::from_millis(5));
        assert_eq!(call.again(), Some(&1));
        let twin_dropped = Arc::new(AtomicBool::new(false));
        let mut parts = Some((call, watched(1, 2, twin_dropped.clone())));
        let none = std::future::poll_fn(|cx| {
            let (call, twin) = parts.take().unwrap();
            Poll::Ready(f.hedge::<u32>(call, twin, cx))
        })
        .await;
        assert!(none.is_none(), "the hedge waits too");
        let c = done(std::future::poll_fn(|cx| f.poll_next::<u32>(cx)).await);
        // The hedge answered first (6 ms after the start): its result is the item's, timed
        // from the first call's start; the first call is dropped, never polled again.
        assert_eq!(c.result.unwrap(), 2);
        assert_eq!(c.latency, Some(Duration::from_millis(6)));
        assert!(slow_dropped.load(SeqCst) && !twin_dropped.load(SeqCst));
        assert!(f.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_answers_before_its_hedge_is_due_is_never_hedged() {
        let mut f: InFlight<Fut, u32> = InFlight::new(None);
        f.hedge_after(Some(Duration::from_millis(5)));
        std::future::poll_fn(|cx| {
            let _ = f.launch(after(4, 1), true, first(0), cx);
            Poll::Ready(())
        })
        .await;
        let c = done(std::future::poll_fn(|cx| f.poll_next::<u32>(cx)).await);
        assert_eq!(c.result.unwrap(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_let_go_on_alone_still_answers() {
        let mut f: InFlight<Fut, u32> = InFlight::new(None);
        f.hedge_after(Some(Duration::from_millis(5)));
        let t0 = Instant::now();
        std::future::poll_fn(|cx| {
            let _ = f.launch(after(30, 1), true, first(0), cx);
            Poll::Ready(())
        })
        .await;
        let Some(Polled::HedgeDue(call)) = std::future::poll_fn(|cx| f.poll_next::<u32>(cx)).await
        else {
            panic!("due for a hedge");
        };
        f.resume(call);
        let c = done(std::future::poll_fn(|cx| f.poll_next::<u32>(cx)).await);
        assert_eq!(
            (c.result.unwrap(), t0.elapsed()),
            (1, Duration::from_millis(30))
        );
    }
}
