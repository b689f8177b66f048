//! `map_async` / `try_map_async`: an async stage with `workers(n)` calls in flight.
//!
//! Each async stage is one driver task. It pulls chunks from the stages before it, keeps up to
//! `n` calls in flight, and sends results on in chunks. The driver polls its calls itself,
//! on its own task: a consumer that is busy elsewhere never stops the calls from making
//! progress (the `buffer_unordered` starvation trap, futures-rs #2387, cannot happen).
//!
//! A call is polled once right where it is created; only a call that is not ready at once is
//! boxed into the in-flight set, and the box of a call that was ready at once is reused by
//! the next call. Cheap calls (a cache hit, a computed value) therefore cost no allocation
//! and no scheduling at all.
//!
//! - [`builder`]: [`AsyncStage`] and its options.
//! - [`call`]: one call ([`StageFn`], the per-call future).
//! - [`routed`]: failures as items ([`Failed`]) and the attempt number ([`attempt`]).
//! - [`driver`]: the task loop. Flow control and resilience come from `crate::policy`
//!   through two traits; the driver names no policy.

mod builder;
mod call;
mod driver;
mod routed;

use std::future::Future;

use crate::Pipeline;
use crate::error::BoxError;

pub use builder::AsyncStage;
pub use call::{Fallible, Infallible, StageFn};
pub use routed::{Failed, Routed, attempt};

pub(crate) fn map_async<T, U, F, Fut>(
    p: Pipeline<T>,
    name: &str,
    f: F,
) -> AsyncStage<T, U, Infallible<F, Fut>>
where
    T: Send + 'static,
    U: Send + 'static,
    F: Fn(T) -> Fut + Send + 'static,
    Fut: Future<Output = U> + Send + 'static,
{
    AsyncStage::new(p, name, Infallible::new(f))
}

pub(crate) fn try_map_async<T, U, E, F, Fut>(
    p: Pipeline<T>,
    name: &str,
    f: F,
) -> AsyncStage<T, U, Fallible<F, Fut>>
where
    T: Send + 'static,
    U: Send + 'static,
    E: Into<BoxError> + 'static,
    F: Fn(T) -> Fut + Send + 'static,
    Fut: Future<Output = Result<U, E>> + Send + 'static,
{
    AsyncStage::new(p, name, Fallible::new(f))
}
