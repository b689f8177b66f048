//! [`AsyncStage`]: an async stage being configured, and how it is built into a driver task.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use crate::Pipeline;
use crate::error::Error;
use crate::failure::{FailedInput, ItemError};
use crate::policy::Policy;
use crate::policy::hedge::Hedge;
use crate::policy::retry::Retry;
use crate::runtime::hop::{HOP_CHUNKS, hop};

use super::call::StageFn;
use super::driver::drive;
use super::key_by;
use super::keyed::KeyFn;
use super::routed::{Failed, Route, Routed, route};

#[derive(Debug, Clone)]
pub(super) struct Options {
    pub(super) workers: usize,
    pub(super) ordered: bool,
    pub(super) timeout: Option<Duration>,
    /// Admission policies, in the order they were given: the order a call passes them.
    pub(super) policies: Vec<Arc<dyn Policy>>,
    pub(super) retry: Option<Retry>,
    /// Ordered stages: the most items started and not yet emitted (`None`: the default).
    pub(super) window: Option<usize>,
    /// A `tracing` span per call (`trace_calls`).
    pub(super) trace_calls: bool,
    /// Which errors of the stage's calls mean its server is down (`transient_if`).
    pub(super) transient: Option<TransientIf>,
    /// A second call for an item whose call is slow (`hedge`).
    pub(super) hedge: Option<Hedge>,
    /// `key_by`: calls in flight per key, and items waiting behind a busy key.
    pub(super) per_key: Option<usize>,
    pub(super) max_waiting: Option<usize>,
}

impl Default for Options {
    /// A new stage's: one worker, ordered, no policy.
    fn default() -> Self {
        Options {
            workers: 1,
            ordered: true,
            timeout: None,
            policies: Vec::new(),
            retry: None,
            window: None,
            trace_calls: false,
            transient: None,
            hedge: None,
            per_key: None,
            max_waiting: None,
        }
    }
}

/// The predicate of [`AsyncStage::transient_if`].
#[derive(Clone)]
pub(super) struct TransientIf(pub(super) Arc<dyn Fn(&ItemError) -> bool + Send + Sync>);

impl fmt::Debug for TransientIf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TransientIf(..)")
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
///
/// ## The order of the flow-control options
///
/// [`rate_limit`](AsyncStage::rate_limit), [`inflight`](AsyncStage::inflight),
/// [`limit`](AsyncStage::limit), [`circuit_breaker`](AsyncStage::circuit_breaker) and
/// [`adaptive`](AsyncStage::adaptive)
/// are gates a call passes before it starts, **in the order they were given**. A call waits
/// at the first gate that is closed, holding what the gates before it granted; when a gate
/// refuses (a fail-fast open breaker), what the gates before it granted is spent: a rate
/// permit stays used, a shared in-flight slot or a breaker probe goes back. Giving an option
/// twice adds a second gate (e.g. a per-stage rate and one shared by every stage).
///
/// So put a breaker first to fail items fast without spending rate permits on them, and a
/// rate first to pace even the refusals:
///
/// ```
/// use flowline::prelude::*;
/// use std::time::Duration;
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let down = |_: u32| async { Err::<u32, _>("503") };
/// let breaker = || Breaker::consecutive_failures(1).on_open(OnOpen::FailFast);
///
/// let t = tokio::time::Instant::now();
/// Pipeline::from_iter(0..5u32)
///     .try_map_async("api", down)
///     .circuit_breaker(breaker())          // refused items never reach the rate
///     .rate_limit(Rate::per_second(10))
///     .run().await.unwrap();
/// assert_eq!(t.elapsed(), Duration::ZERO);
///
/// let t = tokio::time::Instant::now();
/// Pipeline::from_iter(0..5u32)
///     .try_map_async("api", down)
///     .rate_limit(Rate::per_second(10))    // every item takes a permit, refused or not
///     .circuit_breaker(breaker())
///     .run().await.unwrap();
/// assert_eq!(t.elapsed(), Duration::from_millis(400));
/// # }
/// ```
#[must_use = "a stage does nothing until the pipeline it ends is run"]
pub struct AsyncStage<T, U, S> {
    pub(super) upstream: Pipeline<T>,
    pub(super) name: String,
    pub(super) call: S,
    pub(super) options: Options,
    pub(super) keep: Option<fn(&T) -> FailedInput>,
    /// Set by `retry` (which needs `T: Clone`): a copy of the input for the next attempt.
    pub(super) copy: Option<fn(&T) -> T>,
    /// Set by `results`: makes a failed item's output.
    pub(super) route: Option<Route<T, U>>,
    /// Set by `key_by`: makes the stage's key map.
    pub(super) key: Option<KeyFn<T>>,
    /// Set by `done_if`: which outputs end here, as done.
    pub(super) ends: Option<fn(&U) -> bool>,
    pub(super) _out: PhantomData<fn() -> U>,
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
            options: Options::default(),
            keep: None,
            copy: None,
            route: None,
            key: None,
            ends: None,
            _out: PhantomData,
        }
    }

    /// Emits each item's outcome instead of sending failures to the dead letters: `Ok`
    /// with the output, or `Err` with a [`Failed`] — the input, the error, the stage and
    /// the attempts — once the item has no attempt left (after [`retry`](AsyncStage::retry)
    /// and a pausing breaker have had their turn). A failed item is then an item of the
    /// pipeline like any other, counted once, as emitted; a branch handles it (the pipe
    /// language's `branch | error:retry success:print`). Needs `T: Clone`: each call gets a copy of
    /// the input, so that a failure can carry it.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let (ok, failed) = Pipeline::from_iter(["1", "x", "3"])
    ///     .try_map_async("parse", |s| async move { s.parse::<u32>() })
    ///     .results()
    ///     .branch_result();
    /// let (oks, errs) = (Collected::new(), Collected::new());
    /// let report = Graph::new()
    ///     .collect(ok, &oks)
    ///     .collect(failed.map(|f| format!("{}: {}", f.input, f.error)), &errs)
    ///     .run().await.unwrap();
    /// assert_eq!(oks.take(), vec![1, 3]);
    /// assert_eq!(errs.take(), vec!["x: invalid digit found in string".to_string()]);
    /// assert_eq!((report.delivered(), report.failures), (3, 0));
    /// # }
    /// ```
    pub fn results(self) -> AsyncStage<T, Result<U, Failed<T>>, Routed<S, U>>
    where
        T: Clone,
    {
        AsyncStage {
            upstream: self.upstream,
            name: self.name,
            call: Routed::new(self.call),
            options: self.options,
            keep: self.keep,
            copy: Some(T::clone),
            route: Some(route::<T, U>),
            key: self.key,
            // Given for the outputs before `results`; a routed stage's are `Result`s.
            ends: None,
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

    /// An ordered stage's reorder window: at most `n` items started and not yet emitted
    /// (default: the larger of 4 × the limit on calls in flight and 512, plus
    /// [`max_waiting`](AsyncStage::max_waiting) with `key_by`: the items waiting behind busy
    /// keys are in the window too). A finished item
    /// waits in the window until every item before it is out, so one slow call, a timeout or
    /// an item in retry backoff holds back only what fits in the window: the other workers
    /// keep starting items until it is full. The cost is memory: up to `n` finished outputs
    /// (`U`) held at once. A window smaller than `workers` also bounds the calls in flight.
    /// Must be at least 1; only for ordered stages.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let t = tokio::time::Instant::now();
    /// let out = Pipeline::from_iter(0..100u64)
    ///     .map_async("io", |x| async move {
    ///         let ms = if x == 0 { 1000 } else { 10 };     // the first call is slow
    ///         tokio::time::sleep(Duration::from_millis(ms)).await;
    ///         x
    ///     })
    ///     .workers(4)
    ///     .ordered_window(1000)
    ///     .collect().await.unwrap();
    /// assert_eq!(out, (0..100).collect::<Vec<_>>());       // in order
    /// assert_eq!(t.elapsed(), Duration::from_millis(1000)); // the rest ran meanwhile
    /// # }
    /// ```
    pub fn ordered_window(mut self, n: usize) -> Self {
        self.options.window = Some(n);
        self
    }

    /// Fail a call that takes longer than `limit` with
    /// [`ItemError::Timeout`](crate::ItemError::Timeout). Must be more than zero.
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

    /// Makes a `tracing` span for each call (each attempt of an item): `call`, with the
    /// item's place in input order (`seq`), the `attempt` (1 for the first), and the
    /// `outcome` once it ended (`ok`, `error`, `timeout`, `panic`), a child of the stage's
    /// span; the call's future runs in it, so the spans and events of the code it calls nest
    /// under it. Off by default: a span per item costs the subscriber's time per item.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let out = Pipeline::from_iter(0..3u32)
    ///     .map_async("fetch", |id| async move {
    ///         tracing::debug!(id, "fetching");    // inside `run:stage:call`
    ///         id
    ///     })
    ///     .trace_calls()
    ///     .collect().await.unwrap();
    /// assert_eq!(out, vec![0, 1, 2]);
    /// # }
    /// ```
    pub fn trace_calls(mut self) -> Self {
        self.options.trace_calls = true;
        self
    }

    /// Ends here, as done, each output for which `done` is true: it is not sent on, and it
    /// counts as dropped by design (like an item a `filter` drops). Its completion ticket
    /// finishes the moment its call ends, before the stage's next call starts: an
    /// [`idempotent`](crate::Flow::idempotent) key is committed and a cursor's checkpoint
    /// may pass it with no wait for the stages after. For a stage that delivers its own
    /// results (writes them itself) and so is the item's end. Given after
    /// [`results`](AsyncStage::results), whose outputs it sees.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// // The call writes its result itself; an empty result goes on to be looked at.
    /// let (out, report) = Pipeline::from_iter(["a", "", "b"])
    ///     .map_async("write", |s| async move { (s, !s.is_empty()) })
    ///     .done_if(|(_, written)| *written)
    ///     .collect_with_report()
    ///     .await
    ///     .unwrap();
    /// assert_eq!(out, vec![("", false)]);
    /// let s = report.stage("write").unwrap();
    /// assert_eq!((s.passed, s.dropped), (1, 2));
    /// # }
    /// ```
    pub fn done_if(mut self, done: fn(&U) -> bool) -> Self {
        self.ends = Some(done);
        self
    }

    /// Keep each item's input so that a failure carries it to the dead letters (its `Debug`
    /// text, and the value for [`FailedInput::downcast_ref`]). Costs one `clone` per item.
    /// To run the failures again from a dead-letter file, keep it as JSON instead
    /// ([`keep_input_json`](AsyncStage::keep_input_json)).
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

    /// Keep each item's input as JSON so that a failure carries it to the dead letters in a
    /// form that can be run again: a [`DeadLetter::jsonl`](crate::DeadLetter::jsonl) file
    /// holds the item itself, and [`Pipeline::from_dead_letters`] reads the file back into a
    /// pipeline. Use it for items that are `Serialize` (`keep_input` keeps their `Debug` text,
    /// for a person to read). Costs one `clone` per item; the JSON is written only for the
    /// items that fail.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let report = Pipeline::from_iter([1u32, 2])
    ///     .try_map_async("check", |x| async move { if x == 2 { Err("no") } else { Ok(x) } })
    ///     .keep_input_json()
    ///     .run().await.unwrap();
    /// assert_eq!(report.failure_sample[0].input.as_ref().unwrap().debug(), "2");
    /// # }
    /// ```
    #[cfg(feature = "jsonl")]
    #[cfg_attr(docsrs, doc(cfg(feature = "jsonl")))]
    pub fn keep_input_json(mut self) -> Self
    where
        T: Clone + serde_core::Serialize + Sync,
    {
        self.keep = Some(|t: &T| FailedInput::json(t.clone()));
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
            route,
            key,
            ends,
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
        match options.window {
            Some(0) => upstream.settings.errors.push(Error::config(
                &name,
                "ordered_window",
                0usize,
                "must be at least 1",
            )),
            Some(n) if !options.ordered => upstream.settings.errors.push(Error::config(
                &name,
                "ordered_window",
                n,
                "applies to ordered stages only (this one is unordered)",
            )),
            _ => {}
        }
        if options.timeout == Some(Duration::ZERO) {
            upstream.settings.errors.push(Error::config(
                &name,
                "timeout",
                Duration::ZERO,
                "must be more than zero",
            ));
        }
        if options.hedge.is_some() && !options.policies.is_empty() {
            // A hedge's second call is made for an item already let through: it would not
            // pass the gates (a rate's permits, an in-flight slot, a breaker's verdict).
            upstream.settings.errors.push(Error::config_text(
                &name,
                "hedge",
                format!("{:?}", options.policies),
                "cannot be combined with rate_limit, inflight, circuit_breaker or adaptive on one stage: a second call would not pass them",
            ));
        }
        let invalid = options
            .policies
            .iter()
            .map(|p| p.invalid())
            .chain([options.retry.as_ref().and_then(Retry::invalid)])
            .flatten()
            .chain(options.hedge.iter().flat_map(Hedge::invalid))
            .chain(key_by::invalid(&options, key.is_some()));
        for (option, value, reason) in invalid {
            upstream
                .settings
                .errors
                .push(Error::config_text(&name, option, value, reason));
        }
        upstream.then(move |b, up| {
            let stats = b.stage(&name, "async");
            b.policies(&stats, &options.policies);
            b.live_stage(&stats, options.workers, &options.policies);
            let (tx, rx) = hop(HOP_CHUNKS, &stats);
            let run = b.run.clone();
            b.spawn_tail(
                drive(
                    up, call, options, keep, copy, route, ends, key, stats, run, tx,
                ),
                rx,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;
    use std::time::Duration;

    #[tokio::test(flavor = "current_thread")]
    async fn latency_samples_stand_for_every_call() {
        // 100,000 calls: the first 256 timed, then one in 16, then one in 128, each counted
        // for the calls it stands for, so the total is the number of calls to within a stride.
        let report = Pipeline::from_iter(0..100_000u32)
            .map_async("call", |x| async move { x })
            .workers(4)
            .run()
            .await
            .unwrap();
        let samples = report.stages[1]
            .latency
            .expect("an async stage has latency")
            .samples;
        assert_eq!(samples, 256 + 16_128 + 654 * 128);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn trace_calls_makes_a_span_per_attempt_under_the_stage() {
        let capture = crate::observe::capture::Capture::default();
        let _guard = tracing::subscriber::set_default(capture.clone());
        let report = Pipeline::from_iter(0..3u32)
            .try_map_async("api", |x| {
                let fail = x == 1 && crate::attempt() == 1;
                async move {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    tracing::info!("inside");
                    if fail { Err("503") } else { Ok(x) }
                }
            })
            .workers(2)
            .retry(Retry::constant(Duration::from_millis(10)))
            .trace_calls()
            .run()
            .await
            .unwrap();
        assert_eq!(report.delivered(), 3);
        let c = capture.take();
        let mut calls: Vec<_> = c
            .spans
            .iter()
            .enumerate()
            .filter(|(_, s)| s.name == "call")
            .map(|(i, s)| {
                let parent = &c.spans[s.parent.unwrap()];
                (
                    s.field("seq").unwrap().to_string(),
                    s.field("attempt").unwrap().to_string(),
                    s.field("outcome").unwrap().to_string(),
                    parent.field("stage").unwrap().to_string(),
                    // The events of the call's code are in the call's span.
                    c.events.iter().filter(|e| e.span == Some(i)).count(),
                )
            })
            .collect();
        calls.sort();
        let call = |seq: &str, attempt: &str, outcome: &str| {
            (seq.into(), attempt.into(), outcome.into(), "api".into(), 1)
        };
        assert_eq!(
            calls,
            vec![
                call("0", "1", "ok"),
                call("1", "1", "error"),
                call("1", "2", "ok"),
                call("2", "1", "ok"),
            ]
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn without_trace_calls_no_call_span_is_made() {
        let capture = crate::observe::capture::Capture::default();
        let _guard = tracing::subscriber::set_default(capture.clone());
        Pipeline::from_iter(0..3u32)
            .map_async("api", |x| async move { x })
            .run()
            .await
            .unwrap();
        assert!(capture.take().spans.iter().all(|s| s.name != "call"));
    }

    #[tokio::test]
    async fn a_bad_ordered_window_is_named() {
        let err = Pipeline::from_iter(0..3u32)
            .map_async("api", |x| async move { x })
            .ordered_window(0)
            .run()
            .await
            .unwrap_err();
        assert!(err.to_string().contains("ordered_window = 0"), "{err}");
        let err = Pipeline::from_iter(0..3u32)
            .map_async("api", |x| async move { x })
            .unordered()
            .ordered_window(8)
            .run()
            .await
            .unwrap_err();
        assert!(err.to_string().contains("ordered stages only"), "{err}");
    }
}
