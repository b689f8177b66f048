//! Run-level observers: progress, heartbeat, stall watchdog, the failure log, a signal
//! (Ctrl-C),
//! metrics.
//!
//! Each is a task of the run that looks at the stages' counters on a schedule (never per
//! item) and ends when the run ends, after one last look at the final counters.

#[cfg(test)]
pub(crate) mod capture;
pub(crate) mod failure_log;
pub(crate) mod heartbeat;
#[cfg(feature = "metrics")]
pub(crate) mod metrics;
pub(crate) mod progress;
pub(crate) mod stall;

use std::future::Future;
use std::sync::Arc;

use tokio::time::Instant;

use crate::plan::Pipeline;
use crate::report::{Report, RunOutcome};
use crate::runtime::{RunCtx, Upstream};

/// Adds an observer to the run: `start` gets the run and the instant the run was built,
/// and returns the observer's task.
pub(crate) fn observe<T, Fut>(
    p: Pipeline<T>,
    start: impl FnOnce(Arc<RunCtx>, Instant) -> Fut + Send + 'static,
) -> Pipeline<T>
where
    T: Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    p.then(move |b, up: Upstream<T>| {
        let task = start(b.run.clone(), Instant::now());
        b.observe(task);
        up
    })
}

/// The counters of every stage right now, as a report of a running pipeline.
pub(crate) fn snapshot(run: &RunCtx, started: Instant) -> Report {
    Report {
        stages: run.snapshot_stages(),
        elapsed: started.elapsed(),
        outcome: RunOutcome::Running,
        failures: run.dead.count(),
        failure_sample: Vec::new(),
    }
}
