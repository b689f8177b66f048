//! `Limit`: the extension point for a limit kept outside this process (a rate or an
//! in-flight bound shared through a server), and the admission that adapts it to a stage.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Sleep;

use crate::error::ConfigProblem;
use crate::failure::BoxError;
use crate::policy::{Admission, Finished, Invalid, Policy, Verdict};

/// The first wait after a failed acquire; each failure in a row doubles it, up to
/// [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(10);
/// The longest wait between two acquires that failed: an outage that ends costs at most this
/// much more wait.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A limit a stage asks before each call, implemented outside flowline: a rate or an
/// in-flight bound shared by several processes through a server (`flowline-redis` has
/// `RedisRate` and `RedisInflight`), or any other gate. Given to a stage with
/// [`AsyncStage::limit`](crate::AsyncStage::limit), it is a gate like
/// [`rate_limit`](crate::AsyncStage::rate_limit) and
/// [`inflight`](crate::AsyncStage::inflight).
///
/// A stage calls [`acquire`](Limit::acquire) once per call, before the call starts, and
/// keeps the [`Permit`](Limit::Permit) it returns until the call ends (however it ends);
/// dropping the permit gives back what it holds (an in-flight slot). A rate's permit holds
/// nothing: `()`. The stage polls the future from its own task, without blocking it; one
/// acquire is pending per stage at a time.
///
/// **Errors are retried, never fatal to an item.** When `acquire` fails (the server is
/// unreachable), the stage logs the error (`tracing`, level `warn`, with the stage's name)
/// and asks again after a backoff (10 ms, doubling up to 1 s, reset by a success). No call
/// starts meanwhile, so no item is lost or failed for it: the items wait in the stage and the
/// source is held back by the full channels, as for any closed gate. A run that must not wait
/// for an outage can be cancelled ([`Handle::cancel`](crate::Handle::cancel)). An `acquire`
/// that cannot succeed whatever happens (a wrong setting) belongs in
/// [`check`](Limit::check), which fails the run before it starts.
///
/// ```
/// use flowline::prelude::*;
/// use flowline::Limit;
/// use std::sync::Arc;
/// use tokio::sync::{OwnedSemaphorePermit, Semaphore};
///
/// /// Two calls at once, through a semaphore (in place of a server).
/// #[derive(Debug)]
/// struct Two(Arc<Semaphore>);
///
/// impl Limit for Two {
///     type Permit = OwnedSemaphorePermit;
///     fn acquire(&self) -> impl Future<Output = Result<Self::Permit, BoxError>> + Send + 'static {
///         let sem = self.0.clone();
///         async move { Ok(sem.acquire_owned().await?) }
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let sem = Arc::new(Semaphore::new(2));
/// let t = tokio::time::Instant::now();
/// let report = Pipeline::from_iter(0..6u32)
///     .map_async("api", |x| async move {
///         tokio::time::sleep(std::time::Duration::from_millis(100)).await;
///         x
///     })
///     .workers(8)
///     .limit(Two(sem.clone()))
///     .run().await.unwrap();
/// assert_eq!(report.delivered(), 6);
/// assert_eq!(t.elapsed().as_millis(), 300);      // 6 calls, 2 at a time
/// assert_eq!(sem.available_permits(), 2);        // every permit came back
/// # }
/// ```
pub trait Limit: fmt::Debug + Send + Sync + 'static {
    /// What a call holds while it runs; dropped when the call ends.
    type Permit: Send + 'static;

    /// Waits for leave to start one call. The future must not borrow `self` (clone what it
    /// needs): the stage keeps it across polls of its own task.
    fn acquire(&self) -> impl Future<Output = Result<Self::Permit, BoxError>> + Send + 'static;

    /// The first invalid setting, if any: reported with the run's other configuration
    /// errors before anything runs ([`Error::Config`](crate::Error::Config)). The problem's
    /// `stage` is filled in by the stage the limit is given to.
    ///
    /// ```
    /// use flowline::{BoxError, ConfigProblem, Limit};
    /// # use flowline::prelude::*;
    /// #[derive(Debug)]
    /// struct Quota(u32);
    /// impl Limit for Quota {
    ///     type Permit = ();
    ///     fn acquire(&self) -> impl Future<Output = Result<(), BoxError>> + Send + 'static {
    ///         async { Ok(()) }
    ///     }
    ///     fn check(&self) -> Result<(), ConfigProblem> {
    ///         if self.0 > 0 { return Ok(()) }
    ///         Err(ConfigProblem {
    ///             stage: String::new(),
    ///             option: "quota",
    ///             value: self.0.to_string(),
    ///             reason: "must be at least 1",
    ///         })
    ///     }
    /// }
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let err = Pipeline::from_iter(0..3u32)
    ///     .map_async("api", |x| async move { x })
    ///     .limit(Quota(0))
    ///     .run().await.unwrap_err();
    /// assert_eq!(err.to_string(), "invalid configuration: stage `api`: quota = 0: must be at least 1");
    /// # }
    /// ```
    fn check(&self) -> Result<(), ConfigProblem> {
        Ok(())
    }
}

/// A [`Limit`] as a stage's policy.
pub(crate) struct External<L>(pub(crate) Arc<L>);

impl<L: Limit> fmt::Debug for External<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

type Acquire<P> = Pin<Box<dyn Future<Output = Result<P, BoxError>> + Send>>;

impl<L: Limit> Policy for External<L> {
    fn invalid(&self) -> Option<Invalid> {
        self.0.check().err().map(|p| (p.option, p.value, p.reason))
    }

    fn admission(&self) -> Box<dyn Admission> {
        Box::new(Acquiring::<L> {
            limit: self.0.clone(),
            pending: None,
            backoff: None,
            failures: 0,
            granted: None,
            held: HashMap::new(),
        })
    }
}

/// One stage's use of a [`Limit`]: the acquire in progress, the permit granted to the call
/// about to start, and the permits of the calls in flight.
struct Acquiring<L: Limit> {
    limit: Arc<L>,
    pending: Option<Acquire<L::Permit>>,
    /// After a failed acquire: when to ask again.
    backoff: Option<Pin<Box<Sleep>>>,
    /// Failed acquires in a row.
    failures: u32,
    granted: Option<(u64, L::Permit)>,
    held: HashMap<u64, L::Permit>,
}

impl<L: Limit> Acquiring<L> {
    fn delay(&self) -> Duration {
        let doublings = self.failures.saturating_sub(1).min(16);
        BACKOFF_MIN.saturating_mul(1 << doublings).min(BACKOFF_MAX)
    }
}

impl<L: Limit> Admission for Acquiring<L> {
    fn poll_admit(&mut self, cx: &mut Context<'_>, call: u64, _want: usize) -> Poll<Verdict> {
        if let Some((c, _)) = &self.granted {
            if *c == call {
                return Poll::Ready(Verdict::Go);
            }
            // A permit for a call that never started (not announced): not used, given back.
            self.granted = None;
        }
        loop {
            if let Some(sleep) = &mut self.backoff {
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.backoff = None;
            }
            let fut = self
                .pending
                .get_or_insert_with(|| Box::pin(self.limit.acquire()));
            match fut.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(permit)) => {
                    self.pending = None;
                    self.failures = 0;
                    self.granted = Some((call, permit));
                    return Poll::Ready(Verdict::Go);
                }
                Poll::Ready(Err(error)) => {
                    self.pending = None;
                    self.failures = self.failures.saturating_add(1);
                    let delay = self.delay();
                    tracing::warn!(
                        limit = ?self.limit,
                        failures = self.failures,
                        retry_in = ?delay,
                        "a shared limit failed to grant a call: {error}; no call starts until it does"
                    );
                    self.backoff = Some(Box::pin(tokio::time::sleep(delay)));
                }
            }
        }
    }

    fn cancel(&mut self, call: u64) {
        if self.granted.as_ref().is_some_and(|(c, _)| *c == call) {
            self.granted = None;
        }
    }

    fn started(&mut self, call: u64) {
        if let Some((c, permit)) = self.granted.take() {
            if c == call {
                self.held.insert(call, permit);
            }
        }
    }

    fn finished(&mut self, call: &Finished<'_>) {
        self.held.remove(&call.call);
    }
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;
    use crate::{ConfigProblem, Limit};
    use std::future::Future;
    use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering::SeqCst};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    use tokio::time::Instant;

    /// An in-memory shared bound, standing in for a server: `n` slots, and the first
    /// `down` acquires fail as if the server were unreachable.
    #[derive(Debug, Clone)]
    struct Memory {
        n: usize,
        held: Arc<AtomicUsize>,
        peak: Arc<AtomicUsize>,
        down: Arc<AtomicU32>,
        failed_at: Arc<Mutex<Vec<Duration>>>,
        t0: Instant,
    }

    impl Memory {
        fn new(n: usize, down: u32) -> Self {
            Memory {
                n,
                held: Arc::new(AtomicUsize::new(0)),
                peak: Arc::new(AtomicUsize::new(0)),
                down: Arc::new(AtomicU32::new(down)),
                failed_at: Arc::new(Mutex::new(Vec::new())),
                t0: Instant::now(),
            }
        }
    }

    /// A slot: given back when dropped.
    struct Slot(Arc<AtomicUsize>);
    impl Drop for Slot {
        fn drop(&mut self) {
            self.0.fetch_sub(1, SeqCst);
        }
    }

    impl Limit for Memory {
        type Permit = Slot;
        fn acquire(&self) -> impl Future<Output = Result<Slot, BoxError>> + Send + 'static {
            let me = self.clone();
            async move {
                if me
                    .down
                    .fetch_update(SeqCst, SeqCst, |d| d.checked_sub(1))
                    .is_ok()
                {
                    me.failed_at.lock().unwrap().push(me.t0.elapsed());
                    return Err("connection refused".into());
                }
                loop {
                    let now = me.held.load(SeqCst);
                    if now < me.n
                        && me
                            .held
                            .compare_exchange(now, now + 1, SeqCst, SeqCst)
                            .is_ok()
                    {
                        me.peak.fetch_max(now + 1, SeqCst);
                        return Ok(Slot(me.held.clone()));
                    }
                    // A server would be asked again; here, poll every millisecond.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
        fn check(&self) -> Result<(), ConfigProblem> {
            if self.n == 0 {
                return Err(ConfigProblem {
                    stage: String::new(),
                    option: "memory_slots",
                    value: "0".into(),
                    reason: "must be at least 1",
                });
            }
            Ok(())
        }
    }

    fn sleepy(ms: u64) -> impl Fn(u32) -> tokio::time::Sleep + Clone {
        move |_| tokio::time::sleep(Duration::from_millis(ms))
    }

    #[tokio::test(start_paused = true)]
    async fn a_limit_bounds_the_calls_and_gets_every_permit_back() {
        let limit = Memory::new(3, 0);
        let t0 = Instant::now();
        let report = Pipeline::from_iter(0..30u32)
            .map_async("api", sleepy(10))
            .workers(8)
            .limit(limit.clone())
            .run()
            .await
            .unwrap();
        assert_eq!(report.delivered(), 30);
        assert_eq!(limit.peak.load(SeqCst), 3);
        assert_eq!(limit.held.load(SeqCst), 0);
        // 30 calls of 10 ms, 3 at a time (a freed slot is seen by the poll at that instant).
        assert_eq!(t0.elapsed(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_call_and_a_refused_call_give_their_permits_back() {
        let limit = Memory::new(1, 0);
        let report = Pipeline::from_iter(0..5u32)
            .try_map_async("api", |_| async { Err::<u32, _>("503") })
            .limit(limit.clone())
            .circuit_breaker(Breaker::consecutive_failures(1).on_open(OnOpen::FailFast))
            .run()
            .await
            .unwrap();
        assert_eq!(report.failures, 5);
        assert_eq!(limit.held.load(SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_limit_delays_items_with_backoff_and_loses_none() {
        // The first 5 acquires fail: waits of 10, 20, 40, 80, 160 ms, then every call runs.
        let limit = Memory::new(2, 5);
        let t0 = Instant::now();
        let report = Pipeline::from_iter(0..4u32)
            .map_async("api", sleepy(10))
            .workers(4)
            .limit(limit.clone())
            .run()
            .await
            .unwrap();
        assert_eq!((report.delivered(), report.failures), (4, 0));
        assert!(report.is_balanced());
        assert_eq!(
            *limit.failed_at.lock().unwrap(),
            [0, 10, 30, 70, 150].map(Duration::from_millis)
        );
        // Granted at 310 ms: two calls of 10 ms, then the other two (seen free at the poll
        // at 320 ms).
        assert_eq!(t0.elapsed(), Duration::from_millis(330));
    }

    #[tokio::test(start_paused = true)]
    async fn the_backoff_stops_at_one_second() {
        let limit = Memory::new(1, 12);
        Pipeline::from_iter(0..1u32)
            .map_async("api", sleepy(1))
            .limit(limit.clone())
            .run()
            .await
            .unwrap();
        let at = limit.failed_at.lock().unwrap().clone();
        let gaps: Vec<u128> = at.windows(2).map(|w| (w[1] - w[0]).as_millis()).collect();
        assert_eq!(
            gaps,
            [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000, 1000]
        );
    }

    #[tokio::test]
    async fn a_bad_limit_is_a_config_error_naming_the_stage_option_and_value() {
        let err = Pipeline::from_iter(0..3u32)
            .map_async("api", |x| async move { x })
            .workers(0)
            .limit(Memory::new(0, 0))
            .run()
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: stage `api`: workers = 0: must be at least 1; stage `api`: memory_slots = 0: must be at least 1"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_run_gives_back_the_permits_in_flight() {
        let limit = Memory::new(2, 0);
        let handle = Pipeline::from_iter(0..10u32)
            .map_async("api", sleepy(1000))
            .workers(4)
            .limit(limit.clone())
            .spawn();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(limit.held.load(SeqCst), 2);
        handle.cancel();
        let _ = handle.join().await;
        assert_eq!(limit.held.load(SeqCst), 0);
    }
}
