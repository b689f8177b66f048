//! The resilience options of an async stage: `retry`, `hedge` and `transient_if` (each
//! needs a copy of the input for another call), and their tests.

use std::sync::Arc;

use crate::failure::ItemError;
use crate::policy::hedge::Hedge;
use crate::policy::retry::Retry;

use super::builder::{AsyncStage, TransientIf};
use super::call::StageFn;

impl<T: Send + 'static, U: Send + 'static, S: StageFn<T, U>> AsyncStage<T, U, S> {
    /// Retries failed calls (see [`Retry`]). An item waiting for its next attempt sits in a
    /// delay queue inside the stage and does not take a worker; with
    /// [`Retry::pause_source`] the job pauses while it waits (the run's source pulls nothing and
    /// the stage starts no new item). Needs `T: Clone`:
    /// each attempt gets a copy of the input. The failure of an item that ran out of
    /// attempts records how many were made (`Failure::attempts`); each retry is counted in
    /// the stage's `retried`.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let report = Pipeline::from_iter([1u32])
    ///     .try_map_async("down", |_| async { Err::<u32, _>("503") })
    ///     .retry(Retry::constant(Duration::from_millis(100)).max_attempts(4))
    ///     .run().await.unwrap();
    /// assert_eq!(report.failure_sample[0].attempts, 4);
    /// assert_eq!(report.stage("down").unwrap().retried, 3);
    /// # }
    /// ```
    pub fn retry(mut self, retry: Retry) -> Self
    where
        T: Clone,
    {
        self.options.retry = Some(retry);
        self.copy = Some(T::clone);
        self
    }

    /// Hedged requests (see [`Hedge`]): a call that has not answered after the hedge's
    /// delay gets a second call for the same item; the first answer is the item's and the
    /// other call is dropped. Each item still ends once. Needs `T: Clone`: the second call
    /// gets a copy of the input. Hedging applies to every attempt of a stage with `retry`.
    /// The two calls of one item count as one of `workers(n)` (the budget bounds the
    /// extra ones); a stage with `rate_limit`, `inflight`, `circuit_breaker` or `adaptive`
    /// refuses a hedge before the run starts, as its second call would not pass them.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let hedge = Hedge::after(Duration::from_millis(50));
    /// let out = Pipeline::from_iter(0..20u32)
    ///     .map_async("lookup", |x| async move { x })
    ///     .hedge(hedge.clone())
    ///     .collect().await.unwrap();
    /// assert_eq!(out.len(), 20);
    /// assert_eq!(hedge.extra_calls(), 0, "every call answered at once");
    /// # }
    /// ```
    pub fn hedge(mut self, hedge: Hedge) -> Self
    where
        T: Clone,
    {
        self.options.hedge = Some(hedge);
        self.copy = Some(T::clone);
        self
    }

    /// Rides out an outage of the stage's server: a call that fails with an error `f` calls
    /// transient (a connection refused or reset, a server restarting: e.g.
    /// [`ItemError::is_transient`], or a store crate's own classifier) is neither an attempt
    /// nor a failure. The stage pauses the job — the run's source pulls nothing and the
    /// stage starts no new call — and makes that item's call again after the waits of the
    /// run's [`Outage`](crate::Outage) policy, one call at a time while the server is down
    /// (a probe, like a half-open breaker). The first call that gets an answer (anything
    /// but a transient error) ends the outage: the items that waited go first, then the job
    /// resumes by itself. An outage longer than the policy's limit ends the run with
    /// [`Error::Outage`](crate::Error::Outage), the waiting items unfinished, none failed.
    ///
    /// Other errors take the usual way ([`retry`](AsyncStage::retry), the breaker, the dead
    /// letters). Each transient failure is counted in the stage's `transient_retries`.
    /// Needs `T: Clone`: each call gets a copy of the input, for the next try.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let t0 = tokio::time::Instant::now();
    /// let report = Pipeline::from_iter(0..10u32)
    ///     .try_map_async("db", move |x| async move {
    ///         // The server is down for the first 3 seconds.
    ///         if t0.elapsed() < Duration::from_secs(3) {
    ///             Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
    ///         } else {
    ///             Ok(x)
    ///         }
    ///     })
    ///     .transient_if(ItemError::is_transient)
    ///     .run().await.unwrap();
    /// assert_eq!((report.delivered(), report.failures), (10, 0));
    /// assert!(report.stage("db").unwrap().transient_retries > 1);
    /// # }
    /// ```
    pub fn transient_if(mut self, f: impl Fn(&ItemError) -> bool + Send + Sync + 'static) -> Self
    where
        T: Clone,
    {
        self.options.transient = Some(TransientIf(Arc::new(f)));
        self.copy = Some(T::clone);
        self
    }
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;
    use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    use tokio::time::Instant;

    /// An ordered stage of 100 items, 4 workers, 10 ms calls, where item 0 fails once
    /// after 10 ms and backs off 1 s: the output and the call starts during the backoff.
    async fn ordered_around_a_backoff(window: Option<usize>) -> (Vec<u32>, usize) {
        let t0 = Instant::now();
        let starts = Arc::new(Mutex::new(Vec::new()));
        let s = starts.clone();
        let failed = Arc::new(AtomicU32::new(0));
        let mut stage = Pipeline::from_iter(0..100u32)
            .try_map_async("api", move |x| {
                s.lock().unwrap().push(t0.elapsed().as_millis() as u64);
                let fail = x == 0 && failed.fetch_add(1, SeqCst) == 0;
                async move {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    if fail { Err("503") } else { Ok(x) }
                }
            })
            .workers(4)
            .retry(Retry::constant(Duration::from_secs(1)));
        if let Some(n) = window {
            stage = stage.ordered_window(n);
        }
        let out = stage.collect().await.unwrap();
        let during = starts
            .lock()
            .unwrap()
            .iter()
            .filter(|t| (10..1010).contains(*t))
            .count();
        (out, during)
    }

    #[tokio::test(start_paused = true)]
    async fn an_ordered_stage_keeps_working_while_one_item_backs_off() {
        // Items 1..=3 start with item 0; the other 96 all start during its backoff.
        let (out, during) = ordered_around_a_backoff(None).await;
        assert_eq!(out, (0..100).collect::<Vec<_>>());
        assert_eq!(during, 96);
        // A window of 8 holds items 0..=7: items 4..=7 start, then the stage waits.
        let (out, during) = ordered_around_a_backoff(Some(8)).await;
        assert_eq!(out, (0..100).collect::<Vec<_>>());
        assert_eq!(during, 4);
    }
}
