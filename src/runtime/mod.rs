//! The machinery under a pipeline: the run context shared by all tasks, how stages are built
//! into tasks, and the chunk streams that join them.

pub(crate) mod batch_sink;
pub(crate) mod chunk;
pub(crate) mod fused;
pub(crate) mod gate;
pub(crate) mod handle;
pub(crate) mod hop;
pub(crate) mod live;
pub(crate) mod options;
pub(crate) mod run;
pub(crate) mod signal;
pub(crate) mod sink;
pub(crate) mod tail;
pub(crate) mod ttl_map;
#[cfg(all(unix, feature = "signal"))]
pub(crate) mod unix_signals;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::ErrorPolicy;
use crate::dead_letter::DeadLetters;
use crate::failure::{Failure, ItemError};
use crate::observe::RunView;
use crate::observe::failure_log::FailureLog;
use crate::policy::StagePolicies;
use crate::report::{StageReport, StageStats};
use crate::runtime::chunk::Chunk;

pub(crate) use gate::Gate;

/// A pulled stream of chunks: what every stage reads from.
///
/// Not `Stream` because of `discard`: when a run is cancelled, the reader of a chain calls
/// `discard`, which empties the queues in front of it and returns how many items it threw
/// away, so that the first stage behind each queue can count them as its own (cancelled)
/// items. That keeps `received = passed + dropped + failed + unfinished` exact per stage even
/// for a cancelled run.
pub(crate) trait ChunkSource<T>: Send {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Chunk<T>>>;

    /// Throws away whatever is queued upstream; returns how many items the caller must
    /// count as received (and so unfinished).
    fn discard(&mut self) -> usize;

    /// Asked by a consumer that never waits between pulls (the sinks of `run()` and
    /// `collect()`) before the run starts: a stage that would run as a task of its own may
    /// run inside the consumer's task instead (see [`tail`]). True if it will.
    fn pull_in(&mut self) -> bool {
        false
    }
}

pub(crate) type Upstream<T> = Box<dyn ChunkSource<T>>;

/// Builds a plan into the run's tasks and returns the upstream of its last stage.
pub(crate) type BuildFn<T> = Box<dyn FnOnce(&mut Build) -> Upstream<T> + Send>;

/// A plan as a run takes it: how to build it into tasks, and the problems found while it
/// was written (reported with the run options' own, all at once, before anything runs).
pub(crate) struct Plan<T> {
    pub(crate) build: BuildFn<T>,
    pub(crate) errors: Vec<crate::Error>,
}

/// Awaits the next chunk of `up`.
pub(crate) fn next_chunk<T>(up: &mut Upstream<T>) -> impl Future<Output = Option<Chunk<T>>> + '_ {
    std::future::poll_fn(move |cx| up.poll_chunk(cx))
}

/// One task's watch on the run's cancellation, for a loop that checks it at every receive
/// and send of a chunk.
///
/// A `CancellationToken::cancelled()` made afresh for each of them takes the token's lock to
/// check it, registers a waiter under a second lock and removes it again when dropped; every
/// task of the run shares the run's token, so at every chunk the tasks contended for those
/// locks across threads. A watch registers one waiter with the token, once, whose wake-up
/// raises a flag of the watch's own: a check is one atomic load, and the task's waker is
/// handed over only when the task is about to wait.
pub(crate) struct CancelWatch {
    flag: Arc<CancelFlag>,
    /// The waiter registered with the token (polled once, with the flag's waker): kept alive
    /// so that the token's cancellation reaches the flag.
    _wait: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

/// Raised by the token's wake-up; wakes the task that last waited on it.
struct CancelFlag {
    cancelled: std::sync::atomic::AtomicBool,
    task: futures_util::task::AtomicWaker,
}

impl std::task::Wake for CancelFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.cancelled
            .store(true, std::sync::atomic::Ordering::Release);
        self.task.wake();
    }
}

impl CancelWatch {
    pub(crate) fn new(cancel: &CancellationToken) -> Self {
        let flag = Arc::new(CancelFlag {
            cancelled: std::sync::atomic::AtomicBool::new(false),
            task: futures_util::task::AtomicWaker::new(),
        });
        let waker = std::task::Waker::from(flag.clone());
        let mut wait = Box::pin(cancel.clone().cancelled_owned());
        if wait
            .as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_ready()
        {
            std::task::Wake::wake_by_ref(&flag);
        }
        CancelWatch { flag, _wait: wait }
    }

    fn is_cancelled(&self) -> bool {
        self.flag
            .cancelled
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Polls `op` unless the run is cancelled (`None`), cancellation first, as a biased
    /// `select!` would: once the run is cancelled, `op` is not polled again.
    fn poll_unless_cancelled<R>(
        &self,
        cx: &mut Context<'_>,
        op: impl FnOnce(&mut Context<'_>) -> Poll<R>,
    ) -> Poll<Option<R>> {
        if self.is_cancelled() {
            return Poll::Ready(None);
        }
        match op(cx) {
            Poll::Ready(r) => Poll::Ready(Some(r)),
            Poll::Pending => {
                // Registered before the second look: a cancel after that look wakes the task.
                self.flag.task.register(cx.waker());
                if self.is_cancelled() {
                    Poll::Ready(None)
                } else {
                    Poll::Pending
                }
            }
        }
    }

    /// The next chunk of `up` unless the run is cancelled first: `None` means cancelled,
    /// `Some(None)` that `up` has ended.
    pub(crate) async fn next_chunk<T>(&mut self, up: &mut Upstream<T>) -> Option<Option<Chunk<T>>> {
        std::future::poll_fn(|cx| self.poll_unless_cancelled(cx, |cx| up.poll_chunk(cx))).await
    }

    /// Sends `item` unless the run is cancelled first. `false` means cancelled or the
    /// receiver is gone: either way the task stops, and what it held counts as unfinished in
    /// its stage (it was received and never passed on).
    pub(crate) async fn send<T>(&mut self, tx: &tokio::sync::mpsc::Sender<T>, item: T) -> bool {
        let mut send = std::pin::pin!(tx.send(item));
        let sent =
            std::future::poll_fn(|cx| self.poll_unless_cancelled(cx, |cx| send.as_mut().poll(cx)))
                .await;
        matches!(sent, Some(Ok(())))
    }

    /// Sends `chunk` on unless the run is cancelled first, and counts it in `stats`: `passed`
    /// inputs (what produced the chunk) and the chunk's items as emitted. `false` as in
    /// [`send`](CancelWatch::send); nothing is counted then.
    pub(crate) async fn send_counted<T>(
        &mut self,
        tx: &tokio::sync::mpsc::Sender<Chunk<T>>,
        chunk: Chunk<T>,
        passed: usize,
        stats: &StageStats,
    ) -> bool {
        let n = chunk.len();
        if !self.send(tx, chunk).await {
            return false;
        }
        StageStats::add(&stats.passed, passed);
        StageStats::add(&stats.emitted, n);
        true
    }
}

/// State shared by every task of one run.
pub struct RunCtx {
    /// Cancels everything now.
    pub(crate) cancel: CancellationToken,
    /// The source gate: pause, resume, step, stop.
    pub(crate) gate: Arc<Gate>,
    pub(crate) stats: Mutex<Vec<Arc<StageStats>>>,
    pub(crate) dead: DeadLetters,
    pub(crate) policy: ErrorPolicy,
    pub(crate) first_failure: Mutex<Option<Failure>>,
    pub(crate) source_error: Mutex<Option<(String, ItemError)>>,
    /// A stage whose call can never be made again (a tower service failed in `poll_ready`).
    pub(crate) stage_error: Mutex<Option<(String, ItemError)>>,
    /// `Handle::stop` was called (the report says `Stopped` rather than `Completed`).
    pub(crate) stop_requested: std::sync::atomic::AtomicBool,
    /// Fired by a graceful stop ([`RunCtx::stop`]) and by a cancel (it is a child of
    /// `cancel`): an async stage waits on this one token instead of `cancel`, so that
    /// hearing of a stop costs it nothing more per poll, and tells the two apart by
    /// `cancel.is_cancelled()` when it fires.
    pub(crate) stopping: CancellationToken,
    /// Fired once every stage task has ended; run-level observers (progress, heartbeat,
    /// stall watchdog) stop on it, after one last look at the final counters.
    pub(crate) ended: CancellationToken,
    /// The run's time origin, for instants stored as integers (call ages).
    pub(crate) epoch: tokio::time::Instant,
    /// A panic of a stage driven inside another task (a pulled-in [`tail`]): the run's
    /// internal error, as a panic of a spawned task is.
    pub(crate) panicked: Mutex<Option<String>>,
    /// A stall watchdog wants the age of the oldest call of each async stage.
    pub(crate) watch_calls: std::sync::atomic::AtomicBool,
    /// The run's name (`RunOptions::name`): its span's and its metrics' `pipeline`.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) name: Arc<str>,
    /// The run's span, a child of the span current where the run was started; every
    /// stage task's span is its child.
    pub(crate) span: tracing::Span,
    /// Failures summed per stage and interval for the log (one line per stage and interval).
    pub(crate) failure_log: FailureLog,
    /// A signal stops the run, a second one cancels it (`RunOptions::stop_on_signal`).
    pub(crate) signal: Option<signal::Watch>,
    /// The admission policies of each async stage, for gauges (an adaptive limit, a
    /// breaker's state).
    pub(crate) policies: Mutex<Vec<StagePolicies>>,
    /// How long the run's own parts (idempotency and checkpoint stores, cursor sources) ride
    /// out a server that is down (`RunOptions::outage`).
    pub(crate) outage_policy: crate::Outage,
    /// The outage that ended the run, if one did.
    pub(crate) outage: Mutex<Option<crate::OutageError>>,
    /// The async stages' limits that [`Control`](crate::Control) may change while running.
    pub(crate) live: live::LiveStages,
}

impl RunCtx {
    pub(crate) fn new(options: &crate::RunOptions, dead: DeadLetters) -> Self {
        let name = options.run_name();
        let span = tracing::info_span!(target: "flowline", "run", pipeline = %name);
        let cancel = match &options.cancel {
            // A child: cancelling the run leaves the caller's token alone.
            Some(outside) => outside.child_token(),
            None => CancellationToken::new(),
        };
        RunCtx {
            stopping: cancel.child_token(),
            cancel,
            gate: Arc::new(Gate::new()),
            stats: Mutex::new(Vec::new()),
            dead,
            first_failure: Mutex::new(None),
            source_error: Mutex::new(None),
            stage_error: Mutex::new(None),
            stop_requested: std::sync::atomic::AtomicBool::new(false),
            ended: CancellationToken::new(),
            epoch: tokio::time::Instant::now(),
            panicked: Mutex::new(None),
            watch_calls: std::sync::atomic::AtomicBool::new(false),
            name,
            span,
            failure_log: FailureLog::new(),
            signal: options.signal.clone().map(|signal| signal::Watch {
                signal,
                hook: options.signal_hook.clone(),
                grace: options.signal_grace,
            }),
            policies: Mutex::new(Vec::new()),
            policy: options.policy,
            outage_policy: options.outage,
            outage: Mutex::new(None),
            live: live::LiveStages::default(),
        }
    }

    /// A server stayed down past the outage policy: remember the first such error and cancel
    /// the run, so that every item it holds ends unfinished (none fails for it, and no ack
    /// or checkpoint passes them).
    pub(crate) fn outage_ended(&self, error: crate::OutageError) {
        tracing::error!(error = %error, "an outage ends the run; its items are left unfinished");
        let mut slot = self.outage.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(error);
        }
        drop(slot);
        self.cancel.cancel();
    }

    /// A graceful stop: the sources pull nothing more, async stages start no new call (the
    /// items they have not started end unfinished), calls in flight finish and their
    /// results flow on.
    pub(crate) fn stop(&self) {
        self.stop_requested
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.gate.stop();
        self.stopping.cancel();
    }

    /// A failed item: counts nothing (the stage counts), sends it to the dead letters, and
    /// under `ErrorPolicy::Stop` cancels the run.
    pub(crate) fn fail(&self, failure: Failure) {
        if self.policy == ErrorPolicy::Stop {
            let mut first = self.first_failure.lock().unwrap_or_else(|p| p.into_inner());
            if first.is_none() {
                *first = Some(failure.clone());
            }
            drop(first);
            self.cancel.cancel();
        }
        self.count_reason(&failure);
        self.failure_log.record(&failure);
        self.dead.record(failure);
    }

    /// A stage driven inside another task panicked: the first message is the run's error.
    pub(crate) fn internal(&self, message: String) {
        let mut slot = self.panicked.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(message);
        }
    }

    /// Counts the failure's reason at its stage. Looked up by name (the stages pass theirs,
    /// shared, so the pointer usually matches first): one short scan per failed item, so that
    /// none of the places that fail items needs to know.
    fn count_reason(&self, failure: &Failure) {
        let stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let stage = stats
            .iter()
            .find(|s| Arc::ptr_eq(&s.name, &failure.stage))
            .or_else(|| stats.iter().find(|s| s.name == failure.stage));
        if let Some(s) = stage {
            s.failed_because(&failure.error);
        }
    }

    /// The source failed: remember why and stop pulling (what was pulled still finishes).
    pub(crate) fn source_failed(&self, stage: &str, error: ItemError) {
        let mut slot = self.source_error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some((stage.to_string(), error));
        }
        drop(slot);
        self.gate.stop();
    }

    /// A stage can make no more calls: remember why and stop the sources (what was pulled
    /// still finishes: it fails at that stage).
    pub(crate) fn stage_failed(&self, stage: &str, error: ItemError) {
        let mut slot = self.stage_error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some((stage.to_string(), error));
        }
        drop(slot);
        self.gate.stop();
    }

    /// When each stage's oldest call in flight started, in [`snapshot_stages`] order (only
    /// async stages, and only while `watch_calls` is set).
    pub(crate) fn oldest_calls(&self) -> Vec<Option<tokio::time::Instant>> {
        self.stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|s| s.oldest_call(self.epoch))
            .collect()
    }

    /// Every stage's counts while the run goes on (`unfinished`: in flight).
    pub(crate) fn snapshot_stages(&self) -> Vec<StageReport> {
        self.stages(false)
    }

    /// Every stage's counts once every task has ended (`unfinished`: counted where left).
    pub(crate) fn final_stages(&self) -> Vec<StageReport> {
        self.stages(true)
    }

    fn stages(&self, ended: bool) -> Vec<StageReport> {
        self.stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|s| {
                let mut r = s.snapshot(ended);
                r.limits = self.live.find(&s.name).map(|l| l.report());
                r
            })
            .collect()
    }
}

impl RunView for RunCtx {
    fn ended(&self) -> &CancellationToken {
        &self.ended
    }

    fn snapshot_stages(&self) -> Vec<StageReport> {
        RunCtx::snapshot_stages(self)
    }

    fn failures(&self) -> u64 {
        self.dead.count()
    }

    fn oldest_calls(&self) -> Vec<Option<tokio::time::Instant>> {
        RunCtx::oldest_calls(self)
    }

    fn watch_calls(&self) {
        self.watch_calls
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn is_paused(&self) -> bool {
        self.gate.is_paused()
    }

    fn cancel(&self) {
        self.cancel.cancel();
    }

    fn failure_log(&self) -> &FailureLog {
        &self.failure_log
    }

    #[cfg(feature = "metrics")]
    fn name(&self) -> &Arc<str> {
        &self.name
    }

    #[cfg(feature = "metrics")]
    fn stats(&self) -> Vec<Arc<StageStats>> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    #[cfg(feature = "metrics")]
    fn limits(&self) -> Vec<(Arc<str>, crate::report::LiveLimits)> {
        self.live
            .all()
            .iter()
            .map(|s| (s.name.clone(), s.report()))
            .collect()
    }

    #[cfg(feature = "metrics")]
    fn policies(&self) -> Vec<StagePolicies> {
        self.policies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

pub(crate) use crate::observe::Observer;

/// A check made once the whole plan is built (e.g. every branch of a split got a sink).
type Check = Box<dyn FnOnce() -> Result<(), crate::Error> + Send>;

/// What building a pipeline into tasks needs: the run, and a place for the tasks.
pub(crate) struct Build {
    pub(crate) run: Arc<RunCtx>,
    pub(crate) tasks: JoinSet<()>,
    /// Stage tasks spawned once the plan is built, unless their consumer pulls them in.
    pub(crate) deferred: Vec<tail::Slot>,
    /// Run-level observers: they end on `run.ended`, after the stage tasks.
    pub(crate) observers: Vec<Observer>,
    names: HashMap<String, usize>,
    /// Run after every part of the plan is built, before the run is driven: a part that can
    /// only be judged once the whole graph exists (a branch left without a sink) checks here.
    checks: Vec<Check>,
    /// The span of the stage registered last: the tasks spawned for it run in it.
    span: tracing::Span,
}

impl Build {
    /// A build of `run`, with the run-level observers every run has (the failure log, and
    /// what the run's options ask for: Ctrl-C, metrics).
    pub(crate) fn new(run: Arc<RunCtx>) -> Self {
        let mut b = Build {
            span: run.span.clone(),
            run,
            tasks: JoinSet::new(),
            deferred: Vec::new(),
            observers: Vec::new(),
            names: HashMap::new(),
            checks: Vec::new(),
        };
        b.observe(crate::observe::failure_log::flusher(b.run.clone()));
        if let Some(signal) = b.run.signal.clone() {
            b.observe(crate::runtime::signal::watch(b.run.clone(), signal));
        }
        #[cfg(feature = "metrics")]
        b.observe(crate::observe::metrics::export(b.run.clone()));
        b
    }

    /// Adds a check made once the whole plan is built.
    pub(crate) fn check(&mut self, f: impl FnOnce() -> Result<(), crate::Error> + Send + 'static) {
        self.checks.push(Box::new(f));
    }

    /// Makes the run fail with `e` once the plan is built (for errors found while building).
    pub(crate) fn reject(&mut self, e: crate::Error) {
        self.check(move || Err(e));
    }

    /// Runs every check; the first error wins.
    pub(crate) fn run_checks(&mut self) -> Result<(), crate::Error> {
        let mut first = Ok(());
        for check in self.checks.drain(..) {
            let r = check();
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    /// Registers a stage under a unique name (`map`, `map#2`, ...).
    pub(crate) fn stage(&mut self, name: &str, kind: &'static str) -> Arc<StageStats> {
        let n = self.names.entry(name.to_string()).or_insert(0);
        *n += 1;
        let unique: Arc<str> = if *n == 1 {
            Arc::from(name)
        } else {
            Arc::from(format!("{name}#{n}"))
        };
        self.span = tracing::info_span!(
            target: "flowline",
            parent: &self.run.span,
            "stage",
            stage = %unique,
            kind,
        );
        let stats = Arc::new(StageStats::new(unique, kind));
        self.run
            .stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(stats.clone());
        stats
    }

    /// Spawns one of the run's tasks, in the span of the stage registered last (the stage
    /// the task belongs to: a stage registers itself, then spawns its tasks). Every task
    /// watches `run.cancel` and ends when the run ends; the run awaits them all before it
    /// returns.
    pub(crate) fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        use tracing::Instrument as _;
        self.tasks.spawn(task.instrument(self.span.clone()));
    }

    /// The span of the stage registered last (for a task the run drives itself: a sink).
    pub(crate) fn stage_span(&self) -> tracing::Span {
        self.span.clone()
    }

    /// Keeps an async stage's admission policies for the run's gauges.
    pub(crate) fn policies(
        &mut self,
        stage: &StageStats,
        policies: &[Arc<dyn crate::policy::Policy>],
    ) {
        if !policies.is_empty() {
            self.run
                .policies
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((stage.name.clone(), policies.to_vec()));
        }
    }

    /// Makes an async stage's limits changeable while running (by its name).
    pub(crate) fn live_stage(
        &mut self,
        stage: &StageStats,
        workers: usize,
        policies: &[Arc<dyn crate::policy::Policy>],
    ) {
        let rate = policies.iter().find_map(|p| p.rate().cloned());
        let adaptive = policies.iter().any(|p| p.moves_limit());
        self.run.live.add(Arc::new(live::LiveStage::new(
            stage.name.clone(),
            workers,
            rate,
            adaptive,
        )));
    }

    /// A stage task that feeds the chunks of `rx`, as the upstream of the next stage: the
    /// task is spawned once the whole plan is built, unless the consumer pulls it in
    /// ([`ChunkSource::pull_in`]) before then.
    pub(crate) fn spawn_tail<T: Send + 'static>(
        &mut self,
        task: impl Future<Output = ()> + Send + 'static,
        rx: hop::HopRx<T>,
    ) -> Upstream<T> {
        use tracing::Instrument as _;
        // In the stage's span wherever it runs: as a task, or pulled into the sink's.
        let task = task.instrument(self.span.clone());
        let slot: tail::Slot = Arc::new(Mutex::new(Some(Box::pin(task))));
        self.deferred.push(slot.clone());
        Box::new(tail::Tail::new(rx, slot, self.run.clone()))
    }

    /// Adds a run-level observer: it must end soon after `run.ended` fires, which happens
    /// once every task spawned with [`spawn`](Build::spawn) has ended. Observers are polled
    /// by the task that drives the run (they only read counters on a timer), so a short run
    /// pays no thread hand-off to start them or to hear that they have ended.
    pub(crate) fn observe(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.observers.push(Box::pin(task));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn stats() -> StageStats {
        StageStats::new(Arc::from("s"), "s")
    }

    #[tokio::test]
    async fn a_watch_made_after_the_cancel_sees_it_before_polling_the_upstream() {
        let cancel = CancellationToken::new();
        cancel.cancel();
        let (tx, rx) = hop::hop::<u32>(
            1,
            &Arc::new(crate::report::StageStats::new(
                Arc::from("upstream"),
                "test",
            )),
        );
        tx.send(Chunk::untracked(vec![1])).await.unwrap();
        let mut up: Upstream<u32> = Box::new(rx);
        let mut watch = CancelWatch::new(&cancel);
        assert!(watch.next_chunk(&mut up).await.is_none());
        assert!(!watch.send_counted(&tx, Chunk::default(), 0, &stats()).await);
    }

    #[tokio::test]
    async fn a_cancel_wakes_a_task_waiting_for_a_chunk() {
        let cancel = CancellationToken::new();
        let (tx, rx) = hop::hop::<u32>(
            1,
            &Arc::new(crate::report::StageStats::new(
                Arc::from("upstream"),
                "test",
            )),
        );
        let c = cancel.clone();
        let waiting = tokio::spawn(async move {
            let mut up: Upstream<u32> = Box::new(rx);
            let mut watch = CancelWatch::new(&c);
            let first = watch.next_chunk(&mut up).await.map(|c| c.map(|c| c.items));
            let second = watch.next_chunk(&mut up).await.map(|c| c.map(|c| c.items));
            (first, second)
        });
        tx.send(Chunk::untracked(vec![7])).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        cancel.cancel();
        let (first, second) = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken by the cancel")
            .unwrap();
        assert_eq!(first, Some(Some(vec![7])));
        assert_eq!(second, None);
        drop(tx);
    }

    #[tokio::test]
    async fn a_cancel_wakes_a_task_waiting_to_send_and_nothing_is_counted() {
        let cancel = CancellationToken::new();
        let (tx, _rx) = hop::hop::<u32>(
            1,
            &Arc::new(crate::report::StageStats::new(
                Arc::from("upstream"),
                "test",
            )),
        );
        tx.send(Chunk::untracked(vec![1])).await.unwrap();
        let s = Arc::new(stats());
        let (c, s2) = (cancel.clone(), s.clone());
        let waiting = tokio::spawn(async move {
            let mut watch = CancelWatch::new(&c);
            watch
                .send_counted(&tx, Chunk::untracked(vec![2, 3]), 2, &s2)
                .await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        cancel.cancel();
        let sent = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken by the cancel")
            .unwrap();
        assert!(!sent);
        assert_eq!(s.passed.load(std::sync::atomic::Ordering::Relaxed), 0);
        assert_eq!(s.emitted.load(std::sync::atomic::Ordering::Relaxed), 0);
    }
}
