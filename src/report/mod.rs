//! The run report: per-stage counts, latencies, wall time and failures.

mod stats;
mod table;

#[cfg(feature = "serde")]
mod json;

use std::fmt;
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::failure::Failure;

pub(crate) use stats::{OwnedCounts, StageStats, latency_histogram};
pub(crate) use table::{elide, fmt_duration, si, si_count};

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
    /// times only some of its calls (all of its first 256, then one in 16, past 16,384 one
    /// in 128), each counted for the calls it stands for.
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
    pub(super) fn from_histogram(h: &Histogram<u64>) -> Self {
        LatencySummary {
            samples: h.len(),
            p50: Duration::from_nanos(h.value_at_quantile(0.50)),
            p90: Duration::from_nanos(h.value_at_quantile(0.90)),
            p99: Duration::from_nanos(h.value_at_quantile(0.99)),
            max: Duration::from_nanos(h.max()),
        }
    }
}

/// A stage's failed items by reason, keyed by name: `error` (the stage's own error),
/// `timeout`, `panic`, `circuit_open`, and the reason of each policy that refused items
/// ([`ItemError::Refused`](crate::ItemError::Refused)). The names are the ones dead
/// letters, the failure log, metrics and the JSON report use
/// ([`ItemError::kind`](crate::ItemError::kind)); their sum is the stage's `failed`.
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
/// assert_eq!(check.failed_by.get("error"), 3);
/// assert_eq!(check.failed_by.get("timeout"), 0);
/// assert_eq!(check.failed_by.iter().collect::<Vec<_>>(), [("error", 3)]);
/// # }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FailureReasons {
    /// The reasons that failed at least one item, flowline's own in [`NAMES`] order, then
    /// the policies' reasons by name.
    ///
    /// [`NAMES`]: FailureReasons::NAMES
    counts: Vec<(&'static str, u64)>,
}

impl FailureReasons {
    /// The reasons of flowline's own errors, in the order [`iter`](FailureReasons::iter)
    /// gives them (before any policy's own reason).
    pub const NAMES: [&'static str; BUILT_IN] = ["error", "timeout", "panic", "circuit_open"];

    /// The place of a built-in reason in [`NAMES`](FailureReasons::NAMES).
    fn index(reason: &str) -> Option<usize> {
        Self::NAMES.iter().position(|&n| n == reason)
    }

    /// The reasons from counts: `built_in` in [`NAMES`](FailureReasons::NAMES) order, and
    /// the others in any order (zero counts left out).
    fn from_counts(
        built_in: [u64; BUILT_IN],
        others: impl IntoIterator<Item = (&'static str, u64)>,
    ) -> Self {
        let mut others: Vec<(&'static str, u64)> = others.into_iter().collect();
        others.sort_unstable_by_key(|&(name, _)| name);
        let counts = Self::NAMES
            .into_iter()
            .zip(built_in)
            .chain(others)
            .filter(|&(_, n)| n > 0)
            .collect();
        FailureReasons { counts }
    }

    /// How many items failed for `reason` (0 for a reason that failed none).
    pub fn get(&self, reason: &str) -> u64 {
        self.counts
            .iter()
            .find(|(name, _)| *name == reason)
            .map_or(0, |&(_, n)| n)
    }

    /// The reasons that failed at least one item, as `(name, count)`.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        self.counts.iter().copied()
    }

    /// All the failures counted (saturating).
    pub fn total(&self) -> u64 {
        self.counts
            .iter()
            .fold(0u64, |a, &(_, n)| a.saturating_add(n))
    }
}

/// How many reasons flowline's own errors give (the length of [`FailureReasons::NAMES`]).
const BUILT_IN: usize = 4;

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
    /// The most calls in flight (`None`: no cap, as for an adaptive stage no one has
    /// capped).
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
        match (self.workers, self.adaptive) {
            (Some(w), true) => write!(f, "adaptive, at most {w}")?,
            (Some(w), false) => write!(f, "workers {w}")?,
            (None, true) => write!(f, "adaptive")?,
            // `workers(usize::MAX)`: no cap, and no adaptive limit either.
            (None, false) => write!(f, "workers unlimited")?,
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
    /// `ok`, `out`, `dropped`, `failed`, `failed_by`, `retried`, `late`,
    /// `transient_retries`, `key_waits`, `unfinished`, `latency`, and for an async stage
    /// `limits`) and `failure_sample`.
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
            call.failed_by.iter().collect::<Vec<_>>(),
            [("error", 4), ("timeout", 4), ("panic", 4)]
        );
        assert_eq!(call.failed_by.get("circuit_open"), 0);
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

    #[tokio::test]
    async fn limits_say_what_caps_the_calls() {
        let limits = |workers, adaptive| LiveLimits {
            workers,
            adaptive,
            worker_changes: 1,
            rate: None,
            rate_changes: 0,
        };
        let shown: Vec<String> = [
            limits(Some(8), false),
            limits(Some(8), true),
            limits(None, true),
            limits(None, false),
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        assert_eq!(
            shown,
            [
                "workers 8 (1 change)",
                "adaptive, at most 8 (1 change)",
                "adaptive (1 change)",
                "workers unlimited (1 change)",
            ]
        );
        let rated = LiveLimits {
            rate: Some((50, Duration::from_secs(1))),
            rate_changes: 2,
            ..limits(Some(4), false)
        };
        assert_eq!(
            rated.to_string(),
            "workers 4 (1 change), rate 50 per 1s (2 changes)"
        );

        // A stage with no cap on its calls is not adaptive for it.
        let report = Pipeline::from_iter(0..3u32)
            .map_async("api", |x| async move { x })
            .workers(usize::MAX)
            .run()
            .await
            .unwrap();
        let l = report.stage("api").unwrap().limits.clone().unwrap();
        assert_eq!((l.workers, l.adaptive), (None, false));
        assert_eq!(l.to_string(), "workers unlimited (0 changes)");
    }

    pub(super) fn stage(name: &str, kind: &'static str, n: u64) -> StageReport {
        StageReport {
            name: name.into(),
            kind,
            received: n,
            passed: n,
            emitted: n,
            dropped: n,
            failed: n,
            failed_by: FailureReasons::from_counts([n, 0, 0, 0], []),
            retried: n,
            late: 0,
            transient_retries: n,
            key_waits: 0,
            unfinished: n,
            latency: None,
            limits: None,
        }
    }

    pub(super) fn report(stages: Vec<StageReport>) -> Report {
        Report {
            stages,
            elapsed: Duration::from_millis(2_500),
            outcome: RunOutcome::Completed,
            failures: 3,
            failure_sample: Vec::new(),
        }
    }
}
