//! One call of an async stage: the user's function behind a uniform fallible shape
//! ([`StageFn`]), and the future the driver polls for it ([`Call`]), with panic isolation and
//! the stage timeout.

use std::future::Future;
use std::marker::PhantomData;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{FutureExt as _, TryFutureExt as _};
use tokio::time::{Instant, Sleep};

use crate::failure::{BoxError, FailedInput, ItemError};
use crate::runtime::chunk::Ticket;

pub(super) mod sealed {
    /// Keeps [`StageFn`](super::StageFn) implemented by this crate's wrappers only.
    pub trait Sealed {}
}

/// The call an async stage makes for each item: user code behind a uniform fallible shape.
/// Implemented for the closures given to [`Flow::map_async`](crate::Flow::map_async) and
/// [`Flow::try_map_async`](crate::Flow::try_map_async); it is sealed (users do not implement
/// it), and appears only as a bound on [`AsyncStage`](crate::AsyncStage).
///
/// ```
/// use flowline::prelude::*;
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// // Any `Fn(T) -> impl Future` given to `map_async` is a `StageFn`.
/// let out = Pipeline::from_iter([1u32, 2])
///     .map_async("double", |x| async move { x * 2 })
///     .collect().await.unwrap();
/// assert_eq!(out, vec![2, 4]);
/// # }
/// ```
pub trait StageFn<T, U>: sealed::Sealed + Send + 'static {
    /// The call's future.
    type Future: Future<Output = Result<U, BoxError>> + Send + 'static;
    /// Whether `poll_ready` is always ready (a closure): the driver then never asks.
    #[doc(hidden)]
    const ALWAYS_READY: bool = false;
    /// Whether the next call may start (a [`tower::Service`](https://docs.rs/tower)'s
    /// `poll_ready`): `Pending` holds the stage's next call back, an error means no call
    /// can ever be made. A closure is always ready.
    #[inline]
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }
    /// Starts the call for one item (after `poll_ready` said it may).
    fn call(&mut self, item: T) -> Self::Future;
}

/// An infallible async function (`map_async`). Named in [`AsyncStage`](crate::AsyncStage)'s
/// type only.
#[doc(hidden)]
pub struct Infallible<F, Fut>(F, PhantomData<fn() -> Fut>);

impl<F, Fut> Infallible<F, Fut> {
    pub(super) fn new(f: F) -> Self {
        Infallible(f, PhantomData)
    }
}

impl<F, Fut> sealed::Sealed for Infallible<F, Fut> {}

impl<T, U, F, Fut> StageFn<T, U> for Infallible<F, Fut>
where
    F: Fn(T) -> Fut + Send + 'static,
    Fut: Future<Output = U> + Send + 'static,
    U: Send + 'static,
{
    type Future = futures_util::future::Map<Fut, fn(U) -> Result<U, BoxError>>;
    const ALWAYS_READY: bool = true;
    #[inline]
    fn call(&mut self, item: T) -> Self::Future {
        (self.0)(item).map(Ok as fn(U) -> Result<U, BoxError>)
    }
}

/// A fallible async function (`try_map_async`). Named in [`AsyncStage`](crate::AsyncStage)'s
/// type only.
#[doc(hidden)]
pub struct Fallible<F, Fut>(F, PhantomData<fn() -> Fut>);

impl<F, Fut> Fallible<F, Fut> {
    pub(super) fn new(f: F) -> Self {
        Fallible(f, PhantomData)
    }
}

impl<F, Fut> sealed::Sealed for Fallible<F, Fut> {}

impl<T, U, E, F, Fut> StageFn<T, U> for Fallible<F, Fut>
where
    F: Fn(T) -> Fut + Send + 'static,
    Fut: Future<Output = Result<U, E>> + Send + 'static,
    E: Into<BoxError> + 'static,
    U: Send + 'static,
{
    type Future = futures_util::future::MapErr<Fut, fn(E) -> BoxError>;
    const ALWAYS_READY: bool = true;
    #[inline]
    fn call(&mut self, item: T) -> Self::Future {
        (self.0)(item).map_err(Into::into as fn(E) -> BoxError)
    }
}

/// An infallible async function with a shared state (`map_async_with`): the state is
/// cloned for each call. Named in [`AsyncStage`](crate::AsyncStage)'s type only.
#[doc(hidden)]
pub struct InfallibleWith<S, F, Fut>(S, F, PhantomData<fn() -> Fut>);

impl<S, F, Fut> InfallibleWith<S, F, Fut> {
    pub(super) fn new(state: S, f: F) -> Self {
        InfallibleWith(state, f, PhantomData)
    }
}

impl<S, F, Fut> sealed::Sealed for InfallibleWith<S, F, Fut> {}

impl<T, U, S, F, Fut> StageFn<T, U> for InfallibleWith<S, F, Fut>
where
    S: Clone + Send + 'static,
    F: Fn(S, T) -> Fut + Send + 'static,
    Fut: Future<Output = U> + Send + 'static,
    U: Send + 'static,
{
    type Future = futures_util::future::Map<Fut, fn(U) -> Result<U, BoxError>>;
    const ALWAYS_READY: bool = true;
    #[inline]
    fn call(&mut self, item: T) -> Self::Future {
        (self.1)(self.0.clone(), item).map(Ok as fn(U) -> Result<U, BoxError>)
    }
}

/// A fallible async function with a shared state (`try_map_async_with`): the state is
/// cloned for each call. Named in [`AsyncStage`](crate::AsyncStage)'s type only.
#[doc(hidden)]
pub struct FallibleWith<S, F, Fut>(S, F, PhantomData<fn() -> Fut>);

impl<S, F, Fut> FallibleWith<S, F, Fut> {
    pub(super) fn new(state: S, f: F) -> Self {
        FallibleWith(state, f, PhantomData)
    }
}

impl<S, F, Fut> sealed::Sealed for FallibleWith<S, F, Fut> {}

impl<T, U, E, S, F, Fut> StageFn<T, U> for FallibleWith<S, F, Fut>
where
    S: Clone + Send + 'static,
    F: Fn(S, T) -> Fut + Send + 'static,
    Fut: Future<Output = Result<U, E>> + Send + 'static,
    E: Into<BoxError> + 'static,
    U: Send + 'static,
{
    type Future = futures_util::future::MapErr<Fut, fn(E) -> BoxError>;
    const ALWAYS_READY: bool = true;
    #[inline]
    fn call(&mut self, item: T) -> Self::Future {
        (self.1)(self.0.clone(), item).map_err(Into::into as fn(E) -> BoxError)
    }
}

/// Per-item bookkeeping that travels with a call and, between attempts, with a parked item.
/// Small on purpose (it is moved with every call): what only some stages need is boxed.
pub(super) struct Meta {
    /// The item's place in input order.
    pub(super) seq: u64,
    /// The id the running attempt was admitted under (stages with admission policies).
    pub(super) call: u64,
    pub(super) ticket: Ticket,
    /// Attempts made (the running one included).
    pub(super) attempts: u32,
    /// A keyed stage: the slot of the item's key in the key map.
    pub(super) key: u32,
    rare: Option<Box<Rare>>,
}

/// What only some stages keep per item.
#[derive(Default)]
struct Rare {
    /// When the first attempt started (a retry policy with a time limit).
    first_at: Option<Instant>,
    /// The input, for the dead letters (`keep_input`).
    input: Option<FailedInput>,
    /// When the running attempt began waiting (while a stall watchdog looks at calls).
    waiting_since: Option<Instant>,
    /// The running attempt's span (`trace_calls`).
    span: Option<tracing::Span>,
}

impl Meta {
    pub(super) fn new(seq: u64, ticket: Ticket) -> Self {
        Meta {
            seq,
            call: 0,
            ticket,
            attempts: 0,
            key: 0,
            rare: None,
        }
    }

    /// [`new`](Self::new) for an item of a keyed stage whose key has slot `key`.
    pub(super) fn keyed(seq: u64, ticket: Ticket, key: u32) -> Self {
        Meta {
            key,
            ..Meta::new(seq, ticket)
        }
    }

    fn rare(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Box::default)
    }

    pub(super) fn first_at(&self) -> Option<Instant> {
        self.rare.as_ref().and_then(|r| r.first_at)
    }

    pub(super) fn set_first_at(&mut self, at: Instant) {
        self.rare().first_at = Some(at);
    }

    pub(super) fn has_input(&self) -> bool {
        self.rare.as_ref().is_some_and(|r| r.input.is_some())
    }

    pub(super) fn set_input(&mut self, input: FailedInput) {
        self.rare().input = Some(input);
    }

    pub(super) fn take_input(&mut self) -> Option<FailedInput> {
        self.rare.as_mut().and_then(|r| r.input.take())
    }

    pub(super) fn set_span(&mut self, span: tracing::Span) {
        self.rare().span = Some(span);
    }

    fn span(&self) -> Option<&tracing::Span> {
        self.rare.as_ref().and_then(|r| r.span.as_ref())
    }

    /// Ends the running attempt's span, if it has one, with the attempt's outcome.
    pub(super) fn end_span(&mut self, outcome: &'static str) {
        if let Some(span) = self.rare.as_mut().and_then(|r| r.span.take()) {
            span.record("outcome", outcome);
        }
    }

    pub(super) fn take_waiting_since(&mut self) -> Option<Instant> {
        self.rare.as_mut().and_then(|r| r.waiting_since.take())
    }
}

/// What a finished call reports back to the driver.
pub(super) struct Completion<T, U> {
    pub(super) meta: Meta,
    pub(super) result: Result<U, ItemError>,
    pub(super) latency: Option<Duration>,
    /// A copy of the input for another attempt (stages with `retry`).
    pub(super) again: Option<T>,
    /// False for an item refused by an admission (no call was made).
    pub(super) called: bool,
}

/// A reusable pinned place for a call's future. A call is polled once right where it is
/// created, in this slot: a call that is ready at once leaves the slot to the next call
/// (no allocation per item), and only a call that must wait takes it into the in-flight set.
pub(super) type Slot<F> = Pin<Box<Option<F>>>;

/// Makes the user's future for one item (a panic there fails the item).
#[inline]
pub(super) fn make<F>(make: impl FnOnce() -> F) -> Result<F, ItemError> {
    catch_unwind(AssertUnwindSafe(make)).map_err(|panic| ItemError::from_panic(&*panic))
}

/// Polls the future in `slot` with panic isolation.
// Always: the hot path of every call, see `InFlight::launch`.
#[inline(always)]
pub(super) fn poll_slot<F, U>(
    slot: &mut Slot<F>,
    cx: &mut Context<'_>,
) -> Poll<Result<U, ItemError>>
where
    F: Future<Output = Result<U, BoxError>>,
{
    let polled = catch_unwind(AssertUnwindSafe(|| match slot.as_mut().as_pin_mut() {
        Some(fut) => fut.poll(cx),
        None => Poll::Pending,
    }));
    match polled {
        Ok(Poll::Ready(r)) => Poll::Ready(r.map_err(|e| ItemError::User(Arc::from(e)))),
        Ok(Poll::Pending) => Poll::Pending,
        Err(panic) => Poll::Ready(Err(ItemError::from_panic(&*panic))),
    }
}

/// A call that was not ready at its first poll, in the in-flight set: its future (in the
/// slot it was first polled in), the stage timeout, a hedge (a second call for the same
/// item, when the stage hedges), and what comes back with it.
pub(super) struct Call<F, T> {
    slot: Slot<F>,
    limit: Option<Duration>,
    /// Armed when the call starts to wait, which is the call's start: a call is first
    /// polled where it is created. Quick calls never touch the timer wheel.
    sleep: Option<Pin<Box<Sleep>>>,
    start: Option<Instant>,
    meta: Option<Meta>,
    again: Option<T>,
    /// When the call is due for a hedge (a stage with `hedge`, until it is hedged).
    hedge_at: Option<Pin<Box<Sleep>>>,
    /// The hedge's future: whichever of the two answers first is the item's result, and
    /// the other is dropped with the call.
    twin: Option<Slot<F>>,
}

/// What the in-flight set gives back for a call.
pub(super) enum Polled<F, T, U> {
    /// The call (or its hedge) answered, or timed out.
    Done(Completion<T, U>),
    /// The call has not answered by its hedge delay: the stage starts a hedge
    /// ([`Call::hedged`]) or lets it go on alone (back into the set as it is).
    HedgeDue(Call<F, T>),
}

impl<F, T> Call<F, T> {
    /// A call whose first poll (at `start`, if timed) found it not ready; due for a hedge
    /// `hedge` after its start, if given.
    pub(super) fn waiting(
        slot: Slot<F>,
        meta: Meta,
        again: Option<T>,
        limit: Option<Duration>,
        start: Option<Instant>,
        hedge: Option<Duration>,
    ) -> Self {
        Call {
            slot,
            limit,
            sleep: limit.map(|l| Box::pin(tokio::time::sleep(l))),
            hedge_at: hedge.map(|h| {
                let from = start.unwrap_or_else(Instant::now);
                Box::pin(tokio::time::sleep_until(crate::util::time::after(from, h)))
            }),
            start,
            meta: Some(meta),
            again,
            twin: None,
        }
    }

    /// Records `at` as the start of the call's wait.
    pub(super) fn mark_waiting(&mut self, at: Instant) {
        if let Some(meta) = self.meta.as_mut() {
            meta.rare().waiting_since = Some(at);
        }
    }

    /// The copy of the input kept for another attempt (what a hedge calls with).
    pub(super) fn again(&self) -> Option<&T> {
        self.again.as_ref()
    }

    /// Attempts the item has made, this one included.
    pub(super) fn attempts(&self) -> u32 {
        self.meta.as_ref().map_or(0, |m| m.attempts)
    }

    /// The call goes on with its hedge, `twin`, polled beside it.
    pub(super) fn hedged(mut self, twin: Slot<F>) -> Self {
        self.twin = Some(twin);
        self
    }

    /// The item's completion with `result` (the call, or its hedge, answered): the other
    /// future, if any, is dropped with the call.
    pub(super) fn finish<U>(mut self, result: Result<U, ItemError>) -> Option<Completion<T, U>> {
        Some(Completion {
            meta: self.meta.take()?,
            result,
            latency: self.start.map(|s| s.elapsed()),
            again: self.again.take(),
            called: true,
        })
    }

    /// Moves the call out of the in-flight set's place (its hedge is due).
    fn take(&mut self) -> Self {
        Call {
            slot: std::mem::replace(&mut self.slot, Box::pin(None)),
            limit: self.limit,
            sleep: self.sleep.take(),
            start: self.start,
            meta: self.meta.take(),
            again: self.again.take(),
            hedge_at: None,
            twin: self.twin.take(),
        }
    }
}

// Nothing of a call is pinned in place (its futures are in boxes of their own).
impl<F, T> Unpin for Call<F, T> {}

impl<F, T, U> Future for Call<F, T>
where
    F: Future<Output = Result<U, BoxError>>,
{
    type Output = Polled<F, T, U>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Polled<F, T, U>> {
        let this = self.get_mut();
        let _in_span = this
            .meta
            .as_ref()
            .and_then(Meta::span)
            .cloned()
            .map(tracing::Span::entered);
        let result = match poll_slot(&mut this.slot, cx) {
            Poll::Ready(r) => r,
            Poll::Pending => match this.twin.as_mut().map(|t| poll_slot(t, cx)) {
                Some(Poll::Ready(r)) => r,
                _ => {
                    if let Some(at) = this.hedge_at.as_mut() {
                        if at.as_mut().poll(cx).is_ready() {
                            this.hedge_at = None;
                            return Poll::Ready(Polled::HedgeDue(this.take()));
                        }
                    }
                    let (Some(sleep), Some(limit)) = (this.sleep.as_mut(), this.limit) else {
                        return Poll::Pending;
                    };
                    match sleep.as_mut().poll(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(()) => Err(ItemError::Timeout(limit)),
                    }
                }
            },
        };
        // A call is not polled after it is ready; `meta` is there exactly once.
        let Some(meta) = this.meta.take() else {
            return Poll::Pending;
        };
        Poll::Ready(Polled::Done(Completion {
            meta,
            result,
            latency: this.start.map(|s| s.elapsed()),
            again: this.again.take(),
            called: true,
        }))
    }
}
