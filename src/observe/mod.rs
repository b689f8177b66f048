//! Run-level observers: progress, heartbeat, stall watchdog, the failure log, metrics.
//!
//! Each is a task of the run that looks at the stages' counters on a schedule (never per
//! item) and ends when the run ends, after one last look at the final counters. An observer
//! sees its run through [`RunView`] only, so this module sits below the runtime: the run
//! implements the view and starts the observers every run has; a plan adds the others
//! (`Pipeline::observed`).

#[cfg(test)]
pub(crate) mod capture;
pub(crate) mod failure_log;
pub(crate) mod heartbeat;
#[cfg(feature = "metrics")]
pub(crate) mod metrics;
pub(crate) mod progress;
pub(crate) mod stall;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::report::{Report, RunOutcome, StageReport};

/// What a run-level observer sees of its run, and the little it may do to it: the run
/// implements it, and an observer knows nothing more of the run's machinery.
pub(crate) trait RunView: Send + Sync + 'static {
    /// Fires once every stage task has ended: an observer takes one last look and ends.
    fn ended(&self) -> &CancellationToken;

    /// Every stage's counts while the run goes on.
    fn snapshot_stages(&self) -> Vec<StageReport>;

    /// Items failed so far, in every stage.
    fn failures(&self) -> u64;

    /// When each stage's oldest call in flight started, in [`snapshot_stages`] order; only
    /// after [`watch_calls`](RunView::watch_calls).
    ///
    /// [`snapshot_stages`]: RunView::snapshot_stages
    fn oldest_calls(&self) -> Vec<Option<Instant>>;

    /// Asks the async stages to keep the start of their oldest call (it costs them a little).
    fn watch_calls(&self);

    /// The sources are paused (nothing is expected to complete).
    fn is_paused(&self) -> bool;

    /// Cancels the run.
    fn cancel(&self);

    /// The run's failures summed per stage and interval.
    fn failure_log(&self) -> &failure_log::FailureLog;

    /// The run's name (its metrics' `pipeline`).
    #[cfg(feature = "metrics")]
    fn name(&self) -> &Arc<str>;

    /// Every stage's live counters, in the order the stages were built.
    #[cfg(feature = "metrics")]
    fn stats(&self) -> Vec<Arc<crate::report::StageStats>>;

    /// The limits of each async stage whose limits may change while running, by stage.
    #[cfg(feature = "metrics")]
    fn limits(&self) -> Vec<(Arc<str>, crate::report::LiveLimits)>;

    /// The admission policies of each async stage, by stage.
    #[cfg(feature = "metrics")]
    fn policies(&self) -> Vec<crate::policy::StagePolicies>;
}

/// A run-level observer's task: it ends soon after [`RunView::ended`] fires.
pub(crate) type Observer = Pin<Box<dyn Future<Output = ()> + Send>>;

/// How an observer starts: given its run, once the plan is built, its task.
pub(crate) type Start = Box<dyn FnOnce(Arc<dyn RunView>) -> Observer + Send>;

/// An observer's interval must be more than zero.
fn require_positive(observer: &str, every: Duration) -> Result<(), Error> {
    if every.is_zero() {
        return Err(Error::config(
            observer,
            "every",
            every,
            "must be more than zero",
        ));
    }
    Ok(())
}

/// The counters of every stage right now, as a report of a running pipeline.
pub(crate) fn snapshot(run: &dyn RunView, started: Instant) -> Report {
    Report {
        stages: run.snapshot_stages(),
        elapsed: started.elapsed(),
        outcome: RunOutcome::Running,
        failures: run.failures(),
        failure_sample: Vec::new(),
    }
}
