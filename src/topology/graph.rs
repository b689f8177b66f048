//! [`Graph`]: one run that ends in several sinks.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinSet;

use crate::dead_letter::DeadLetter;
use crate::error::Error;
use crate::plan::{IntoPipeline, Pipeline, Settings};
use crate::report::{Report, StageStats};
use crate::runtime::handle::Handle;
use crate::runtime::options::{ErrorPolicy, RunOptions};
use crate::runtime::run::{End, Spawned, conclude, drive_until, prepare};
use crate::runtime::sink::{self, Sink};
use crate::runtime::{Build, RunCtx, next_chunk};

type Driver = Pin<Box<dyn Future<Output = ()> + Send>>;
type EndFn = Box<dyn FnOnce(&mut Build) -> Driver + Send>;
/// A graph ready to run: its run, its sinks, its deadline.
type Prepared = (Arc<RunCtx>, Vec<EndFn>, Option<Duration>);

/// A run with several sinks: every branch of a split ends in a sink of the same graph, and
/// one [`run`](Graph::run) (or [`spawn`](Graph::spawn)) drives them all, with one
/// [`Handle`] and one [`Report`] covering every stage of every branch.
///
/// A graph is a by-value builder, like a [`Pipeline`]: add sinks, set the run's options
/// (the [`RunOptions`] of a pipeline's run, under the same names: `deadline`, `outage`,
/// `error_policy`, `dead_letter`, `name`, `cancel_on`, `stop_on_signal`, `on_signal`,
/// `signal_grace`; they apply to the whole graph), then run it.
/// Each sink is driven by a task of its own and back-pressures its branch. A branch that was
/// split off but never given a sink fails the run before it starts with [`Error::Config`].
///
/// ```
/// use flowline::prelude::*;
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let (even, odd) = Pipeline::from_iter(0..10u32).branch("parity", |x| x % 2 == 0);
/// let evens = Collected::new();
/// let report = Graph::new()
///     .collect(even, &evens)
///     .for_each(odd.map(|x| x * 100), |x| async move { println!("{x}") })
///     .dead_letter(DeadLetter::callback(|f| eprintln!("{f}")))
///     .run()
///     .await
///     .unwrap();
/// assert_eq!(evens.take(), vec![0, 2, 4, 6, 8]);
/// assert_eq!(report.delivered(), 10);
/// # }
/// ```
#[must_use = "a graph does nothing until it is run"]
pub struct Graph {
    ends: Vec<EndFn>,
    settings: Vec<Settings>,
    options: RunOptions,
}

impl Default for Graph {
    fn default() -> Self {
        Graph::new()
    }
}

impl fmt::Debug for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Graph")
            .field("sinks", &self.ends.len())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// Where a [`Graph::collect`] sink puts its items; they are there once the run has ended.
/// Clones share one place.
///
/// ```
/// use flowline::prelude::*;
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let out = Collected::new();
/// Graph::new().collect(Pipeline::from_iter(0..3), &out).run().await.unwrap();
/// assert_eq!(out.take(), vec![0, 1, 2]);
/// # }
/// ```
pub struct Collected<T>(Arc<Mutex<Vec<T>>>);

impl<T> Clone for Collected<T> {
    fn clone(&self) -> Self {
        Collected(self.0.clone())
    }
}

impl<T> Default for Collected<T> {
    fn default() -> Self {
        Collected(Arc::new(Mutex::new(Vec::new())))
    }
}

impl<T> fmt::Debug for Collected<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Collected").finish_non_exhaustive()
    }
}

impl<T> Collected<T> {
    /// An empty place for a collect sink's items.
    ///
    /// ```
    /// let out = flowline::Collected::<u32>::new();
    /// assert!(out.take().is_empty());
    /// ```
    pub fn new() -> Self {
        Collected::default()
    }

    /// Takes what was collected (empty before the run ended, and after a first `take`).
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let out = Collected::new();
    /// Graph::new().collect(Pipeline::from_iter([7]), &out).run().await.unwrap();
    /// assert_eq!((out.take(), out.take()), (vec![7], vec![]));
    /// # }
    /// ```
    pub fn take(&self) -> Vec<T> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Graph {
    /// An empty graph.
    ///
    /// ```
    /// let graph = flowline::Graph::new();
    /// # let _ = graph;
    /// ```
    pub fn new() -> Graph {
        Graph {
            ends: Vec::new(),
            settings: Vec::new(),
            options: RunOptions::default(),
        }
    }

    fn add<T, K>(
        mut self,
        p: Pipeline<T>,
        sink: K,
        name: &'static str,
        deliver: impl FnOnce(K::Output) + Send + 'static,
    ) -> Self
    where
        T: Send + 'static,
        K: Sink<T>,
    {
        let Pipeline { build, settings } = p;
        self.settings.push(settings);
        self.ends.push(Box::new(move |b: &mut Build| {
            let up = build(b);
            let stats = b.stage(name, "sink");
            let run = b.run.clone();
            let span = b.stage_span();
            Box::pin(tracing::Instrument::instrument(
                drive_sink(up, sink, stats, run, deliver),
                span,
            )) as Driver
        }));
        self
    }

    /// Ends `p` in a sink that counts and drops its items (like [`Flow::run`](crate::Flow::run)).
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let report = Graph::new().discard(Pipeline::from_iter(0..5)).run().await.unwrap();
    /// assert_eq!(report.delivered(), 5);
    /// # }
    /// ```
    pub fn discard(self, p: impl IntoPipeline) -> Self {
        self.add(p.into_pipeline(), sink::Discard, "sink", |()| {})
    }

    /// Ends `p` in a sink that calls `f` for each item, one at a time, in order (like
    /// [`Flow::for_each`](crate::Flow::for_each)). A panic in `f` fails that item.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let report = Graph::new()
    ///     .for_each(Pipeline::from_iter(0..3), |x| async move { println!("{x}") })
    ///     .run().await.unwrap();
    /// assert_eq!(report.delivered(), 3);
    /// # }
    /// ```
    pub fn for_each<P, F, Fut>(self, p: P, f: F) -> Self
    where
        P: IntoPipeline,
        F: FnMut(P::Item) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.add(p.into_pipeline(), sink::ForEach(f), "for_each", |()| {})
    }

    /// Ends `p` in a sink that collects its items into `into` (they are there once the run
    /// has ended).
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let (small, big) = Pipeline::from_iter(0..6).branch("size", |x| *x < 3);
    /// let (a, b) = (Collected::new(), Collected::new());
    /// Graph::new().collect(small, &a).collect(big, &b).run().await.unwrap();
    /// assert_eq!((a.take(), b.take()), (vec![0, 1, 2], vec![3, 4, 5]));
    /// # }
    /// ```
    pub fn collect<P: IntoPipeline>(self, p: P, into: &Collected<P::Item>) -> Self {
        let slot = into.0.clone();
        self.add(
            p.into_pipeline(),
            sink::Collect(Vec::new()),
            "collect",
            move |v| slot.lock().unwrap_or_else(|p| p.into_inner()).extend(v),
        )
    }

    /// Ends the whole run if it has not finished within `limit` (on tokio's clock). Must be
    /// more than zero.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let endless = Pipeline::from_iter(0..u64::MAX)
    ///     .map_async("tick", |x| async move { tokio::time::sleep(Duration::from_millis(1)).await; x });
    /// let err = Graph::new().discard(endless).deadline(Duration::from_secs(1)).run().await.unwrap_err();
    /// assert!(matches!(err, Error::DeadlineExceeded { .. }));
    /// # }
    /// ```
    pub fn deadline(mut self, limit: Duration) -> Self {
        self.options = self.options.deadline(limit);
        self
    }

    /// How long the graph's own parts ride out a server that is down (see
    /// [`RunOptions::outage`](crate::RunOptions::outage)).
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use flowline::Outage;
    /// let graph = Graph::new().outage(Outage::forever());
    /// # let _ = graph;
    /// ```
    pub fn outage(mut self, policy: crate::Outage) -> Self {
        self.options = self.options.outage(policy);
        self
    }

    /// What to do when an item fails, anywhere in the graph.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// let graph = Graph::new().error_policy(ErrorPolicy::Stop);
    /// # let _ = graph;
    /// ```
    pub fn error_policy(mut self, policy: ErrorPolicy) -> Self {
        self.options = self.options.error_policy(policy);
        self
    }

    /// Where the failed items of every branch go.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// let graph = Graph::new().dead_letter(DeadLetter::callback(|f| eprintln!("{f}")));
    /// # let _ = graph;
    /// ```
    pub fn dead_letter(mut self, target: DeadLetter) -> Self {
        self.options = self.options.dead_letter(target);
        self
    }

    /// Names the graph's run: the `pipeline` field of its `tracing` span and the `pipeline`
    /// label of its metrics (default `"flowline"`). See [`RunOptions::name`].
    ///
    /// ```
    /// use flowline::prelude::*;
    /// let graph = Graph::new().name("orders");
    /// # let _ = graph;
    /// ```
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.options = self.options.name(name);
        self
    }

    /// Cancels the graph's run when `token` is cancelled: every branch ends, the run
    /// returns [`Error::Cancelled`] with its report. See [`RunOptions::cancel_on`].
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use flowline::CancellationToken;
    /// let shutdown = CancellationToken::new();
    /// let graph = Graph::new().cancel_on(shutdown.clone());
    /// # let _ = graph;
    /// ```
    pub fn cancel_on(mut self, token: tokio_util::sync::CancellationToken) -> Self {
        self.options = self.options.cancel_on(token);
        self
    }

    /// Stops the graph's run when a signal comes: the first stops every branch gracefully
    /// ([`RunOutcome::Stopped`](crate::RunOutcome)); a second cancels it. See
    /// [`RunOptions::stop_on_signal`].
    ///
    /// ```
    /// use flowline::prelude::*;
    /// let graph = Graph::new().stop_on_signal(|| async {
    ///     tokio::time::sleep(std::time::Duration::from_secs(60)).await;
    ///     Ok(())
    /// });
    /// # let _ = graph;
    /// ```
    pub fn stop_on_signal<F, Fut>(mut self, signal: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::io::Result<()>> + Send + 'static,
    {
        self.options = self.options.stop_on_signal(signal);
        self
    }

    /// Calls `hook` each time a signal of [`stop_on_signal`](Graph::stop_on_signal) acts,
    /// before it stops or cancels the graph's run. See [`RunOptions::on_signal`].
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use flowline::SignalStep;
    /// let graph = Graph::new().on_signal(|step| {
    ///     if step != SignalStep::Stop {
    ///         eprintln!("cancelling: ending the jobs still running");
    ///     }
    /// });
    /// # let _ = graph;
    /// ```
    pub fn on_signal(mut self, hook: impl Fn(crate::SignalStep) + Send + Sync + 'static) -> Self {
        self.options = self.options.on_signal(hook);
        self
    }

    /// After the first signal of [`stop_on_signal`](Graph::stop_on_signal), cancels the
    /// graph's run if it has not ended within `grace`. See [`RunOptions::signal_grace`].
    ///
    /// ```
    /// use flowline::prelude::*;
    /// let graph = Graph::new().signal_grace(std::time::Duration::from_secs(30));
    /// # let _ = graph;
    /// ```
    pub fn signal_grace(mut self, grace: std::time::Duration) -> Self {
        self.options = self.options.signal_grace(grace);
        self
    }

    /// Replaces every run option with `options`.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// let graph = Graph::new().options(RunOptions::new().error_policy(ErrorPolicy::Stop));
    /// # let _ = graph;
    /// ```
    pub fn options(mut self, options: RunOptions) -> Self {
        self.options = options;
        self
    }

    /// Checks the graph and its options and opens what the run needs.
    fn prepare(self) -> Result<Prepared, Error> {
        let mut settings = Settings::join(self.settings);
        if self.ends.is_empty() {
            settings.errors.push(Error::config(
                "graph",
                "sinks",
                0usize,
                "must have at least one sink",
            ));
        }
        let run = prepare(settings.errors, &self.options)?;
        Ok((run, self.ends, self.options.deadline))
    }

    /// Runs every sink of the graph to its end and returns the one report.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let parts = Pipeline::from_iter(0..9).broadcast(3);
    /// let graph = parts.into_iter().fold(Graph::new(), |g, p| g.discard(p));
    /// assert_eq!(graph.run().await.unwrap().delivered(), 27);
    /// # }
    /// ```
    pub async fn run(self) -> Result<Report, Error> {
        use tracing::Instrument as _;
        let (run, ends, deadline) = self.prepare()?;
        let span = run.span.clone();
        execute(run, ends, deadline).instrument(span).await
    }

    /// Starts the graph in the background and returns its [`Handle`] (cancel, stop, pause,
    /// snapshot, join). Must be called inside a tokio runtime.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let handle = Graph::new().discard(Pipeline::from_iter(0..5)).spawn();
    /// assert_eq!(handle.join().await.unwrap().delivered(), 5);
    /// # }
    /// ```
    pub fn spawn(self) -> Handle {
        match self.prepare() {
            Ok((run, ends, deadline)) => {
                Handle::from_run(run.clone(), execute(run, ends, deadline))
            }
            Err(e) => Handle::not_started(e),
        }
    }
}

/// Drives one sink in its own task until its branch ends or the run is cancelled.
async fn drive_sink<T: Send + 'static, K: Sink<T>>(
    mut up: crate::runtime::Upstream<T>,
    mut sink: K,
    stats: Arc<StageStats>,
    run: Arc<RunCtx>,
    deliver: impl FnOnce(K::Output) + Send,
) {
    let cancel = run.cancel.clone();
    let in_hand = crate::runtime::sink::InHand::default();
    let drained = {
        let drive = async {
            while let Some(chunk) = next_chunk(&mut up).await {
                in_hand.consume(&mut sink, chunk, &stats, &run).await;
                tokio::task::consume_budget().await;
            }
        };
        tokio::select! {
            biased;
            _ = cancel.cancelled() => false,
            _ = drive => true,
        }
    };
    if !drained {
        in_hand.cut_short(&stats);
        stats.discarded(up.discard());
    }
    drop(up);
    deliver(sink.finish());
}

/// Builds every end of the graph into one run, drives all sinks at once, and ends the run
/// like a single pipeline's (`run::execute_in`).
async fn execute(
    run: Arc<RunCtx>,
    ends: Vec<EndFn>,
    deadline: Option<Duration>,
) -> Result<Report, Error> {
    let started = tokio::time::Instant::now();
    let mut b = Build::new(run.clone());
    let drivers: Vec<Driver> = ends.into_iter().map(|end| end(&mut b)).collect();
    let (checked, spawned) = Spawned::take(b);
    if let Err(e) = checked {
        drop(drivers);
        spawned.abandon(&run).await;
        return Err(e);
    }
    let mut sinks = JoinSet::new();
    for d in drivers {
        sinks.spawn(d);
    }
    let main = async {
        let mut internal = None;
        let all = async {
            while let Some(joined) = sinks.join_next().await {
                note_panic(joined, &mut internal);
            }
        };
        let end = drive_until(&run, deadline, all).await;
        if end != End::Drained {
            run.cancel.cancel();
        }
        while let Some(joined) = sinks.join_next().await {
            note_panic(joined, &mut internal);
        }
        (end, internal)
    };
    let (end, internal) = spawned.drive(&run, main).await;
    conclude(&run, end, internal, started, deadline).await
}

fn note_panic(joined: Result<(), tokio::task::JoinError>, internal: &mut Option<String>) {
    if let Err(e) = joined {
        if e.is_panic() {
            *internal = Some(crate::failure::panic_message(&*e.into_panic()));
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn a_graph_without_sinks_is_a_config_error() {
        let err = Graph::new().run().await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: stage `graph`: sinks = 0: must have at least one sink"
        );
    }

    /// A guard held by every stage closure of a graph: when the run returned, the count is
    /// back to one (no task kept a closure alive).
    fn build(guard: &Arc<()>) -> Graph {
        let g1 = guard.clone();
        let g2 = guard.clone();
        let (a, b) = Pipeline::from_iter(0..u64::MAX).branch("split", |x| x % 3 == 0);
        let a = a.map_async("slow a", move |x| {
            let _g = g1.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                x
            }
        });
        let b = b
            .broadcast(2)
            .into_iter()
            .map(|p| p.map(|x| x + 1))
            .collect::<Vec<_>>();
        let b = Pipeline::merge(b).map_async("slow b", move |x| {
            let _g = g2.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(3)).await;
                x
            }
        });
        Graph::new().discard(a).discard(b)
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_ends_every_branch_without_leaks() {
        let guard = Arc::new(());
        let handle = build(&guard).spawn();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let live = handle.snapshot();
        assert!(live.stage("sink").unwrap().passed > 50);
        assert!(live.stage("sink#2").unwrap().passed > 200);
        handle.cancel();
        let err = handle.join().await.unwrap_err();
        let Error::Cancelled { report } = err else {
            panic!("{err}")
        };
        assert!(report.is_balanced(), "{report}");
        assert_eq!(Arc::strong_count(&guard), 1, "a task outlived the run");
    }

    #[tokio::test(start_paused = true)]
    async fn stop_ends_every_branch_finishing_the_calls_in_flight() {
        let guard = Arc::new(());
        let handle = build(&guard).spawn();
        tokio::time::sleep(Duration::from_millis(1_001)).await;
        let before = handle.snapshot();
        handle.stop();
        let t = tokio::time::Instant::now();
        let report = handle.join().await.unwrap();
        assert_eq!(report.outcome, RunOutcome::Stopped);
        // The calls in flight (one per stage, started at 1,000 and 999 ms) finish and are
        // delivered; no call starts after the stop.
        assert_eq!(t.elapsed(), Duration::from_millis(9));
        for (stage, sink) in [("slow a", "sink"), ("slow b", "sink#2")] {
            let calls = before.stage(stage).unwrap().passed + 1;
            assert_eq!(report.stage(stage).unwrap().passed, calls, "{report}");
            assert_eq!(report.stage(sink).unwrap().passed, calls, "{report}");
        }
        // What was pulled and not started ends unfinished in the async stages, and only
        // there: the source, the split, the copies and the merge passed everything on.
        for s in &report.stages {
            assert_eq!(s.unfinished > 0, s.kind == "async", "{report}");
        }
        let split = report.stage("split").unwrap();
        assert_eq!(split.received, split.passed);
        assert!(report.is_balanced());
        assert_eq!(Arc::strong_count(&guard), 1, "a task outlived the run");
    }

    #[tokio::test(start_paused = true)]
    async fn the_graph_deadline_ends_every_branch() {
        let guard = Arc::new(());
        let err = build(&guard)
            .deadline(Duration::from_millis(500))
            .run()
            .await
            .unwrap_err();
        assert!(matches!(err, Error::DeadlineExceeded { .. }), "{err}");
        assert_eq!(err.report().unwrap().elapsed, Duration::from_millis(500));
        assert_eq!(Arc::strong_count(&guard), 1);
    }

    #[tokio::test]
    async fn stop_policy_on_one_branch_stops_the_graph() {
        let (a, b) = Pipeline::from_iter(0..u64::MAX).branch("split", |x| x % 2 == 0);
        let a = a.try_map_async("check", |x| async move {
            if x == 100 { Err("bad") } else { Ok(x) }
        });
        let err = Graph::new()
            .discard(a)
            .discard(b)
            .error_policy(ErrorPolicy::Stop)
            .run()
            .await
            .unwrap_err();
        assert!(matches!(err, Error::ItemFailed { .. }), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_graph_is_cancelled_by_its_token_and_stopped_by_its_signal() {
        let guard = Arc::new(());
        let token = crate::CancellationToken::new();
        let t = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            t.cancel();
        });
        let err = build(&guard).cancel_on(token).run().await.unwrap_err();
        let Error::Cancelled { report } = err else {
            panic!("{err}")
        };
        assert_eq!(report.elapsed, Duration::from_millis(300));
        assert!(report.is_balanced(), "{report}");

        let report = build(&guard)
            .stop_on_signal(|| async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                Ok(())
            })
            .run()
            .await
            .unwrap();
        assert_eq!(report.outcome, RunOutcome::Stopped);
        // Stopped at 200 ms; the calls in flight (10 ms at most) finished.
        assert!(
            (Duration::from_millis(200)..=Duration::from_millis(210)).contains(&report.elapsed),
            "{report}"
        );
        assert!(report.is_balanced(), "{report}");
        assert_eq!(Arc::strong_count(&guard), 1);
    }

    #[tokio::test]
    async fn a_graph_has_the_name_it_is_given_and_refuses_an_empty_one() {
        let graph = Graph::new()
            .discard(Pipeline::from_iter(0..3))
            .name("orders");
        let (run, _, _) = graph.prepare().unwrap();
        assert_eq!(&*run.name, "orders");
        let err = Graph::new()
            .discard(Pipeline::from_iter(0..3))
            .name("")
            .run()
            .await
            .unwrap_err();
        assert!(err.to_string().contains("name"), "{err}");
        let Error::Config { problems } = err else {
            panic!("{err}")
        };
        let options: Vec<&str> = problems.iter().map(|p| p.option).collect();
        assert_eq!(options, ["name"]);
        assert_eq!(problems[0].value, r#""""#);
    }
}
