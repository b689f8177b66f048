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
//! - `service` (feature `tower`): a `tower::Service` as the call.
//! - [`transient`]: riding out an outage of the stage's server (`transient_if`).
//! - [`driver`]: the task loop over the stage's parts. Flow control and resilience come
//!   from `crate::policy` through two traits; the driver names no policy.
//! - The parts, each with its tests: [`input`] (the input buffer), [`admission`] (the
//!   admission chain), [`inflight`] (the calls in flight and the one path that launches
//!   them), [`reorder`] (places in input order), [`retry_queue`], [`held`] (items an
//!   admission holds), [`latency`] (the latency sampler), [`call_ages`] (for the stall
//!   watchdog), [`output`], [`keyed`] (the calls and waiting items of each key).
//! - The options by role: [`gates`] (admission policies), [`resilience`] (retry, hedge,
//!   transient errors), [`key_by`].
//!
//! ## Keyed concurrency
//!
//! [`AsyncStage::key_by`] runs at most [`per_key`](AsyncStage::per_key) calls (default 1)
//! of one key at a time, each key's items in arrival order, while items of other keys go on
//! up to `workers(n)`. The driver pulls a new item, hashes its key once and either starts
//! it or puts it in its key's waiting queue; when a key's item ends (done, failed or left),
//! the key's next item may start. Waiting items are bounded by
//! [`max_waiting`](AsyncStage::max_waiting): at the bound the stage pulls no input, which
//! back-pressures the source. An item in retry backoff, held by a pausing breaker or
//! waiting out a server outage keeps its key busy, so key order survives every policy.
//! Without `key_by` the stage has no key map and pays nothing for it.
//!
//! Compared with [`partition(n, key, ..)`](crate::Flow::partition): `partition` hashes
//! keys into `n` fixed lanes, each a stage of its own; one slow key stalls every key that
//! shares its lane, and a lane's slots go unused while it waits. `key_by` has one shared
//! pool of workers and a waiting queue per key, so only the slow key's own items wait.
//!
//! With a Redis stream source (the `flowline-redis` crate's `RedisStream`), a keyed stage
//! keeps one key's entries in the order the source hands them to this worker: the stream's
//! order for the entries it reads, while an entry reclaimed from another consumer runs when
//! it is reclaimed. Across workers of one consumer group nothing holds: the group hands
//! entries to consumers without looking at keys. To keep a key's order across workers, let
//! the key pick the worker (e.g. one stream per key range, each read by one consumer).

mod admission;
mod builder;
mod call;
mod call_ages;
mod driver;
mod gates;
mod held;
mod inflight;
mod input;
mod key_by;
mod keyed;
mod latency;
mod output;
mod reorder;
mod resilience;
mod retry_queue;
mod routed;
#[cfg(feature = "tower")]
mod service;
mod transient;

use std::future::Future;

use crate::Pipeline;
use crate::failure::BoxError;

pub use builder::AsyncStage;
pub use call::{Fallible, FallibleWith, Infallible, InfallibleWith, StageFn};
pub use routed::{Failed, Routed, attempt};
#[cfg(feature = "tower")]
pub use service::ServiceCall;
#[cfg(feature = "tower")]
pub(crate) use service::call_service;

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

pub(crate) fn map_async_with<T, U, S, F, Fut>(
    p: Pipeline<T>,
    name: &str,
    state: S,
    f: F,
) -> AsyncStage<T, U, InfallibleWith<S, F, Fut>>
where
    T: Send + 'static,
    U: Send + 'static,
    S: Clone + Send + 'static,
    F: Fn(S, T) -> Fut + Send + 'static,
    Fut: Future<Output = U> + Send + 'static,
{
    AsyncStage::new(p, name, InfallibleWith::new(state, f))
}

pub(crate) fn try_map_async_with<T, U, E, S, F, Fut>(
    p: Pipeline<T>,
    name: &str,
    state: S,
    f: F,
) -> AsyncStage<T, U, FallibleWith<S, F, Fut>>
where
    T: Send + 'static,
    U: Send + 'static,
    E: Into<BoxError> + 'static,
    S: Clone + Send + 'static,
    F: Fn(S, T) -> Fut + Send + 'static,
    Fut: Future<Output = Result<U, E>> + Send + 'static,
{
    AsyncStage::new(p, name, FallibleWith::new(state, f))
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering::SeqCst};

    struct Api {
        calls: AtomicU32,
    }

    impl Api {
        async fn get_user(&self, id: u32) -> Result<String, String> {
            self.calls.fetch_add(1, SeqCst);
            tokio::task::yield_now().await;
            if id == 0 {
                Err("no user 0".into())
            } else {
                Ok(format!("user-{id}"))
            }
        }
    }

    #[tokio::test]
    async fn a_stage_with_state_shares_one_value_and_needs_no_clone() {
        let api = Arc::new(Api {
            calls: AtomicU32::new(0),
        });
        // The closure calls the state as it comes: no `let api = api.clone()` before the
        // `async move`.
        let report = Pipeline::from_iter(0..10u32)
            .try_map_async_with("fetch", api.clone(), |api, id| async move {
                api.get_user(id).await
            })
            .workers(4)
            .run()
            .await
            .unwrap();
        assert_eq!((report.delivered(), report.failures), (9, 1));
        // Every call reached the one `Api`, and the stage kept no copy of the handle.
        assert_eq!(api.calls.load(SeqCst), 10);
        assert_eq!(Arc::strong_count(&api), 1);

        let out = Pipeline::from_iter(1..=3u32)
            .map_async_with("fetch", api.clone(), |api, id| async move {
                api.get_user(id).await.unwrap()
            })
            .collect()
            .await
            .unwrap();
        assert_eq!(out, vec!["user-1", "user-2", "user-3"]);
        assert_eq!(api.calls.load(SeqCst), 13);
    }
}
