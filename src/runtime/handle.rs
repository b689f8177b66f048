//! Controlling a run in the background: [`Handle`], and [`ItemStream`] for `into_stream`.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_core::Stream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::dead_letter::{DeadLetter, DeadLetters};
use crate::error::Error;
use crate::report::Report;
use crate::runtime::RunCtx;
use crate::runtime::chunk::{Chunk, Outcome, Ticket};

enum State {
    Running(JoinHandle<Result<Report, Error>>),
    NotStarted(Error),
    Joined,
}

/// A run in the background. Dropping the handle cancels the run.
///
/// - [`cancel`](Handle::cancel): stop now; items in flight are counted unfinished.
/// - [`stop`](Handle::stop): a graceful stop: start nothing new, finish the calls in flight.
/// - [`pause`](Handle::pause) / [`resume`](Handle::resume) / [`step`](Handle::step): hold
///   the source, release it, or let exactly `n` more items out while paused.
/// - [`snapshot`](Handle::snapshot): live counters; [`join`](Handle::join): the report.
///
/// ```
/// use flowline::prelude::*;
/// use std::time::Duration;
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let handle = Pipeline::from_iter(0..u64::MAX)
///     .map_async("tick", |x| async move { tokio::time::sleep(Duration::from_millis(10)).await; x })
///     .spawn();
/// tokio::time::sleep(Duration::from_millis(105)).await;
/// handle.stop();                               // graceful: the calls in flight finish
/// let report = handle.join().await.unwrap();
/// assert_eq!(report.outcome, RunOutcome::Stopped);
/// assert_eq!(report.delivered(), 11);              // started at 0, 10, ..., 100 ms
/// assert!(report.unfinished() > 0);                // pulled, never started
/// assert!(report.is_balanced());
/// # }
/// ```
pub struct Handle {
    /// The steering every handle shares with its [`Control`]s.
    ctl: Control,
    state: State,
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handle")
            .field("paused", &self.is_paused())
            .finish_non_exhaustive()
    }
}

impl Handle {
    /// A handle on a run already prepared (`run`) whose driving future is `task` (a graph).
    pub(crate) fn from_run(
        run: Arc<RunCtx>,
        task: impl Future<Output = Result<Report, Error>> + Send + 'static,
    ) -> Handle {
        use tracing::Instrument as _;
        let span = run.span.clone();
        Handle {
            ctl: Control {
                run,
                started: tokio::time::Instant::now(),
            },
            state: State::Running(tokio::spawn(task.instrument(span))),
        }
    }

    /// A handle on a run that could not start.
    pub(crate) fn not_started(e: Error) -> Handle {
        Handle {
            ctl: Control {
                run: Arc::new(RunCtx::new(
                    &crate::RunOptions::default(),
                    DeadLetters::open(&DeadLetter::report())
                        .expect("the report target cannot fail to open"),
                )),
                started: tokio::time::Instant::now(),
            },
            state: State::NotStarted(e),
        }
    }

    /// Stops the run now. `join` then returns [`Error::Cancelled`] with the report; the
    /// items that were in flight are counted as unfinished.
    pub fn cancel(&self) {
        self.ctl.cancel();
    }

    /// The run's cancellation token: cancelled when the run is cancelled (by
    /// [`cancel`](Handle::cancel), a deadline, [`ErrorPolicy::Stop`](crate::ErrorPolicy), a
    /// token given with [`RunOptions::cancel_on`](crate::RunOptions::cancel_on), a dropped
    /// handle), and cancelling it cancels the run. For work beside the run that must end
    /// with it, or to cancel the run from code that only takes a token. A run that ends
    /// otherwise (completed, stopped) leaves it as it was.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let handle = Pipeline::from_iter(0..u64::MAX)
    ///     .map_async("tick", |x| async move { tokio::time::sleep(Duration::from_millis(10)).await; x })
    ///     .spawn();
    /// let token = handle.cancellation_token();
    /// let beside = tokio::spawn(async move { token.cancelled().await; "run cancelled" });
    /// handle.cancel();
    /// assert!(matches!(handle.join().await, Err(Error::Cancelled { .. })));
    /// assert_eq!(beside.await.unwrap(), "run cancelled");
    /// # }
    /// ```
    pub fn cancellation_token(&self) -> tokio_util::sync::CancellationToken {
        self.ctl.cancellation_token()
    }

    /// A graceful stop: starts nothing new. The sources pull nothing more and the async
    /// stages start no new call; the items already pulled but not started (in a stage's
    /// buffer, waiting for a retry, a breaker or a server, in the queues between stages)
    /// end *unfinished* — not failed, not delivered, and never marked done, so no
    /// checkpoint or ack passes them and a rerun does them. The calls in flight finish and
    /// their results flow on through the synchronous operators to the sinks (an async
    /// stage after them starts no call for them: they end unfinished there). `join` returns
    /// the report with [`RunOutcome::Stopped`](crate::RunOutcome::Stopped); its
    /// [`unfinished`](crate::Report::unfinished) says how many were left.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let handle = Pipeline::from_iter(0..100u32)
    ///     .map_async("call", |x| async move { tokio::time::sleep(Duration::from_secs(1)).await; x })
    ///     .workers(4)
    ///     .spawn();
    /// tokio::time::sleep(Duration::from_millis(1500)).await;
    /// handle.stop();
    /// let report = handle.join().await.unwrap();
    /// assert_eq!(report.delivered(), 8);              // 4 done, 4 in flight at the stop
    /// assert_eq!(report.unfinished(), 92);            // pulled, never started
    /// assert_eq!(report.failures, 0);
    /// # }
    /// ```
    pub fn stop(&self) {
        self.ctl.stop();
    }

    /// Pauses the source: nothing more is pulled until `resume` (or `step`); items already
    /// pulled go on and finish.
    pub fn pause(&self) {
        self.ctl.pause();
    }

    /// Resumes a paused source.
    pub fn resume(&self) {
        self.ctl.resume();
    }

    /// While paused, lets exactly `n` more items out of the source.
    pub fn step(&self, n: u64) {
        self.ctl.step(n);
    }

    /// Whether the source is paused (by `pause`, or held by a stage).
    pub fn is_paused(&self) -> bool {
        self.ctl.is_paused()
    }

    /// As [`Control::set_workers`]: the most calls in flight of async stage `stage`, from
    /// the next call on.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let handle = Pipeline::from_iter(0..100u32)
    ///     .map_async("api", |x| async move { tokio::time::sleep(Duration::from_millis(10)).await; x })
    ///     .workers(2)
    ///     .spawn();
    /// handle.set_workers("api", 10).unwrap();
    /// tokio::task::yield_now().await;                  // the run's task builds its stages
    /// assert!(handle.set_workers("nope", 10).is_err());
    /// let report = handle.join().await.unwrap();
    /// assert_eq!(report.stage("api").unwrap().limits.as_ref().unwrap().workers, Some(10));
    /// # }
    /// ```
    pub fn set_workers(&self, stage: &str, n: usize) -> Result<(), Error> {
        self.ctl.set_workers(stage, n)
    }

    /// As [`Control::set_rate`]: the rate of async stage `stage`, from the next call on.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let handle = Pipeline::from_iter(0..30u32)
    ///     .map_async("api", |x| async move { x })
    ///     .rate_limit(Rate::per_second(10))
    ///     .spawn();
    /// handle.set_rate("api", &Rate::per_second(100)).unwrap();
    /// let t = tokio::time::Instant::now();
    /// handle.join().await.unwrap();
    /// assert!(t.elapsed() < std::time::Duration::from_secs(1));
    /// # }
    /// ```
    pub fn set_rate(&self, stage: &str, rate: &crate::Rate) -> Result<(), Error> {
        self.ctl.set_rate(stage, rate)
    }

    /// The counters of every stage right now.
    pub fn snapshot(&self) -> Report {
        self.ctl.snapshot()
    }

    /// A cloneable remote for this run's [`stop`](Handle::stop) and
    /// [`cancel`](Handle::cancel), for code that must steer the run while another task
    /// awaits [`join`](Handle::join) (a Ctrl-C handler, say). It does not keep the run
    /// alive and does nothing once the run has ended.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let handle = Pipeline::from_iter(0..u64::MAX)
    ///     .map_async("tick", |x| async move { tokio::time::sleep(Duration::from_millis(10)).await; x })
    ///     .spawn();
    /// let control = handle.control();
    /// tokio::spawn(async move {
    ///     tokio::time::sleep(Duration::from_secs(1)).await;
    ///     control.stop();
    /// });
    /// let report = handle.join().await.unwrap();
    /// assert!(report.delivered() > 0);
    /// # }
    /// ```
    pub fn control(&self) -> Control {
        self.ctl.clone()
    }

    /// Waits for the run to end and returns its report.
    pub async fn join(mut self) -> Result<Report, Error> {
        match std::mem::replace(&mut self.state, State::Joined) {
            State::Running(task) => task
                .await
                .unwrap_or_else(|e| Err(Error::Internal(format!("run task failed: {e}")))),
            State::NotStarted(e) => Err(e),
            State::Joined => Err(Error::Internal("the run was already joined".into())),
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        if matches!(self.state, State::Running(_)) {
            self.ctl.run.cancel.cancel();
        }
    }
}

/// The items of a run as a `Stream` (from [`Flow::into_stream`](crate::Flow::into_stream)).
/// Dropping it cancels the run.
///
/// ```
/// use flowline::prelude::*;
/// use futures_util::StreamExt;
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let s = Pipeline::from_iter(0..5).into_stream();
/// let firsts: Vec<_> = s.take(2).collect().await;
/// assert_eq!(firsts, vec![0, 1]);
/// # }
/// ```
pub struct ItemStream<T> {
    rx: mpsc::Receiver<Chunk<T>>,
    ready: VecDeque<(T, Ticket)>,
    done: bool,
    handle: Handle,
}

impl<T> fmt::Debug for ItemStream<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ItemStream")
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl<T: Send + 'static> ItemStream<T> {
    pub(crate) fn new(rx: mpsc::Receiver<Chunk<T>>, handle: Handle) -> Self {
        ItemStream {
            rx,
            ready: VecDeque::new(),
            done: false,
            handle,
        }
    }

    /// The run's handle: pause, stop, snapshot.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Ends the run and returns its report. If the stream was not read to its end, the run
    /// is cancelled first (and the report says so).
    pub async fn finish(self) -> Result<Report, Error> {
        let ItemStream {
            rx,
            ready,
            done,
            handle,
        } = self;
        // Items not read are let go before waiting: a run that tracks completion (a cursor
        // checkpoint) waits for every ticket, and these hold some.
        drop(ready);
        drop(rx);
        if !done {
            handle.cancel();
        }
        handle.join().await
    }
}

// The stream never pins its items: they sit in a `VecDeque` and are moved out by value.
impl<T> Unpin for ItemStream<T> {}

impl<T: Send + 'static> Stream for ItemStream<T> {
    type Item = T;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let this = self.get_mut();
        loop {
            if let Some((item, ticket)) = this.ready.pop_front() {
                ticket.finish(Outcome::Done);
                return Poll::Ready(Some(item));
            }
            if this.done {
                return Poll::Ready(None);
            }
            match this.rx.poll_recv(cx) {
                Poll::Ready(Some(chunk)) => this.ready.extend(chunk.into_pairs()),
                Poll::Ready(None) => this.done = true,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Steers a run from anywhere: a cheap, cloneable part of a [`Handle`] (from
/// [`Handle::control`]) for code that must stop, pause or watch the run while another task
/// awaits [`Handle::join`]. It does not keep the run alive (dropping it cancels nothing)
/// and does nothing once the run has ended.
///
/// ```
/// use flowline::prelude::*;
/// use std::time::Duration;
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let handle = Pipeline::from_iter(0..u64::MAX)
///     .map_async("tick", |x| async move { tokio::time::sleep(Duration::from_millis(10)).await; x })
///     .spawn();
/// let (a, b) = (handle.control(), handle.control());
/// a.pause();
/// assert!(b.is_paused());
/// b.resume();
/// tokio::time::sleep(Duration::from_secs(1)).await;
/// a.stop();
/// let report = handle.join().await.unwrap();
/// assert_eq!(report.outcome, RunOutcome::Stopped);
/// # }
/// ```
#[derive(Clone)]
pub struct Control {
    run: Arc<RunCtx>,
    started: tokio::time::Instant,
}

impl fmt::Debug for Control {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Control")
            .field("paused", &self.is_paused())
            .finish_non_exhaustive()
    }
}

impl Control {
    /// As [`Handle::stop`]: a graceful stop; no new call starts, the calls in flight finish,
    /// the items pulled and not started end unfinished.
    pub fn stop(&self) {
        self.run.stop();
    }

    /// As [`Handle::cancel`]: stop now.
    pub fn cancel(&self) {
        self.run.cancel.cancel();
    }

    /// As [`Handle::pause`]: hold the source.
    pub fn pause(&self) {
        self.run.gate.pause();
    }

    /// As [`Handle::resume`]: release a paused source.
    pub fn resume(&self) {
        self.run.gate.resume();
    }

    /// As [`Handle::step`]: while paused, let exactly `n` more items out of the source.
    pub fn step(&self, n: u64) {
        self.run.gate.step(n);
    }

    /// As [`Handle::is_paused`].
    pub fn is_paused(&self) -> bool {
        self.run.gate.is_paused()
    }

    /// As [`Handle::snapshot`]: the counters of every stage right now.
    pub fn snapshot(&self) -> Report {
        crate::observe::snapshot(&*self.run, self.started)
    }

    /// As [`Handle::cancellation_token`]: the run's token.
    pub fn cancellation_token(&self) -> tokio_util::sync::CancellationToken {
        self.run.cancel.clone()
    }

    /// Changes the most calls in flight of the async stage named `stage` while it runs.
    /// It holds from the next call start: a raised limit starts more calls at once; a
    /// lowered one cancels no call in flight, it starts none until fewer than `n` run.
    ///
    /// On a stage with [`adaptive`](crate::AsyncStage::adaptive) concurrency, `n` caps the
    /// adaptive limit (which goes on moving below it); the adaptive range is unchanged.
    ///
    /// Refused with [`Error::Config`] naming the stage and the value, the stage keeping its
    /// limit: no async stage of that name, `n` of 0 or above 2^20.
    ///
    /// The run's task builds its stages when it first runs: a change made before (right
    /// after `spawn`) has its value checked at once and applies when the stages are built;
    /// a stage name unknown then is logged (`warn`) and the change dropped.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let handle = Pipeline::from_iter(0..u64::MAX)
    ///     .map_async("api", |x| async move { tokio::time::sleep(Duration::from_millis(10)).await; x })
    ///     .workers(4)
    ///     .spawn();
    /// let control = handle.control();
    /// tokio::time::sleep(Duration::from_millis(50)).await;
    /// control.set_workers("api", 64).unwrap();
    /// let err = control.set_workers("api", 0).unwrap_err();
    /// assert_eq!(err.to_string(), "invalid configuration: stage `api`: workers = 0: must be at least 1");
    /// assert!(control.set_workers("apl", 8).unwrap_err().to_string().contains("apl"));
    /// tokio::time::sleep(Duration::from_millis(100)).await;
    /// control.stop();
    /// let report = handle.join().await.unwrap();
    /// let limits = report.stage("api").unwrap().limits.clone().unwrap();
    /// assert_eq!((limits.workers, limits.worker_changes), (Some(64), 1));
    /// # }
    /// ```
    pub fn set_workers(&self, stage: &str, n: usize) -> Result<(), Error> {
        self.run.live.set_workers(stage, n)
    }

    /// Changes the rate of the async stage named `stage` (its
    /// [`rate_limit`](crate::AsyncStage::rate_limit)) while it runs, to `rate`'s count,
    /// period and burst: see [`Rate::set`](crate::Rate::set). A rate shared with other
    /// stages or pipelines is one budget: it changes for all of them.
    ///
    /// Refused with [`Error::Config`] naming the stage and the value, the stage keeping its
    /// rate: no async stage of that name, a stage without a rate limit, a rate
    /// [`Rate::check`](crate::Rate::check) refuses (0, a period under 1 ns per item, an
    /// interval over 30 years). A change made before the stages are built waits for them,
    /// as for [`set_workers`](Control::set_workers).
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let handle = Pipeline::from_iter(0..u64::MAX)
    ///     .map_async("api", |x| async move { x })
    ///     .rate_limit(Rate::per_second(10))
    ///     .spawn();
    /// let control = handle.control();
    /// control.set_rate("api", &Rate::per_second(50)).unwrap();
    /// let err = control.set_rate("api", &Rate::per_second(0)).unwrap_err().to_string();
    /// assert!(err.contains("stage `api`: rate = 0 per 1s"), "{err}");
    /// tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    /// control.stop();
    /// let report = handle.join().await.unwrap();
    /// assert!((50..=52).contains(&report.delivered()), "{}", report.delivered());
    /// # }
    /// ```
    pub fn set_rate(&self, stage: &str, rate: &crate::Rate) -> Result<(), Error> {
        self.run.live.set_rate(stage, rate)
    }
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;
    use crate::{AsyncStage, StageFn};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    use tokio::time::Instant;

    type Log = Arc<Mutex<Vec<(u32, Duration)>>>;

    /// A stage that logs each call's start (item, time since `t0`) and takes `ms`.
    fn logged(
        p: Pipeline<u32>,
        name: &str,
        ms: u64,
        t0: Instant,
        log: &Log,
    ) -> AsyncStage<u32, u32, impl StageFn<u32, u32> + use<>> {
        let log = log.clone();
        p.map_async(name, move |x| {
            log.lock().unwrap().push((x, t0.elapsed()));
            async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                x
            }
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_while_1000_items_are_buffered_starts_no_call_after_it() {
        let t0 = Instant::now();
        let (first, second): (Log, Log) = Default::default();
        // The source runs ahead on its own task (`buffer`): all 1,000 items are pulled.
        let source = Pipeline::from_iter(0..1000u32).buffer(1024);
        let a = logged(source, "a", 100, t0, &first).workers(4);
        let b = logged(a.map(|x| x + 1), "b", 1, t0, &second).workers(4);
        let delivered = Arc::new(Mutex::new(Vec::new()));
        let d = delivered.clone();
        let handle = b.inspect(move |x| d.lock().unwrap().push(*x)).spawn();
        tokio::time::sleep(Duration::from_millis(250)).await;
        // Every item is pulled: 12 started, 988 wait in the stage and the queue before it.
        assert_eq!(handle.snapshot().stages[0].emitted, 1000);
        handle.stop();
        let report = handle.join().await.unwrap();
        assert_eq!(report.outcome, RunOutcome::Stopped);
        // The calls in flight (started at 200 ms) finish at 300 ms; none started after, in
        // `a` or in `b` (which the results of those calls reach at 300 ms).
        assert_eq!(t0.elapsed(), Duration::from_millis(300));
        let first = first.lock().unwrap().clone();
        assert_eq!(first.len(), 12);
        assert!(first.iter().all(|(_, t)| *t <= Duration::from_millis(200)));
        let second = second.lock().unwrap().clone();
        assert!(second.iter().all(|(_, t)| *t < Duration::from_millis(250)));
        // Their results flow on through `b`'s calls made before the stop... and the calls
        // in flight in `a` reach `b` after it: left there, unfinished.
        assert_eq!(second.len(), 8, "{second:?}");
        let a = report.stage("a").unwrap();
        assert_eq!(
            (a.received, a.passed, a.unfinished, a.failed),
            (1000, 12, 988, 0)
        );
        let b = report.stage("b").unwrap();
        assert_eq!((b.received, b.passed, b.unfinished), (12, 8, 4));
        assert_eq!(*delivered.lock().unwrap(), (1..=8).collect::<Vec<_>>());
        assert_eq!(report.unfinished(), 988 + 4);
        assert_eq!(report.failures, 0);
        for s in &report.stages {
            assert!(s.is_balanced(), "{report}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_leaves_an_item_in_retry_backoff_unfinished_without_trying_it_again() {
        let t0 = Instant::now();
        let calls: Log = Default::default();
        let c = calls.clone();
        let handle = Pipeline::from_iter(0..3u32)
            .try_map_async("api", move |x| {
                let mut calls = c.lock().unwrap();
                calls.push((x, t0.elapsed()));
                let fail = x == 0;
                async move { if fail { Err("503") } else { Ok(x) } }
            })
            .retry(Retry::constant(Duration::from_secs(1)).max_attempts(5))
            .workers(3)
            .spawn();
        tokio::time::sleep(Duration::from_millis(500)).await;
        handle.stop();
        let report = handle.join().await.unwrap();
        assert_eq!(t0.elapsed(), Duration::from_millis(500));
        assert_eq!(calls.lock().unwrap().len(), 3, "no retry after the stop");
        let api = report.stage("api").unwrap();
        assert_eq!((api.passed, api.failed, api.unfinished), (2, 0, 1));
        assert_eq!(report.delivered(), 2);
        assert!(report.is_balanced());
    }
}
