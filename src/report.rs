//! The run report: per-stage counts, latencies, wall time and failures.

use std::fmt;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::error::Failure;

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
    /// Items counted where a run left them: in a stage's buffers, calls or queues when the
    /// run was cancelled. Counted, never derived from the other counters, so that an item a
    /// stage lost (neither passed on, dropped, failed, nor held) shows as an imbalance.
    pub(crate) unfinished: AtomicU64,
    latency: Mutex<Option<Histogram<u64>>>,
    /// When the oldest call still in flight started, as nanoseconds after the run's epoch
    /// plus one (0: none, or not tracked). Kept only while a stall watchdog asks.
    oldest_call: AtomicU64,
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
            unfinished: AtomicU64::new(0),
            latency: Mutex::new(None),
            oldest_call: AtomicU64::new(0),
        }
    }

    #[inline]
    pub(crate) fn add(counter: &AtomicU64, n: usize) {
        if n > 0 {
            counter.fetch_add(n as u64, Relaxed);
        }
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
        StageReport {
            name: self.name.to_string(),
            kind: self.kind,
            received,
            passed,
            emitted: self.emitted.load(Relaxed),
            dropped,
            failed,
            retried: self.retried.load(Relaxed),
            unfinished: if ended {
                self.unfinished.load(Relaxed)
            } else {
                received.saturating_sub(passed + dropped + failed)
            },
            latency,
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

/// The counts of one stage.
///
/// For every stage `received = passed + dropped + failed + unfinished`; `unfinished` is zero
/// when the run completed, and counts the items that were inside the stage (or queued in
/// front of it) when a run was cancelled. In a finished run's report each stage counts its
/// unfinished items where it left them (they are not the remainder of the other counts), so
/// an item that vanished shows as an unbalanced stage; in a live snapshot `unfinished` is
/// what is in flight. `emitted` is the number of outputs, which differs
/// from `passed` only for stages that change the number of items (`flat_map`, batches).
///
/// ```
/// use flowline::prelude::*;
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let report = Pipeline::from_iter(0..10).filter(|x| x % 2 == 0).run().await.unwrap();
/// let filter = report.stage("filter").unwrap();
/// assert_eq!((filter.received, filter.passed, filter.dropped), (10, 5, 5));
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
    /// Items that went on to the next stage ("out"; for a sink: delivered).
    pub passed: u64,
    /// Outputs sent on (equals `passed` for 1:1 stages).
    pub emitted: u64,
    /// Items dropped by design: filtered, deduplicated, throttled.
    pub dropped: u64,
    /// Items that failed here and went to the dead letters.
    pub failed: u64,
    /// Retry attempts made (not counted in `received`).
    pub retried: u64,
    /// Items still inside the stage: in flight during a run (a live snapshot), and once the
    /// run has ended the items the stage held or had queued in front of it when the run was
    /// cancelled (counted where they were left).
    pub unfinished: u64,
    /// Latency of the stage's calls (async stages).
    pub latency: Option<LatencySummary>,
}

impl StageReport {
    /// `received == passed + dropped + failed + unfinished`.
    pub fn is_balanced(&self) -> bool {
        self.received == self.passed + self.dropped + self.failed + self.unfinished
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
    /// `Handle::stop`: the source stopped early, every pulled item finished.
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
}

impl fmt::Display for RunOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RunOutcome::Running => "running",
            RunOutcome::Completed => "completed",
            RunOutcome::Stopped => "stopped",
            RunOutcome::Cancelled => "cancelled",
            RunOutcome::DeadlineExceeded => "deadline exceeded",
            RunOutcome::SourceFailed => "source failed",
            RunOutcome::StageFailed => "stage failed",
        })
    }
}

/// What happened in a run: per-stage counts and latencies, wall time, failures.
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

    /// The stage called `name`.
    pub fn stage(&self, name: &str) -> Option<&StageReport> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// Items that reached a sink.
    pub fn delivered(&self) -> u64 {
        self.stages
            .iter()
            .filter(|s| s.kind == "sink")
            .map(|s| s.passed)
            .sum()
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

    /// Every stage is balanced: `in = out + dropped + failed (+ unfinished)`.
    pub fn is_balanced(&self) -> bool {
        self.stages.iter().all(StageReport::is_balanced)
    }
}

fn fmt_latency(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.0}µs")
    } else if us < 1e6 {
        format!("{:.1}ms", us / 1e3)
    } else {
        format!("{:.2}s", us / 1e6)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "run {} in {:.3}s: {} delivered ({:.0}/s), {} failed",
            self.outcome,
            self.elapsed.as_secs_f64(),
            self.delivered(),
            self.items_per_second(),
            self.failures
        )?;
        let width = self
            .stages
            .iter()
            .map(|s| s.name.len())
            .max()
            .unwrap_or(5)
            .max(5);
        writeln!(
            f,
            "{:<width$}  {:<8} {:>10} {:>10} {:>9} {:>8} {:>8} {:>8} {:>9} {:>9}",
            "stage", "kind", "in", "out", "dropped", "failed", "retried", "unfin.", "p50", "p99"
        )?;
        for s in &self.stages {
            let (p50, p99) = match s.latency {
                Some(l) if l.samples > 0 => (fmt_latency(l.p50), fmt_latency(l.p99)),
                _ => ("-".into(), "-".into()),
            };
            writeln!(
                f,
                "{:<width$}  {:<8} {:>10} {:>10} {:>9} {:>8} {:>8} {:>8} {:>9} {:>9}",
                s.name,
                s.kind,
                s.received,
                s.passed,
                s.dropped,
                s.failed,
                s.retried,
                s.unfinished,
                p50,
                p99
            )?;
        }
        Ok(())
    }
}
