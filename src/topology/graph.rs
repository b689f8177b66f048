//! [`Graph`]: one run that ends in several sinks.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinSet;

use crate::dead_letter::DeadLetter;
use crate::error::Error;
use crate::plan::{ErrorPolicy, IntoPipeline, Pipeline, Settings};
use crate::report::{Report, StageStats};
use crate::runtime::handle::Handle;
use crate::runtime::run::{End, Spawned, conclude, drive_until, prepare_settings};
use crate::runtime::sink::{self, Sink};
use crate::runtime::{Build, RunCtx, next_chunk};

type Driver = Pin<Box<dyn Future<Output = ()> + Send>>;
type EndFn = Box<dyn FnOnce(&mut Build) -> Driver + Send>;

/// A run with several sinks: every branch of a split ends in a sink of the same graph, and
/// one [`run`](Graph::run) (or [`spawn`](Graph::spawn)) drives them all, with one
/// [`Handle`] and one [`Report`] covering every stage of every branch.
///
/// Each sink is driven by a task of its own and back-pressures its branch. A branch that was
/// split off but never given a sink fails the run before it starts with [`Error::Config`].
/// The run-wide settings are those of all its pipelines combined: the shortest deadline,
/// [`ErrorPolicy::Stop`] if any asked for it, and the first dead-letter target set (the
/// graph's own, set with [`Graph::dead_letter`], comes first).
///
/// ```
/// use flowline::prelude::*;
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let (even, odd) = Pipeline::from_iter(0..10u32).branch("parity", |x| x % 2 == 0);
/// let mut graph = Graph::new();
/// let evens = graph.collect(even);
/// graph.for_each(odd.map(|x| x * 100), |x| async move { println!("{x}") });
/// let report = graph.run().await.unwrap();
/// assert_eq!(evens.take(), vec![0, 2, 4, 6, 8]);
/// assert_eq!(report.delivered(), 10);
/// # }
/// ```
#[must_use = "a graph does nothing until it is run"]
pub struct Graph {
    ends: Vec<EndFn>,
    settings: Vec<Settings>,
    own: Settings,
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
            .finish_non_exhaustive()
    }
}

/// What a [`Graph::collect`] sink gathered; filled when the run ends.
///
/// ```
/// use flowline::prelude::*;
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let mut graph = Graph::new();
/// let out = graph.collect(Pipeline::from_iter(0..3));
/// graph.run().await.unwrap();
/// assert_eq!(out.take(), vec![0, 1, 2]);
/// # }
/// ```
pub struct Collected<T>(Arc<Mutex<Vec<T>>>);

impl<T> fmt::Debug for Collected<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Collected").finish_non_exhaustive()
    }
}

impl<T> Collected<T> {
    /// Takes what was collected (empty before the run ended, and after a first `take`).
    pub fn take(&self) -> Vec<T> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Graph {
    /// An empty graph.
    pub fn new() -> Graph {
        Graph {
            ends: Vec::new(),
            settings: Vec::new(),
            own: Settings::default(),
        }
    }

    fn add<T, K>(
        &mut self,
        p: Pipeline<T>,
        sink: K,
        name: &'static str,
        deliver: impl FnOnce(K::Output) + Send + 'static,
    ) where
        T: Send + 'static,
        K: Sink<T>,
    {
        let Pipeline { build, settings } = p;
        self.settings.push(settings);
        self.ends.push(Box::new(move |b: &mut Build| {
            let up = build(b);
            let stats = b.stage(name, "sink");
            let run = b.run.clone();
            Box::pin(drive_sink(up, sink, stats, run, deliver)) as Driver
        }));
    }

    /// Ends `p` in a sink that counts and drops its items (like [`Flow::run`](crate::Flow::run)).
    pub fn discard(&mut self, p: impl IntoPipeline) -> &mut Self {
        self.add(p.into_pipeline(), sink::Discard, "sink", |()| {});
        self
    }

    /// Ends `p` in a sink that calls `f` for each item, one at a time, in order (like
    /// [`Flow::for_each`](crate::Flow::for_each)). A panic in `f` fails that item.
    pub fn for_each<P, F, Fut>(&mut self, p: P, f: F) -> &mut Self
    where
        P: IntoPipeline,
        F: FnMut(P::Item) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.add(p.into_pipeline(), sink::ForEach(f), "for_each", |()| {});
        self
    }

    /// Ends `p` in a sink that collects its items; they are in the returned [`Collected`]
    /// once the run has ended.
    pub fn collect<P: IntoPipeline>(&mut self, p: P) -> Collected<P::Item> {
        let slot = Arc::new(Mutex::new(Vec::new()));
        let out = slot.clone();
        self.add(
            p.into_pipeline(),
            sink::Collect(Vec::new()),
            "collect",
            move |v| *out.lock().unwrap_or_else(|p| p.into_inner()) = v,
        );
        Collected(slot)
    }

    /// Ends the whole run if it has not finished within `limit` (combined with the
    /// pipelines' own deadlines: the shortest wins). Must be more than zero.
    pub fn deadline(&mut self, limit: Duration) -> &mut Self {
        self.own.require_positive("graph", "deadline", limit);
        self.own.deadline = Some(limit);
        self
    }

    /// What to do when an item fails, for the whole graph (`Stop` if any pipeline says so).
    pub fn error_policy(&mut self, policy: ErrorPolicy) -> &mut Self {
        self.own.policy = policy;
        self
    }

    /// Where the failed items of every branch go.
    pub fn dead_letter(&mut self, target: DeadLetter) -> &mut Self {
        self.own.dead_letter = target;
        self
    }

    fn into_parts(self) -> (Settings, Vec<EndFn>) {
        let mut all = Vec::with_capacity(self.settings.len() + 1);
        all.push(self.own);
        all.extend(self.settings);
        let mut settings = combine(all);
        if self.ends.is_empty() {
            settings.errors.push(Error::config(
                "graph",
                "sinks",
                0usize,
                "must have at least one sink",
            ));
        }
        (settings, self.ends)
    }

    /// Runs every sink of the graph to its end and returns the one report.
    pub async fn run(self) -> Result<Report, Error> {
        let (mut settings, ends) = self.into_parts();
        let run = prepare_settings(&mut settings)?;
        execute(run, ends, settings.deadline).await
    }

    /// Starts the graph in the background and returns its [`Handle`] (cancel, stop, pause,
    /// snapshot, join). Must be called inside a tokio runtime.
    pub fn spawn(self) -> Handle {
        let (mut settings, ends) = self.into_parts();
        match prepare_settings(&mut settings) {
            Ok(run) => Handle::from_run(run.clone(), execute(run, ends, settings.deadline)),
            Err(e) => Handle::not_started(e),
        }
    }
}

/// The run-wide settings of several pipelines run as one: the shortest deadline,
/// `ErrorPolicy::Stop` if any asks for it, the first dead-letter target that is not the
/// default, and every configuration error. The item total is left unknown.
pub(crate) fn combine(all: Vec<Settings>) -> Settings {
    let mut out = Settings::default();
    for s in all {
        out.deadline = match (out.deadline, s.deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if s.policy == ErrorPolicy::Stop {
            out.policy = ErrorPolicy::Stop;
        }
        if out.dead_letter.is_report() && !s.dead_letter.is_report() {
            out.dead_letter = s.dead_letter;
        }
        out.errors.extend(s.errors);
    }
    out
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
    let drained = {
        let drive = async {
            while let Some(chunk) = next_chunk(&mut up).await {
                StageStats::add(&stats.received, chunk.len());
                sink.consume(chunk, &stats, &run).await;
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
        StageStats::add(&stats.received, up.discard());
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
            *internal = Some(crate::error::panic_message(&*e.into_panic()));
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
        let mut graph = Graph::new();
        graph.discard(a);
        graph.discard(b);
        graph
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
    async fn stop_ends_every_branch_and_finishes_what_was_pulled() {
        let guard = Arc::new(());
        let handle = build(&guard).spawn();
        tokio::time::sleep(Duration::from_secs(1)).await;
        handle.stop();
        let report = handle.join().await.unwrap();
        assert_eq!(report.outcome, RunOutcome::Stopped);
        assert!(report.stages.iter().all(|s| s.unfinished == 0), "{report}");
        let source = report.stage("source").map(|s| s.passed).unwrap_or_default();
        let split = report.stage("split").unwrap();
        assert_eq!(split.received, split.passed);
        assert!(source == 0 || source == split.received);
        assert!(report.is_balanced());
        assert_eq!(Arc::strong_count(&guard), 1, "a task outlived the run");
    }

    #[tokio::test(start_paused = true)]
    async fn the_graph_deadline_ends_every_branch() {
        let guard = Arc::new(());
        let mut graph = build(&guard);
        graph.deadline(Duration::from_millis(500));
        let err = graph.run().await.unwrap_err();
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
        let mut graph = Graph::new();
        graph.discard(a.error_policy(ErrorPolicy::Stop));
        graph.discard(b);
        let err = graph.run().await.unwrap_err();
        assert!(matches!(err, Error::ItemFailed { .. }), "{err}");
    }
}
