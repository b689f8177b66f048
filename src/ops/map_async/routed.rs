//! Failures as items: [`AsyncStage::results`](crate::AsyncStage::results) emits each item's
//! outcome, and an item that failed (after its retries) travels on as a typed [`Failed`]
//! with its input, for a branch of the pipeline to handle. Also [`attempt`]: the attempt
//! a call is making.

use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use futures_util::TryFutureExt as _;

use crate::failure::ItemError;

use super::call::{StageFn, sealed};

/// An item whose call failed, as an item of the pipeline (see
/// [`AsyncStage::results`](crate::AsyncStage::results)): its input, why it failed, the stage
/// and the attempts made.
///
/// ```
/// use flowline::prelude::*;
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let out = Pipeline::from_iter(["1", "x"])
///     .try_map_async("parse", |s| async move { s.parse::<u32>() })
///     .results()
///     .collect().await.unwrap();
/// let Err(failed) = &out[1] else { panic!() };
/// assert_eq!((failed.input, &*failed.stage, failed.attempts), ("x", "parse", 1));
/// # }
/// ```
#[derive(Clone)]
pub struct Failed<T> {
    /// The item's input.
    pub input: T,
    /// Why it failed.
    pub error: ItemError,
    /// The name of the stage where it failed.
    pub stage: Arc<str>,
    /// Attempts made (1 without retries).
    pub attempts: u32,
}

impl<T: fmt::Debug> fmt::Debug for Failed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Failed")
            .field("input", &self.input)
            .field("error", &self.error)
            .field("stage", &self.stage)
            .field("attempts", &self.attempts)
            .finish()
    }
}

impl<T> fmt::Display for Failed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "stage `{}` failed after {} attempt(s): {}",
            self.stage, self.attempts, self.error
        )
    }
}

impl<T: fmt::Debug> std::error::Error for Failed<T> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// Makes the output of a routed stage's failed item.
pub(super) type Route<T, U> = fn(T, ItemError, u32, &Arc<str>) -> U;

/// The [`Route`] of [`AsyncStage::results`](crate::AsyncStage::results).
pub(super) fn route<T, U>(
    input: T,
    error: ItemError,
    attempts: u32,
    stage: &Arc<str>,
) -> Result<U, Failed<T>> {
    Err(Failed {
        input,
        error,
        stage: stage.clone(),
        attempts,
    })
}

/// A stage's call whose outputs are wrapped in `Ok` (failures come from the driver).
/// Named in [`AsyncStage`](crate::AsyncStage)'s type only.
#[doc(hidden)]
pub struct Routed<S, U>(S, PhantomData<fn() -> U>);

impl<S, U> Routed<S, U> {
    pub(super) fn new(s: S) -> Self {
        Routed(s, PhantomData)
    }
}

impl<S, U> sealed::Sealed for Routed<S, U> {}

impl<T, U, S> StageFn<T, Result<U, Failed<T>>> for Routed<S, U>
where
    S: StageFn<T, U>,
    T: Send + 'static,
    U: Send + 'static,
{
    type Future = futures_util::future::MapOk<S::Future, fn(U) -> Result<U, Failed<T>>>;
    const ALWAYS_READY: bool = S::ALWAYS_READY;
    #[inline]
    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), crate::BoxError>> {
        self.0.poll_ready(cx)
    }
    #[inline]
    fn call(&mut self, item: T) -> Self::Future {
        self.0
            .call(item)
            .map_ok(Ok as fn(U) -> Result<U, Failed<T>>)
    }
}

thread_local! {
    /// The attempt of the call being made on this thread (0: none is being made).
    static ATTEMPT: Cell<u32> = const { Cell::new(0) };
}

/// The attempt the call being made is (1 for the first, 2 for the first retry, ...), when
/// read by a stage's function as it makes the call — in the closure, before its `async`
/// block, whose body runs later. Outside a call it is 1.
///
/// ```
/// use flowline::prelude::*;
/// use std::time::Duration;
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let out = Pipeline::from_iter([7u32])
///     .try_map_async("flaky", |x| {
///         let attempt = flowline::attempt();
///         async move { if attempt < 3 { Err("busy") } else { Ok((x, attempt)) } }
///     })
///     .retry(Retry::constant(Duration::from_millis(10)).max_attempts(5))
///     .collect().await.unwrap();
/// assert_eq!(out, vec![(7, 3)]);
/// # }
/// ```
pub fn attempt() -> u32 {
    ATTEMPT.with(|a| a.get().max(1))
}

/// Makes `attempt()` read `n` while `f` runs.
pub(super) fn with_attempt<R>(n: u32, f: impl FnOnce() -> R) -> R {
    struct Reset(u32);
    impl Drop for Reset {
        fn drop(&mut self) {
            ATTEMPT.with(|a| a.set(self.0));
        }
    }
    let _reset = Reset(ATTEMPT.with(|a| a.replace(n)));
    f()
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn failures_reach_their_branch_once_with_input_and_attempts() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let (ok, failed) = Pipeline::from_iter(0..10u32)
            .try_map_async("api", move |x| {
                s.lock().unwrap().push((x, crate::attempt()));
                async move { if x % 3 == 0 { Err("503") } else { Ok(x * 10) } }
            })
            .workers(4)
            .retry(Retry::constant(Duration::from_millis(10)).max_attempts(3))
            .results()
            .branch_result();
        let (oks, errs) = (Collected::new(), Collected::new());
        let report = Graph::new()
            .collect(ok, &oks)
            .collect(
                failed.map(|f| {
                    (
                        f.input,
                        f.attempts,
                        f.stage.to_string(),
                        f.error.to_string(),
                    )
                }),
                &errs,
            )
            .run()
            .await
            .unwrap();
        assert_eq!(oks.take(), vec![10, 20, 40, 50, 70, 80]);
        let api = || "api".to_string();
        let e = || "503".to_string();
        assert_eq!(
            errs.take(),
            vec![
                (0, 3, api(), e()),
                (3, 3, api(), e()),
                (6, 3, api(), e()),
                (9, 3, api(), e())
            ]
        );
        // Every item is accounted once: delivered to one sink or the other, none failed.
        assert_eq!((report.delivered(), report.failures), (10, 0));
        let stage = report.stage("api").unwrap();
        assert_eq!((stage.received, stage.failed, stage.retried), (10, 0, 8));
        assert!(report.is_balanced());
        // The calls saw their attempt numbers.
        let mut attempts: Vec<_> = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(x, _)| *x == 3)
            .map(|(_, a)| *a)
            .collect();
        attempts.sort();
        assert_eq!(attempts, vec![1, 2, 3]);
        assert_eq!(crate::attempt(), 1, "outside a call");
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_item_is_routed_too() {
        let out = Pipeline::from_iter(0..3u32)
            .try_map_async("api", |_| async { Err::<u32, _>("503") })
            .circuit_breaker(
                Breaker::consecutive_failures(1)
                    .cooldown(Duration::from_secs(60))
                    .on_open(OnOpen::FailFast),
            )
            .results()
            .collect()
            .await
            .unwrap();
        let kinds: Vec<_> = out
            .iter()
            .map(|r| r.as_ref().map_err(|f| (f.input, f.error.kind())))
            .collect();
        assert_eq!(
            kinds,
            vec![
                Err((0, "error")),
                Err((1, "circuit_open")),
                Err((2, "circuit_open"))
            ]
        );
    }
}
