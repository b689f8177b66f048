//! `stop_on_signal`: the first signal (Ctrl-C, SIGTERM, a program's own) stops the run
//! gracefully, a second cancels it.
//!
//! Tested with a real process sent SIGINT (`testsuite/tests/ctrl_c.rs`): a signal cannot be
//! raised for one test without reaching every test of the process.

use std::sync::Arc;
use std::time::Duration;

use crate::runtime::RunCtx;
use crate::runtime::options::{Signal, SignalHook};

/// What a stop signal does to a run, as told to the hook of
/// [`RunOptions::on_signal`](crate::RunOptions::on_signal) before it is done.
///
/// ```
/// use flowline::SignalStep;
/// let cancels = |step: SignalStep| step != SignalStep::Stop;
/// assert!(cancels(SignalStep::GraceOver));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SignalStep {
    /// The first signal: the run stops gracefully (nothing new starts, the calls in flight
    /// finish).
    Stop,
    /// A second signal: the run is cancelled (the calls in flight are dropped).
    Cancel,
    /// The [`signal_grace`](crate::RunOptions::signal_grace) after the first signal ran
    /// out: the run is cancelled.
    GraceOver,
}

/// What a run's signal watch is given: the signal, its hook and its grace.
#[derive(Clone, Debug)]
pub(crate) struct Watch {
    pub(crate) signal: Signal,
    pub(crate) hook: Option<SignalHook>,
    pub(crate) grace: Option<Duration>,
}

impl Watch {
    fn tell(&self, step: SignalStep) {
        if let Some(hook) = &self.hook {
            hook.tell(step);
        }
    }
}

/// Waits for the signal while the run lasts (a run-level observer: it ends with the run).
pub(crate) async fn watch(run: Arc<RunCtx>, watch: Watch) {
    let heard = tokio::select! {
        biased;
        _ = run.ended.cancelled() => return,
        heard = watch.signal.next() => heard,
    };
    if let Err(e) = heard {
        tracing::error!(target: "flowline", error = %e, "cannot listen for the stop signal");
        return;
    }
    watch.tell(SignalStep::Stop);
    tracing::warn!(target: "flowline", "signal: stopping; no new call starts, calls in flight finish (a second signal cancels)");
    run.stop();
    // The next wait is made right after the first signal, before anything else runs, so
    // that a second signal soon after is not missed.
    let next = async {
        if let Err(e) = watch.signal.next().await {
            tracing::error!(target: "flowline", error = %e, "cannot listen for a second signal");
            std::future::pending::<()>().await;
        }
    };
    let grace = async {
        match watch.grace {
            Some(grace) => tokio::time::sleep(grace).await,
            None => std::future::pending().await,
        }
    };
    let step = tokio::select! {
        biased;
        _ = run.ended.cancelled() => return,
        () = next => SignalStep::Cancel,
        () = grace => SignalStep::GraceOver,
    };
    watch.tell(step);
    match step {
        SignalStep::GraceOver => {
            tracing::warn!(target: "flowline", "signal: the grace after the stop is over: cancelling")
        }
        _ => tracing::warn!(target: "flowline", "second signal: cancelling"),
    }
    run.cancel.cancel();
}

#[cfg(test)]
mod tests {
    use crate::SignalStep;
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

    /// A run of one-second calls, two at a time, whose hook records each step and how many
    /// calls were still in flight (not dropped) when it was told.
    async fn recorded(
        options: RunOptions,
    ) -> (Result<Report, Error>, Vec<(SignalStep, u32)>, Duration) {
        let in_flight = Arc::new(AtomicU32::new(0));
        let steps = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (seen, counted) = (steps.clone(), in_flight.clone());
        let options =
            options.on_signal(move |step| seen.lock().unwrap().push((step, counted.load(SeqCst))));
        struct Guard(Arc<AtomicU32>);
        impl Drop for Guard {
            fn drop(&mut self) {
                self.0.fetch_sub(1, SeqCst);
            }
        }
        let t0 = tokio::time::Instant::now();
        let result = Pipeline::from_iter(0..u64::MAX)
            .map_async("work", move |x| {
                let in_flight = in_flight.clone();
                async move {
                    in_flight.fetch_add(1, SeqCst);
                    let _guard = Guard(in_flight);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    x
                }
            })
            .workers(2)
            .run()
            .options(options)
            .await;
        let steps = steps.lock().unwrap().clone();
        (result, steps, t0.elapsed())
    }

    /// [`recorded`] with a first signal at 100 ms, a second `second` after it (if ever),
    /// and `grace`.
    async fn graced(
        grace: Duration,
        second: Option<Duration>,
    ) -> (Result<Report, Error>, Vec<(SignalStep, u32)>, Duration) {
        let waits = Arc::new(AtomicU32::new(0));
        let signal = timer(Duration::from_millis(100), second, waits);
        recorded(RunOptions::new().stop_on_signal(signal).signal_grace(grace)).await
    }

    #[tokio::test(start_paused = true)]
    async fn the_grace_cancels_once_it_is_over_and_the_hook_hears_first() {
        let (result, steps, elapsed) = graced(Duration::from_millis(400), None).await;
        let Err(Error::Cancelled { report }) = result else {
            panic!("{result:?}")
        };
        // Stopped at 100 ms, cancelled at 500 ms: the two calls started at 0 ms (1 s long)
        // were still in flight when the hook was told, each time.
        assert_eq!(steps, [(SignalStep::Stop, 2), (SignalStep::GraceOver, 2)]);
        assert_eq!(elapsed, Duration::from_millis(500));
        assert_eq!(report.delivered(), 0);
        assert!(report.is_balanced());
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_that_ends_within_the_grace_is_not_cancelled() {
        let (result, steps, elapsed) = graced(Duration::from_millis(901), None).await;
        let report = result.unwrap();
        assert_eq!(report.outcome, RunOutcome::Stopped);
        assert_eq!(report.delivered(), 2);
        assert_eq!(steps, [(SignalStep::Stop, 2)]);
        assert_eq!(elapsed, Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_signal_a_zero_grace_and_the_longest_grace() {
        use SignalStep::{Cancel, GraceOver, Stop};
        let ms = Duration::from_millis;
        // (what, grace, second signal after the first, steps told, cancelled, ended at)
        let rows = [
            (
                "a second signal within the grace cancels at once",
                Duration::from_secs(10),
                Some(ms(100)),
                vec![(Stop, 2), (Cancel, 2)],
                true,
                ms(200),
            ),
            (
                "a zero grace cancels right after the stop",
                Duration::ZERO,
                None,
                vec![(Stop, 2), (GraceOver, 2)],
                true,
                ms(100),
            ),
            (
                "the longest grace is no grace at all",
                Duration::MAX,
                None,
                vec![(Stop, 2)],
                false,
                ms(1000),
            ),
        ];
        for (what, grace, second, want, cancelled, at) in rows {
            let (result, steps, elapsed) = graced(grace, second).await;
            assert_eq!(
                matches!(result, Err(Error::Cancelled { .. })),
                cancelled,
                "{what}: {result:?}"
            );
            assert_eq!(steps, want, "{what}");
            assert_eq!(elapsed, at, "{what}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_grace_holds_when_a_second_signal_cannot_be_listened_for() {
        let waits = Arc::new(AtomicU32::new(0));
        let counted = waits.clone();
        let options = RunOptions::new()
            .stop_on_signal(move || {
                let first = counted.fetch_add(1, SeqCst) == 0;
                async move {
                    if first {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Ok(())
                    } else {
                        Err(std::io::Error::other("no second signal"))
                    }
                }
            })
            .signal_grace(Duration::from_millis(300));
        let (result, steps, elapsed) = recorded(options).await;
        assert!(matches!(result, Err(Error::Cancelled { .. })), "{result:?}");
        assert_eq!(steps, [(SignalStep::Stop, 2), (SignalStep::GraceOver, 2)]);
        assert_eq!(elapsed, Duration::from_millis(400));
        assert_eq!(waits.load(SeqCst), 2);
    }
}
