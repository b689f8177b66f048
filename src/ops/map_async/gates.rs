//! The gates of an async stage, as its options: `rate_limit`, `inflight`, `limit`,
//! `circuit_breaker` and `adaptive` (admission policies a call passes, in the order given;
//! see [the order of the flow-control options](AsyncStage#the-order-of-the-flow-control-options)),
//! and their tests.

use std::sync::Arc;

use crate::policy::Policy;
use crate::policy::adaptive::Adaptive;
use crate::policy::breaker::Breaker;
use crate::policy::inflight::Inflight;
use crate::policy::limit::{External, Limit};
use crate::policy::rate::Rate;

use super::builder::AsyncStage;
use super::call::StageFn;

impl<T: Send + 'static, U: Send + 'static, S: StageFn<T, U>> AsyncStage<T, U, S> {
    /// Adds an admission policy: the next gate a call passes before it starts.
    pub(crate) fn policy(mut self, policy: impl Policy + 'static) -> Self {
        self.options.policies.push(Arc::new(policy));
        self
    }

    /// Starts calls at most at `rate` (delays, never drops). Clones of one [`Rate`] share
    /// one budget, so the same `Rate` on two stages holds their sum to it. A gate: see
    /// [the order of the flow-control options](AsyncStage#the-order-of-the-flow-control-options).
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let t = tokio::time::Instant::now();
    /// Pipeline::from_iter(0..5u32)
    ///     .map_async("api", |x| async move { x })
    ///     .workers(4)
    ///     .rate_limit(Rate::per_second(4))
    ///     .run().await.unwrap();
    /// assert_eq!(t.elapsed(), Duration::from_secs(1));   // 5 calls, 4 gaps of 250 ms
    /// # }
    /// ```
    pub fn rate_limit(self, rate: Rate) -> Self {
        self.policy(rate)
    }

    /// Also bounds this stage's calls by a shared [`Inflight`] (every stage given the same
    /// value counts against it). A gate: see
    /// [the order of the flow-control options](AsyncStage#the-order-of-the-flow-control-options).
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let db = Inflight::new(2);
    /// let out = Pipeline::from_iter(0..10u32)
    ///     .map_async("db", |x| async move { x })
    ///     .workers(8)
    ///     .inflight(&db)
    ///     .collect().await.unwrap();
    /// assert_eq!(out.len(), 10);
    /// # }
    /// ```
    pub fn inflight(self, bound: &Inflight) -> Self {
        self.policy(bound.clone())
    }

    /// Also passes each call through a [`Limit`] implemented outside flowline (a rate or an
    /// in-flight bound shared by several processes through a server): the call starts once
    /// the limit's `acquire` has granted it a permit, and the permit is dropped when the call
    /// ends. An acquire that fails is retried with backoff; no item is failed for it (see
    /// [`Limit`]). A gate: see
    /// [the order of the flow-control options](AsyncStage#the-order-of-the-flow-control-options).
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use std::sync::Arc;
    ///
    /// #[derive(Debug)]
    /// struct Ticket(Arc<tokio::sync::Semaphore>);
    /// impl Limit for Ticket {
    ///     type Permit = tokio::sync::OwnedSemaphorePermit;
    ///     fn acquire(&self) -> impl Future<Output = Result<Self::Permit, BoxError>> + Send + 'static {
    ///         let sem = self.0.clone();
    ///         async move { Ok(sem.acquire_owned().await?) }
    ///     }
    /// }
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let out = Pipeline::from_iter(0..10u32)
    ///     .map_async("db", |x| async move { x })
    ///     .workers(8)
    ///     .limit(Ticket(Arc::new(tokio::sync::Semaphore::new(2))))
    ///     .collect().await.unwrap();
    /// assert_eq!(out.len(), 10);
    /// # }
    /// ```
    pub fn limit(self, limit: impl Limit) -> Self {
        self.policy(External(Arc::new(limit)))
    }

    /// Guards the calls with a circuit breaker (see [`Breaker`]; clones share one state).
    /// While it is open the stage pauses the job ([`OnOpen::Pause`](crate::OnOpen::Pause):
    /// the source pulls nothing, no call starts, and the items whose calls failed wait and
    /// are tried again) or fails items fast ([`OnOpen::FailFast`](crate::OnOpen::FailFast)).
    /// Needs `T: Clone`: each call gets a copy of the input, for another attempt. A gate: see
    /// [the order of the flow-control options](AsyncStage#the-order-of-the-flow-control-options).
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let breaker = Breaker::consecutive_failures(5).cooldown(Duration::from_secs(1));
    /// let report = Pipeline::from_iter(0..100u32)
    ///     .try_map_async("api", |x| async move { Ok::<_, String>(x) })
    ///     .circuit_breaker(breaker.clone())
    ///     .run().await.unwrap();
    /// assert_eq!((report.delivered(), breaker.state()), (100, BreakerState::Closed));
    /// # }
    /// ```
    pub fn circuit_breaker(mut self, breaker: Breaker) -> Self
    where
        T: Clone,
    {
        self.copy = Some(T::clone);
        self.policy(breaker)
    }

    /// Lets the number of calls in flight follow an adaptive limit (see [`Adaptive`])
    /// instead of a fixed `workers(n)`. A lower limit only stops new calls; calls in flight
    /// are never cancelled. A gate too (it admits every call within its limit): see
    /// [the order of the flow-control options](AsyncStage#the-order-of-the-flow-control-options).
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let out = Pipeline::from_iter(0..100u32)
    ///     .map_async("api", |x| async move { x })
    ///     .adaptive(Adaptive::aimd(1..=32))
    ///     .collect().await.unwrap();
    /// assert_eq!(out.len(), 100);
    /// # }
    /// ```
    pub fn adaptive(self, limit: Adaptive) -> Self {
        self.policy(limit)
    }
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;
    use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    use tokio::time::Instant;

    /// Ten items against a backend that is down, a fail-fast breaker that opens on the
    /// first failure, and a rate of 10/s: returns how long the run took and how many calls
    /// were made.
    async fn breaker_and_rate(breaker_first: bool) -> (Duration, u32) {
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let stage = Pipeline::from_iter(0..10u32).try_map_async("api", move |_| {
            c.fetch_add(1, SeqCst);
            async { Err::<u32, _>("503") }
        });
        let breaker = Breaker::consecutive_failures(1)
            .cooldown(Duration::from_secs(60))
            .on_open(OnOpen::FailFast);
        let rate = Rate::per_second(10);
        let stage = if breaker_first {
            stage.circuit_breaker(breaker).rate_limit(rate)
        } else {
            stage.rate_limit(rate).circuit_breaker(breaker)
        };
        let t0 = Instant::now();
        let report = stage.run().await.unwrap();
        assert_eq!(report.failures, 10);
        assert!(report.is_balanced());
        (t0.elapsed(), calls.load(SeqCst))
    }

    #[tokio::test(start_paused = true)]
    async fn admission_follows_the_order_the_options_were_given() {
        // Breaker first: the nine refused items never wait for a rate permit.
        assert_eq!(breaker_and_rate(true).await, (Duration::ZERO, 1));
        // Rate first: every item takes its permit (100 ms apart), then meets the breaker.
        assert_eq!(
            breaker_and_rate(false).await,
            (Duration::from_millis(900), 1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_call_gives_back_its_inflight_slot() {
        // The shared slot is taken before the breaker refuses; it must not leak.
        let bound = Inflight::new(1);
        let report = Pipeline::from_iter(0..5u32)
            .try_map_async("api", |_| async { Err::<u32, _>("503") })
            .inflight(&bound)
            .circuit_breaker(Breaker::consecutive_failures(1).on_open(OnOpen::FailFast))
            .run()
            .await
            .unwrap();
        assert_eq!(report.failures, 5);
        assert_eq!(bound.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_option_given_twice_applies_both() {
        let t0 = Instant::now();
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        Pipeline::from_iter(0..3u32)
            .map_async("api", move |x| {
                l.lock().unwrap().push(t0.elapsed().as_millis() as u64);
                async move { x }
            })
            .workers(4)
            .rate_limit(Rate::per_second(100))
            .rate_limit(Rate::per_second(10))
            .run()
            .await
            .unwrap();
        assert_eq!(*log.lock().unwrap(), vec![0, 100, 200]);
    }
}
