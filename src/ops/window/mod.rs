//! Windowed aggregation: [`Flow::window`](crate::Flow::window) with a window kind
//! ([`Tumbling`](crate::Tumbling), [`Sliding`](crate::Sliding), [`Session`](crate::Session), [`Count`](crate::Count)), configured by [`Windows`] (key, event
//! time, allowed lateness, idle advance, a bound on open windows) and ended by an
//! aggregation ([`Windows::count`], [`reduce`](Windows::reduce), [`fold`](Windows::fold),
//! [`collect_items`](Windows::collect_items), [`aggregate`](Windows::aggregate)), which emits one
//! [`Windowed`] per closed window.
//!
//! One file per concern: the kinds (`tumbling`, `sliding`, `session`, `count`), their state
//! (`panes` for tumbling and sliding, the session and count states beside their kinds), the
//! aggregations (`aggregate`), and the stage that drives them (`stage`).

pub(crate) mod aggregate;
pub(crate) mod count;
pub(crate) mod panes;
pub(crate) mod session;
pub(crate) mod sliding;
pub(crate) mod stage;
pub(crate) mod state;
pub(crate) mod tumbling;

use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use crate::error::Error;
use crate::plan::Pipeline;
use aggregate::{Aggregate, CollectItems, CountItems, Fold, Reduce};

/// Times are kept as nanoseconds since the time domain's epoch; an event time at or beyond
/// this (about 146 years after it) fails its item, so that no window arithmetic overflows.
pub(crate) const MAX_TIME: u64 = u64::MAX / 4;

/// One closed window: its key, its span `[start, end)` as times since the time domain's
/// epoch (the UNIX epoch, or whatever the event-time extractor measures from; the run's
/// start for processing time), how many items it holds, and the aggregation's value.
///
/// ```
/// use flowline::prelude::*;
/// use flowline::Tumbling;
/// use std::time::Duration;
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let out = Pipeline::from_iter([("a", 3u64), ("a", 4)])
///     .window(Tumbling::every(Duration::from_secs(10)))
///         .key_by(|(k, _)| *k)
///         .event_time(|(_, s)| Duration::from_secs(*s))
///     .count()
///     .collect().await.unwrap();
/// let w = &out[0];
/// assert_eq!((w.key, w.start, w.end, w.items, w.value), ("a", Duration::ZERO, Duration::from_secs(10), 2, 2));
/// assert!(!w.evicted);
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Windowed<K, V> {
    /// The key the items share (`()` for a global window).
    pub key: K,
    /// The window's first instant.
    pub start: Duration,
    /// The instant after its last one: an item at `end` belongs to the next window.
    pub end: Duration,
    /// How many items it holds.
    pub items: u64,
    /// What the aggregation made of them.
    pub value: V,
    /// Emitted before its end was reached, to make room ([`OnFull::EmitOldest`]): later
    /// items of its span may open and emit another window of the same span.
    pub evicted: bool,
}

/// What a window stage does with an item that needs a new window when
/// [`max_open`](Windows::max_open) windows are open.
///
/// ```
/// use flowline::OnFull;
/// assert_eq!(OnFull::default(), OnFull::Fail);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OnFull {
    /// Fail the item (to the dead letters, with an error naming the limit). The default.
    #[default]
    Fail,
    /// Emit the window that would close first now, marked [`Windowed::evicted`], and take
    /// the item.
    EmitOldest,
}

/// The error of a late item sent to the dead letters: every window that would hold it had
/// closed. Reach it through [`ItemError::User`](crate::ItemError::User)'s source.
///
/// ```
/// use flowline::LateItem;
/// use std::time::Duration;
/// let e = LateItem { time: Duration::from_secs(5), watermark: Duration::from_secs(12) };
/// assert_eq!(e.to_string(), "late: event time 5s, watermark 12s: its windows have closed");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LateItem {
    /// The item's event time.
    pub time: Duration,
    /// The watermark when it arrived.
    pub watermark: Duration,
}

impl fmt::Display for LateItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "late: event time {:?}, watermark {:?}: its windows have closed",
            self.time, self.watermark
        )
    }
}

impl std::error::Error for LateItem {}

mod sealed {
    /// The hidden side of [`WindowKind`](super::WindowKind).
    pub trait Kind {
        /// The kind's spans in nanoseconds, checked: problems go to `errors`.
        fn spec(&self, stage: &str, errors: &mut Vec<crate::Error>) -> super::Spec;
    }

    /// The hidden side of [`TimeOf`](super::TimeOf).
    pub trait Time {}
}

/// A kind of window: [`Tumbling`](crate::Tumbling), [`Sliding`](crate::Sliding), [`Session`](crate::Session) or [`Count`](crate::Count). Given to
/// [`Flow::window`](crate::Flow::window); implemented by those four only.
///
/// ```
/// use flowline::{Count, WindowKind};
/// fn takes(_: impl WindowKind) {}
/// takes(Count::every(10));
/// ```
pub trait WindowKind: sealed::Kind + Send + 'static {}

/// A window kind's spans, in nanoseconds.
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub enum Spec {
    Panes { size: u64, step: u64 },
    Session { gap: u64 },
    Count { n: u64 },
}

/// A length of a window kind in nanoseconds; records an error unless it is more than zero
/// and within the range of times.
fn check_length(stage: &str, option: &'static str, d: Duration, errors: &mut Vec<Error>) -> u64 {
    if d.is_zero() {
        errors.push(Error::config(stage, option, d, "must be more than zero"));
        return 1;
    }
    match u64::try_from(d.as_nanos()) {
        Ok(n) if n < MAX_TIME => n,
        _ => {
            errors.push(Error::config(
                stage,
                option,
                d,
                "must be less than 146 years (times are nanoseconds in 64 bits)",
            ));
            1
        }
    }
}

/// Where a window stage takes an item's time from: [`ProcessingTime`] (the default) or
/// [`EventTime`] (set by [`Windows::event_time`]). Implemented by those two only.
///
/// ```
/// use flowline::{ProcessingTime, TimeOf};
/// fn takes<T>(_: impl TimeOf<T>) {}
/// takes::<u32>(ProcessingTime);
/// ```
pub trait TimeOf<T>: sealed::Time + Send + 'static {
    /// Whether items carry their own time.
    #[doc(hidden)]
    const EVENT: bool;
    /// The item's event time (not called for processing time).
    #[doc(hidden)]
    fn event_time(&mut self, item: &T) -> Duration;
}

/// Processing time: an item's time is when the stage pulled it, on tokio's clock (so
/// testable on the paused clock), measured from the run's start. Windows close when the
/// clock passes their end, whether items arrive or not. No item is ever late.
///
/// ```
/// use flowline::prelude::*;
/// use flowline::Tumbling;
/// use std::time::Duration;
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let out = Pipeline::from_iter(0..5).window(Tumbling::every(Duration::from_secs(1))).count().collect().await.unwrap();
/// assert_eq!(out[0].value, 5);     // all pulled in the first second
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessingTime;

impl sealed::Time for ProcessingTime {}

impl<T> TimeOf<T> for ProcessingTime {
    const EVENT: bool = false;
    fn event_time(&mut self, _: &T) -> Duration {
        Duration::ZERO
    }
}

/// Event time: the item's own time, from the extractor given to
/// [`Windows::event_time`].
///
/// ```
/// use flowline::prelude::*;
/// use flowline::{EventTime, Tumbling, Windows};
/// use std::time::Duration;
/// let w: Windows<u64, (), fn(&u64), EventTime<fn(&u64) -> Duration>> =
///     Pipeline::from_iter([1u64]).window(Tumbling::every(Duration::from_secs(1))).event_time(|s| Duration::from_secs(*s));
/// # let _ = w;
/// ```
pub struct EventTime<F>(F);

impl<F> sealed::Time for EventTime<F> {}

impl<T, F> TimeOf<T> for EventTime<F>
where
    F: FnMut(&T) -> Duration + Send + 'static,
{
    const EVENT: bool = true;
    #[inline]
    fn event_time(&mut self, item: &T) -> Duration {
        (self.0)(item)
    }
}

/// The most windows (panes, sessions, count windows) a stage holds open by default.
pub const DEFAULT_MAX_OPEN: usize = 1_000_000;

/// A window stage being configured; returned by [`Flow::window`](crate::Flow::window). Set
/// the key ([`key_by`](Windows::key_by); without one, all items share one global window),
/// the time ([`event_time`](Windows::event_time), [`allowed_lateness`](Windows::allowed_lateness),
/// [`idle_timeout`](Windows::idle_timeout); without, processing time) and the bound on state
/// ([`max_open`](Windows::max_open), [`on_full`](Windows::on_full)), then end it with an
/// aggregation, which returns the pipeline of [`Windowed`]s.
///
/// **Time.** With event time the watermark is the largest event time seen minus the allowed
/// lateness; a window `[start, end)` closes, and is emitted, when the watermark reaches
/// `end`. An item whose every window has closed is *late*: it is counted in the stage's
/// [`late`](crate::StageReport::late) and goes to the dead letters (a [`LateItem`] error), or,
/// with [`aggregate_with_late`](Windows::aggregate_with_late), to a pipeline of its own —
/// never dropped silently. Items within the lateness, out of order, land in their windows.
/// A quiet input would hold the last windows open forever; after
/// [`idle_timeout`](Windows::idle_timeout) without an item, the watermark moves on with
/// tokio's clock instead.
///
/// **The end.** When the input ends, every open window is emitted. A graceful stop
/// ([`Handle::stop`](crate::Handle::stop), a signal) ends the input, so it flushes them too;
/// a cancel ([`Handle::cancel`](crate::Handle::cancel), a deadline, `ErrorPolicy::Stop`) does
/// not: the items in open windows are counted `unfinished`.
///
/// **Counts.** In the report, the stage's `in` is items; an item is `ok` once every window
/// holding it has been emitted (a sliding window's item after its last window), `failed` if
/// it went to the dead letters (late, no room, a panic in a closure); its `out` is windows
/// (plus late items on the side output, which count `ok` too). While windows are open their
/// items are in flight. So `in = ok + failed (+ unfinished)` holds as for every stage, and
/// every item is in the windows that hold it, counted late, or failed.
///
/// ```
/// use flowline::prelude::*;
/// use flowline::Tumbling;
/// use std::time::Duration;
///
/// struct Login { account: &'static str, ok: bool, at: Duration }
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let s = Duration::from_secs;
/// let logins = vec![
///     Login { account: "ann", ok: false, at: s(1) },
///     Login { account: "ann", ok: false, at: s(5) },
///     Login { account: "bob", ok: true, at: s(7) },
///     Login { account: "ann", ok: false, at: s(3) },     // out of order, within the lateness
///     Login { account: "ann", ok: false, at: s(70) },
/// ];
/// let (alerts, report) = Pipeline::from_iter(logins)
///     .filter(|l| !l.ok)
///     .window(Tumbling::every(s(60)))
///         .key_by(|l| l.account)
///         .event_time(|l| l.at)
///         .allowed_lateness(s(10))
///     .count()
///     .filter(|w| w.value >= 3)
///     .collect_with_report().await.unwrap();
/// assert_eq!(alerts.len(), 1);
/// assert_eq!((alerts[0].key, alerts[0].start, alerts[0].value), ("ann", s(0), 3));
/// assert_eq!(report.stage("window").unwrap().late, 0);
/// # }
/// ```
#[must_use = "a window stage does nothing until an aggregation ends it and the pipeline is run"]
pub struct Windows<T, K, KF, TF> {
    p: Pipeline<T>,
    name: String,
    spec: Spec,
    key: KF,
    time: TF,
    lateness: Duration,
    idle: Option<Duration>,
    max_open: usize,
    on_full: OnFull,
    _k: PhantomData<fn() -> K>,
}

/// The key of a global window.
fn global<T>(_: &T) {}

/// Starts a window stage over `p`.
pub(crate) fn window<T, W: WindowKind>(
    mut p: Pipeline<T>,
    kind: W,
) -> Windows<T, (), fn(&T), ProcessingTime> {
    let name = "window".to_string();
    let spec = kind.spec(&name, &mut p.settings.errors);
    Windows {
        p,
        name,
        spec,
        key: global::<T>,
        time: ProcessingTime,
        lateness: Duration::ZERO,
        idle: None,
        max_open: DEFAULT_MAX_OPEN,
        on_full: OnFull::Fail,
        _k: PhantomData,
    }
}

impl<T, K, KF, TF> Windows<T, K, KF, TF> {
    /// Windows per key: `key` is called once per item. Without it all items share one
    /// global window (key `()`).
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use flowline::Count;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let out = Pipeline::from_iter(0..6u32).window(Count::every(3)).key_by(|x| x % 2).count().collect().await.unwrap();
    /// assert_eq!(out.iter().map(|w| (w.key, w.value)).collect::<Vec<_>>(), vec![(0, 3), (1, 3)]);
    /// # }
    /// ```
    pub fn key_by<K2, F2>(self, key: F2) -> Windows<T, K2, F2, TF>
    where
        F2: FnMut(&T) -> K2 + Send + 'static,
    {
        Windows {
            p: self.p,
            name: self.name,
            spec: self.spec,
            key,
            time: self.time,
            lateness: self.lateness,
            idle: self.idle,
            max_open: self.max_open,
            on_full: self.on_full,
            _k: PhantomData,
        }
    }

    /// Event time: `time` gives each item's own time, as a duration since an epoch of your
    /// choice (usually the UNIX epoch: `t.duration_since(UNIX_EPOCH)`); windows are aligned
    /// to it. A time 146 years or more after it fails its item.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use flowline::Tumbling;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let out = Pipeline::from_iter([5u64, 15, 25])
    ///     .window(Tumbling::every(Duration::from_secs(10)))
    ///     .event_time(|s| Duration::from_secs(*s))
    ///     .count()
    ///     .collect().await.unwrap();
    /// assert_eq!(out.len(), 3);
    /// # }
    /// ```
    pub fn event_time<F>(self, time: F) -> Windows<T, K, KF, EventTime<F>>
    where
        F: FnMut(&T) -> Duration + Send + 'static,
    {
        Windows {
            p: self.p,
            name: self.name,
            spec: self.spec,
            key: self.key,
            time: EventTime(time),
            lateness: self.lateness,
            idle: self.idle,
            max_open: self.max_open,
            on_full: self.on_full,
            _k: PhantomData,
        }
    }

    /// How far behind the largest event time seen an item may be and still land in its
    /// window (default zero): the watermark is that largest time minus `lateness`, so
    /// windows also close that much later. Event time only: set on processing time (no
    /// [`event_time`](Windows::event_time)), a nonzero lateness is a configuration error
    /// naming it.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use flowline::Tumbling;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let report = Pipeline::from_iter([12u64, 8])       // 8 arrives after 12
    ///     .window(Tumbling::every(Duration::from_secs(10)))
    ///         .event_time(|s| Duration::from_secs(*s))
    ///         .allowed_lateness(Duration::from_secs(5))
    ///     .count()
    ///     .run().await.unwrap();
    /// assert_eq!(report.stage("window").unwrap().late, 0);
    /// # }
    /// ```
    pub fn allowed_lateness(mut self, lateness: Duration) -> Self {
        self.lateness = lateness;
        self
    }

    /// After `idle` without an item (tokio's clock), the watermark advances with the clock,
    /// as if event time went on while the input is quiet, so the last windows of a quiet
    /// source still close. An item arriving later behind the advanced watermark is late.
    /// Event time only (set on processing time, a configuration error naming it); must be
    /// more than zero.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use flowline::Tumbling;
    /// use std::time::Duration;
    /// let w = Pipeline::from_iter([1u64])
    ///     .window(Tumbling::every(Duration::from_secs(60)))
    ///         .event_time(|s| Duration::from_secs(*s))
    ///         .idle_timeout(Duration::from_secs(5));
    /// # let _ = w;
    /// ```
    pub fn idle_timeout(mut self, idle: Duration) -> Self {
        self.p
            .settings
            .require_positive(&self.name, "idle_timeout", idle);
        self.idle = Some(idle);
        self
    }

    /// The most windows held open at once (default [`DEFAULT_MAX_OPEN`]): sessions, count
    /// windows, and for tumbling and sliding windows the panes they are made of (one per
    /// key and `gcd(size, step)` that holds items). What happens to an item that needs one
    /// more is [`on_full`](Windows::on_full). Must be at least 1.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use flowline::{Count, OnFull};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let report = Pipeline::from_iter(0..10u32)
    ///     .window(Count::every(100)).key_by(|x| *x).max_open(4).count()
    ///     .run().await.unwrap();
    /// assert_eq!(report.stage("window").unwrap().failed, 6);
    /// # }
    /// ```
    pub fn max_open(mut self, n: usize) -> Self {
        if n == 0 {
            self.p.settings.errors.push(Error::config(
                &self.name,
                "max_open",
                n,
                "must be at least 1",
            ));
        }
        self.max_open = n.max(1);
        self
    }

    /// What to do with an item that needs a new window when [`max_open`](Windows::max_open)
    /// are open: fail it (the default) or emit the oldest window early.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use flowline::{Count, OnFull};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let out = Pipeline::from_iter(0..10u32)
    ///     .window(Count::every(100)).key_by(|x| *x).max_open(4).on_full(OnFull::EmitOldest).count()
    ///     .collect().await.unwrap();
    /// assert_eq!(out.iter().filter(|w| w.evicted).count(), 6);
    /// # }
    /// ```
    pub fn on_full(mut self, policy: OnFull) -> Self {
        self.on_full = policy;
        self
    }

    /// Names the stage (default `window`) in the report, failures and errors.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use flowline::Count;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let report = Pipeline::from_iter(0..3).window(Count::every(2)).name("pairs").count().run().await.unwrap();
    /// assert_eq!(report.stage("pairs").unwrap().emitted, 2);
    /// # }
    /// ```
    pub fn name(mut self, name: &str) -> Self {
        if name.is_empty() {
            self.p
                .settings
                .errors
                .push(Error::config("window", "name", "", "must not be empty"));
        }
        // Problems recorded so far named the stage `window`; they stay as they are.
        self.name = name.to_string();
        self
    }
}

impl<T, K, KF, TF> Windows<T, K, KF, TF>
where
    T: Send + 'static,
    K: std::hash::Hash + Eq + Clone + Send + 'static,
    KF: FnMut(&T) -> K + Send + 'static,
    TF: TimeOf<T>,
{
    /// Checks what depends on the aggregation, and returns the plan and the stage's config.
    fn finish<A: Aggregate<T>>(self, agg: &mut A) -> (Pipeline<T>, stage::Config, KF, TF) {
        let Windows {
            mut p,
            name,
            spec,
            key,
            time,
            lateness,
            idle,
            max_open,
            on_full,
            ..
        } = self;
        if matches!(spec, Spec::Panes { size, step } if size != step)
            || matches!(spec, Spec::Session { .. })
        {
            let (mut a, b) = (agg.init(), agg.init());
            if !agg.merge(&mut a, &b) {
                p.settings.errors.push(Error::config_text(
                    &name,
                    "aggregate",
                    "a fold without merge".into(),
                    "sliding and session windows merge accumulators: give one \
                     (Fold::new(..).merge(..) with aggregate)",
                ));
            }
        }
        // The watermark of processing time is the clock: a lateness or an idle timeout
        // would do nothing there, and a setting that silently does nothing hides a
        // forgotten `event_time`.
        if !TF::EVENT {
            let reason = "event time only: give the items' time with event_time, or drop it";
            if !lateness.is_zero() {
                p.settings
                    .errors
                    .push(Error::config(&name, "allowed_lateness", lateness, reason));
            }
            if let Some(idle) = idle {
                p.settings
                    .errors
                    .push(Error::config(&name, "idle_timeout", idle, reason));
            }
        }
        let config = stage::Config {
            name,
            spec,
            event: TF::EVENT,
            lateness: u64::try_from(lateness.as_nanos()).unwrap_or(u64::MAX),
            idle,
            max_open,
            on_full,
        };
        (p, config, key, time)
    }

    /// Ends the stage with an aggregation of your own (see [`Aggregate`]); late items go to
    /// the dead letters.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use flowline::{Fold, Session};
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let out = Pipeline::from_iter([1u64, 2, 30])
    ///     .window(Session::gap(Duration::from_secs(10)))
    ///         .event_time(|s| Duration::from_secs(*s))
    ///     .aggregate(Fold::new(0u64, |sum: &mut u64, x: u64| *sum += x).merge(|a, b| *a += *b))
    ///     .collect().await.unwrap();
    /// assert_eq!(out.iter().map(|w| w.value).collect::<Vec<_>>(), vec![3, 30]);
    /// # }
    /// ```
    pub fn aggregate<A: Aggregate<T>>(self, mut agg: A) -> Pipeline<Windowed<K, A::Output>> {
        let (p, config, key, time) = self.finish(&mut agg);
        stage::window(p, config, key, time, agg)
    }

    /// Like [`aggregate`](Windows::aggregate), with late items sent on, as they are, on a
    /// pipeline of their own (counted `late` and `ok` at the window stage) instead of the
    /// dead letters. Both pipelines must end in a sink of the same run (a
    /// [`Graph`](crate::Graph)); the split is a router stage named `branch_result`.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use flowline::{CountItems, Tumbling};
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let (windows, late) = Pipeline::from_iter([15u64, 2, 16])     // 2 comes after 15
    ///     .window(Tumbling::every(Duration::from_secs(10)))
    ///         .event_time(|s| Duration::from_secs(*s))
    ///     .aggregate_with_late(CountItems);
    /// let (w, l) = (Collected::new(), Collected::new());
    /// let report = Graph::new().collect(windows, &w).collect(late, &l).run().await.unwrap();
    /// assert_eq!(l.take(), vec![2]);
    /// assert_eq!(w.take().iter().map(|w| w.value).collect::<Vec<_>>(), vec![2]);
    /// assert_eq!(report.stage("window").unwrap().late, 1);
    /// # }
    /// ```
    #[allow(clippy::type_complexity)]
    pub fn aggregate_with_late<A: Aggregate<T>>(
        self,
        mut agg: A,
    ) -> (Pipeline<Windowed<K, A::Output>>, Pipeline<T>) {
        let (p, config, key, time) = self.finish(&mut agg);
        let both: Pipeline<Result<Windowed<K, A::Output>, T>> =
            stage::window(p, config, key, time, agg);
        crate::topology::branch::branch_result(both)
    }

    /// Counts the items of each window.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use flowline::Count;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let out = Pipeline::from_iter(0..5).window(Count::every(2)).count().collect().await.unwrap();
    /// assert_eq!(out.iter().map(|w| w.value).collect::<Vec<_>>(), vec![2, 2, 1]);
    /// # }
    /// ```
    pub fn count(self) -> Pipeline<Windowed<K, u64>> {
        self.aggregate(CountItems)
    }

    /// Combines each window's items pairwise with `f` (which also merges panes and
    /// sessions, so it should be associative, like `+`, `max` or `min`). The value is never
    /// `None`: a window with no items is not emitted.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use flowline::Count;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let out = Pipeline::from_iter([3, 9, 4]).window(Count::every(3)).reduce(i32::max).collect().await.unwrap();
    /// assert_eq!(out[0].value, Some(9));
    /// # }
    /// ```
    pub fn reduce<F>(self, f: F) -> Pipeline<Windowed<K, Option<T>>>
    where
        T: Clone,
        F: FnMut(T, T) -> T + Send + 'static,
    {
        self.aggregate(Reduce::new(f))
    }

    /// Folds each window's items into a state that starts as a clone of `init`. For
    /// tumbling and count windows; sliding and session windows merge states, so they take
    /// a fold with a merge: `.aggregate(Fold::new(init, add).merge(m))` (without one, the
    /// run fails with a configuration error that says so).
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use flowline::Count;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let out = Pipeline::from_iter(["a", "bb", "ccc"])
    ///     .window(Count::every(3))
    ///     .fold(0usize, |len, s| *len += s.len())
    ///     .collect().await.unwrap();
    /// assert_eq!(out[0].value, 6);
    /// # }
    /// ```
    pub fn fold<A, F>(self, init: A, add: F) -> Pipeline<Windowed<K, A>>
    where
        A: Clone + Send + 'static,
        F: FnMut(&mut A, T) + Send + 'static,
    {
        self.aggregate(Fold::new(init, add))
    }

    /// Keeps each window's items, in the order they arrived.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use flowline::Count;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let out = Pipeline::from_iter(0..4).window(Count::every(2)).collect_items().collect().await.unwrap();
    /// assert_eq!(out[1].value, vec![2, 3]);
    /// # }
    /// ```
    pub fn collect_items(self) -> Pipeline<Windowed<K, Vec<T>>>
    where
        T: Clone,
    {
        self.aggregate(CollectItems)
    }
}

impl<T, K, KF, TF> fmt::Debug for Windows<T, K, KF, TF> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Windows")
            .field("name", &self.name)
            .field("spec", &self.spec)
            .field("lateness", &self.lateness)
            .field("idle", &self.idle)
            .field("max_open", &self.max_open)
            .field("on_full", &self.on_full)
            .finish_non_exhaustive()
    }
}
