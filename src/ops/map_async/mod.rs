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

use std::collections::{BTreeSet, BinaryHeap, VecDeque};
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt as _};
use futures_util::{FutureExt as _, TryFutureExt as _};
use hdrhistogram::Histogram;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{PollSemaphore, PollSender};

use crate::Pipeline;
use crate::error::{BoxError, Error, FailedInput, Failure, ItemError};
use crate::policy::adaptive::{Adaptive, Sample};
use crate::policy::breaker::{Admit, Breaker, OnOpen};
use crate::policy::inflight::Inflight;
use crate::policy::rate::{Rate, RateWait};
use crate::policy::retry::Retry;
use crate::report::{StageStats, latency_histogram};
use crate::runtime::chunk::{CHUNK_CAP, Chunk, Outcome, Ticket};
use crate::runtime::gate::GateHold;
use crate::runtime::hop::{HOP_CHUNKS, hop};
use crate::runtime::{RunCtx, Upstream};

/// Time one call in this many (latency percentiles come from this sample).
const SAMPLE_EVERY: u64 = 8;
/// Every this many timed calls, the driver checks whether its latency sample is due to be
/// merged into the shared stats (for live snapshots).
const MERGE_EVERY: u64 = 64;
/// How stale the live latency of a stage may get. Merging adds whole histograms (thousands
/// of buckets), so a busy stage merges on time, not on every few hundred calls.
const MERGE_INTERVAL: Duration = Duration::from_millis(100);

/// The call an async stage makes for each item: user code behind a uniform fallible shape.
/// Implemented for the closures given to [`Flow::map_async`](crate::Flow::map_async) and
/// [`Flow::try_map_async`](crate::Flow::try_map_async); users do not implement it.
pub trait StageFn<T, U>: Send + 'static {
    /// The call's future.
    type Future: Future<Output = Result<U, BoxError>> + Send + 'static;
    /// Starts the call for one item.
    fn call(&self, item: T) -> Self::Future;
}

/// An infallible async function (`map_async`).
pub struct Infallible<F, Fut>(F, PhantomData<fn() -> Fut>);

impl<T, U, F, Fut> StageFn<T, U> for Infallible<F, Fut>
where
    F: Fn(T) -> Fut + Send + 'static,
    Fut: Future<Output = U> + Send + 'static,
    U: Send + 'static,
{
    type Future = futures_util::future::Map<Fut, fn(U) -> Result<U, BoxError>>;
    fn call(&self, item: T) -> Self::Future {
        (self.0)(item).map(Ok as fn(U) -> Result<U, BoxError>)
    }
}

/// A fallible async function (`try_map_async`).
pub struct Fallible<F, Fut>(F, PhantomData<fn() -> Fut>);

impl<T, U, E, F, Fut> StageFn<T, U> for Fallible<F, Fut>
where
    F: Fn(T) -> Fut + Send + 'static,
    Fut: Future<Output = Result<U, E>> + Send + 'static,
    E: Into<BoxError> + 'static,
    U: Send + 'static,
{
    type Future = futures_util::future::MapErr<Fut, fn(E) -> BoxError>;
    fn call(&self, item: T) -> Self::Future {
        (self.0)(item).map_err(Into::into as fn(E) -> BoxError)
    }
}

#[derive(Debug, Clone)]
struct Options {
    workers: usize,
    ordered: bool,
    timeout: Option<Duration>,
    rate: Option<Rate>,
    inflight: Option<Inflight>,
    retry: Option<Retry>,
    breaker: Option<Breaker>,
    adaptive: Option<Adaptive>,
}

impl Options {
    /// Whether any flow-control or resilience option is set (else the driver's fast path).
    fn has_extras(&self) -> bool {
        self.rate.is_some()
            || self.inflight.is_some()
            || self.retry.is_some()
            || self.breaker.is_some()
            || self.adaptive.is_some()
    }
}

/// An async stage being configured: options set here apply to this stage only. Any
/// pipeline operator (or terminal) ends the configuration.
///
/// ```
/// use flowline::prelude::*;
/// use std::time::Duration;
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let out = Pipeline::from_iter(0..100u32)
///     .map_async("fetch", |id| async move { id * 2 })
///         .workers(16)                      // 16 calls in flight
///         .timeout(Duration::from_secs(2))  // per call
///     .filter(|x| x % 4 == 0)
///     .collect()
///     .await
///     .unwrap();
/// assert_eq!(out.len(), 50);
/// # }
/// ```
#[must_use = "a stage builder does nothing until its pipeline is run by a terminal"]
pub struct AsyncStage<T, U, S> {
    upstream: Pipeline<T>,
    name: String,
    call: S,
    options: Options,
    keep: Option<fn(&T) -> FailedInput>,
    /// Set by `retry` (which needs `T: Clone`): a copy of the input for the next attempt.
    copy: Option<fn(&T) -> T>,
    _out: PhantomData<fn() -> U>,
}

impl<T, U, S> fmt::Debug for AsyncStage<T, U, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncStage")
            .field("name", &self.name)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl<T: Send + 'static, U: Send + 'static, S: StageFn<T, U>> AsyncStage<T, U, S> {
    pub(crate) fn new(upstream: Pipeline<T>, name: &str, call: S) -> Self {
        AsyncStage {
            upstream,
            name: name.to_string(),
            call,
            options: Options {
                workers: 1,
                ordered: true,
                timeout: None,
                rate: None,
                inflight: None,
                retry: None,
                breaker: None,
                adaptive: None,
            },
            keep: None,
            copy: None,
            _out: PhantomData,
        }
    }

    /// How many calls may be in flight at once (default 1). Must be at least 1.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let out = Pipeline::from_iter(0..8u32)
    ///     .map_async("io", |x| async move { x })
    ///     .workers(4)
    ///     .collect()
    ///     .await
    ///     .unwrap();
    /// assert_eq!(out, (0..8).collect::<Vec<_>>()); // ordered by default
    /// # }
    /// ```
    pub fn workers(mut self, n: usize) -> Self {
        self.options.workers = n;
        self
    }

    /// Emit results as they finish rather than in input order. With slow and fast calls
    /// mixed, an unordered stage is not held up by its slowest call in flight.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let out = Pipeline::from_iter([30u64, 10, 20])
    ///     .map_async("sleep", |ms| async move {
    ///         tokio::time::sleep(Duration::from_millis(ms)).await;
    ///         ms
    ///     })
    ///     .workers(3)
    ///     .unordered()
    ///     .collect()
    ///     .await
    ///     .unwrap();
    /// assert_eq!(out, vec![10, 20, 30]);
    /// # }
    /// ```
    pub fn unordered(mut self) -> Self {
        self.options.ordered = false;
        self
    }

    /// Fail a call that takes longer than `limit` with [`ItemError::Timeout`]. Must be more
    /// than zero.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let report = Pipeline::from_iter([1u64, 500])
    ///     .map_async("slow", |ms| async move {
    ///         tokio::time::sleep(Duration::from_millis(ms)).await;
    ///     })
    ///     .timeout(Duration::from_millis(100))
    ///     .run()
    ///     .await
    ///     .unwrap();
    /// assert_eq!(report.stage("slow").unwrap().failed, 1);
    /// assert!(matches!(report.failure_sample[0].error, ItemError::Timeout(d) if d == Duration::from_millis(100)));
    /// # }
    /// ```
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.options.timeout = Some(limit);
        self
    }

    /// Keep each item's input so that a failure carries it to the dead letters (its `Debug`
    /// text, and the value for [`FailedInput::downcast_ref`]). Costs one `clone` per item.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let report = Pipeline::from_iter(["ok", "bad"])
    ///     .try_map_async("parse", |s| async move {
    ///         if s == "bad" { Err("unparsable") } else { Ok(s.len()) }
    ///     })
    ///     .keep_input()
    ///     .run()
    ///     .await
    ///     .unwrap();
    /// let failure = &report.failure_sample[0];
    /// assert_eq!(failure.input.as_ref().unwrap().downcast_ref::<&str>(), Some(&"bad"));
    /// # }
    /// ```
    pub fn keep_input(mut self) -> Self
    where
        T: Clone + fmt::Debug + Sync,
    {
        self.keep = Some(|t: &T| FailedInput::new(t.clone()));
        self
    }

    // ---- Flow control and resilience (issue 3) ----

    /// Starts calls at most at `rate` (delays, never drops). Clones of one [`Rate`] share
    /// one budget, so the same `Rate` on two stages holds their sum to it.
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
    pub fn rate_limit(mut self, rate: Rate) -> Self {
        self.options.rate = Some(rate);
        self
    }

    /// Also bounds this stage's calls by a shared [`Inflight`] (every stage given the same
    /// value counts against it).
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
    pub fn inflight(mut self, bound: &Inflight) -> Self {
        self.options.inflight = Some(bound.clone());
        self
    }

    /// Retries failed calls (see [`Retry`]). An item waiting for its next attempt sits in a
    /// delay queue inside the stage and does not take a worker; with
    /// [`Retry::pause_source`] the run's source is paused while it waits. Needs `T: Clone`:
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

    /// Guards the calls with a circuit breaker (see [`Breaker`]; clones share one state).
    /// While it is open the stage pauses the run's source ([`OnOpen::Pause`](crate::OnOpen::Pause))
    /// or fails items fast ([`OnOpen::FailFast`](crate::OnOpen::FailFast)).
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
    pub fn circuit_breaker(mut self, breaker: Breaker) -> Self {
        self.options.breaker = Some(breaker);
        self
    }

    /// Lets the number of calls in flight follow an adaptive limit (see [`Adaptive`])
    /// instead of a fixed `workers(n)`. A lower limit only stops new calls; calls in flight
    /// are never cancelled.
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
    pub fn adaptive(mut self, limit: Adaptive) -> Self {
        self.options.adaptive = Some(limit);
        self
    }
}

impl<T: Send + 'static, U: Send + 'static, S: StageFn<T, U>> crate::IntoPipeline
    for AsyncStage<T, U, S>
{
    type Item = U;

    fn into_pipeline(self) -> Pipeline<U> {
        let AsyncStage {
            mut upstream,
            name,
            call,
            options,
            keep,
            copy,
            ..
        } = self;
        if options.workers == 0 {
            upstream.settings.errors.push(Error::config(
                &name,
                "workers",
                0usize,
                "must be at least 1",
            ));
        }
        if options.timeout == Some(Duration::ZERO) {
            upstream.settings.errors.push(Error::config(
                &name,
                "timeout",
                Duration::ZERO,
                "must be more than zero",
            ));
        }
        let invalid = [
            options.rate.as_ref().and_then(Rate::invalid),
            options.retry.as_ref().and_then(Retry::invalid),
            options.breaker.as_ref().and_then(Breaker::invalid),
            options.adaptive.as_ref().and_then(Adaptive::invalid),
            options
                .inflight
                .as_ref()
                .filter(|i| i.limit() == 0)
                .map(|_| ("inflight", "0".to_string(), "must be at least 1")),
        ];
        for (option, value, reason) in invalid.into_iter().flatten() {
            upstream.settings.errors.push(Error::Config {
                stage: name.clone(),
                option,
                value,
                reason,
            });
        }
        upstream.then(move |b, up| {
            let stats = b.stage(&name, "async");
            let (tx, rx) = hop(HOP_CHUNKS);
            let run = b.run.clone();
            b.spawn(drive(up, call, options, keep, copy, stats, run, tx));
            Box::new(rx) as Upstream<U>
        })
    }
}

/// Per-item bookkeeping that travels with a call and, between attempts, with the parked item.
struct Meta {
    seq: u64,
    ticket: Ticket,
    /// Attempts made (the running one included).
    attempts: u32,
    /// When the first attempt started (only kept when `max_elapsed` needs it).
    first_at: Option<Instant>,
    input: Option<FailedInput>,
    /// The call is a half-open breaker's probe.
    probe: bool,
    /// When the running attempt began waiting (only while a stall watchdog looks at calls).
    waiting_since: Option<Instant>,
}

/// What a finished call reports back to the driver.
struct Completion<T, U> {
    meta: Meta,
    result: Result<U, ItemError>,
    latency: Option<Duration>,
    /// A copy of the input for another attempt (stages with `retry`).
    again: Option<T>,
    /// False for an item refused by an open breaker (no call was made).
    called: bool,
}

/// What travels with a call and comes back in its [`Completion`].
struct Carry<T> {
    meta: Meta,
    again: Option<T>,
    /// The shared in-flight bound's permit, released when the call ends.
    permit: Option<OwnedSemaphorePermit>,
}

pin_project_lite::pin_project! {
    /// One call: the user's future with panic isolation and the stage timeout.
    ///
    /// Written out rather than as an `async` block around `tokio::time::timeout` because
    /// this is the per-item hot path: the timer is armed only when the call does not finish
    /// at its first poll (`now + limit` then, which is the call's start, since a call is
    /// first polled where it is created), so quick calls never touch the timer wheel, and
    /// the future stays small (it is moved once per item).
    struct Call<F, T> {
        #[pin]
        fut: F,
        limit: Option<Duration>,
        sleep: Option<Pin<Box<Sleep>>>,
        start: Option<Instant>,
        carry: Option<Carry<T>>,
    }
}

/// A call that can be told it is waiting (for the stall watchdog's call ages).
trait MarkWaiting {
    /// Records `at` as the start of the wait; returns the call's sequence number.
    fn mark_waiting(self: Pin<&mut Self>, at: Instant) -> Option<u64>;
}

impl<F, T> MarkWaiting for Call<F, T> {
    fn mark_waiting(self: Pin<&mut Self>, at: Instant) -> Option<u64> {
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
        let Some(Carry {
            meta,
            again,
            permit,
        }) = this.carry.take()
        else {
            return Poll::Pending;
        };
        drop(permit);
        Poll::Ready(Completion {
            meta,
            result,
            latency: this.start.map(|s| s.elapsed()),
            again,
            called: true,
        })
    }
}

#[allow(clippy::too_many_arguments)]
async fn drive<T, U, S>(
    up: Upstream<T>,
    call: S,
    options: Options,
    keep: Option<fn(&T) -> FailedInput>,
    copy: Option<fn(&T) -> T>,
    stats: Arc<StageStats>,
    run: Arc<RunCtx>,
    tx: tokio::sync::mpsc::Sender<Chunk<U>>,
) where
    T: Send + 'static,
    U: Send + 'static,
    S: StageFn<T, U>,
{
    let limit_time = options.timeout;
    let make = move |item: T, mut meta: Meta, timed: bool, permit: Option<OwnedSemaphorePermit>| {
        if meta.input.is_none() {
            meta.input = keep.map(|k| k(&item));
        }
        let again = copy.map(|c| c(&item));
        match catch_unwind(AssertUnwindSafe(|| call.call(item))) {
            Ok(fut) => Ok(Call {
                fut,
                limit: limit_time,
                sleep: None,
                start: timed.then(Instant::now),
                carry: Some(Carry {
                    meta,
                    again,
                    permit,
                }),
            }),
            Err(panic) => Err(Box::new(Completion {
                meta,
                result: Err(ItemError::from_panic(&*panic)),
                latency: None,
                again,
                called: true,
            })),
        }
    };
    let extras = options.has_extras().then(|| {
        Box::new(Extras {
            rate: options.rate.clone().map(|r| (r, RateWait::default())),
            granted: 0,
            sem: options
                .inflight
                .as_ref()
                .map(|i| PollSemaphore::new(i.sem.clone())),
            permit: None,
            retry: options.retry.clone().map(|cfg| Retrying {
                cfg,
                heap: BinaryHeap::new(),
                due: VecDeque::new(),
                sleep: None,
                next_id: 0,
                rng: seed(),
                fresh: 0,
            }),
            breaker: options.breaker.clone().map(|breaker| Guard {
                breaker,
                hold: None,
                sleep: None,
                outcomes: Vec::new(),
            }),
            adaptive: options.adaptive.clone().map(|a| (a, Vec::new())),
            admitted: None,
        })
    });
    let mut driver = Driver {
        up,
        up_done: false,
        waiting: VecDeque::new(),
        make,
        inflight: FuturesUnordered::new(),
        spare: None,
        waiting_calls: None,
        limit: options.workers.max(1),
        ordered: options.ordered,
        next_seq: 0,
        next_emit: 0,
        reorder: VecDeque::new(),
        out: Chunk::default(),
        tx: PollSender::new(tx),
        stats: stats.clone(),
        run: run.clone(),
        hist: latency_histogram(),
        timed: 0,
        merged_at: Instant::now(),
        x: extras,
    };
    let cancel = run.cancel.clone();
    let cancelled = tokio::select! {
        biased;
        _ = cancel.cancelled() => true,
        _ = std::future::poll_fn(|cx| driver.poll_drive(cx)) => false,
    };
    if cancelled {
        StageStats::add(&stats.received, driver.up.discard());
    }
    stats.merge_latency(&mut driver.hist);
}

/// A seed for the retry jitter (no RNG dependency: std's randomly keyed hasher).
fn seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x9e37_79b9_7f4a_7c15);
    h.finish() | 1
}

enum Slot<U> {
    Ok(U, Ticket),
    Failed,
}

/// Adaptive-limit samples batched before they are reported.
const SAMPLE_BATCH: usize = 16;

/// The most items a stage keeps in retry backoff before it stops taking new ones.
const MAX_PARKED: usize = 4 * CHUNK_CAP;

/// An item waiting for its next attempt.
struct Parked<T> {
    at: Instant,
    id: u64,
    item: T,
    meta: Meta,
    /// Keeps the run's source paused while it waits (`Retry::pause_source`).
    hold: Option<GateHold>,
}

impl<T> PartialEq for Parked<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.id) == (other.at, other.id)
    }
}
impl<T> Eq for Parked<T> {}
impl<T> PartialOrd for Parked<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Parked<T> {
    /// Reversed: `BinaryHeap` pops the earliest first.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.at, other.id).cmp(&(self.at, self.id))
    }
}

/// The retry delay queue.
struct Retrying<T> {
    cfg: Retry,
    heap: BinaryHeap<Parked<T>>,
    /// Backoff over: start these before new items.
    due: VecDeque<(T, Meta)>,
    sleep: Option<Pin<Box<Sleep>>>,
    next_id: u64,
    rng: u64,
    /// First attempts not yet deposited in the retry budget.
    fresh: u64,
}

impl<T> Retrying<T> {
    /// xorshift64*: a uniform draw in [0, 1) for full jitter.
    fn next_rand(&mut self) -> f64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let x = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A breaker as one stage uses it.
struct Guard {
    breaker: Breaker,
    /// Held while the breaker keeps this stage from calling (`OnOpen::Pause`).
    hold: Option<GateHold>,
    sleep: Option<Pin<Box<Sleep>>>,
    /// Outcomes not yet reported: (failed, probe).
    outcomes: Vec<(bool, bool)>,
}

/// Everything the flow-control and resilience options need. `None` on the driver when no
/// option is set, so the plain stage pays one branch, no timer and no lock.
struct Extras<T> {
    rate: Option<(Rate, RateWait)>,
    /// Rate permits taken and not yet used.
    granted: usize,
    sem: Option<PollSemaphore>,
    permit: Option<OwnedSemaphorePermit>,
    retry: Option<Retrying<T>>,
    breaker: Option<Guard>,
    adaptive: Option<(Adaptive, Vec<Sample>)>,
    /// The breaker's verdict for the next start, once taken: `Some(is_probe)`.
    admitted: Option<bool>,
}

enum Admission {
    Go {
        probe: bool,
        permit: Option<OwnedSemaphorePermit>,
    },
    /// An open breaker in fail-fast mode refused the call.
    Refuse,
    /// Not yet: `rate` says whether the rate is what it waits for.
    Wait { rate: bool },
}

struct Driver<T, U, C, M> {
    up: Upstream<T>,
    up_done: bool,
    /// Received, not yet started (at most one chunk).
    waiting: VecDeque<(T, Ticket)>,
    make: M,
    inflight: FuturesUnordered<Pin<Box<C>>>,
    /// The box of the last call that finished at its first poll, reused by the next call.
    spare: Option<Pin<Box<C>>>,
    /// Calls waiting in `inflight`, oldest first, kept only while a stall watchdog asks
    /// for call ages (`RunCtx::watch_calls`): it then sees one stuck call even while the
    /// other workers keep completing.
    waiting_calls: Option<BTreeSet<(Instant, u64)>>,
    limit: usize,
    ordered: bool,
    next_seq: u64,
    /// Ordered mode: the sequence number of `reorder[0]`.
    next_emit: u64,
    reorder: VecDeque<Option<Slot<U>>>,
    out: Chunk<U>,
    tx: PollSender<Chunk<U>>,
    stats: Arc<StageStats>,
    run: Arc<RunCtx>,
    hist: Histogram<u64>,
    timed: u64,
    merged_at: Instant,
    x: Option<Box<Extras<T>>>,
}

impl<T, U, C, M> Driver<T, U, C, M>
where
    T: Send + 'static,
    U: Send + 'static,
    C: Future<Output = Completion<T, U>> + MarkWaiting,
    M: FnMut(T, Meta, bool, Option<OwnedSemaphorePermit>) -> Result<C, Box<Completion<T, U>>>,
{
    fn limit(&self) -> usize {
        match self.x.as_ref().and_then(|x| x.adaptive.as_ref()) {
            Some((a, _)) => a.limit(),
            None => self.limit,
        }
    }

    /// Items in retry backoff (or due to restart).
    fn parked(&self) -> usize {
        self.x
            .as_ref()
            .and_then(|x| x.retry.as_ref())
            .map_or(0, |r| r.heap.len() + r.due.len())
    }

    fn has_due(&self) -> bool {
        self.x
            .as_ref()
            .and_then(|x| x.retry.as_ref())
            .is_some_and(|r| !r.due.is_empty())
    }

    /// Whether another call may start. Calls in flight count against the limit; an ordered
    /// stage also bounds its reorder window (items started and not yet emitted, less those
    /// in retry backoff, which take no worker). A retry whose backoff is over is already in
    /// the window, so only the calls in flight bound it — else a finished item waiting for
    /// it to be emitted could hold its place forever.
    fn can_start(&self) -> bool {
        let limit = self.limit();
        if self.out.len() >= CHUNK_CAP || self.inflight.len() >= limit {
            return false;
        }
        !self.ordered
            || self.has_due()
            || ((self.next_seq - self.next_emit) as usize - self.parked()) < limit
    }

    /// How many items could start now (pulls a chunk if none is waiting).
    fn available(&mut self, cx: &mut Context<'_>) -> usize {
        let due = self
            .x
            .as_ref()
            .and_then(|x| x.retry.as_ref())
            .map_or(0, |r| r.due.len());
        if self.waiting.is_empty() && !self.up_done && (due > 0 || self.parked() < MAX_PARKED) {
            match self.up.poll_chunk(cx) {
                Poll::Ready(Some(chunk)) => {
                    StageStats::add(&self.stats.received, chunk.len());
                    self.waiting.extend(chunk.into_pairs());
                }
                Poll::Ready(None) => self.up_done = true,
                Poll::Pending => {}
            }
        }
        due + self.waiting.len()
    }

    /// The next item to start: a retry whose backoff is over, else a new one.
    fn pop_input(&mut self) -> Option<(T, Meta)> {
        if let Some(r) = self.x.as_mut().and_then(|x| x.retry.as_mut()) {
            if let Some(d) = r.due.pop_front() {
                return Some(d);
            }
        }
        let (item, ticket) = self.waiting.pop_front()?;
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.ordered {
            self.reorder.push_back(None);
        }
        Some((
            item,
            Meta {
                seq,
                ticket,
                attempts: 0,
                first_at: None,
                input: None,
                probe: false,
                waiting_since: None,
            },
        ))
    }

    fn start(
        &mut self,
        item: T,
        mut meta: Meta,
        permit: Option<OwnedSemaphorePermit>,
        cx: &mut Context<'_>,
    ) {
        meta.attempts += 1;
        let mut timed = meta.seq % SAMPLE_EVERY == 0;
        if let Some(x) = self.x.as_mut() {
            timed |= x.adaptive.is_some();
            if let Some(r) = x.retry.as_mut() {
                if meta.attempts == 1 {
                    r.fresh += 1;
                    if r.cfg.max_elapsed.is_some() {
                        meta.first_at = Some(Instant::now());
                    }
                }
            }
        }
        match (self.make)(item, meta, timed, permit) {
            Err(done) => self.complete(*done),
            Ok(fut) => {
                // A call that is ready at its first poll never leaves this box, so the box
                // is kept for the next call: a stage of quick calls allocates nothing per
                // item. Only a call that must wait moves (boxed) into the in-flight set.
                let mut boxed = match self.spare.take() {
                    Some(mut spare) => {
                        spare.as_mut().set(fut);
                        spare
                    }
                    None => Box::pin(fut),
                };
                match boxed.as_mut().poll(cx) {
                    Poll::Ready(done) => {
                        self.spare = Some(boxed);
                        self.complete(done)
                    }
                    Poll::Pending => {
                        if let Some(waiting) = self.waiting_calls.as_mut() {
                            let at = Instant::now();
                            if let Some(seq) = boxed.as_mut().mark_waiting(at) {
                                waiting.insert((at, seq));
                            }
                        }
                        self.inflight.push(boxed)
                    }
                }
            }
        }
    }

    /// Asks the breaker, the rate and the shared in-flight bound, in that order; a grant is
    /// kept until an item uses it.
    fn admit(&mut self, cx: &mut Context<'_>, available: usize) -> Admission {
        let room = self.limit().saturating_sub(self.inflight.len()).max(1);
        let run = &self.run;
        let Some(x) = self.x.as_mut() else {
            return Admission::Go {
                probe: false,
                permit: None,
            };
        };
        if x.admitted.is_none() {
            match x.breaker.as_mut() {
                None => x.admitted = Some(false),
                Some(g) => loop {
                    match g.breaker.admit(Some(cx.waker())) {
                        Admit::Call => {
                            g.hold = None;
                            x.admitted = Some(false);
                            break;
                        }
                        Admit::Probe => {
                            g.hold = None;
                            x.admitted = Some(true);
                            break;
                        }
                        Admit::Refused(until) => {
                            if g.breaker.mode() == OnOpen::FailFast {
                                g.breaker.count_rejected(1);
                                return Admission::Refuse;
                            }
                            if g.hold.is_none() {
                                g.hold = Some(run.gate.hold());
                            }
                            let Some(until) = until else {
                                return Admission::Wait { rate: false };
                            };
                            if !poll_sleep(&mut g.sleep, until, cx) {
                                return Admission::Wait { rate: false };
                            }
                        }
                    }
                },
            }
        }
        if let Some((rate, wait)) = x.rate.as_mut() {
            if x.granted == 0 {
                match rate.poll_take(cx, available.min(room), wait) {
                    Poll::Ready(n) => x.granted = n,
                    Poll::Pending => return Admission::Wait { rate: true },
                }
            }
        }
        if let Some(sem) = x.sem.as_mut() {
            if x.permit.is_none() {
                match sem.poll_acquire(cx) {
                    Poll::Ready(p) => x.permit = p,
                    Poll::Pending => return Admission::Wait { rate: false },
                }
            }
        }
        if x.rate.is_some() {
            x.granted -= 1;
        }
        Admission::Go {
            probe: x.admitted.take().unwrap_or(false),
            permit: x.permit.take(),
        }
    }

    /// Fails the next item with `CircuitOpen` (fail-fast breaker).
    fn refuse(&mut self) {
        if let Some((item, meta)) = self.pop_input() {
            drop(item);
            self.complete(Completion {
                meta,
                result: Err(ItemError::CircuitOpen),
                latency: None,
                again: None,
                called: false,
            });
        }
    }

    /// Reports batched outcomes, releases a breaker hold that is no longer needed, and
    /// moves retries whose backoff is over to `due`. True if something changed.
    fn poll_extras(&mut self, cx: &mut Context<'_>) -> bool {
        let run = &self.run;
        let Some(x) = self.x.as_mut() else {
            return false;
        };
        let mut changed = false;
        if let Some((a, samples)) = x.adaptive.as_mut() {
            a.record(samples);
            samples.clear();
        }
        if let Some(g) = x.breaker.as_mut() {
            g.breaker.record(&g.outcomes);
            g.outcomes.clear();
            // Pause: the source stops as soon as the breaker opens, and goes on when a call
            // may go through again (a probe needs an item to probe with).
            if g.breaker.mode() == OnOpen::Pause {
                match g.breaker.blocked(cx.waker()) {
                    None => changed |= g.hold.take().is_some(),
                    Some(until) => {
                        if g.hold.is_none() {
                            g.hold = Some(run.gate.hold());
                        }
                        if let Some(until) = until {
                            changed |= poll_sleep(&mut g.sleep, until, cx);
                        }
                    }
                }
            }
        }
        if let Some(r) = x.retry.as_mut() {
            loop {
                let now = Instant::now();
                while r.heap.peek().is_some_and(|p| p.at <= now) {
                    if let Some(p) = r.heap.pop() {
                        drop(p.hold);
                        r.due.push_back((p.item, p.meta));
                        changed = true;
                    }
                }
                let Some(at) = r.heap.peek().map(|p| p.at) else {
                    break;
                };
                if !poll_sleep(&mut r.sleep, at, cx) {
                    break;
                }
            }
        }
        changed
    }

    /// Parks a failed call for another attempt if the retry policy allows; else gives it back.
    fn park(
        x: &mut Extras<T>,
        mut c: Completion<T, U>,
        run: &RunCtx,
        stats: &StageStats,
    ) -> Option<Completion<T, U>> {
        let Some(r) = x.retry.as_mut() else {
            return Some(c);
        };
        let Err(e) = &c.result else {
            return Some(c);
        };
        if !c.called || c.meta.attempts >= r.cfg.max_attempts || !r.cfg.is_retryable(e) {
            return Some(c);
        }
        let rand = r.next_rand();
        let at = Instant::now() + r.cfg.next_delay(c.meta.attempts, e, rand);
        if let (Some(limit), Some(first)) = (r.cfg.max_elapsed, c.meta.first_at) {
            if at.duration_since(first) > limit {
                return Some(c);
            }
        }
        if let Some(b) = &r.cfg.budget {
            if !b.deposit_and_withdraw(std::mem::take(&mut r.fresh), true) {
                return Some(c);
            }
        }
        let Some(item) = c.again.take() else {
            return Some(c);
        };
        StageStats::add(&stats.retried, 1);
        let id = r.next_id;
        r.next_id += 1;
        r.heap.push(Parked {
            at,
            id,
            item,
            meta: c.meta,
            hold: r.cfg.pause_source.then(|| run.gate.hold()),
        });
        None
    }

    fn complete(&mut self, mut c: Completion<T, U>) {
        if let Some(l) = c.latency {
            let _ = self.hist.record(l.as_nanos().min(u64::MAX as u128) as u64);
            self.timed += 1;
            if self.timed % MERGE_EVERY == 0 && self.merged_at.elapsed() >= MERGE_INTERVAL {
                self.merged_at = Instant::now();
                self.stats.merge_latency(&mut self.hist);
            }
        }
        if let Some(x) = self.x.as_mut() {
            // Outcomes are batched per poll, except what must act before the next start:
            // a failure or probe result (may trip or close the breaker), overload, or a
            // full batch (calls failing inline can start many items in one poll).
            if c.called {
                if let Some(g) = x.breaker.as_mut() {
                    let failed = c.result.is_err();
                    g.outcomes.push((failed, c.meta.probe));
                    if failed || c.meta.probe {
                        g.breaker.record(&g.outcomes);
                        g.outcomes.clear();
                    }
                }
                if let Some((a, samples)) = x.adaptive.as_mut() {
                    let overload = c.result.as_ref().err().is_some_and(|e| a.is_overload(e));
                    samples.push(Sample {
                        latency: c.latency.unwrap_or_default(),
                        overload,
                        inflight: self.inflight.len() + 1,
                    });
                    if overload || samples.len() >= SAMPLE_BATCH {
                        a.record(samples);
                        samples.clear();
                    }
                }
            }
            match Self::park(x, c, &self.run, &self.stats) {
                Some(back) => c = back,
                None => return,
            }
        }
        let Completion { meta, result, .. } = c;
        let slot = match result {
            Ok(u) => Slot::Ok(u, meta.ticket),
            Err(error) => {
                StageStats::add(&self.stats.failed, 1);
                meta.ticket.finish(Outcome::Failed);
                self.run.fail(Failure {
                    stage: self.stats.name.clone(),
                    error,
                    attempts: meta.attempts,
                    input: meta.input,
                });
                Slot::Failed
            }
        };
        if !self.ordered {
            if let Slot::Ok(u, t) = slot {
                self.out.push(u, t);
            }
            return;
        }
        self.reorder[(meta.seq - self.next_emit) as usize] = Some(slot);
        while let Some(Some(_)) = self.reorder.front() {
            if let Some(Some(Slot::Ok(u, t))) = self.reorder.pop_front() {
                self.out.push(u, t);
            }
            self.next_emit += 1;
        }
    }

    /// Sends `out` if the hop has room. `Ready(Err)` means the downstream is gone.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, ()>> {
        if self.out.is_empty() {
            return Poll::Ready(Ok(false));
        }
        match self.tx.poll_reserve(cx) {
            Poll::Ready(Ok(())) => {
                let chunk = std::mem::take(&mut self.out);
                let n = chunk.len();
                if self.tx.send_item(chunk).is_err() {
                    return Poll::Ready(Err(()));
                }
                StageStats::add(&self.stats.passed, n);
                StageStats::add(&self.stats.emitted, n);
                Poll::Ready(Ok(true))
            }
            Poll::Ready(Err(_)) => Poll::Ready(Err(())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_drive(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.waiting_calls.is_none() && self.run.watch_calls.load(Ordering::Relaxed) {
            self.waiting_calls = Some(BTreeSet::new());
        }
        let r = self.poll_drive_inner(cx);
        if let Some(w) = &self.waiting_calls {
            self.stats
                .set_oldest_call(w.first().map(|&(at, _)| at), self.run.epoch);
        }
        r
    }

    fn poll_drive_inner(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let mut progress = false;
            match self.poll_flush(cx) {
                Poll::Ready(Err(())) => return Poll::Ready(()),
                Poll::Ready(Ok(sent)) => progress |= sent,
                Poll::Pending => {}
            }
            while !self.inflight.is_empty() {
                match self.inflight.poll_next_unpin(cx) {
                    Poll::Ready(Some(mut c)) => {
                        if let (Some(w), Some(at)) =
                            (self.waiting_calls.as_mut(), c.meta.waiting_since.take())
                        {
                            w.remove(&(at, c.meta.seq));
                        }
                        self.complete(c);
                        progress = true;
                    }
                    _ => break,
                }
            }
            if self.x.is_some() {
                progress |= self.poll_extras(cx);
            }
            let mut rate_bound = false;
            while self.can_start() {
                let available = self.available(cx);
                if available == 0 {
                    break;
                }
                if self.x.is_none() {
                    if let Some((item, meta)) = self.pop_input() {
                        self.start(item, meta, None, cx);
                    }
                } else {
                    match self.admit(cx, available) {
                        Admission::Go { probe, permit } => {
                            if let Some((item, mut meta)) = self.pop_input() {
                                meta.probe = probe;
                                self.start(item, meta, permit, cx);
                            }
                        }
                        Admission::Refuse => self.refuse(),
                        Admission::Wait { rate } => {
                            rate_bound = rate;
                            break;
                        }
                    }
                }
                progress = true;
            }
            if !rate_bound {
                // Not waiting on the rate (no input, no room): owed no permits meanwhile.
                if let Some((_, wait)) = self.x.as_mut().and_then(|x| x.rate.as_mut()) {
                    wait.idle();
                }
            }
            if self.up_done
                && self.waiting.is_empty()
                && self.inflight.is_empty()
                && self.parked() == 0
                && self.reorder.is_empty()
                && self.out.is_empty()
            {
                self.poll_extras(cx);
                return Poll::Ready(());
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }
}

/// Polls a reusable timer set to `at`; true once it has fired.
fn poll_sleep(slot: &mut Option<Pin<Box<Sleep>>>, at: Instant, cx: &mut Context<'_>) -> bool {
    let sleep = slot.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
    if sleep.deadline() != at {
        sleep.as_mut().reset(at);
    }
    sleep.as_mut().poll(cx).is_ready()
}

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
    AsyncStage::new(p, name, Infallible(f, PhantomData))
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
    AsyncStage::new(p, name, Fallible(f, PhantomData))
}
