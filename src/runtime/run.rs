//! Running a plan: build it into tasks, drive the sink, end every task, write the report.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::dead_letter::DeadLetters;
use crate::error::Error;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::time::Duration;

use crate::report::{Report, RunOutcome};
use crate::runtime::chunk::Chunk;
use crate::runtime::handle::{Handle, ItemStream};
use crate::runtime::options::RunOptions;
use crate::runtime::sink;
use futures_util::FutureExt as _;

use crate::runtime::sink::Sink;
use crate::runtime::{Build, Observer, Plan, RunCtx, next_chunk};

/// Checks the plan and the run's options (every problem at once) and opens what the run
/// needs, before anything runs.
pub(crate) fn prepare(mut errors: Vec<Error>, options: &RunOptions) -> Result<Arc<RunCtx>, Error> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(Error::NoRuntime);
    }
    options.check(&mut errors);
    if let Some(e) = Error::all_config(errors) {
        return Err(e);
    }
    let dead = DeadLetters::open(&options.dead_letter)?;
    Ok(Arc::new(RunCtx::new(options, dead)))
}

/// A run about to start: a plan, the sink it ends in, and the run's options. Await it to run
/// to the end, or [`spawn`](Run::spawn) it to steer it through a [`Handle`]. Awaited on a
/// multi-thread runtime, a run with stage tasks drives its sink as a task of the runtime's
/// workers, beside its stages, even when awaited from `block_on`; otherwise the sink runs
/// in the awaiting task. Dropping the future cancels the run either way. Returned by the terminals of [`Flow`](crate::Flow): `run`, `collect`,
/// `collect_with_report`, `for_each`.
///
/// The options are the run's, not a stage's: a deadline for the whole run, what a failure
/// does, where failed items go.
///
/// ```
/// use flowline::prelude::*;
/// use std::time::Duration;
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let (tx, mut rx) = tokio::sync::mpsc::channel(16);
/// let report = Pipeline::from_iter([1u32, 0, 2])
///     .try_map_async("invert", |x| async move { if x == 0 { Err("zero") } else { Ok(1.0 / x as f64) } })
///     .run()
///     .dead_letter(DeadLetter::channel(tx))
///     .deadline(Duration::from_secs(60))
///     .await
///     .unwrap();
/// assert_eq!(report.failures, 1);
/// assert_eq!(rx.recv().await.unwrap().error.to_string(), "zero");
/// # }
/// ```
#[must_use = "a run does nothing until it is awaited or spawned"]
pub struct Run<T, K: Sink<T>, O> {
    plan: Plan<T>,
    sink: K,
    sink_name: &'static str,
    options: RunOptions,
    conclude: fn(Report, K::Output) -> O,
}

impl<T, K: Sink<T>, O> std::fmt::Debug for Run<T, K, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run")
            .field("sink", &self.sink_name)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl<T: Send + 'static, K: Sink<T>, O: Send + 'static> Run<T, K, O> {
    pub(crate) fn new(
        plan: Plan<T>,
        sink: K,
        sink_name: &'static str,
        conclude: fn(Report, K::Output) -> O,
    ) -> Self {
        Run {
            plan,
            sink,
            sink_name,
            options: RunOptions::default(),
            conclude,
        }
    }

    /// Ends the whole run if it has not finished within `limit` (on tokio's clock): the run
    /// returns [`Error::DeadlineExceeded`] with the report. Must be more than zero.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let err = Pipeline::from_iter(0..u64::MAX)
    ///     .map_async("slow", |x| async move { tokio::time::sleep(Duration::from_secs(1)).await; x })
    ///     .run()
    ///     .deadline(Duration::from_secs(10))
    ///     .await
    ///     .unwrap_err();
    /// assert!(matches!(err, Error::DeadlineExceeded { .. }));
    /// # }
    /// ```
    pub fn deadline(mut self, limit: Duration) -> Self {
        self.options = self.options.deadline(limit);
        self
    }

    /// How long the run's own parts ride out a server that is down (see
    /// [`RunOptions::outage`](crate::RunOptions::outage)).
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use flowline::Outage;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let report = Pipeline::from_iter(0..3u32)
    ///     .run()
    ///     .outage(Outage::keep_trying_for(std::time::Duration::from_secs(60)))
    ///     .await
    ///     .unwrap();
    /// assert_eq!(report.delivered(), 3);
    /// # }
    /// ```
    pub fn outage(mut self, policy: crate::Outage) -> Self {
        self.options = self.options.outage(policy);
        self
    }

    /// What to do when an item fails (default: [`ErrorPolicy::Continue`](crate::ErrorPolicy)).
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let err = Pipeline::from_iter(0..100u32)
    ///     .try_map_async("check", |x| async move { if x == 7 { Err("seven") } else { Ok(x) } })
    ///     .run()
    ///     .error_policy(ErrorPolicy::Stop)
    ///     .await
    ///     .unwrap_err();
    /// assert!(matches!(err, Error::ItemFailed { .. }));
    /// # }
    /// ```
    pub fn error_policy(mut self, policy: crate::ErrorPolicy) -> Self {
        self.options = self.options.error_policy(policy);
        self
    }

    /// Where failed items go (default: counted and sampled in the report, and logged).
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let report = Pipeline::from_iter([1u32, 0])
    ///     .try_map_async("check", |x| async move { if x == 0 { Err("zero") } else { Ok(x) } })
    ///     .run()
    ///     .dead_letter(DeadLetter::callback(|f| eprintln!("failed: {f}")))
    ///     .await
    ///     .unwrap();
    /// assert_eq!(report.failures, 1);
    /// # }
    /// ```
    pub fn dead_letter(mut self, target: crate::DeadLetter) -> Self {
        self.options = self.options.dead_letter(target);
        self
    }

    /// Names the run: the `pipeline` field of its `tracing` span and the `pipeline` label
    /// of its metrics (default `"flowline"`). See [`RunOptions::name`].
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let report = Pipeline::from_iter(0..3).run().name("orders").await.unwrap();
    /// assert_eq!(report.delivered(), 3);
    /// # }
    /// ```
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.options = self.options.name(name);
        self
    }

    /// Cancels the run when `token` is cancelled (a service shutting down, say): the run
    /// returns [`Error::Cancelled`] with its report, the items in flight counted
    /// unfinished. See [`RunOptions::cancel_on`].
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use flowline::CancellationToken;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let shutdown = CancellationToken::new();
    /// let s = shutdown.clone();
    /// tokio::spawn(async move { tokio::time::sleep(Duration::from_secs(1)).await; s.cancel() });
    /// let err = Pipeline::from_iter(0..u64::MAX)
    ///     .map_async("tick", |x| async move { tokio::time::sleep(Duration::from_millis(10)).await; x })
    ///     .run()
    ///     .cancel_on(shutdown)
    ///     .await
    ///     .unwrap_err();
    /// let Error::Cancelled { report } = err else { panic!("{err}") };
    /// assert!(report.is_balanced());
    /// # }
    /// ```
    pub fn cancel_on(mut self, token: tokio_util::sync::CancellationToken) -> Self {
        self.options = self.options.cancel_on(token);
        self
    }

    /// Stops the run when a signal comes: the first stops it gracefully and the run
    /// returns its report ([`RunOutcome::Stopped`]); a second cancels it. Ctrl-C is
    /// `.stop_on_signal(tokio::signal::ctrl_c)`. See [`RunOptions::stop_on_signal`].
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// // A signal that comes after 10 ms (a program's own; Ctrl-C in a real one).
    /// let report = Pipeline::from_iter(0..u64::MAX)
    ///     .map_async("work", |x| async move {
    ///         tokio::time::sleep(Duration::from_millis(1)).await;
    ///         x
    ///     })
    ///     .run()
    ///     .stop_on_signal(|| async {
    ///         tokio::time::sleep(Duration::from_millis(10)).await;
    ///         Ok(())
    ///     })
    ///     .await;
    /// match report {
    ///     Ok(report) => assert_eq!(report.outcome, RunOutcome::Stopped), // once
    ///     Err(Error::Cancelled { report }) => println!("{report}"),      // twice
    ///     Err(e) => panic!("{e}"),
    /// }
    /// # }
    /// ```
    pub fn stop_on_signal<F, Fut>(mut self, signal: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = std::io::Result<()>> + Send + 'static,
    {
        self.options = self.options.stop_on_signal(signal);
        self
    }

    /// Calls `hook` each time a signal of [`stop_on_signal`](Run::stop_on_signal) acts,
    /// before it stops or cancels the run. See [`RunOptions::on_signal`].
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use flowline::SignalStep;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let _ = Pipeline::from_iter(0..u64::MAX)
    ///     .run()
    ///     .stop_on_signal(|| async { Ok(()) })
    ///     .on_signal(|step| match step {
    ///         SignalStep::Stop => eprintln!("stopping: starting nothing new"),
    ///         _ => eprintln!("cancelling"),
    ///     })
    ///     .await;
    /// # }
    /// ```
    pub fn on_signal(mut self, hook: impl Fn(crate::SignalStep) + Send + Sync + 'static) -> Self {
        self.options = self.options.on_signal(hook);
        self
    }

    /// After the first signal of [`stop_on_signal`](Run::stop_on_signal), cancels the run
    /// if it has not ended within `grace`. See [`RunOptions::signal_grace`].
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// // A signal now and then every hour: the grace of 5 s cancels the run first.
    /// let err = Pipeline::from_iter(0..u64::MAX)
    ///     .map_async("slow", |x| async move {
    ///         tokio::time::sleep(Duration::from_secs(60)).await;
    ///         x
    ///     })
    ///     .run()
    ///     .stop_on_signal(|| async {
    ///         tokio::time::sleep(Duration::from_secs(3600)).await;
    ///         Ok(())
    ///     })
    ///     .signal_grace(Duration::from_secs(5))
    ///     .await
    ///     .unwrap_err();
    /// let Error::Cancelled { report } = err else { panic!("{err}") };
    /// assert_eq!(report.elapsed, Duration::from_secs(3605));
    /// # }
    /// ```
    pub fn signal_grace(mut self, grace: std::time::Duration) -> Self {
        self.options = self.options.signal_grace(grace);
        self
    }

    /// Replaces every run option with `options` (options kept and reused across runs).
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let options = RunOptions::new().deadline(Duration::from_secs(5));
    /// let out = Pipeline::from_iter(0..3).collect().options(options).await.unwrap();
    /// assert_eq!(out, vec![0, 1, 2]);
    /// # }
    /// ```
    pub fn options(mut self, options: RunOptions) -> Self {
        self.options = options;
        self
    }

    async fn execute(self) -> Result<O, Error> {
        let Run {
            mut plan,
            sink,
            sink_name,
            options,
            conclude,
        } = self;
        use tracing::Instrument as _;
        let run = prepare(std::mem::take(&mut plan.errors), &options)?;
        let span = run.span.clone();
        let (report, out) = execute_in(run, plan, sink, sink_name, options.deadline)
            .instrument(span)
            .await?;
        Ok(conclude(report, out))
    }
}

impl<T: Send + 'static, K: Sink<T, Output = ()>, O: Send + 'static> Run<T, K, O> {
    /// Starts the run in the background and returns its [`Handle`]: cancel, stop, pause,
    /// step, live counters, and `join` for the report. Must be called inside a tokio runtime.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let handle = Pipeline::from_iter(0..100).run().deadline(Duration::from_secs(5)).spawn();
    /// let report = handle.join().await.unwrap();
    /// assert_eq!(report.delivered(), 100);
    /// # }
    /// ```
    pub fn spawn(self) -> Handle {
        let Run {
            mut plan,
            sink,
            sink_name,
            options,
            ..
        } = self;
        match prepare(std::mem::take(&mut plan.errors), &options) {
            Ok(run) => Handle::from_run(run.clone(), async move {
                execute_in(run, plan, sink, sink_name, options.deadline)
                    .await
                    .map(|(report, ())| report)
            }),
            Err(e) => Handle::not_started(e),
        }
    }
}

impl<T: Send + 'static> Run<T, sink::Discard, Report> {
    /// Starts the run and returns a stream of what comes out, with this run's options.
    /// Dropping the stream cancels the run; [`ItemStream::finish`] returns the report.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use futures_util::StreamExt;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let mut s = Pipeline::from_iter(0..3).run().deadline(Duration::from_secs(5)).into_stream();
    /// let mut got = vec![];
    /// while let Some(x) = s.next().await { got.push(x); }
    /// assert_eq!(got, vec![0, 1, 2]);
    /// # }
    /// ```
    pub fn into_stream(self) -> ItemStream<T> {
        let (tx, rx) = tokio::sync::mpsc::channel::<Chunk<T>>(2);
        let handle = Run {
            plan: self.plan,
            sink: sink::Forward(tx),
            sink_name: "stream",
            options: self.options,
            conclude: |report, ()| report,
        }
        .spawn();
        ItemStream::new(rx, handle)
    }
}

impl<T: Send + 'static, K: Sink<T>, O: Send + 'static> IntoFuture for Run<T, K, O> {
    type Output = Result<O, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<O, Error>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.execute())
    }
}

/// Drives `sink_loop` (a run's sink pulling from its last stage) as a task of the runtime's
/// workers when the run has stage tasks and the runtime has several workers, else in place.
///
/// Why: a run awaited from `block_on` (as in `#[tokio::main]`'s `main`) would drive its sink
/// on the thread that called `block_on`, which is not one of the runtime's workers, and
/// every chunk a stage hands to the sink would have to wake that thread through the OS (a
/// futex, an interrupt between cores on a VM): 30–60 ns per item measured here for a
/// trivial 16-worker stage. As a task, the sink is woken in the queue of the worker that
/// made the chunk. A run without stage tasks hands nothing across threads and stays in
/// place, where it runs without the scheduler between its chunks.
async fn beside_the_stages<R: Send + 'static>(
    has_tasks: bool,
    sink_loop: impl Future<Output = R> + Send + 'static,
) -> Result<R, Error> {
    use tracing::Instrument as _;
    match tokio::runtime::Handle::try_current() {
        Ok(h) if has_tasks && h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            OnWorkers(h.spawn(sink_loop.in_current_span())).await
        }
        _ => Ok(sink_loop.await),
    }
}

/// A sink loop spawned by [`beside_the_stages`]: dropping it ends the loop, as dropping the
/// loop itself would; a panic in it resumes in the caller.
struct OnWorkers<R>(tokio::task::JoinHandle<R>);

impl<R> Drop for OnWorkers<R> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<R> Future for OnWorkers<R> {
    type Output = Result<R, Error>;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        self.0.poll_unpin(cx).map(|joined| match joined {
            Ok(out) => Ok(out),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Only a runtime shutting down cancels the task while it is awaited.
            Err(e) => Err(Error::Internal(format!(
                "the run's sink task ended early: {e}"
            ))),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    Drained,
    Cancelled,
    Deadline,
}

async fn execute_in<T: Send + 'static, K: Sink<T>>(
    run: Arc<RunCtx>,
    p: Plan<T>,
    mut sink: K,
    sink_name: &'static str,
    deadline: Option<Duration>,
) -> Result<(Report, K::Output), Error> {
    let started = tokio::time::Instant::now();
    let Plan { build, .. } = p;
    let mut b = Build::new(run.clone());
    let mut up = build(&mut b);
    if K::NEVER_WAITS {
        up.pull_in();
    }
    let stats = b.stage(sink_name, "sink");
    let sink_span = b.stage_span();
    let (checked, spawned) = Spawned::take(b);
    if let Err(e) = checked {
        // The plan is unsound (e.g. a branch left without a sink): end what was built.
        drop(up);
        spawned.abandon(&run).await;
        return Err(e);
    }

    let sink_loop = {
        let run = run.clone();
        async move {
            let in_hand = sink::InHand::default();
            let drive = async {
                while let Some(chunk) = next_chunk(&mut up).await {
                    in_hand.consume(&mut sink, chunk, &stats, &run).await;
                    tokio::task::consume_budget().await;
                }
            };
            let end = drive_until(&run, deadline, drive).await;
            if end != End::Drained {
                run.cancel.cancel();
                in_hand.cut_short(&stats);
                stats.discarded(up.discard());
            }
            drop(up);
            (end, sink)
        }
    };
    let sink_loop = tracing::Instrument::instrument(sink_loop, sink_span);
    let has_tasks = spawned.has_tasks();
    let mut sink = None;
    let main = async {
        match beside_the_stages(has_tasks, sink_loop).await {
            Ok((end, s)) => {
                sink = Some(s);
                (end, None)
            }
            Err(e) => {
                run.cancel.cancel();
                (End::Cancelled, Some(e.to_string()))
            }
        }
    };
    let (end, internal) = spawned.drive(&run, main).await;
    let internal = internal.or_else(|| {
        run.panicked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    });
    let report = conclude(&run, end, internal, started, deadline).await?;
    match sink {
        Some(sink) => Ok((report, sink.finish())),
        None => Err(Error::Internal("the run's sink was lost".into())),
    }
}

/// The tasks a build spawned (the run's stages) and its observers (which end after them).
pub(crate) struct Spawned {
    tasks: tokio::task::JoinSet<()>,
    observers: Vec<Observer>,
}

impl Spawned {
    /// Takes the tasks out of a finished build, with the result of the plan's checks.
    pub(crate) fn take(mut b: Build) -> (Result<(), Error>, Spawned) {
        let checked = b.run_checks();
        b.run.live.built();
        for slot in std::mem::take(&mut b.deferred) {
            if let Some(task) = slot.lock().unwrap_or_else(|p| p.into_inner()).take() {
                b.tasks.spawn(task);
            }
        }
        let spawned = Spawned {
            tasks: std::mem::take(&mut b.tasks),
            observers: std::mem::take(&mut b.observers),
        };
        (checked, spawned)
    }

    /// True if the build spawned tasks (stages that run beside the sink).
    pub(crate) fn has_tasks(&self) -> bool {
        !self.tasks.is_empty()
    }

    /// Ends a plan that failed its checks before it ran: cancels and joins every task (the
    /// observers were never started).
    pub(crate) async fn abandon(mut self, run: &RunCtx) {
        run.cancel.cancel();
        while self.tasks.join_next().await.is_some() {}
        run.ended.cancel();
    }

    /// Drives `main` (the run, until it ends; it returns how, and a panic it saw), then
    /// joins every task, while the observers run beside it on this task; they take a last
    /// look once every task has ended. Returns how the run ended and the first panic seen.
    pub(crate) async fn drive(
        self,
        run: &RunCtx,
        main: impl std::future::Future<Output = (End, Option<String>)>,
    ) -> (End, Option<String>) {
        let Spawned {
            mut tasks,
            observers,
        } = self;
        let ending = async {
            let (end, mut internal) = main.await;
            // Every task of the run ends before the run returns: no task outlives its run.
            while let Some(joined) = tasks.join_next().await {
                if let Err(e) = joined {
                    if e.is_panic() {
                        internal = Some(crate::failure::panic_message(&*e.into_panic()));
                    }
                }
            }
            run.ended.cancel();
            (end, internal)
        };
        let observing = futures_util::future::join_all(
            observers
                .into_iter()
                .map(|o| std::panic::AssertUnwindSafe(o).catch_unwind()),
        );
        let ((end, internal), observed) = tokio::join!(ending, observing);
        let observer_panic = observed
            .into_iter()
            .find_map(Result::err)
            .map(|p| crate::failure::panic_message(&*p));
        (end, internal.or(observer_panic))
    }
}

/// Drives `drive` until it ends, the run is cancelled, or the deadline passes.
pub(crate) async fn drive_until(
    run: &RunCtx,
    deadline: Option<std::time::Duration>,
    drive: impl std::future::Future<Output = ()>,
) -> End {
    let timer = async {
        match deadline {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        biased;
        _ = run.cancel.cancelled() => End::Cancelled,
        _ = timer => End::Deadline,
        _ = drive => End::Drained,
    }
}

/// Ends a run that was driven until `end` and whose tasks have ended: closes the dead
/// letters and writes the report (or the error that carries it). `internal` is a panic already seen.
pub(crate) async fn conclude(
    run: &RunCtx,
    end: End,
    internal: Option<String>,
    started: tokio::time::Instant,
    deadline: Option<std::time::Duration>,
) -> Result<Report, Error> {
    run.dead.close().await;

    let first_failure = run
        .first_failure
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    let source_error = run
        .source_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    let stage_error = run
        .stage_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    let outage = run.outage.lock().unwrap_or_else(|p| p.into_inner()).take();
    let outcome = match end {
        _ if outage.is_some() => RunOutcome::Outage,
        End::Cancelled => RunOutcome::Cancelled,
        End::Deadline => RunOutcome::DeadlineExceeded,
        End::Drained if stage_error.is_some() => RunOutcome::StageFailed,
        End::Drained if source_error.is_some() => RunOutcome::SourceFailed,
        End::Drained if run.stop_requested.load(Ordering::Relaxed) => RunOutcome::Stopped,
        End::Drained => RunOutcome::Completed,
    };
    let report = Box::new(Report {
        stages: run.final_stages(),
        elapsed: started.elapsed(),
        outcome,
        failures: run.dead.count(),
        failure_sample: run.dead.sample(),
    });
    if let Some(msg) = internal {
        return Err(Error::Internal(msg));
    }
    if let Some(failure) = first_failure {
        return Err(Error::ItemFailed { failure, report });
    }
    if let Some(error) = outage {
        return Err(Error::Outage { error, report });
    }
    match end {
        End::Cancelled => Err(Error::Cancelled { report }),
        End::Deadline => Err(Error::DeadlineExceeded {
            deadline: deadline.unwrap_or_default(),
            report,
        }),
        End::Drained => match (stage_error, source_error) {
            (Some((stage, error)), _) => Err(Error::Stage {
                stage,
                error,
                report,
            }),
            (None, Some((stage, error))) => Err(Error::Source {
                stage,
                error,
                report,
            }),
            (None, None) => Ok(*report),
        },
    }
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;
    use std::future::IntoFuture;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_awaited_run_drives_its_sink_beside_its_stages_on_the_workers() {
        // The test's body runs in `block_on`, on the test's own thread.
        let caller = std::thread::current().id();
        let report = Pipeline::from_iter(0..3)
            .map_async("call", |x| async move { x })
            .for_each(move |_| async move {
                assert_ne!(std::thread::current().id(), caller);
            })
            .await
            .unwrap();
        assert_eq!((report.delivered(), report.failures), (3, 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_run_without_stage_tasks_stays_in_place() {
        let caller = std::thread::current().id();
        let report = Pipeline::from_iter(0..3)
            .map(|x| x + 1)
            .for_each(move |_| async move {
                assert_eq!(std::thread::current().id(), caller);
            })
            .await
            .unwrap();
        assert_eq!((report.delivered(), report.failures), (3, 0));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn on_one_thread_an_awaited_run_stays_in_place() {
        let caller = std::thread::current().id();
        let report = Pipeline::from_iter(0..3)
            .for_each(move |_| async move {
                assert_eq!(std::thread::current().id(), caller);
            })
            .await
            .unwrap();
        assert_eq!((report.delivered(), report.failures), (3, 0));
    }

    /// The names of the spans from the one an event named `message` happened in up to the
    /// root, with each span's `stage`/`pipeline` field, for every such event.
    fn ancestry_of(
        c: &crate::observe::capture::Captured,
        message: &str,
    ) -> Vec<Vec<(&'static str, String)>> {
        c.events
            .iter()
            .filter(|e| e.field("message") == Some(message))
            .map(|e| {
                c.ancestry(e.span.expect("the event is in a span"))
                    .into_iter()
                    .map(|i| {
                        let s = &c.spans[i];
                        let label = s.field("stage").or(s.field("pipeline")).unwrap_or_default();
                        (s.name, label.to_string())
                    })
                    .collect()
            })
            .collect()
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn stage_tasks_run_in_their_spans_under_the_run_under_the_callers_span() {
        use tracing::Instrument as _;
        let capture = crate::observe::capture::Capture::default();
        let _guard = tracing::subscriber::set_default(capture.clone());
        let caller = tracing::info_span!("request");
        let report = async {
            Pipeline::from_iter(0..3u32)
                .map_async("fetch", |x| async move {
                    tracing::info!("calling");
                    x
                })
                .workers(2)
                .for_each(|_| async { tracing::info!("storing") })
                .name("orders")
                .await
                .unwrap()
        }
        .instrument(caller)
        .await;
        assert_eq!(report.delivered(), 3);
        let c = capture.take();
        let expected = |stage: &str| {
            vec![
                ("stage", stage.to_string()),
                ("run", "orders".to_string()),
                ("request", String::new()),
            ]
        };
        assert_eq!(ancestry_of(&c, "calling"), vec![expected("fetch"); 3]);
        assert_eq!(ancestry_of(&c, "storing"), vec![expected("for_each"); 3]);
        let kinds: Vec<_> = c
            .spans
            .iter()
            .filter(|s| s.name == "stage")
            .map(|s| (s.field("stage").unwrap(), s.field("kind").unwrap()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("source", "source"),
                ("fetch", "async"),
                ("for_each", "sink")
            ]
        );
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_spawned_run_keeps_the_span_current_where_it_was_spawned() {
        let capture = crate::observe::capture::Capture::default();
        let _guard = tracing::subscriber::set_default(capture.clone());
        let handle = tracing::info_span!("request").in_scope(|| {
            Pipeline::from_iter(0..2u32)
                .map_async("fetch", |x| async move {
                    tracing::info!("calling");
                    x
                })
                .spawn()
        });
        // Joined outside the caller's span: the run's tasks still belong to it.
        assert_eq!(handle.join().await.unwrap().delivered(), 2);
        let c = capture.take();
        let names: Vec<Vec<_>> = ancestry_of(&c, "calling")
            .into_iter()
            .map(|a| a.into_iter().map(|(n, _)| n).collect())
            .collect();
        assert_eq!(names, vec![vec!["stage", "run", "request"]; 2]);
    }

    /// Tells when it is dropped.
    struct Dropped(Option<tokio::sync::oneshot::Sender<()>>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            if let Some(tx) = self.0.take() {
                let _ = tx.send(());
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sink_that_never_waits_drives_the_last_async_stage_in_place() {
        // `collect` only stores what it gets: it pulls the stage in, so the calls run
        // where the run is awaited, with no task and no thread between them and the sink.
        let caller = std::thread::current().id();
        let threads = Pipeline::from_iter(0..2_000)
            .map_async("call", |_| async { std::thread::current().id() })
            .workers(16)
            .collect()
            .await
            .unwrap();
        assert_eq!(threads.len(), 2_000);
        assert!(threads.iter().all(|t| *t == caller));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stage_before_another_stage_keeps_its_own_task() {
        // Only the stage right before the sink is pulled in: the first one runs as a task
        // of its own and hands its chunks to the second through a hop.
        let tasks = Pipeline::from_iter(0..100)
            .map_async("first", |_| async { tokio::task::try_id() })
            .map_async("second", |t| async move { (t, tokio::task::try_id()) })
            .collect()
            .await
            .unwrap();
        let (first, second) = tasks[0];
        assert!(first.is_some() && second.is_some());
        assert_ne!(first, second);
        assert!(tasks.iter().all(|t| *t == (first, second)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_an_awaited_run_ends_it() {
        let pulled = Arc::new(AtomicU64::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let guard = Dropped(Some(tx));
        let p = pulled.clone();
        let run = Pipeline::from_iter(0..u64::MAX)
            .inspect(move |_| {
                p.fetch_add(1, Ordering::Relaxed);
            })
            .map_async("call", |x| async move { x })
            .for_each(move |_| {
                let _keep = &guard;
                async {}
            });
        let mut run = run.into_future();
        // Runs until it has pulled something, then the caller gives up on it.
        while pulled.load(Ordering::Relaxed) == 0 {
            std::future::poll_fn(|cx| {
                let _ = run.as_mut().poll(cx);
                std::task::Poll::Ready(())
            })
            .await;
            tokio::task::yield_now().await;
        }
        drop(run);
        // The sink (and its closure) goes with the run; a hang here is a run left behind.
        tokio::time::timeout(std::time::Duration::from_secs(10), rx)
            .await
            .expect("the dropped run ended")
            .unwrap();
    }
}
