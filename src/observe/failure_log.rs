//! The failure log: failed items summed per stage and interval, one `WARN` line per stage
//! and interval rather than one per item (a job with thousands of failures writes a few
//! lines: `stage fetch: 37 failed (error 30, timeout 7); sample: …`). The failures
//! themselves go to the dead-letter target and the report's sample, unchanged.
//!
//! An interval starts at the first failure after a quiet spell (no failure left unwritten)
//! and ends [`EVERY`] later or when the run ends, whichever comes first: then every stage
//! with failures in it gets its line.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::RunView;
use crate::failure::Failure;

/// How long failures are summed before their line is written.
pub(crate) const EVERY: Duration = Duration::from_secs(5);

/// The longest sample a line quotes (an error or an input can be outside text of any size).
const SAMPLE_MAX: usize = 300;

/// Failures by reason (few reasons: a list is smaller and faster than a map).
#[derive(Default, Clone)]
pub(crate) struct Reasons(Vec<(&'static str, u64)>);

impl Reasons {
    fn add(&mut self, reason: &'static str) {
        match self.0.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, n)) => *n += 1,
            None => self.0.push((reason, 1)),
        }
    }

    fn total(&self) -> u64 {
        self.0.iter().map(|(_, n)| n).sum()
    }

    /// Every reason with its count.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        self.0.iter().copied()
    }
}

struct StageFailures {
    stage: Arc<str>,
    /// Every failure of the run (for metrics).
    total: Reasons,
    /// This interval's, not yet written.
    window: Reasons,
    /// The first failure of this interval.
    sample: Option<String>,
}

/// Failures per stage: the run's totals and the interval not yet logged.
pub(crate) struct FailureLog {
    stages: Mutex<Vec<StageFailures>>,
    /// Told when an interval starts (a failure after a quiet spell).
    started: Notify,
}

impl FailureLog {
    pub(crate) fn new() -> Self {
        FailureLog {
            stages: Mutex::new(Vec::new()),
            started: Notify::new(),
        }
    }

    /// Counts one failure (called for every failed item; the line comes later).
    pub(crate) fn record(&self, f: &Failure) {
        let mut stages = self.stages.lock().unwrap_or_else(|p| p.into_inner());
        let quiet = stages.iter().all(|s| s.sample.is_none());
        let i = match stages.iter().position(|s| s.stage == f.stage) {
            Some(i) => i,
            None => {
                stages.push(StageFailures {
                    stage: f.stage.clone(),
                    total: Reasons::default(),
                    window: Reasons::default(),
                    sample: None,
                });
                stages.len() - 1
            }
        };
        let s = &mut stages[i];
        let why = f.error.kind();
        s.total.add(why);
        s.window.add(why);
        if s.sample.is_none() {
            s.sample = Some(sample(f));
        }
        drop(stages);
        if quiet {
            self.started.notify_one();
        }
    }

    /// Writes one line per stage with failures since the last flush.
    pub(crate) fn flush(&self) {
        let mut stages = self.stages.lock().unwrap_or_else(|p| p.into_inner());
        for s in stages.iter_mut() {
            let Some(sample) = s.sample.take() else {
                continue;
            };
            let window = std::mem::take(&mut s.window);
            let failed = window.total();
            let mut reasons = String::new();
            for (i, (r, n)) in window.iter().enumerate() {
                let sep = if i == 0 { "" } else { ", " };
                let _ = write!(reasons, "{sep}{r} {n}");
            }
            tracing::warn!(
                target: "flowline",
                stage = %s.stage,
                failed,
                reasons = %reasons,
                sample = %sample,
                "stage {}: {failed} failed ({reasons}); sample: {sample}",
                s.stage,
            );
        }
    }

    /// Every stage's failures so far, by reason.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) fn totals(&self) -> Vec<(Arc<str>, Reasons)> {
        self.stages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|s| (s.stage.clone(), s.total.clone()))
            .collect()
    }
}

/// A failure as a line quotes it: the error, the attempts when more than one, the input
/// when kept; at most `SAMPLE_MAX` bytes.
fn sample(f: &Failure) -> String {
    let mut s = f.error.to_string();
    if f.attempts > 1 {
        let _ = write!(s, " (after {} attempts)", f.attempts);
    }
    if let Some(input) = &f.input {
        let _ = write!(s, " (input: {})", input.debug());
    }
    if s.len() > SAMPLE_MAX {
        let mut end = SAMPLE_MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// Writes the lines of the run's failures: an interval's line [`EVERY`] after its first
/// failure, and what is left when the run ends (a run-level observer).
pub(crate) async fn flusher(run: Arc<dyn RunView>) {
    let log = run.failure_log();
    loop {
        tokio::select! {
            biased;
            _ = run.ended().cancelled() => break,
            _ = log.started.notified() => {}
        }
        tokio::select! {
            biased;
            _ = run.ended().cancelled() => break,
            _ = tokio::time::sleep(EVERY) => log.flush(),
        }
    }
    log.flush();
}

#[cfg(test)]
mod tests {
    use crate::observe::capture::{Capture, Captured};
    use crate::prelude::*;
    use std::time::Duration;

    /// The failure lines: (stage, failed, reasons, sample).
    fn lines(c: &Captured) -> Vec<(String, u64, String, String)> {
        c.events
            .iter()
            .filter(|e| e.level == tracing::Level::WARN && e.field("failed").is_some())
            .map(|e| {
                (
                    e.field("stage").unwrap().to_string(),
                    e.field("failed").unwrap().parse().unwrap(),
                    e.field("reasons").unwrap().to_string(),
                    e.field("sample").unwrap().to_string(),
                )
            })
            .collect()
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn failures_make_one_line_per_stage_and_interval() {
        let capture = Capture::default();
        let _guard = tracing::subscriber::set_default(capture.clone());
        // One failure every 300 ms for 12 s: the first interval runs from 0.3 s to 5.3 s
        // (17 failures), the next from 5.4 s to 10.4 s (17), the last from 10.5 s to the
        // end of the run at 12 s (6).
        let report = Pipeline::from_iter(1..=40u32)
            .try_map_async("fetch", |x| async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                Err::<u32, _>(format!("item {x}: 503"))
            })
            .run()
            .await
            .unwrap();
        assert_eq!(report.failures, 40);
        assert_eq!(
            report.failure_sample.len(),
            40,
            "the report keeps its sample"
        );
        let got = lines(&capture.take());
        let counts: Vec<_> = got
            .iter()
            .map(|(s, n, r, _)| (s.as_str(), *n, r.as_str()))
            .collect();
        assert_eq!(
            counts,
            vec![
                ("fetch", 17, "error 17"),
                ("fetch", 17, "error 17"),
                ("fetch", 6, "error 6")
            ]
        );
        let samples: Vec<_> = got.iter().map(|l| l.3.as_str()).collect();
        assert_eq!(samples, vec!["item 1: 503", "item 18: 503", "item 35: 503"]);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn each_stage_gets_its_line_with_its_reasons() {
        let capture = Capture::default();
        let _guard = tracing::subscriber::set_default(capture.clone());
        let report = Pipeline::from_iter(0..10u32)
            .try_map_async("a", |x| async move {
                if x % 5 == 0 {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                }
                if x % 2 == 1 { Err("odd") } else { Ok(x) }
            })
            .timeout(Duration::from_secs(1))
            .keep_input()
            .retry(Retry::constant(Duration::from_millis(10)).max_attempts(2))
            .try_map_async(
                "b",
                |x| async move { Err::<u32, _>(format!("{x} refused")) },
            )
            .run()
            .await
            .unwrap();
        assert_eq!(report.failures, 10);
        let got = lines(&capture.take());
        assert_eq!(
            got,
            vec![
                (
                    "a".to_string(),
                    6,
                    "timeout 2, error 4".to_string(),
                    "timed out after 1s (after 2 attempts) (input: 0)".to_string()
                ),
                (
                    "b".to_string(),
                    4,
                    "error 4".to_string(),
                    "2 refused".to_string()
                ),
            ]
        );
    }

    #[test]
    fn a_long_sample_is_cut_at_a_char_boundary() {
        let f = crate::Failure::new("s", crate::ItemError::user("é".repeat(400)), 1);
        let s = super::sample(&f);
        assert!(s.len() <= super::SAMPLE_MAX + '…'.len_utf8());
        assert!(s.ends_with('…'));
    }
}
