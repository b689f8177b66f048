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

use crate::error::{BoxError, FailedInput, ItemError};
use crate::runtime::chunk::Ticket;

mod sealed {
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
    /// Starts the call for one item.
    fn call(&self, item: T) -> Self::Future;
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
    #[inline]
    fn call(&self, item: T) -> Self::Future {
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
    #[inline]
    fn call(&self, item: T) -> Self::Future {
        (self.0)(item).map_err(Into::into as fn(E) -> BoxError)
    }
}

/// Per-item bookkeeping that travels with a call and, between attempts, with a parked item.
pub(super) struct Meta {
    /// The item's place in input order.
    pub(super) seq: u64,
    /// The id the running attempt was admitted under (stages with admission policies).
    pub(super) call: u64,
    pub(super) ticket: Ticket,
    /// Attempts made (the running one included).
    pub(super) attempts: u32,
    /// When the first attempt started (only kept when the retry policy needs it).
    pub(super) first_at: Option<Instant>,
    pub(super) input: Option<FailedInput>,
    /// When the running attempt began waiting (only while a stall watchdog looks at calls).
    pub(super) waiting_since: Option<Instant>,
}

impl Meta {
    pub(super) fn new(seq: u64, ticket: Ticket) -> Self {
        Meta {
            seq,
            call: 0,
            ticket,
            attempts: 0,
            first_at: None,
            input: None,
            waiting_since: None,
        }
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

/// What travels with a call and comes back in its [`Completion`].
struct Carry<T> {
    meta: Meta,
    again: Option<T>,
}

pin_project_lite::pin_project! {
    /// One call: the user's future with panic isolation and the stage timeout.
    ///
    /// Written out rather than as an `async` block around `tokio::time::timeout` because
    /// this is the per-item hot path: the timer is armed only when the call does not finish
    /// at its first poll (`now + limit` then, which is the call's start, since a call is
    /// first polled where it is created), so quick calls never touch the timer wheel, and
    /// the future stays small (it is moved once per item).
    pub(super) struct Call<F, T> {
        #[pin]
        fut: F,
        limit: Option<Duration>,
        sleep: Option<Pin<Box<Sleep>>>,
        start: Option<Instant>,
        carry: Option<Carry<T>>,
    }
}

impl<F, T> Call<F, T> {
    /// Starts a call: `make` runs the user's function (a panic there fails the item).
    #[inline]
    pub(super) fn start<U>(
        make: impl FnOnce() -> F,
        meta: Meta,
        again: Option<T>,
        limit: Option<Duration>,
        timed: bool,
    ) -> Result<Self, Box<Completion<T, U>>> {
        match catch_unwind(AssertUnwindSafe(make)) {
            Ok(fut) => Ok(Call {
                fut,
                limit,
                sleep: None,
                start: timed.then(Instant::now),
                carry: Some(Carry { meta, again }),
            }),
            Err(panic) => Err(Box::new(Completion {
                meta,
                result: Err(ItemError::from_panic(&*panic)),
                latency: None,
                again,
                called: true,
            })),
        }
    }

    /// Records `at` as the start of the call's wait; returns its sequence number.
    pub(super) fn mark_waiting(self: Pin<&mut Self>, at: Instant) -> Option<u64> {
        let carry = self.project().carry.as_mut()?;
        carry.meta.waiting_since = Some(at);
        Some(carry.meta.seq)
    }
}

impl<F, T, U> Future for Call<F, T>
where
    F: Future<Output = Result<U, BoxError>>,
{
    type Output = Completion<T, U>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Completion<T, U>> {
        let this = self.project();
        let polled = catch_unwind(AssertUnwindSafe(|| this.fut.poll(cx)));
        let result = match polled {
            Ok(Poll::Ready(r)) => r.map_err(|e| ItemError::User(Arc::from(e))),
            Err(panic) => Err(ItemError::from_panic(&*panic)),
            Ok(Poll::Pending) => {
                let Some(limit) = *this.limit else {
                    return Poll::Pending;
                };
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                match sleep.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(()) => Err(ItemError::Timeout(limit)),
                }
            }
        };
        // A call is not polled after it is ready; `carry` is there exactly once.
        let Some(Carry { meta, again }) = this.carry.take() else {
            return Poll::Pending;
        };
        Poll::Ready(Completion {
            meta,
            result,
            latency: this.start.map(|s| s.elapsed()),
            again,
            called: true,
        })
    }
}
