//! `map_async` / `try_map_async`: an async stage with `workers(n)` calls in flight.
//!
//! Each async stage is one driver task. It pulls chunks from the stages before it, keeps up to
//! `n` calls in flight, and sends results on in chunks. The driver polls its calls itself,
//! on its own task: a consumer that is busy elsewhere never stops the calls from making
//! progress (the `buffer_unordered` starvation trap, futures-rs #2387, cannot happen).
//!
//! A call is polled once right where it is created; only a call that is not ready at once is
//! boxed into the in-flight set. Cheap calls (a cache hit, a computed value) therefore cost
//! one allocation and no scheduling at all.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt as _};
use futures_util::{FutureExt as _, TryFutureExt as _};
use hdrhistogram::Histogram;
use tokio_util::sync::PollSender;

use crate::chunk::{CHUNK_CAP, Chunk, Outcome, Ticket};
use crate::error::{BoxError, Error, FailedInput, Failure, ItemError};
use crate::pipeline::{Flow, Pipeline};
use crate::report::{StageStats, latency_histogram};
use crate::runtime::hop::{HOP_CHUNKS, hop};
use crate::runtime::{RunCtx, Upstream};

/// Time one call in this many (latency percentiles come from this sample).
const SAMPLE_EVERY: u64 = 8;
/// Merge the driver's latency sample into the shared stats after this many timed calls.
const MERGE_EVERY: u64 = 64;

/// The call an async stage makes for each item: user code behind a uniform fallible shape.
/// Implemented for the closures given to [`Flow::map_async`] and [`Flow::try_map_async`];
/// users do not implement it.
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
pub struct AsyncStage<T, U, S> {
    upstream: Pipeline<T>,
    name: String,
    call: S,
    options: Options,
    keep: Option<fn(&T) -> FailedInput>,
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
            },
            keep: None,
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
}

impl<T: Send + 'static, U: Send + 'static, S: StageFn<T, U>> Flow for AsyncStage<T, U, S> {
    type Item = U;

    fn into_pipeline(self) -> Pipeline<U> {
        let AsyncStage {
            mut upstream,
            name,
            call,
            options,
            keep,
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
        upstream.then(move |b, up| {
            let stats = b.stage(&name, "async");
            let (tx, rx) = hop(HOP_CHUNKS);
            let run = b.run.clone();
            b.spawn(drive(up, call, options, keep, stats, run, tx));
            Box::new(rx) as Upstream<U>
        })
    }
}

/// What a finished call reports back to the driver.
struct Completion<U> {
    seq: u64,
    ticket: Ticket,
    result: Result<U, ItemError>,
    input: Option<FailedInput>,
    latency: Option<Duration>,
}

fn flatten<U>(
    r: Result<Result<U, BoxError>, Box<dyn std::any::Any + Send>>,
) -> Result<U, ItemError> {
    match r {
        Ok(Ok(u)) => Ok(u),
        Ok(Err(e)) => Err(ItemError::User(Arc::from(e))),
        Err(panic) => Err(ItemError::from_panic(&*panic)),
    }
}

async fn drive<T, U, S>(
    up: Upstream<T>,
    call: S,
    options: Options,
    keep: Option<fn(&T) -> FailedInput>,
    stats: Arc<StageStats>,
    run: Arc<RunCtx>,
    tx: tokio::sync::mpsc::Sender<Chunk<U>>,
) where
    T: Send + 'static,
    U: Send + 'static,
    S: StageFn<T, U>,
{
    let limit_time = options.timeout;
    let make = move |item: T, ticket: Ticket, seq: u64, timed: bool| {
        let input = keep.map(|k| k(&item));
        match catch_unwind(AssertUnwindSafe(|| call.call(item))) {
            Ok(fut) => Ok(async move {
                let start = timed.then(tokio::time::Instant::now);
                let guarded = AssertUnwindSafe(fut).catch_unwind();
                let result = match limit_time {
                    Some(d) => match tokio::time::timeout(d, guarded).await {
                        Ok(r) => flatten(r),
                        Err(_) => Err(ItemError::Timeout(d)),
                    },
                    None => flatten(guarded.await),
                };
                Completion {
                    seq,
                    ticket,
                    result,
                    input,
                    latency: start.map(|s| s.elapsed()),
                }
            }),
            Err(panic) => Err(Completion {
                seq,
                ticket,
                result: Err(ItemError::from_panic(&*panic)),
                input,
                latency: None,
            }),
        }
    };
    let mut driver = Driver {
        up,
        up_done: false,
        waiting: VecDeque::new(),
        make,
        inflight: FuturesUnordered::new(),
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

enum Slot<U> {
    Ok(U, Ticket),
    Failed,
}

struct Driver<T, U, C, M> {
    up: Upstream<T>,
    up_done: bool,
    /// Received, not yet started (at most one chunk).
    waiting: VecDeque<(T, Ticket)>,
    make: M,
    inflight: FuturesUnordered<Pin<Box<C>>>,
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
}

impl<T, U, C, M> Driver<T, U, C, M>
where
    T: Send + 'static,
    U: Send + 'static,
    C: Future<Output = Completion<U>>,
    M: FnMut(T, Ticket, u64, bool) -> Result<C, Completion<U>>,
{
    fn can_start(&self) -> bool {
        let room = if self.ordered {
            self.next_seq - self.next_emit < self.limit as u64
        } else {
            self.inflight.len() < self.limit
        };
        room && self.out.len() < CHUNK_CAP
    }

    fn next_input(&mut self, cx: &mut Context<'_>) -> Option<(T, Ticket)> {
        if let Some(x) = self.waiting.pop_front() {
            return Some(x);
        }
        if self.up_done {
            return None;
        }
        match self.up.poll_chunk(cx) {
            Poll::Ready(Some(chunk)) => {
                StageStats::add(&self.stats.received, chunk.len());
                self.waiting.extend(chunk.into_pairs());
                self.waiting.pop_front()
            }
            Poll::Ready(None) => {
                self.up_done = true;
                None
            }
            Poll::Pending => None,
        }
    }

    fn start(&mut self, item: T, ticket: Ticket, cx: &mut Context<'_>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.ordered {
            self.reorder.push_back(None);
        }
        match (self.make)(item, ticket, seq, seq % SAMPLE_EVERY == 0) {
            Err(done) => self.complete(done),
            Ok(fut) => {
                let mut fut = Box::pin(fut);
                match fut.as_mut().poll(cx) {
                    Poll::Ready(done) => self.complete(done),
                    Poll::Pending => self.inflight.push(fut),
                }
            }
        }
    }

    fn complete(&mut self, c: Completion<U>) {
        if let Some(l) = c.latency {
            let _ = self.hist.record(l.as_nanos().min(u64::MAX as u128) as u64);
            self.timed += 1;
            if self.timed % MERGE_EVERY == 0 {
                self.stats.merge_latency(&mut self.hist);
            }
        }
        let slot = match c.result {
            Ok(u) => Slot::Ok(u, c.ticket),
            Err(error) => {
                StageStats::add(&self.stats.failed, 1);
                c.ticket.finish(Outcome::Failed);
                self.run.fail(Failure {
                    stage: self.stats.name.clone(),
                    error,
                    attempts: 1,
                    input: c.input,
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
        self.reorder[(c.seq - self.next_emit) as usize] = Some(slot);
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
        loop {
            let mut progress = false;
            match self.poll_flush(cx) {
                Poll::Ready(Err(())) => return Poll::Ready(()),
                Poll::Ready(Ok(sent)) => progress |= sent,
                Poll::Pending => {}
            }
            while !self.inflight.is_empty() {
                match self.inflight.poll_next_unpin(cx) {
                    Poll::Ready(Some(c)) => {
                        self.complete(c);
                        progress = true;
                    }
                    _ => break,
                }
            }
            while self.can_start() {
                match self.next_input(cx) {
                    Some((item, ticket)) => {
                        self.start(item, ticket, cx);
                        progress = true;
                    }
                    None => break,
                }
            }
            if self.up_done
                && self.waiting.is_empty()
                && self.inflight.is_empty()
                && self.reorder.is_empty()
                && self.out.is_empty()
            {
                return Poll::Ready(());
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }
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
