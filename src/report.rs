//! The run report: per-stage counts, latencies, wall time and failures.

use std::fmt;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::error::{Failure, ItemError};

/// The counters of a stage that exactly one owner updates (a fused operator or a source:
/// whoever holds the stage by `&mut` is its only writer). The owner keeps running totals
/// and publishes them with plain stores: on the hottest path, a chain of fused operators
/// over small items, five locked atomic adds per operator per chunk were a measurable share
/// of the work (`core/fused8`). Readers (snapshots, the report) see the same values.
#[derive(Debug, Default)]
pub(crate) struct OwnedCounts {
    received: u64,
    passed: u64,
    emitted: u64,
    dropped: u64,
    failed: u64,
}

impl OwnedCounts {
    /// Counts one processed chunk and publishes the totals to `stats`.
    #[inline]
    pub(crate) fn chunk(
        &mut self,
        stats: &StageStats,
        received: usize,
        passed: usize,
        emitted: usize,
        dropped: usize,
        failed: usize,
    ) {
        self.received += received as u64;
        self.passed += passed as u64;
        self.emitted += emitted as u64;
        self.dropped += dropped as u64;
        self.failed += failed as u64;
        stats.publish(self);
    }
}

/// Live counters of one stage. Updated per chunk (never per item) with relaxed atomics.
pub struct StageStats {
    pub(crate) name: Arc<str>,
    pub(crate) kind: &'static str,
    pub(crate) received: AtomicU64,
    pub(crate) passed: AtomicU64,
    pub(crate) emitted: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) retried: AtomicU64,
    /// Items a window stage found late (also counted where they went: failed, or passed
    /// on a side output).
    pub(crate) late: AtomicU64,
    /// Calls that failed with an error the stage's `transient_if` calls transient, tried
    /// again after the outage waits (not attempts, not failures).
    pub(crate) transient_retries: AtomicU64,
    /// Items of a keyed async stage that waited behind a busy key.
    pub(crate) key_waits: AtomicU64,
    /// Failed items by reason, in [`FailureReasons::NAMES`] order. Counted where every
    /// failure passes (`RunCtx::fail`), so that the stages that count `failed` need not.
    failed_by: [AtomicU64; REASONS],
    /// Items counted where a run left them: in a stage's buffers, calls or queues when the
    /// run was cancelled. Counted, never derived from the other counters, so that an item a
    /// stage lost (neither passed on, dropped, failed, nor held) shows as an imbalance.
    pub(crate) unfinished: AtomicU64,
    latency: Mutex<Option<Histogram<u64>>>,
    /// When the oldest call still in flight started, as nanoseconds after the run's epoch
    /// plus one (0: none, or not tracked). Kept only while a stall watchdog asks.
    oldest_call: AtomicU64,
    /// Of the items this stage sent on through a queue (a hop), how many the next stage has
    /// taken; `u64::MAX` while the stage sends into no queue (its items go on in the same
    /// task). Counted by the queue's reader, per chunk.
    taken_on: AtomicU64,
}

impl StageStats {
    pub(crate) fn new(name: Arc<str>, kind: &'static str) -> Self {
        StageStats {
            name,
            kind,
            received: AtomicU64::new(0),
            passed: AtomicU64::new(0),
            emitted: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            late: AtomicU64::new(0),
            transient_retries: AtomicU64::new(0),
            key_waits: AtomicU64::new(0),
            failed_by: Default::default(),
            unfinished: AtomicU64::new(0),
            latency: Mutex::new(None),
            oldest_call: AtomicU64::new(0),
            taken_on: AtomicU64::new(u64::MAX),
        }
    }

    /// The stage sends its items on through a queue, whose reader counts what it takes.
    pub(crate) fn sends_through_queue(&self) {
        let _ = self
            .taken_on
            .compare_exchange(u64::MAX, 0, Relaxed, Relaxed);
    }

    /// Counts `n` items the next stage took from this stage's queue.
    #[inline]
    pub(crate) fn taken_on(&self, n: usize) {
        Self::add(&self.taken_on, n);
    }

    /// Items this stage sent on that wait in the queue to the next stage, not yet taken
    /// (`None`: the stage sends into no queue). The stage counts what it sent after the
    /// send, so the figure may briefly read low, never high.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) fn queued(&self) -> Option<u64> {
        let taken = self.taken_on.load(Relaxed);
        (taken != u64::MAX).then(|| self.emitted.load(Relaxed).saturating_sub(taken))
    }

    #[inline]
    pub(crate) fn add(counter: &AtomicU64, n: usize) {
        if n > 0 {
            counter.fetch_add(n as u64, Relaxed);
        }
    }

    /// Counts one failed item's reason (its count in `failed` is the stage's own).
    pub(crate) fn failed_because(&self, error: &ItemError) {
        self.failed_by[FailureReasons::index(error)].fetch_add(1, Relaxed);
    }

    /// Counts `n` items the stage still held when it ended: they stay unfinished.
    #[inline]
    pub(crate) fn left(&self, n: usize) {
        Self::add(&self.unfinished, n);
    }

    /// Counts `n` items thrown away from the queues in front of the stage when the run was
    /// cancelled: received by the stage, and left unfinished in it.
    #[inline]
    pub(crate) fn discarded(&self, n: usize) {
        Self::add(&self.received, n);
        Self::add(&self.unfinished, n);
    }

    /// Counts one processed chunk of a 1:1 (or 1:n) operator.
    #[inline]
    pub(crate) fn chunk(
        &self,
        received: usize,
        passed: usize,
        emitted: usize,
        dropped: usize,
        failed: usize,
    ) {
        Self::add(&self.received, received);
        Self::add(&self.passed, passed);
        Self::add(&self.emitted, emitted);
        Self::add(&self.dropped, dropped);
        Self::add(&self.failed, failed);
    }

    /// Publishes the running totals of a stage's only writer (see [`OwnedCounts`]).
    #[inline]
    fn publish(&self, c: &OwnedCounts) {
        self.received.store(c.received, Relaxed);
        self.passed.store(c.passed, Relaxed);
        self.emitted.store(c.emitted, Relaxed);
        self.dropped.store(c.dropped, Relaxed);
        self.failed.store(c.failed, Relaxed);
    }

    pub(crate) fn set_oldest_call(
        &self,
        at: Option<tokio::time::Instant>,
        epoch: tokio::time::Instant,
    ) {
        let v = at.map_or(0, |at| {
            at.saturating_duration_since(epoch).as_nanos() as u64 + 1
        });
        self.oldest_call.store(v, Relaxed);
    }

    /// When the oldest call in flight started (stages that time their calls, while watched).
    pub(crate) fn oldest_call(&self, epoch: tokio::time::Instant) -> Option<tokio::time::Instant> {
        match self.oldest_call.load(Relaxed) {
            0 => None,
            v => Some(epoch + Duration::from_nanos(v - 1)),
        }
    }

    /// Merges a task-local latency histogram (nanoseconds) into the stage's.
    pub(crate) fn merge_latency(&self, local: &mut Histogram<u64>) {
        if local.is_empty() {
            return;
        }
        let mut slot = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        match slot.as_mut() {
            Some(h) => {
                let _ = h.add(&*local);
            }
            None => *slot = Some(local.clone()),
        }
        local.reset();
    }

    /// A copy of the stage's latency histogram (nanoseconds), if any call was timed.
    #[cfg(feature = "metrics")]
    pub(crate) fn latency_histogram(&self) -> Option<Histogram<u64>> {
        self.latency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The stage's counts. While the run goes on (`ended` false), `unfinished` is what is
    /// in flight: received and not yet passed, dropped or failed. Once every task of the run
    /// has ended, it is what the stages counted as left behind, so that
    /// [`StageReport::is_balanced`] checks every item's end rather than restating it.
    pub(crate) fn snapshot(&self, ended: bool) -> StageReport {
        let received = self.received.load(Relaxed);
        let passed = self.passed.load(Relaxed);
        let dropped = self.dropped.load(Relaxed);
        let failed = self.failed.load(Relaxed);
        let latency = self
            .latency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(LatencySummary::from_histogram);
        let by = |i: usize| self.failed_by[i].load(Relaxed);
        StageReport {
            name: self.name.to_string(),
            kind: self.kind,
            received,
            passed,
            // What a sink delivered left the pipeline: its "out", as for any 1:1 stage.
            emitted: if self.kind == "sink" {
                passed
            } else {
                self.emitted.load(Relaxed)
            },
            dropped,
            failed,
            retried: self.retried.load(Relaxed),
            late: self.late.load(Relaxed),
            transient_retries: self.transient_retries.load(Relaxed),
            key_waits: self.key_waits.load(Relaxed),
            failed_by: FailureReasons {
                error: by(0),
                timeout: by(1),
                panic: by(2),
                circuit_open: by(3),
            },
            unfinished: if ended {
                self.unfinished.load(Relaxed)
            } else {
                received.saturating_sub(passed + dropped + failed)
            },
            latency,
            limits: None,
        }
    }
}

/// A new latency histogram (nanoseconds, 3 significant digits, auto-resizing).
pub(crate) fn latency_histogram() -> Histogram<u64> {
    Histogram::new(3).expect("3 significant figures is a valid histogram precision")
}

/// Latency percentiles of an async stage, from sampled calls.
///
/// ```
/// # use flowline::LatencySummary;
/// let l = LatencySummary::default();
/// assert_eq!(l.samples, 0);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LatencySummary {
    /// How many calls the percentiles stand for: close to the stage's calls. A busy stage
    /// times only some of its calls (all of its first 1,024, then one in 8, past 65,536 one
    /// in 64), each counted for the calls it stands for.
    pub samples: u64,
    /// Median.
    pub p50: Duration,
    /// 90th percentile.
    pub p90: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Slowest timed call.
    pub max: Duration,
}

impl LatencySummary {
    fn from_histogram(h: &Histogram<u64>) -> Self {
        LatencySummary {
            samples: h.len(),
            p50: Duration::from_nanos(h.value_at_quantile(0.50)),
            p90: Duration::from_nanos(h.value_at_quantile(0.90)),
            p99: Duration::from_nanos(h.value_at_quantile(0.99)),
            max: Duration::from_nanos(h.max()),
        }
    }
}

/// How many failure reasons a stage counts (the fields of [`FailureReasons`]).
const REASONS: usize = 4;

/// A stage's failed items by reason. The names are the ones metrics and the JSON report use
/// (`error`, `timeout`, `panic`, `circuit_open`); their sum is the stage's `failed`.
///
/// ```
/// use flowline::prelude::*;
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let report = Pipeline::from_iter(0..10u32)
///     .try_map_async("check", |x| async move { if x < 3 { Err("too small") } else { Ok(x) } })
///     .run()
///     .await
///     .unwrap();
/// let check = report.stage("check").unwrap();
/// assert_eq!(check.failed_by.error, 3);
/// assert_eq!(check.failed_by.iter().collect::<Vec<_>>(), [("error", 3)]);
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FailureReasons {
    /// The stage's function returned an error ([`ItemError::User`]; `error` in dead-letter files).
    pub error: u64,
    /// The call took longer than the stage's timeout ([`ItemError::Timeout`]).
    pub timeout: u64,
    /// User code panicked ([`ItemError::Panic`]).
    pub panic: u64,
    /// The circuit breaker was open and failed the item without a call ([`ItemError::CircuitOpen`]).
    pub circuit_open: u64,
}

impl FailureReasons {
    /// Every reason's name, in the order [`iter`](FailureReasons::iter) gives them.
    pub const NAMES: [&'static str; REASONS] = ["error", "timeout", "panic", "circuit_open"];

    fn index(e: &ItemError) -> usize {
        match e {
            ItemError::User(_) => 0,
            ItemError::Timeout(_) => 1,
            ItemError::Panic(_) => 2,
            ItemError::CircuitOpen => 3,
        }
    }

    fn counts(&self) -> [u64; REASONS] {
        [self.error, self.timeout, self.panic, self.circuit_open]
    }

    /// The reasons that failed at least one item, as `(name, count)`.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + use<> {
        Self::NAMES
            .into_iter()
            .zip(self.counts())
            .filter(|&(_, n)| n > 0)
    }

    /// All the failures counted (saturating).
    pub fn total(&self) -> u64 {
        self.counts().iter().fold(0u64, |a, &n| a.saturating_add(n))
    }
}

/// The counts of one stage.
///
/// Three numbers say what the stage did with what came in: `received` ("in"), and for each
/// of them one end: `passed` ("ok": handled, its outputs sent on), `dropped` (by the stage's
/// own design: filtered, deduplicated, cut by `take`), `failed` (to the dead letters), or
/// `unfinished`. So `received = passed + dropped + failed + unfinished`, always.
/// `emitted` ("out") is what the stage sent to the next one: the same as `passed` for a stage
/// that maps one to one, more for a `flat_map`, fewer for a `batch` (one per batch). In a
/// chain, one stage's out is the next stage's in; nothing is lost between them.
///
/// `unfinished` is zero when the run completed, and counts the items that were inside the
/// stage (or queued in front of it) when a run was cancelled. In a finished run's report each
/// stage counts its unfinished items where it left them (they are not the remainder of the
/// other counts), so an item that vanished shows as an unbalanced stage; in a live snapshot
/// `unfinished` is what is in flight.
///
/// ```
/// use flowline::prelude::*;
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let report = Pipeline::from_iter(0..10).filter(|x| x % 2 == 0).run().await.unwrap();
/// let filter = report.stage("filter").unwrap();
/// assert_eq!((filter.received, filter.passed, filter.dropped), (10, 5, 5));
/// assert_eq!(filter.emitted, report.stage("sink").unwrap().received);
/// assert!(filter.is_balanced());
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StageReport {
    /// The stage's name (unique within the run).
    pub name: String,
    /// What kind of stage it is: `source`, `map`, `filter`, `async`, `buffer`, `sink`, ...
    pub kind: &'static str,
    /// Items that entered the stage ("in").
    pub received: u64,
    /// Items the stage handled ("ok"): passed its check, or made into the outputs it sent
    /// on; for a sink: delivered.
    pub passed: u64,
    /// Items sent on to the next stage ("out"; for a sink: delivered). Equals `passed` for
    /// 1:1 stages; a `flat_map` sends more, a `batch` fewer.
    pub emitted: u64,
    /// Items the stage dropped by design: filtered, deduplicated, throttled, past a `take`.
    pub dropped: u64,
    /// Items that failed here and went to the dead letters.
    pub failed: u64,
    /// The failed items by reason (their sum is `failed`).
    pub failed_by: FailureReasons,
    /// Retry attempts made (not counted in `received`).
    pub retried: u64,
    /// Items a window stage received after every window that would hold them had closed
    /// (event time behind the watermark). Not an end of its own: each is also counted where
    /// it went — `failed` (to the dead letters), or `passed` (sent on a side output).
    pub late: u64,
    /// Calls of an async stage with [`transient_if`](crate::AsyncStage::transient_if) that
    /// failed with a transient error (the server down) and were made again once the run's
    /// [`Outage`](crate::Outage) wait was over: neither attempts nor failures.
    pub transient_retries: u64,
    /// Items of an async stage with [`key_by`](crate::AsyncStage::key_by) that arrived while
    /// their key was busy and waited for it (not an end: each also ends as usual).
    pub key_waits: u64,
    /// Items still inside the stage: in flight during a run (a live snapshot), and once the
    /// run has ended the items the stage held or had queued in front of it when the run was
    /// cancelled (counted where they were left).
    pub unfinished: u64,
    /// Latency of the stage's calls (async stages).
    pub latency: Option<LatencySummary>,
    /// An async stage's limits now, and how often they were changed while running
    /// ([`Control::set_workers`](crate::Control::set_workers),
    /// [`Control::set_rate`](crate::Control::set_rate)).
    pub limits: Option<LiveLimits>,
}

/// An async stage's limits as the run left them, and how often they were changed.
///
/// ```
/// use flowline::prelude::*;
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let report = Pipeline::from_iter(0..3u32)
///     .map_async("api", |x| async move { x })
///     .workers(4)
///     .run().await.unwrap();
/// let limits = report.stage("api").unwrap().limits.clone().unwrap();
/// assert_eq!((limits.workers, limits.worker_changes), (Some(4), 0));
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LiveLimits {
    /// The most calls in flight (`None`: an adaptive stage no one has capped).
    pub workers: Option<usize>,
    /// The stage's limit is adaptive: `workers`, when set, caps it.
    pub adaptive: bool,
    /// Changes of `workers` while running.
    pub worker_changes: u64,
    /// The stage's rate, as (count, period), if it has one.
    pub rate: Option<(u64, std::time::Duration)>,
    /// Changes of the rate while running.
    pub rate_changes: u64,
}

impl fmt::Display for LiveLimits {
    /// `workers 8 (2 changes), rate 50 per 1s (1 change)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let changes = |n: u64| {
            if n == 1 {
                "1 change".to_string()
            } else {
                format!("{n} changes")
            }
        };
        match self.workers {
            Some(w) if self.adaptive => write!(f, "adaptive, at most {w}")?,
            Some(w) => write!(f, "workers {w}")?,
            None => write!(f, "adaptive")?,
        }
        write!(f, " ({})", changes(self.worker_changes))?;
        if let Some((count, period)) = self.rate {
            write!(
                f,
                ", rate {count} per {period:?} ({})",
                changes(self.rate_changes)
            )?;
        }
        Ok(())
    }
}

impl StageReport {
    /// `received == passed + dropped + failed + unfinished`.
    pub fn is_balanced(&self) -> bool {
        let ends = [self.passed, self.dropped, self.failed, self.unfinished];
        u128::from(self.received) == ends.iter().map(|&n| u128::from(n)).sum::<u128>()
    }
}

/// How a run ended.
///
/// ```
/// # use flowline::RunOutcome;
/// assert_eq!(RunOutcome::Completed.to_string(), "completed");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RunOutcome {
    /// Still running (a live snapshot).
    Running,
    /// The source ended and every item finished.
    Completed,
    /// A graceful stop ([`Handle::stop`](crate::Handle::stop), the first signal of
    /// `stop_on_signal`): the sources stopped, no call started after it, the calls in
    /// flight finished and their results went on; the items pulled and not started are
    /// unfinished ([`Report::unfinished`]), none failed for it.
    Stopped,
    /// `Handle::cancel`, a dropped handle, or `ErrorPolicy::Stop`.
    Cancelled,
    /// The run's deadline passed.
    DeadlineExceeded,
    /// The source failed; the items already pulled finished.
    SourceFailed,
    /// A stage could make no more calls (its tower service failed in `poll_ready`): the
    /// sources stopped, and the items already pulled finished (failed at that stage).
    StageFailed,
    /// A server the run needs stayed down longer than the run's
    /// [`Outage`](crate::Outage) policy: the run was cancelled, and the items it held are
    /// unfinished (none failed for it).
    Outage,
}

impl RunOutcome {
    fn as_str(self) -> &'static str {
        match self {
            RunOutcome::Running => "running",
            RunOutcome::Completed => "completed",
            RunOutcome::Stopped => "stopped",
            RunOutcome::Cancelled => "cancelled",
            RunOutcome::DeadlineExceeded => "deadline exceeded",
            RunOutcome::SourceFailed => "source failed",
            RunOutcome::Outage => "outage",
            RunOutcome::StageFailed => "stage failed",
        }
    }
}

impl fmt::Display for RunOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happened in a run: per-stage counts and latencies, wall time, failures.
///
/// Printed (`{report}`), it is a table at most [`Report::WIDTH`] columns wide; a width
/// (`{report:80}`) narrows it. Long stage names are elided in the middle, and counts too long
/// for the width are shortened to three significant digits (`1.23M`). With the `serde`
/// feature (on with `jsonl`) it is `Serialize`, and [`Report::to_json`] writes it.
///
/// ```
/// use flowline::prelude::*;
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let report = Pipeline::from_iter(1..=100u64)
///     .map_async("square", |x| async move { x * x })
///     .workers(4)
///     .run()
///     .await
///     .unwrap();
/// assert_eq!(report.delivered(), 100);
/// assert!(report.is_balanced());
/// println!("{report}");
/// # }
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Report {
    /// Every stage, source first, in the order they were added.
    pub stages: Vec<StageReport>,
    /// Wall time from start to end (tokio's clock).
    pub elapsed: Duration,
    /// How the run ended.
    pub outcome: RunOutcome,
    /// How many items failed in all stages (every one went to the dead-letter target).
    pub failures: u64,
    /// The first failures (at most [`Report::FAILURE_SAMPLE`]), for a look without a dead-letter target.
    pub failure_sample: Vec<Failure>,
}

impl Report {
    /// How many failures the report keeps as a sample.
    pub const FAILURE_SAMPLE: usize = 100;

    /// How wide the printed report is at most, in columns (unless a width is given).
    pub const WIDTH: usize = 100;

    /// The stage called `name`.
    pub fn stage(&self, name: &str) -> Option<&StageReport> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// Items that reached a sink.
    pub fn delivered(&self) -> u64 {
        self.stages
            .iter()
            .filter(|s| s.kind == "sink")
            .fold(0u64, |a, s| a.saturating_add(s.passed))
    }

    /// Retry attempts made in all stages.
    ///
    /// ```
    /// # use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let report = Pipeline::from_iter(0..3).run().await.unwrap();
    /// assert_eq!(report.retries(), 0);
    /// # }
    /// ```
    pub fn retries(&self) -> u64 {
        self.stages
            .iter()
            .fold(0u64, |a, s| a.saturating_add(s.retried))
    }

    /// Items left unfinished in all stages: in their buffers, calls or queues when the run
    /// was cancelled, or pulled and not started when it was stopped
    /// ([`Handle::stop`](crate::Handle::stop)). None of them failed; a rerun does them.
    ///
    /// ```
    /// # use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let report = Pipeline::from_iter(0..3).run().await.unwrap();
    /// assert_eq!(report.unfinished(), 0);
    /// # }
    /// ```
    pub fn unfinished(&self) -> u64 {
        self.stages
            .iter()
            .fold(0u64, |a, s| a.saturating_add(s.unfinished))
    }

    /// Items delivered per second of wall time.
    pub fn items_per_second(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.delivered() as f64 / secs
        } else {
            0.0
        }
    }

    /// Every stage is balanced: `in = ok + dropped + failed (+ unfinished)`.
    pub fn is_balanced(&self) -> bool {
        self.stages.iter().all(StageReport::is_balanced)
    }

    /// The report as one line of JSON: `outcome`, `elapsed_seconds`, `delivered`, `failed`,
    /// `retried`, `items_per_second`, `balanced`, `stages` (each with `name`, `kind`, `in`,
    /// `ok`, `out`, `dropped`, `failed`, `failed_by`, `retried`, `transient_retries`,
    /// `unfinished`, `latency`) and
    /// `failure_sample`.
    ///
    /// ```
    /// # use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let report = Pipeline::from_iter(0..3).run().await.unwrap();
    /// assert!(report.to_json().starts_with(r#"{"outcome":"completed","#));
    /// # }
    /// ```
    #[cfg(feature = "jsonl")]
    #[cfg_attr(docsrs, doc(cfg(feature = "jsonl")))]
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!(r#"{{"error":"{e}"}}"#))
    }
}

/// Shorter than [`fmt_duration`] for small values: call latencies.
fn fmt_latency(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.0}µs")
    } else if us < 1e6 {
        format!("{}ms", sig3(us / 1e3))
    } else {
        fmt_duration(d)
    }
}

/// A duration in at most seven characters: `12.3ms`, `4.56s`, `12.3m`, `4.56h`, `1.23kh`.
pub(crate) fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1.0 {
        format!("{}ms", sig3(s * 1e3))
    } else if s < 999.5 {
        format!("{}s", sig3(s))
    } else if s < 999.5 * 60.0 {
        format!("{}m", sig3(s / 60.0))
    } else {
        format!("{}h", si(s / 3600.0))
    }
}

/// `v` (below 999.5) with three significant digits: `7.42`, `74.2`, `742`.
fn sig3(v: f64) -> String {
    if v >= 99.95 {
        format!("{v:.0}")
    } else if v >= 9.995 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A rate or other measure with three significant digits and a k/M/G/T/P/E suffix:
/// `0.50`, `7.42`, `742`, `7.42k`, `12.0M`. Not a number (or below zero) is `0`.
pub(crate) fn si(v: f64) -> String {
    if v.is_nan() || v <= 0.0 {
        return "0".into();
    }
    let mut v = v;
    for suffix in ["", "k", "M", "G", "T", "P", "E"] {
        if v < 999.5 {
            return format!("{}{suffix}", sig3(v));
        }
        v /= 1000.0;
    }
    format!("{:.0}E", v * 1000.0)
}

/// A count, exact below 1000 and with three significant digits above: `999`, `1.23k`.
pub(crate) fn si_count(n: u64) -> String {
    if n < 1000 {
        n.to_string()
    } else {
        si(n as f64)
    }
}

/// `s` cut to `width` characters with `…` in the middle (the end often tells stages
/// apart: `fetch#2`).
pub(crate) fn elide(s: &str, width: usize) -> String {
    let n = s.chars().count();
    if n <= width {
        return s.to_string();
    }
    if width == 0 {
        return String::new();
    }
    let tail = (width - 1) / 2;
    let head = width - 1 - tail;
    let mut out: String = s.chars().take(head).collect();
    out.push('…');
    out.extend(s.chars().skip(n - tail));
    out
}

/// The table's columns after the stage's name: header, right-aligned.
const COLUMNS: [(&str, bool); 9] = [
    ("kind", false),
    ("in", true),
    ("out", true),
    ("dropped", true),
    ("failed", true),
    ("retried", true),
    ("unfin.", true),
    ("p50", true),
    ("p99", true),
];

/// The narrowest a printed report gets, whatever width it is given.
const MIN_WIDTH: usize = 60;

impl Report {
    /// The table's cells, header first; counts exact or (`short`) with three digits.
    fn cells(&self, short: bool) -> Vec<(String, [String; 9])> {
        let count = |n: u64| if short { si_count(n) } else { n.to_string() };
        let mut rows = vec![("stage".to_string(), COLUMNS.map(|(h, _)| h.to_string()))];
        for s in &self.stages {
            let (p50, p99) = match s.latency {
                Some(l) if l.samples > 0 => (fmt_latency(l.p50), fmt_latency(l.p99)),
                _ => ("-".into(), "-".into()),
            };
            rows.push((
                s.name.clone(),
                [
                    elide(s.kind, 10),
                    count(s.received),
                    count(s.emitted),
                    count(s.dropped),
                    count(s.failed),
                    count(s.retried),
                    count(s.unfinished),
                    p50,
                    p99,
                ],
            ));
        }
        rows
    }

    /// The header line, shortened (counts to three digits) when longer than `max`.
    fn headline(&self, max: usize) -> String {
        let line = |count: &dyn Fn(u64) -> String| {
            let mut l = format!(
                "run {} in {}: {} delivered ({}/s), {} failed",
                self.outcome,
                if self.elapsed.as_secs_f64() < 999.5 {
                    format!("{:.3}s", self.elapsed.as_secs_f64())
                } else {
                    fmt_duration(self.elapsed)
                },
                count(self.delivered()),
                si(self.items_per_second()),
                count(self.failures),
            );
            let retries = self.retries();
            if retries > 0 {
                l.push_str(&format!(", {} retries", count(retries)));
            }
            l
        };
        let exact = line(&|n: u64| n.to_string());
        if exact.chars().count() <= max {
            return exact;
        }
        let short = line(&si_count);
        if short.chars().count() <= max {
            return short;
        }
        // Only hostile values get here (a run of petahours): the counts on a line of their own.
        short.replacen(": ", ":\n", 1)
    }

    /// `failed at STAGE: error 3, timeout 1`, within `max` columns.
    fn reasons_line(s: &StageReport, max: usize) -> String {
        let list = |count: &dyn Fn(u64) -> String| {
            let mut parts: Vec<String> = s
                .failed_by
                .iter()
                .map(|(name, n)| format!("{name} {}", count(n)))
                .collect();
            // Failures a stage counted without a reason (none today) still add up.
            let other = s.failed.saturating_sub(s.failed_by.total());
            if other > 0 {
                parts.push(format!("other {}", count(other)));
            }
            parts.join(", ")
        };
        let mut reasons = list(&|n: u64| n.to_string());
        let fixed = "failed at : ".len();
        if fixed + 3 + reasons.chars().count() > max {
            reasons = list(&si_count);
        }
        let room = max.saturating_sub(fixed + reasons.chars().count()).max(3);
        format!("failed at {}: {reasons}", elide(&s.name, room))
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let max = f.width().unwrap_or(Report::WIDTH).max(MIN_WIDTH);
        writeln!(f, "{}", self.headline(max))?;
        // Exact counts with two spaces between columns if the names get 8 columns (or all
        // they need); else one space; else counts shortened to three digits.
        let name_len = |rows: &[(String, [String; 9])]| {
            rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(0)
        };
        let mut layout = None;
        for (short, gap) in [(false, 2), (false, 1), (true, 1)] {
            let rows = self.cells(short);
            let widths: [usize; 9] = std::array::from_fn(|c| {
                rows.iter()
                    .map(|r| r.1[c].chars().count())
                    .max()
                    .unwrap_or(0)
            });
            let rest: usize = widths.iter().map(|w| w + gap).sum();
            let room = max.saturating_sub(rest);
            let names = name_len(&rows);
            if room >= names.min(8) || short {
                layout = Some((rows, widths, gap, names.min(room).max(3)));
                break;
            }
        }
        let Some((rows, widths, gap, name_w)) = layout else {
            return Ok(());
        };
        for (name, cells) in &rows {
            let mut line = format!("{:<name_w$}", elide(name, name_w));
            for (c, cell) in cells.iter().enumerate() {
                let w = widths[c];
                line.push_str(&" ".repeat(gap));
                if COLUMNS[c].1 {
                    line.push_str(&format!("{cell:>w$}"));
                } else {
                    line.push_str(&format!("{cell:<w$}"));
                }
            }
            writeln!(f, "{}", line.trim_end())?;
        }
        for s in self.stages.iter().filter(|s| s.failed > 0) {
            writeln!(f, "{}", Self::reasons_line(s, max))?;
        }
        // Limits only where they were changed while running: a run without changes reads
        // as before.
        for (s, l) in self
            .stages
            .iter()
            .filter_map(|s| Some((s, s.limits.as_ref()?)))
        {
            if l.worker_changes + l.rate_changes > 0 {
                writeln!(f, "limits of {}: {l}", elide(&s.name, max / 2))?;
            }
        }
        Ok(())
    }
}

// `Serialize` written out rather than derived: the derive macro would add `serde` and
// `serde_derive` (and a second `syn`) to every build with the feature, for a few small
// structs whose JSON names differ from their fields anyway ("in", "ok", "out").
#[cfg(feature = "serde")]
mod json {
    use serde_core::ser::{Serialize, SerializeMap, SerializeSeq, SerializeStruct, Serializer};

    use super::{FailureReasons, LatencySummary, Report, RunOutcome, StageReport};
    use crate::error::Failure;

    #[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
    impl Serialize for RunOutcome {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(&self.as_str().replace(' ', "_"))
        }
    }

    /// Only the reasons that failed an item: `{"error": 3, "timeout": 1}`.
    #[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
    impl Serialize for FailureReasons {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut m = s.serialize_map(None)?;
            for (name, n) in self.iter() {
                m.serialize_entry(name, &n)?;
            }
            m.end()
        }
    }

    /// Durations in seconds: `{"samples": 100, "p50_seconds": 0.004, ...}`.
    #[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
    impl Serialize for LatencySummary {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut m = s.serialize_struct("LatencySummary", 5)?;
            m.serialize_field("samples", &self.samples)?;
            m.serialize_field("p50_seconds", &self.p50.as_secs_f64())?;
            m.serialize_field("p90_seconds", &self.p90.as_secs_f64())?;
            m.serialize_field("p99_seconds", &self.p99.as_secs_f64())?;
            m.serialize_field("max_seconds", &self.max.as_secs_f64())?;
            m.end()
        }
    }

    /// The table's names: `in`, `ok` (`passed`), `out` (`emitted`), ...
    #[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
    impl Serialize for StageReport {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut m = s.serialize_struct("StageReport", 14)?;
            m.serialize_field("name", &self.name)?;
            m.serialize_field("kind", self.kind)?;
            m.serialize_field("in", &self.received)?;
            m.serialize_field("ok", &self.passed)?;
            m.serialize_field("out", &self.emitted)?;
            m.serialize_field("dropped", &self.dropped)?;
            m.serialize_field("failed", &self.failed)?;
            m.serialize_field("failed_by", &self.failed_by)?;
            m.serialize_field("retried", &self.retried)?;
            m.serialize_field("late", &self.late)?;
            m.serialize_field("transient_retries", &self.transient_retries)?;
            m.serialize_field("unfinished", &self.unfinished)?;
            m.serialize_field("latency", &self.latency)?;
            match &self.limits {
                Some(l) => m.serialize_field("limits", &Limits(l))?,
                None => m.skip_field("limits")?,
            }
            m.end()
        }
    }

    /// `{"workers": 8, "worker_changes": 2, "rate_per_second": 50.0, "rate_changes": 1}`.
    struct Limits<'a>(&'a super::LiveLimits);

    impl Serialize for Limits<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let l = self.0;
            let mut m = s.serialize_struct("LiveLimits", 5)?;
            m.serialize_field("workers", &l.workers)?;
            m.serialize_field("adaptive", &l.adaptive)?;
            m.serialize_field("worker_changes", &l.worker_changes)?;
            let rate = l.rate.map(|(c, p)| c as f64 / p.as_secs_f64());
            m.serialize_field("rate_per_second", &rate)?;
            m.serialize_field("rate_changes", &l.rate_changes)?;
            m.end()
        }
    }

    /// One sampled failure: where, why, after how many attempts, and the input's text.
    struct Sampled<'a>(&'a Failure);

    impl Serialize for Sampled<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let f = self.0;
            let mut m = s.serialize_struct("Failure", 5)?;
            m.serialize_field("stage", &*f.stage)?;
            m.serialize_field(
                "reason",
                FailureReasons::NAMES[FailureReasons::index(&f.error)],
            )?;
            m.serialize_field("error", &f.error.to_string())?;
            m.serialize_field("attempts", &f.attempts)?;
            m.serialize_field("input", &f.input.as_ref().map(|i| i.debug()))?;
            m.end()
        }
    }

    struct Samples<'a>(&'a [Failure]);

    impl Serialize for Samples<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut seq = s.serialize_seq(Some(self.0.len()))?;
            for f in self.0 {
                seq.serialize_element(&Sampled(f))?;
            }
            seq.end()
        }
    }

    /// See [`Report::to_json`] for the shape.
    #[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
    impl Serialize for Report {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut m = s.serialize_struct("Report", 9)?;
            m.serialize_field("outcome", &self.outcome)?;
            m.serialize_field("elapsed_seconds", &self.elapsed.as_secs_f64())?;
            m.serialize_field("delivered", &self.delivered())?;
            m.serialize_field("failed", &self.failures)?;
            m.serialize_field("retried", &self.retries())?;
            m.serialize_field("items_per_second", &self.items_per_second())?;
            m.serialize_field("balanced", &self.is_balanced())?;
            m.serialize_field("stages", &self.stages)?;
            m.serialize_field("failure_sample", &Samples(&self.failure_sample))?;
            m.end()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prelude::*;

    fn counts(s: &StageReport) -> [u64; 5] {
        [s.received, s.passed, s.emitted, s.dropped, s.failed]
    }

    #[tokio::test(start_paused = true)]
    async fn out_of_each_stage_is_in_of_the_next() {
        let report = Pipeline::from_iter(0..40u64)
            .flat_map(|x| (0..500u64).map(move |y| x * 500 + y))
            .filter(|x| x % 2 == 0)
            .take(3_000)
            .batch(100, Duration::from_secs(1))
            .map_async("store", |b: Vec<u64>| async move { b.len() })
            .run()
            .await
            .unwrap();
        let got: Vec<(&str, [u64; 5])> = report
            .stages
            .iter()
            .map(|s| (s.name.as_str(), counts(s)))
            .collect();
        // [in, ok, out, dropped, failed]
        assert_eq!(
            got,
            [
                ("source", [40, 40, 40, 0, 0]),
                ("flat_map", [40, 40, 20_000, 0, 0]),
                ("filter", [20_000, 10_000, 10_000, 10_000, 0]),
                ("take", [10_000, 3_000, 3_000, 7_000, 0]),
                ("batch", [3_000, 3_000, 30, 0, 0]),
                ("store", [30, 30, 30, 0, 0]),
                ("sink", [30, 30, 30, 0, 0]),
            ]
        );
        for pair in report.stages.windows(2) {
            assert_eq!(pair[0].emitted, pair[1].received, "{pair:?}");
        }
        assert!(report.is_balanced());
        // The table's "out" is what went on: flat_map's 20000 is filter's "in".
        let text = report.to_string();
        let row = |name: &str| -> Vec<String> {
            let line = text.lines().find(|l| l.starts_with(name)).unwrap();
            line.split_whitespace().map(str::to_string).collect()
        };
        assert_eq!(row("flat_map")[2..4], ["40", "20000"]);
        assert_eq!(row("filter")[2..6], ["20000", "10000", "10000", "0"]);
        assert_eq!(row("batch")[2..4], ["3000", "30"]);
        assert_eq!(row("sink")[2..4], ["30", "30"]);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_split_by_reason_per_stage() {
        let report = Pipeline::from_iter(0..20u64)
            .try_map_async("call", |x| async move {
                match x % 5 {
                    0 => Err(format!("{x} refused")),
                    1 => {
                        tokio::time::sleep(Duration::from_secs(10)).await;
                        Ok(x)
                    }
                    2 => panic!("bug at {x}"),
                    _ => Ok(x),
                }
            })
            .timeout(Duration::from_secs(1))
            .try_map_async("down", |_x| async move { Err::<u64, _>("503") })
            .workers(1)
            .circuit_breaker(
                Breaker::consecutive_failures(2)
                    .cooldown(Duration::from_secs(3600))
                    .on_open(OnOpen::FailFast),
            )
            .run()
            .await
            .unwrap();
        let call = report.stage("call").unwrap();
        assert_eq!(call.failed, 12);
        assert_eq!(
            call.failed_by,
            FailureReasons {
                error: 4,
                timeout: 4,
                panic: 4,
                circuit_open: 0
            }
        );
        let down = report.stage("down").unwrap();
        assert_eq!(down.received, 8);
        assert_eq!(
            down.failed_by.iter().collect::<Vec<_>>(),
            [("error", 2), ("circuit_open", 6)]
        );
        assert_eq!(report.failures, 20);
        for s in &report.stages {
            assert_eq!(s.failed_by.total(), s.failed, "{s:?}");
        }
        let text = report.to_string();
        assert!(
            text.contains("\nfailed at call: error 4, timeout 4, panic 4\n"),
            "{text}"
        );
        assert!(
            text.contains("\nfailed at down: error 2, circuit_open 6\n"),
            "{text}"
        );
    }

    fn stage(name: &str, kind: &'static str, n: u64) -> StageReport {
        StageReport {
            name: name.into(),
            kind,
            received: n,
            passed: n,
            emitted: n,
            dropped: n,
            failed: n,
            failed_by: FailureReasons {
                error: n,
                ..FailureReasons::default()
            },
            retried: n,
            late: 0,
            transient_retries: n,
            key_waits: 0,
            unfinished: n,
            latency: None,
            limits: None,
        }
    }

    fn report(stages: Vec<StageReport>) -> Report {
        Report {
            stages,
            elapsed: Duration::from_millis(2_500),
            outcome: RunOutcome::Completed,
            failures: 3,
            failure_sample: Vec::new(),
        }
    }

    fn widest(text: &str) -> usize {
        text.lines().map(|l| l.chars().count()).max().unwrap()
    }

    #[test]
    fn the_table_fits_100_columns_with_long_names_elided() {
        let long = "enrich-with-the-customer-service-of-the-eu-region-v2";
        let r = report(vec![
            stage("source", "source", 20_000),
            stage(long, "async", 20_000),
            stage(&format!("{long}#2"), "a-user-operator-name", 1),
            stage("sink", "sink", 20_000),
        ]);
        let text = r.to_string();
        assert!(widest(&text) <= 100, "{text}");
        let lines: Vec<&str> = text.lines().collect();
        // The two long names stay apart: elided in the middle, their ends kept.
        let first = lines[3].split_whitespace().next().unwrap();
        assert!(
            first.starts_with("enrich-with-the…") && first.ends_with("region-v2"),
            "{text}"
        );
        assert!(
            lines[4]
                .split_whitespace()
                .next()
                .unwrap()
                .ends_with("-v2#2")
        );
        assert!(lines[4].contains(" a-use…name "), "{}", lines[4]);
        // Counts stay exact while they fit.
        assert_eq!(lines[3].split_whitespace().nth(2), Some("20000"));
        // A narrower width is kept too.
        let narrow = format!("{r:80}");
        assert!(widest(&narrow) <= 80, "{narrow}");
        assert!(narrow.contains(" 20000 "), "{narrow}");
    }

    #[test]
    fn counts_at_u64_max_still_fit() {
        let r = Report {
            failures: u64::MAX,
            elapsed: Duration::MAX,
            ..report(vec![
                stage("source", "source", u64::MAX),
                stage("sink", "sink", u64::MAX),
            ])
        };
        let text = r.to_string();
        assert!(widest(&text) <= 100, "{text}");
        assert!(text.contains("18.4E"), "{text}");
        assert!(!r.is_balanced());
        let narrow = format!("{r:60}");
        assert!(widest(&narrow) <= 60, "{narrow}");
    }

    #[test]
    fn numbers_keep_three_significant_digits() {
        let got: Vec<String> = [
            0.0,
            0.5,
            7.421,
            74.21,
            742.1,
            999.4,
            999.6,
            7421.0,
            12e6,
            f64::NAN,
        ]
        .iter()
        .map(|&v| si(v))
        .collect();
        assert_eq!(
            got,
            [
                "0", "0.50", "7.42", "74.2", "742", "999", "1.00k", "7.42k", "12.0M", "0"
            ]
        );
        assert_eq!(si_count(999), "999");
        assert_eq!(si_count(1_234), "1.23k");
        assert_eq!(si_count(u64::MAX), "18.4E");
        assert_eq!(fmt_duration(Duration::from_millis(1_500)), "1.50s");
        assert_eq!(fmt_duration(Duration::from_secs(3_000)), "50.0m");
        assert_eq!(fmt_duration(Duration::MAX), "5.12Ph");
        assert_eq!(elide("customer-tier#2", 9), "cust…er#2");
        assert_eq!(elide("short", 9), "short");
        assert_eq!(elide("abc", 0), "");
    }

    #[cfg(feature = "jsonl")]
    #[test]
    fn json_has_the_tables_names_and_the_reasons() {
        let mut r = report(vec![
            stage("source", "source", 3),
            stage("fetch", "async", 3),
        ]);
        r.stages[1].latency = Some(LatencySummary {
            samples: 3,
            p50: Duration::from_millis(4),
            p90: Duration::from_millis(5),
            p99: Duration::from_millis(6),
            max: Duration::from_millis(7),
        });
        r.failure_sample = vec![Failure {
            input: Some(crate::FailedInput::new(7u64)),
            ..Failure::new("fetch", ItemError::Timeout(Duration::from_secs(2)), 3)
        }];
        assert_eq!(
            r.to_json(),
            concat!(
                r#"{"outcome":"completed","elapsed_seconds":2.5,"delivered":0,"failed":3,"#,
                r#""retried":6,"items_per_second":0.0,"balanced":false,"stages":["#,
                r#"{"name":"source","kind":"source","in":3,"ok":3,"out":3,"dropped":3,"#,
                r#""failed":3,"failed_by":{"error":3},"retried":3,"late":0,"transient_retries":3,"unfinished":3,"latency":null},"#,
                r#"{"name":"fetch","kind":"async","in":3,"ok":3,"out":3,"dropped":3,"#,
                r#""failed":3,"failed_by":{"error":3},"retried":3,"late":0,"transient_retries":3,"unfinished":3,"#,
                r#""latency":{"samples":3,"p50_seconds":0.004,"p90_seconds":0.005,"#,
                r#""p99_seconds":0.006,"max_seconds":0.007}}],"#,
                r#""failure_sample":[{"stage":"fetch","reason":"timeout","#,
                r#""error":"timed out after 2s","attempts":3,"input":"7"}]}"#
            )
        );
    }
}
