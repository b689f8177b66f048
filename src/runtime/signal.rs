//! `stop_on_signal`: the first signal (Ctrl-C, SIGTERM, a program's own) stops the run
//! gracefully, a second cancels it.
//!
//! Tested with a real process sent SIGINT (`testsuite/tests/ctrl_c.rs`): a signal cannot be
//! raised for one test without reaching every test of the process.

use std::sync::Arc;

use crate::runtime::RunCtx;
use crate::runtime::options::Signal;

/// Waits for the signal while the run lasts (a run-level observer: it ends with the run).
pub(crate) async fn watch(run: Arc<RunCtx>, signal: Signal) {
    for first in [true, false] {
        // The next wait is made right after the first signal, before anything else runs,
        // so that a second signal soon after is not missed.
        let next = signal.next();
        tokio::select! {
            biased;
            _ = run.ended.cancelled() => return,
            heard = next => if let Err(e) = heard {
                tracing::error!(target: "flowline", error = %e, "cannot listen for the stop signal");
                return;
            },
        }
        if first {
            tracing::warn!(target: "flowline", "signal: stopping; no new call starts, calls in flight finish (a second signal cancels)");
            run.stop();
        } else {
            tracing::warn!(target: "flowline", "second signal: cancelling");
            run.cancel.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
    use std::time::Duration;

    type Wait = std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<()>> + Send>>;

    /// A signal that comes `first` after the first wait starts and `second` (if ever) after
    /// the second; counts the waits made.
    fn timer(
        first: Duration,
        second: Option<Duration>,
        waits: Arc<AtomicU32>,
    ) -> impl Fn() -> Wait + Send + Sync + 'static {
        move || {
            let n = waits.fetch_add(1, SeqCst);
            let at = if n == 0 { Some(first) } else { second };
            Box::pin(async move {
                match at {
                    Some(at) => tokio::time::sleep(at).await,
                    None => std::future::pending().await,
                }
                Ok(())
            })
        }
    }

    fn slow_endless() -> crate::AsyncStage<u64, u64, impl crate::StageFn<u64, u64>> {
        Pipeline::from_iter(0..u64::MAX).map_async("work", |x| async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            x
        })
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_signal_stops_and_what_is_in_flight_finishes() {
        let waits = Arc::new(AtomicU32::new(0));
        let t0 = tokio::time::Instant::now();
        let report = slow_endless()
            .workers(2)
            .run()
            .stop_on_signal(timer(Duration::from_millis(100), None, waits.clone()))
            .await
            .unwrap();
        assert_eq!(report.outcome, RunOutcome::Stopped);
        // Nothing is pulled after the signal and no call starts: the calls started at 0,
        // 30, 60 and 90 ms (two at a time) finish, the last at 120 ms; the rest of the
        // first chunk, pulled before, is left unfinished.
        assert_eq!(report.stages[0].emitted, 512);
        assert_eq!(report.delivered(), 8);
        assert_eq!(report.stage("work").unwrap().unfinished, 512 - 8);
        assert_eq!(report.unfinished(), 512 - 8);
        assert_eq!(t0.elapsed(), Duration::from_millis(120));
        assert!(report.is_balanced());
        // A second wait was made at once, for a second signal.
        assert_eq!(waits.load(SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_signal_cancels() {
        let waits = Arc::new(AtomicU32::new(0));
        // Signals at 10 ms and 20 ms: the calls started at 0 ms (30 ms long) are cut.
        let at = Duration::from_millis(10);
        let err = slow_endless()
            .workers(2)
            .run()
            .stop_on_signal(timer(at, Some(at), waits.clone()))
            .await
            .unwrap_err();
        let Error::Cancelled { report } = err else {
            panic!("{err}")
        };
        assert_eq!(report.delivered(), 0);
        assert!(report.is_balanced());
    }

    #[tokio::test(start_paused = true)]
    async fn a_signal_that_cannot_be_listened_for_leaves_the_run_alone() {
        let report = Pipeline::from_iter(0..100u32)
            .run()
            .stop_on_signal(|| async { Err(std::io::Error::other("no signals here")) })
            .await
            .unwrap();
        assert_eq!(report.outcome, RunOutcome::Completed);
        assert_eq!(report.delivered(), 100);
    }
}
