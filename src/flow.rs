//! `Flow`, the operators and terminals every plan offers. Each method is one line that hands
//! the plan to the operator's own module; the operators import the plan, never this trait's
//! implementors.

use std::future::Future;
use std::time::Duration;

use crate::failure::BoxError;
use crate::ops::map_async::{AsyncStage, Fallible, FallibleWith, Infallible, InfallibleWith};
use crate::plan::{IntoPipeline, Pipeline};
use crate::report::Report;
use crate::runtime::handle::{Handle, ItemStream};
use crate::runtime::run::Run;
use crate::runtime::sink;

/// The operators and terminals of a pipeline: one-line methods over [`IntoPipeline`], so
/// every plan and every stage being configured (like [`AsyncStage`]) has them, and one chain
/// reads top to bottom with each stage's options right under it.
///
/// ```
/// use flowline::prelude::*;
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let report = Pipeline::from_iter(1..=1000u64)
///     .filter(|x| x % 2 == 1)
///     .map_async("work", |x| async move { x * 3 })
///         .workers(8)
///     .map(|x| x + 1)
///     .run()
///     .await
///     .unwrap();
/// assert_eq!(report.delivered(), 500);
/// # }
/// ```
pub trait Flow: IntoPipeline {
    /// Transforms each item (synchronous, fused into the task before it).
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let out = Pipeline::from_iter(["a", "bb"]).map(str::len).collect().await.unwrap();
    /// assert_eq!(out, vec![1, 2]);
    /// # }
    /// ```
    fn map<U, F>(self, f: F) -> Pipeline<U>
    where
        U: Send + 'static,
        F: FnMut(Self::Item) -> U + Send + 'static,
    {
        crate::ops::map::map(self.into_pipeline(), f)
    }

    /// Keeps the items `keep` accepts; the others are counted as dropped.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let out = Pipeline::from_iter(0..6).filter(|x| x % 2 == 0).collect().await.unwrap();
    /// assert_eq!(out, vec![0, 2, 4]);
    /// # }
    /// ```
    fn filter<F>(self, keep: F) -> Pipeline<Self::Item>
    where
        F: FnMut(&Self::Item) -> bool + Send + 'static,
    {
        crate::ops::filter::filter(self.into_pipeline(), keep)
    }

    /// Transforms each item and keeps the `Some`s; `None`s are counted as dropped.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let out = Pipeline::from_iter(["4", "x"]).filter_map(|s| s.parse::<u8>().ok()).collect().await.unwrap();
    /// assert_eq!(out, vec![4]);
    /// # }
    /// ```
    fn filter_map<U, F>(self, f: F) -> Pipeline<U>
    where
        U: Send + 'static,
        F: FnMut(Self::Item) -> Option<U> + Send + 'static,
    {
        crate::ops::filter_map::filter_map(self.into_pipeline(), f)
    }

    /// Turns each item into any number of items.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let out = Pipeline::from_iter(["a b", "c"])
    ///     .flat_map(|line| line.split(' ').map(String::from).collect::<Vec<_>>())
    ///     .collect().await.unwrap();
    /// assert_eq!(out, vec!["a", "b", "c"]);
    /// # }
    /// ```
    fn flat_map<U, I, F>(self, f: F) -> Pipeline<U>
    where
        U: Send + 'static,
        I: IntoIterator<Item = U>,
        F: FnMut(Self::Item) -> I + Send + 'static,
    {
        crate::ops::flat_map::flat_map(self.into_pipeline(), f)
    }

    /// Looks at each item as it passes.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let report = Pipeline::from_iter(0..3).inspect(|x| println!("saw {x}")).run().await.unwrap();
    /// assert_eq!(report.delivered(), 3);
    /// # }
    /// ```
    fn inspect<F>(self, f: F) -> Pipeline<Self::Item>
    where
        F: FnMut(&Self::Item) + Send + 'static,
    {
        crate::ops::inspect::inspect(self.into_pipeline(), f)
    }

    /// Runs a user-written [`Operator`](crate::Operator), fused into the task before it like
    /// `map` and `filter`. The engine counts each item passed, dropped or failed by what the
    /// operator did with it, and moves completion tickets (cursor checkpoints, idempotency)
    /// along, so a custom operator keeps the accounting of the built-in ones.
    ///
    /// When the operator returns [`Step::Done`](crate::Step::Done), the sources that feed
    /// only this stage stop being pulled: the sources of its own upstream, across async
    /// stages, buffers, `merge` and `zip`. A source of another pipeline of the same
    /// [`Graph`](crate::Graph) goes on, and so does a source behind a split (`branch`,
    /// `route`, `broadcast`) whose other outputs lead elsewhere: they still want its items,
    /// so this stage drops what reaches it (after `partition`, whose lanes all lead here, the
    /// source does stop). The run ends normally ([`RunOutcome::Completed`](crate::RunOutcome)).
    ///
    /// ```
    /// use flowline::prelude::*;
    ///
    /// /// Passes items until their running sum would exceed a budget.
    /// struct Budget(u64);
    ///
    /// impl Operator<u64> for Budget {
    ///     type Output = u64;
    ///     fn push(&mut self, x: u64, out: &mut Out<'_, u64>) -> Result<Step, BoxError> {
    ///         if x > self.0 {
    ///             return Ok(Step::Done);
    ///         }
    ///         self.0 -= x;
    ///         out.push(x);
    ///         Ok(Step::Continue)
    ///     }
    ///     fn name(&self) -> &'static str { "budget" }
    /// }
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let (out, report) = Pipeline::from_iter(1..).via(Budget(10)).collect_with_report().await.unwrap();
    /// assert_eq!(out, vec![1, 2, 3, 4]);              // 5 would exceed it: the source stops
    /// assert!(report.is_balanced());
    /// # }
    /// ```
    fn via<Op>(self, op: Op) -> Pipeline<Op::Output>
    where
        Op: crate::Operator<Self::Item>,
    {
        crate::ops::operator::via(self.into_pipeline(), op)
    }

    /// Threads a state through the items (like `StreamExt::scan`): `f` gets the state and an
    /// item and returns the output, or `None` to end the stream, as in `StreamExt::scan`. The
    /// item that returned `None` and every later one are counted as dropped, and the sources
    /// feeding this stage stop (see [`via`](Flow::via)). To skip an item without ending,
    /// return `Some(None)` and follow with `.filter_map(|x| x)`.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let out = Pipeline::from_iter(1..=10u32)
    ///     .scan(0, |sum, x| { *sum += x; (*sum <= 10).then_some(*sum) })
    ///     .collect().await.unwrap();
    /// assert_eq!(out, vec![1, 3, 6, 10]);
    /// # }
    /// ```
    fn scan<S, U, F>(self, init: S, f: F) -> Pipeline<U>
    where
        S: Send + 'static,
        U: Send + 'static,
        F: FnMut(&mut S, Self::Item) -> Option<U> + Send + 'static,
    {
        self.via(crate::ops::scan::Scan::new(init, f))
    }

    /// Lets the first `n` items through, then stops pulling the sources that feed this stage
    /// (see [`via`](Flow::via)); the items already on their way are counted as dropped.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let out = Pipeline::from_iter(0..).take(3).collect().await.unwrap();   // endless source
    /// assert_eq!(out, vec![0, 1, 2]);
    /// # }
    /// ```
    fn take(self, n: u64) -> Pipeline<Self::Item> {
        self.via(crate::ops::take::Take { left: n })
    }

    /// Lets items through while `pred` accepts them; at the first it refuses, stops pulling
    /// the sources that feed this stage (see [`via`](Flow::via)). That item and the ones
    /// still on their way are counted as dropped.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let out = Pipeline::from_iter([1, 2, 7, 3]).take_while(|x| *x < 5).collect().await.unwrap();
    /// assert_eq!(out, vec![1, 2]);
    /// # }
    /// ```
    fn take_while<F>(self, pred: F) -> Pipeline<Self::Item>
    where
        F: FnMut(&Self::Item) -> bool + Send + 'static,
    {
        self.via(crate::ops::take::TakeWhile(pred))
    }

    /// An async stage named `name`: `f` is called for each item, with `workers(n)` calls in
    /// flight (default 1), in order unless `.unordered()`. A panic in `f` fails the item.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let out = Pipeline::from_iter(1..=3u32)
    ///     .map_async("fetch", |id| async move { format!("user-{id}") })
    ///     .workers(2)
    ///     .collect().await.unwrap();
    /// assert_eq!(out, vec!["user-1", "user-2", "user-3"]);
    /// # }
    /// ```
    fn map_async<U, F, Fut>(self, name: &str, f: F) -> AsyncStage<Self::Item, U, Infallible<F, Fut>>
    where
        U: Send + 'static,
        F: Fn(Self::Item) -> Fut + Send + 'static,
        Fut: Future<Output = U> + Send + 'static,
    {
        crate::ops::map_async::map_async(self.into_pipeline(), name, f)
    }

    /// A fallible async stage: an `Err` fails the item, which goes to the dead letters with
    /// the error, the stage's name and the attempt count.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let report = Pipeline::from_iter(["1", "two", "3"])
    ///     .try_map_async("parse", |s| async move { s.parse::<u32>() })
    ///     .run().await.unwrap();
    /// assert_eq!((report.delivered(), report.failures), (2, 1));
    /// # }
    /// ```
    fn try_map_async<U, E, F, Fut>(
        self,
        name: &str,
        f: F,
    ) -> AsyncStage<Self::Item, U, Fallible<F, Fut>>
    where
        U: Send + 'static,
        E: Into<BoxError> + 'static,
        F: Fn(Self::Item) -> Fut + Send + 'static,
        Fut: Future<Output = Result<U, E>> + Send + 'static,
    {
        crate::ops::map_async::try_map_async(self.into_pipeline(), name, f)
    }

    /// [`map_async`](Flow::map_async) with a shared state: `f` gets its own clone of
    /// `state` with each item, so the closure needs no `let api = api.clone()` before its
    /// `async move`. Give an `Arc` (or a handle that is cheap to clone, such as a connection
    /// pool or an HTTP client): every call then shares the one value behind it.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use std::sync::Arc;
    ///
    /// struct Api { prefix: String }
    /// impl Api {
    ///     async fn get_user(&self, id: u32) -> String { format!("{}{id}", self.prefix) }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let api = Arc::new(Api { prefix: "user-".into() });
    /// let out = Pipeline::from_iter(1..=3u32)
    ///     .map_async_with("fetch", api, |api, id| async move { api.get_user(id).await })
    ///     .workers(2)
    ///     .collect().await.unwrap();
    /// assert_eq!(out, vec!["user-1", "user-2", "user-3"]);
    /// # }
    /// ```
    fn map_async_with<U, S, F, Fut>(
        self,
        name: &str,
        state: S,
        f: F,
    ) -> AsyncStage<Self::Item, U, InfallibleWith<S, F, Fut>>
    where
        U: Send + 'static,
        S: Clone + Send + 'static,
        F: Fn(S, Self::Item) -> Fut + Send + 'static,
        Fut: Future<Output = U> + Send + 'static,
    {
        crate::ops::map_async::map_async_with(self.into_pipeline(), name, state, f)
    }

    /// [`try_map_async`](Flow::try_map_async) with a shared state, cloned for each call (see
    /// [`map_async_with`](Flow::map_async_with)).
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use std::collections::HashMap;
    /// use std::sync::Arc;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let users = Arc::new(HashMap::from([(1u32, "ann"), (2, "bob")]));
    /// let report = Pipeline::from_iter([1u32, 2, 3])
    ///     .try_map_async_with("lookup", users, |users, id| async move {
    ///         users.get(&id).copied().ok_or(format!("no user {id}"))
    ///     })
    ///     .run().await.unwrap();
    /// assert_eq!((report.delivered(), report.failures), (2, 1));
    /// # }
    /// ```
    fn try_map_async_with<U, E, S, F, Fut>(
        self,
        name: &str,
        state: S,
        f: F,
    ) -> AsyncStage<Self::Item, U, FallibleWith<S, F, Fut>>
    where
        U: Send + 'static,
        E: Into<BoxError> + 'static,
        S: Clone + Send + 'static,
        F: Fn(S, Self::Item) -> Fut + Send + 'static,
        Fut: Future<Output = Result<U, E>> + Send + 'static,
    {
        crate::ops::map_async::try_map_async_with(self.into_pipeline(), name, state, f)
    }

    /// A [`tower::Service`](tower_service::Service) as an async stage named `name`: each
    /// item is a request, each response an output, and an error fails the item with the
    /// service's own error ([`ItemError::User`](crate::ItemError::User), whose
    /// [`source`](std::error::Error::source) downcasts to it). Every option of an async stage
    /// applies ([`workers`](AsyncStage::workers), [`retry`](AsyncStage::retry),
    /// [`timeout`](AsyncStage::timeout), [`rate_limit`](AsyncStage::rate_limit), …), beside
    /// the service's own layers.
    ///
    /// The stage keeps one instance of the service (it need not be `Clone`): before each
    /// call it waits for `poll_ready` on that instance, then calls the same instance. While
    /// `poll_ready` is `Pending` no call starts (the calls in flight go on, and the stage
    /// pulls nothing more: back-pressure); the service's readiness (a concurrency limit, a
    /// `Buffer`) bounds the calls in flight as well as `workers`. The stage's `timeout`
    /// times the call, not the wait for readiness. Readiness is asked before the stage's
    /// gates, so a rate permit is taken only when the call can start.
    ///
    /// An error from `poll_ready` means the service can never take a call again: the
    /// stage makes no more calls, the sources stop, each item already pulled fails at this
    /// stage with that error (in the dead letters, like any failure), and the run ends with
    /// [`Error::Stage`](crate::Error::Stage) naming the stage and the error.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use std::task::{Context, Poll};
    ///
    /// // Usually a `tower::ServiceBuilder` stack or a client's service.
    /// struct Double;
    /// impl tower_service::Service<u32> for Double {
    ///     type Response = u32;
    ///     type Error = std::convert::Infallible;
    ///     type Future = std::future::Ready<Result<u32, Self::Error>>;
    ///     fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
    ///         Poll::Ready(Ok(()))
    ///     }
    ///     fn call(&mut self, x: u32) -> Self::Future {
    ///         std::future::ready(Ok(x * 2))
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let out = Pipeline::from_iter(1..=3u32)
    ///     .call_service("double", Double)
    ///     .workers(4)
    ///     .collect().await.unwrap();
    /// assert_eq!(out, vec![2, 4, 6]);
    /// # }
    /// ```
    #[cfg(feature = "tower")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
    fn call_service<Svc>(
        self,
        name: &str,
        service: Svc,
    ) -> AsyncStage<Self::Item, Svc::Response, crate::ServiceCall<Svc>>
    where
        Svc: tower_service::Service<Self::Item> + Send + 'static,
        Svc::Response: Send + 'static,
        Svc::Error: Into<BoxError> + 'static,
        Svc::Future: Send + 'static,
    {
        crate::ops::map_async::call_service(self.into_pipeline(), name, service)
    }

    /// An explicit async boundary: the stages before it run on their own task and may work
    /// up to about `capacity` items ahead (rounded up to whole chunks of 512).
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let out = Pipeline::from_iter(0..3).map(|x| x * 2).buffer(1024).map(|x| x + 1).collect().await.unwrap();
    /// assert_eq!(out, vec![1, 3, 5]);
    /// # }
    /// ```
    fn buffer(self, capacity: usize) -> Pipeline<Self::Item> {
        crate::ops::buffer::buffer(self.into_pipeline(), capacity)
    }

    /// Runs the pipeline to the end, dropping what comes out; await it for the report. The
    /// returned [`Run`] takes the run's options (`deadline`, `error_policy`, `dead_letter`)
    /// and can be [`spawn`](Run::spawn)ed instead.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let report = Pipeline::from_iter(0..10).run().await.unwrap();
    /// assert_eq!(report.delivered(), 10);
    /// # }
    /// ```
    fn run(self) -> Run<Self::Item, sink::Discard, Report> {
        Run::new(
            self.into_pipeline().into_plan(),
            sink::Discard,
            "sink",
            |report, ()| report,
        )
    }

    /// Runs the pipeline, calling `f` for each item that comes out (one at a time, in
    /// order); await it for the report. A panic in `f` fails that item.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let report = Pipeline::from_iter(0..3)
    ///     .for_each(|x| async move { println!("{x}") })
    ///     .await.unwrap();
    /// assert_eq!(report.delivered(), 3);
    /// # }
    /// ```
    fn for_each<F, Fut>(self, f: F) -> Run<Self::Item, sink::ForEach<F>, Report>
    where
        F: FnMut(Self::Item) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Run::new(
            self.into_pipeline().into_plan(),
            sink::ForEach(f),
            "for_each",
            |report, ()| report,
        )
    }

    /// Runs the pipeline and collects what comes out.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// assert_eq!(Pipeline::from_iter(0..3).collect().await.unwrap(), vec![0, 1, 2]);
    /// # }
    /// ```
    fn collect(self) -> Run<Self::Item, sink::Collect<Self::Item>, Vec<Self::Item>> {
        Run::new(
            self.into_pipeline().into_plan(),
            sink::Collect(Vec::new()),
            "collect",
            |_, v| v,
        )
    }

    /// Like [`collect`](Flow::collect), with the report.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let (out, report) = Pipeline::from_iter(0..3).collect_with_report().await.unwrap();
    /// assert_eq!((out.len() as u64), report.delivered());
    /// # }
    /// ```
    #[allow(clippy::type_complexity)]
    fn collect_with_report(
        self,
    ) -> Run<Self::Item, sink::Collect<Self::Item>, (Vec<Self::Item>, Report)> {
        Run::new(
            self.into_pipeline().into_plan(),
            sink::Collect(Vec::new()),
            "collect",
            |r, v| (v, r),
        )
    }

    /// Runs the pipeline into a sink written outside this crate (a [`BatchSink`](crate::BatchSink):
    /// a batched database writer, a queue producer). Await it for the sink's output and the
    /// report; the returned [`Run`] takes the run's options and, for a sink whose output is
    /// `()`, can be [`spawn`](Run::spawn)ed. A batch the sink fails (an `Err` or a panic)
    /// fails each of its items into the dead letters under the sink's name.
    ///
    /// ```
    /// use flowline::prelude::*;
    ///
    /// struct Sum(u64);
    ///
    /// impl BatchSink<u64> for Sum {
    ///     type Output = u64;
    ///     async fn write(&mut self, batch: Vec<u64>) -> Result<(), BoxError> {
    ///         self.0 += batch.iter().sum::<u64>();
    ///         Ok(())
    ///     }
    ///     fn finish(self) -> u64 { self.0 }
    /// }
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let (sum, report) = Pipeline::from_iter(1..=10u64).into_sink(Sum(0)).await.unwrap();
    /// assert_eq!((sum, report.delivered()), (55, 10));
    /// # }
    /// ```
    fn into_sink<S>(
        self,
        sink: S,
    ) -> Run<Self::Item, crate::runtime::batch_sink::IntoSink<S>, (S::Output, Report)>
    where
        S: crate::BatchSink<Self::Item>,
    {
        crate::runtime::batch_sink::into_sink(self.into_pipeline().into_plan(), sink)
    }

    /// Starts the run and returns a stream of what comes out. Dropping the stream cancels
    /// the run; [`ItemStream::finish`] returns the report. With run options:
    /// `.run().deadline(..).into_stream()`.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use futures_util::StreamExt;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let mut s = Pipeline::from_iter(0..3).map(|x| x * 2).into_stream();
    /// let mut got = vec![];
    /// while let Some(x) = s.next().await { got.push(x); }
    /// assert_eq!(got, vec![0, 2, 4]);
    /// assert_eq!(s.finish().await.unwrap().delivered(), 3);
    /// # }
    /// ```
    fn into_stream(self) -> ItemStream<Self::Item> {
        self.run().into_stream()
    }

    /// Starts the run in the background and returns its [`Handle`]: cancel, stop, pause,
    /// step, live counters, and `join` for the report. Must be called inside a tokio runtime.
    /// With run options: `.run().deadline(..).spawn()`.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let handle = Pipeline::from_iter(0..100).spawn();
    /// let report = handle.join().await.unwrap();
    /// assert_eq!(report.delivered(), 100);
    /// # }
    /// ```
    fn spawn(self) -> Handle {
        self.run().spawn()
    }

    /// Shows live progress: per-stage counts, rate, and ETA when the total is known (from an
    /// exact-size iterator, or [`ProgressOptions::total`](crate::ProgressOptions::total)).
    /// A bar on a terminal (feature `progress`), else a plain line on stderr every second.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let report = Pipeline::from_iter(0..1000).map(|x| x + 1).progress().run().await.unwrap();
    /// assert_eq!(report.delivered(), 1000);
    /// # }
    /// ```
    fn progress(self) -> Pipeline<Self::Item> {
        self.into_pipeline().observed(|plan| {
            crate::observe::progress::progress(crate::ProgressOptions::new(), plan.total)
        })
    }

    /// [`progress`](Flow::progress) with options: interval, total, plain lines, writer.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use flowline::ProgressOptions;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let opts = ProgressOptions::new().to_writer(std::io::sink());
    /// let report = Pipeline::from_iter(0..10).progress_with(opts).run().await.unwrap();
    /// assert_eq!(report.delivered(), 10);
    /// # }
    /// ```
    fn progress_with(self, options: crate::ProgressOptions) -> Pipeline<Self::Item> {
        self.into_pipeline()
            .observed(|plan| crate::observe::progress::progress(options, plan.total))
    }

    /// Calls `f` with a snapshot of every stage's counters every `every`, whether items flow
    /// or not (paused, waiting on the source): the pipeline's sign of life.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let report = Pipeline::from_iter(0..5u32)
    ///     .map_async("slow", |x| async move { tokio::time::sleep(Duration::from_secs(1)).await; x })
    ///     .heartbeat(Duration::from_secs(2), |snap| println!("alive: {} delivered", snap.delivered()))
    ///     .run().await.unwrap();
    /// assert_eq!(report.delivered(), 5);
    /// # }
    /// ```
    fn heartbeat<F>(self, every: Duration, f: F) -> Pipeline<Self::Item>
    where
        F: FnMut(&Report) + Send + 'static,
    {
        self.into_pipeline()
            .observed(|_| crate::observe::heartbeat::heartbeat(every, f))
    }

    /// A stall watchdog: if no item completes anywhere for `after` (while not paused), or a
    /// stage holds items for `after` without completing any, `action` runs (log, callback,
    /// or cancel the run). Must be at least 4 ms.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use flowline::StallAction;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let report = Pipeline::from_iter(0..10)
    ///     .stall_after(Duration::from_secs(30), StallAction::Log)
    ///     .run().await.unwrap();
    /// assert_eq!(report.delivered(), 10);
    /// # }
    /// ```
    fn stall_after(self, after: Duration, action: crate::StallAction) -> Pipeline<Self::Item> {
        self.into_pipeline()
            .observed(|_| crate::observe::stall::stall_after(after, action))
    }

    // ---- Batching, deduplication, debounce, idempotency, dataloader and gather ----

    /// Groups items into `Vec`s of up to `size`: a batch is emitted when full, or `max_wait`
    /// (tokio's clock) after its first item, whichever comes first. Never emits an empty
    /// batch; flushes what it holds when the input ends or the run stops gracefully. It runs
    /// in the task that pulls it (no extra hop); `.buffer(n)` before it lets the stages in
    /// front work ahead. `size` and `max_wait` must be more than zero.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let out = Pipeline::from_iter(0..5).batch(2, Duration::from_millis(200)).collect().await.unwrap();
    /// assert_eq!(out, vec![vec![0, 1], vec![2, 3], vec![4]]);
    /// # }
    /// ```
    fn batch(self, size: usize, max_wait: Duration) -> Pipeline<Vec<Self::Item>> {
        crate::ops::batch::batch(self.into_pipeline(), size, max_wait)
    }

    /// Flattens batches back into items.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let out = Pipeline::from_iter([vec![1, 2], vec![], vec![3]]).unbatch().collect().await.unwrap();
    /// assert_eq!(out, vec![1, 2, 3]);
    /// # }
    /// ```
    fn unbatch<U>(self) -> Pipeline<U>
    where
        U: Send + 'static,
        Self: Flow<Item = Vec<U>>,
    {
        crate::ops::unbatch::unbatch(self.into_pipeline())
    }

    /// Like [`batch`](Flow::batch), with each key at most once per batch: a later item with
    /// a key already in the open batch is dropped (and counted). For batched lookups by id.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let out = Pipeline::from_iter([7, 7, 8, 7, 9])
    ///     .batch_dedup_by(10, Duration::from_millis(50), |id| *id)
    ///     .collect().await.unwrap();
    /// assert_eq!(out, vec![vec![7, 8, 9]]);
    /// # }
    /// ```
    fn batch_dedup_by<K, F>(
        self,
        size: usize,
        max_wait: Duration,
        key: F,
    ) -> Pipeline<Vec<Self::Item>>
    where
        K: std::hash::Hash + Eq + Send + 'static,
        F: FnMut(&Self::Item) -> K + Send + 'static,
    {
        crate::ops::batch_dedup::batch_dedup_by(self.into_pipeline(), size, max_wait, key)
    }

    /// Drops an item whose key already passed within `window` ([`Window::ttl`] or
    /// [`Window::last`]); memory is bounded. Dropped duplicates are counted; add
    /// [`on_duplicate`](crate::Dedup::on_duplicate) to see them and
    /// [`exempt`](crate::Dedup::exempt) to let some items pass unchecked.
    ///
    /// [`Window::ttl`]: crate::Window::ttl
    /// [`Window::last`]: crate::Window::last
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let out = Pipeline::from_iter([1, 2, 1, 3, 2])
    ///     .dedup_by(|x| *x, Window::ttl(Duration::from_secs(60)))
    ///     .collect().await.unwrap();
    /// assert_eq!(out, vec![1, 2, 3]);
    /// # }
    /// ```
    fn dedup_by<K, F>(self, key: F, window: crate::Window) -> crate::Dedup<Self::Item, K, F>
    where
        K: std::hash::Hash + Eq + Clone + Send + 'static,
        F: FnMut(&Self::Item) -> K + Send + 'static,
    {
        crate::ops::dedup::dedup_by(self.into_pipeline(), key, window)
    }

    /// Emits the latest item once `period` has passed without a newer one (add
    /// [`max_wait`](crate::Debounce::max_wait) so a never-quiet input still emits). Replaced
    /// items are counted as dropped.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let out = Pipeline::from_iter([1, 2, 3]).debounce(Duration::from_millis(100)).collect().await.unwrap();
    /// assert_eq!(out, vec![3]);
    /// # }
    /// ```
    #[allow(clippy::type_complexity)]
    fn debounce(self, period: Duration) -> crate::Debounce<Self::Item, (), fn(&Self::Item)> {
        fn unit<T>(_: &T) {}
        crate::ops::debounce::debounce_by(
            self.into_pipeline(),
            "debounce",
            unit::<Self::Item>,
            period,
        )
    }

    /// Like [`debounce`](Flow::debounce), per key: the latest item of each key.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let out = Pipeline::from_iter([("a", 1), ("b", 1), ("a", 2)])
    ///     .debounce_by(|(k, _)| *k, Duration::from_millis(100))
    ///     .collect().await.unwrap();
    /// assert_eq!(out, vec![("b", 1), ("a", 2)]);
    /// # }
    /// ```
    fn debounce_by<K, F>(self, key: F, period: Duration) -> crate::Debounce<Self::Item, K, F>
    where
        K: std::hash::Hash + Eq + Clone + Send + 'static,
        F: FnMut(&Self::Item) -> K + Send + 'static,
    {
        crate::ops::debounce::debounce_by(self.into_pipeline(), "debounce", key, period)
    }

    /// Skips an item whose key is already done in `store` — in this run or an earlier one —
    /// and counts it as dropped. The key is reserved when the item enters and committed only
    /// when the item has finished the pipeline successfully; a failed item's key is released
    /// and retried next run. See [`Store`](crate::Store).
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use flowline::MemoryStore;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let store = MemoryStore::new();
    /// Pipeline::from_iter([1, 2]).idempotent(store.clone(), |x| *x).run().await.unwrap();
    /// let again = Pipeline::from_iter([1, 2, 3]).idempotent(store, |x| *x).collect().await.unwrap();
    /// assert_eq!(again, vec![3]);
    /// # }
    /// ```
    fn idempotent<S, K, F>(self, store: S, key: F) -> crate::Idempotent<Self::Item, S, F>
    where
        S: crate::Store,
        K: std::fmt::Display + 'static,
        F: FnMut(&Self::Item) -> K + Send + 'static,
    {
        crate::ops::idempotent::idempotent(self.into_pipeline(), store, key)
    }

    /// Paces the *items* passing this point to at most `rate`: delayed, never dropped (see
    /// [`Rate`](crate::Rate); clones share one budget). To limit how often an async stage
    /// *starts calls* ("at most n requests per second"), use [`AsyncStage::rate_limit`] right
    /// under the stage instead: it limits the calls themselves, retries included.
    ///
    /// An item counts against the rate until the pace is pulled again, after the operators
    /// fused behind it (`map`, `filter`, `inspect`, ...) have handled it: a timestamp taken
    /// there never shows more than the rate in any window of one period, however late the
    /// thread ran.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let t = tokio::time::Instant::now();
    /// let out = Pipeline::from_iter(0..3).pace(Rate::per_second(2)).collect().await.unwrap();
    /// assert_eq!((out.len(), t.elapsed()), (3, Duration::from_secs(1)));
    /// # }
    /// ```
    #[doc(alias = "rate_limit")]
    fn pace(self, rate: crate::Rate) -> Pipeline<Self::Item> {
        crate::ops::pace::pace(self.into_pipeline(), rate)
    }

    /// At most one item per `interval`; the others are dropped and counted as `dropped`
    /// (lossy by design — for updates where only the latest matters; use
    /// [`pace`](Flow::pace) to delay instead). [`Throttle::Leading`](crate::Throttle::Leading)
    /// passes the first item of an interval, [`Throttle::Trailing`](crate::Throttle::Trailing)
    /// the latest one when the interval ends.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let (out, report) = Pipeline::from_iter(0..100)
    ///     .throttle(Duration::from_secs(1), Throttle::Leading)
    ///     .collect_with_report().await.unwrap();
    /// assert_eq!(out, vec![0]);                       // all arrived at once
    /// assert_eq!(report.stage("throttle").unwrap().dropped, 99);
    /// # }
    /// ```
    fn throttle(self, interval: Duration, mode: crate::Throttle) -> Pipeline<Self::Item> {
        crate::ops::throttle::throttle(self.into_pipeline(), interval, mode)
    }

    /// Windowed aggregation: groups the items into windows of `kind` ([`Tumbling`],
    /// [`Sliding`], [`Session`] or [`Count`](crate::Count)), per key or global, on processing
    /// or event time, and emits one [`Windowed`](crate::Windowed) per window when it closes. The
    /// returned [`Windows`](crate::Windows) takes the options (key, event time, lateness, idle
    /// advance, bound on open windows) and ends with an aggregation (`count`, `reduce`,
    /// `fold`, `collect_items`, `aggregate`). Late items are counted and go to the dead
    /// letters or a side output, never dropped silently; open windows are emitted when the
    /// input ends.
    ///
    /// [`Tumbling`]: crate::Tumbling
    /// [`Sliding`]: crate::Sliding
    /// [`Session`]: crate::Session
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use flowline::Tumbling;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let events = [("ann", 1u64), ("bob", 2), ("ann", 4), ("ann", 12)];   // (account, second)
    /// let out = Pipeline::from_iter(events)
    ///     .window(Tumbling::every(Duration::from_secs(10)))
    ///         .key_by(|(account, _)| *account)
    ///         .event_time(|(_, s)| Duration::from_secs(*s))
    ///     .count()
    ///     .collect().await.unwrap();
    /// let got: Vec<(&str, u64, u64)> = out.iter().map(|w| (w.key, w.start.as_secs(), w.value)).collect();
    /// assert_eq!(got, vec![("ann", 0, 2), ("bob", 0, 1), ("ann", 10, 1)]);
    /// # }
    /// ```
    #[allow(clippy::type_complexity)]
    fn window<W: crate::WindowKind>(
        self,
        kind: W,
    ) -> crate::Windows<Self::Item, (), fn(&Self::Item), crate::ProcessingTime> {
        crate::ops::window::window(self.into_pipeline(), kind)
    }

    // ---- Topology: branch, branch on result, partition by key, broadcast, merge, zip, several sinks in one run ----

    /// Splits the pipeline in two: the items `predicate` accepts, and the others (a router
    /// stage named `name`). Each item goes to exactly one branch, in order; each branch goes
    /// on with its own stages and must end in a sink of the same run (a [`Graph`](crate::Graph)):
    /// a branch left without one fails the run with [`Error::Config`](crate::Error::Config). A full branch
    /// back-pressures the router, and so the source.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let (small, large) = Pipeline::from_iter(1..=6u32).branch("size", |x| *x <= 3);
    /// let (smalls, larges) = (Collected::new(), Collected::new());
    /// Graph::new()
    ///     .collect(small, &smalls)
    ///     .collect(large.map(|x| x * 10), &larges)
    ///     .run().await.unwrap();
    /// assert_eq!((smalls.take(), larges.take()), (vec![1, 2, 3], vec![40, 50, 60]));
    /// # }
    /// ```
    fn branch<F>(self, name: &str, predicate: F) -> (Pipeline<Self::Item>, Pipeline<Self::Item>)
    where
        F: FnMut(&Self::Item) -> bool + Send + 'static,
    {
        crate::topology::branch::branch(self.into_pipeline(), name, predicate)
    }

    /// Splits a pipeline of `Result`s into an `Ok` pipeline and an `Err` pipeline (router
    /// stage `branch_result`), so that errors can go through their own stages (a retry, a
    /// dead-letter sink) while the successes go on. Both must end in a sink of the same
    /// [`Graph`](crate::Graph).
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let (ok, err) = Pipeline::from_iter(["1", "x", "3"])
    ///     .map(|s| s.parse::<u32>().map_err(|_| s))
    ///     .branch_result();
    /// let (oks, errs) = (Collected::new(), Collected::new());
    /// Graph::new().collect(ok, &oks).collect(err, &errs).run().await.unwrap();
    /// assert_eq!((oks.take(), errs.take()), (vec![1, 3], vec!["x"]));
    /// # }
    /// ```
    fn branch_result<A, E>(self) -> (Pipeline<A>, Pipeline<E>)
    where
        Self: Flow<Item = Result<A, E>>,
        A: Send + 'static,
        E: Send + 'static,
    {
        crate::topology::branch::branch_result(self.into_pipeline())
    }

    /// Splits the pipeline into `n` (router stage `route`): `pick` returns each item's branch
    /// index. An index `>= n` (or a panic in `pick`) fails that item. With `n == 0` the one
    /// pipeline returned fails with [`Error::Config`](crate::Error::Config) when run.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let [low, mid, high]: [_; 3] = Pipeline::from_iter(0..9u32)
    ///     .route(3, |x| (*x / 3) as usize)
    ///     .try_into()
    ///     .unwrap();
    /// let (lows, mids) = (Collected::new(), Collected::new());
    /// Graph::new().collect(low, &lows).collect(mid, &mids).discard(high).run().await.unwrap();
    /// assert_eq!((lows.take(), mids.take()), (vec![0, 1, 2], vec![3, 4, 5]));
    /// # }
    /// ```
    fn route<F>(self, n: usize, pick: F) -> Vec<Pipeline<Self::Item>>
    where
        F: FnMut(&Self::Item) -> usize + Send + 'static,
    {
        crate::topology::route::route(self.into_pipeline(), n, pick)
    }

    /// Per-key order with parallelism across keys: items go to `lanes` lanes by the hash of
    /// `key(item)` (stage `partition`), so the items of one key are always in the same lane,
    /// in order; `per_lane` builds the stages of each lane (called once per lane; each lane's
    /// stages run on their own tasks), and the lanes are merged back (stage `merge`). Like
    /// Akka's `mapAsyncPartitioned` or Kafka's partitions. `lanes` must be at least 1.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let events = (0..100u32).map(|i| (i % 5, i));        // (account, sequence)
    /// let out = Pipeline::from_iter(events)
    ///     .partition(4, |(account, _)| *account, |lane| {
    ///         lane.map_async("apply", |e| async move { e })  // one at a time per lane
    ///     })
    ///     .collect()
    ///     .await
    ///     .unwrap();
    /// let account_2: Vec<u32> = out.iter().filter(|e| e.0 == 2).map(|e| e.1).collect();
    /// assert!(account_2.windows(2).all(|w| w[0] < w[1]));    // in order per key
    /// assert_eq!(out.len(), 100);
    /// # }
    /// ```
    fn partition<K, KF, L, F>(self, lanes: usize, key: KF, per_lane: F) -> Pipeline<L::Item>
    where
        K: std::hash::Hash,
        KF: FnMut(&Self::Item) -> K + Send + 'static,
        L: Flow,
        F: FnMut(Pipeline<Self::Item>) -> L,
    {
        crate::topology::partition::partition(self.into_pipeline(), lanes, key, per_lane)
    }

    /// `n` pipelines that each receive every item (router stage `broadcast`, `n - 1` clones
    /// per item). The slowest branch back-pressures the source: the router waits for it, so
    /// nothing is lost and memory stays bounded. To let the other branches run ahead of a
    /// slow one, give the slow one a [`buffer`](Flow::buffer). With `n == 0` the one pipeline
    /// returned fails with [`Error::Config`](crate::Error::Config) when run.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let outs = [Collected::new(), Collected::new()];
    /// let graph = Pipeline::from_iter(0..3u32)
    ///     .broadcast(2)
    ///     .into_iter()
    ///     .zip(&outs)
    ///     .fold(Graph::new(), |g, (branch, out)| g.collect(branch.buffer(1_000), out));
    /// let report = graph.run().await.unwrap();
    /// assert_eq!(outs[1].take(), vec![0, 1, 2]);
    /// assert_eq!(report.delivered(), 6);
    /// # }
    /// ```
    fn broadcast(self, n: usize) -> Vec<Pipeline<Self::Item>>
    where
        Self::Item: Clone,
    {
        crate::topology::broadcast::broadcast(self.into_pipeline(), n)
    }

    /// Merges this pipeline with `other` (see [`Pipeline::merge`]): fair, order kept within
    /// each input.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let (ok, err) = Pipeline::from_iter([Ok(1u32), Err(2u32), Ok(3)]).branch_result();
    /// let mut all = ok.merge_with(err.map(|e| e * 100)).collect().await.unwrap();
    /// all.sort();
    /// assert_eq!(all, vec![1, 3, 200]);
    /// # }
    /// ```
    fn merge_with<P: Flow<Item = Self::Item>>(self, other: P) -> Pipeline<Self::Item> {
        crate::topology::merge::merge(vec![self.into_pipeline(), other.into_pipeline()])
    }

    /// Pairs this pipeline's items with `other`'s, in order (stage `zip`). Ends when either
    /// ends; what the longer one had already produced is counted as dropped at the zip.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let out = Pipeline::from_iter(["a", "b", "c"])
    ///     .zip(Pipeline::from_iter(1..=2u32))
    ///     .collect().await.unwrap();
    /// assert_eq!(out, vec![("a", 1), ("b", 2)]);
    /// # }
    /// ```
    fn zip<P: Flow>(self, other: P) -> Pipeline<(Self::Item, P::Item)> {
        crate::topology::zip::zip(self.into_pipeline(), other.into_pipeline())
    }
}

impl<P: IntoPipeline> Flow for P {}
