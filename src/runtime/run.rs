//! Running a plan: build it into tasks, drive the sink, end every task, write the report.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::dead_letter::DeadLetters;
use crate::error::Error;
use crate::plan::{Pipeline, Settings};
use crate::report::{Report, RunOutcome, StageStats};
use futures_util::FutureExt as _;

use crate::runtime::sink::Sink;
use crate::runtime::{Build, Observer, RunCtx, next_chunk};

/// Checks the plan and opens what the run needs, before anything runs.
pub(crate) fn prepare<T>(p: &mut Pipeline<T>) -> Result<Arc<RunCtx>, Error> {
    prepare_settings(&mut p.settings)
}

/// [`prepare`] for the run-wide settings of a plan (one pipeline, or a graph's combined ones).
pub(crate) fn prepare_settings(settings: &mut Settings) -> Result<Arc<RunCtx>, Error> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(Error::NoRuntime);
    }
    if !settings.errors.is_empty() {
        return Err(settings.errors.remove(0));
    }
    let dead = DeadLetters::open(&settings.dead_letter)?;
    Ok(Arc::new(RunCtx::new(settings.policy, dead)))
}

/// Runs `p` into `sink` in the calling task.
pub(crate) async fn execute<T: Send + 'static, K: Sink<T>>(
    mut p: Pipeline<T>,
    sink: K,
    sink_name: &'static str,
) -> Result<(Report, K::Output), Error> {
    let run = prepare(&mut p)?;
    execute_in(run, p, sink, sink_name).await
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    Drained,
    Cancelled,
    Deadline,
}

pub(crate) async fn execute_in<T: Send + 'static, K: Sink<T>>(
    run: Arc<RunCtx>,
    p: Pipeline<T>,
    mut sink: K,
    sink_name: &'static str,
) -> Result<(Report, K::Output), Error> {
    let started = tokio::time::Instant::now();
    let Pipeline { build, settings } = p;
    let mut b = Build::new(run.clone());
    let mut up = build(&mut b);
    let stats = b.stage(sink_name, "sink");
    let (checked, spawned) = Spawned::take(b);
    if let Err(e) = checked {
        // The plan is unsound (e.g. a branch left without a sink): end what was built.
        drop(up);
        spawned.abandon(&run).await;
        return Err(e);
    }

    let main = async {
        let drive = async {
            while let Some(chunk) = next_chunk(&mut up).await {
                StageStats::add(&stats.received, chunk.len());
                sink.consume(chunk, &stats, &run).await;
                tokio::task::consume_budget().await;
            }
        };
        let end = drive_until(&run, settings.deadline, drive).await;
        if end != End::Drained {
            run.cancel.cancel();
            StageStats::add(&stats.received, up.discard());
        }
        drop(up);
        (end, None)
    };
    let (end, internal) = spawned.drive(&run, main).await;
    conclude(&run, end, internal, started, settings.deadline)
        .await
        .map(|report| (report, sink.finish()))
}

/// The tasks a build spawned (the run's stages) and its observers (which end after them).
pub(crate) struct Spawned {
    tasks: tokio::task::JoinSet<()>,
    observers: Vec<Observer>,
}

impl Spawned {
    /// Takes the tasks out of a finished build, with the result of the plan's checks.
    pub(crate) fn take(mut b: Build) -> (Result<(), Error>, Spawned) {
        let checked = b.run_checks();
        let spawned = Spawned {
            tasks: std::mem::take(&mut b.tasks),
            observers: std::mem::take(&mut b.observers),
        };
        (checked, spawned)
    }

    /// Ends a plan that failed its checks before it ran: cancels and joins every task (the
    /// observers were never started).
    pub(crate) async fn abandon(mut self, run: &RunCtx) {
        run.cancel.cancel();
        while self.tasks.join_next().await.is_some() {}
        run.ended.cancel();
    }

    /// Drives `main` (the run, until it ends; it returns how, and a panic it saw), then
    /// joins every task, while the observers run beside it on this task; they take a last
    /// look once every task has ended. Returns how the run ended and the first panic seen.
    pub(crate) async fn drive(
        self,
        run: &RunCtx,
        main: impl std::future::Future<Output = (End, Option<String>)>,
    ) -> (End, Option<String>) {
        let Spawned {
            mut tasks,
            observers,
        } = self;
        let ending = async {
            let (end, mut internal) = main.await;
            // Every task of the run ends before the run returns: no task outlives its run.
            while let Some(joined) = tasks.join_next().await {
                if let Err(e) = joined {
                    if e.is_panic() {
                        internal = Some(crate::error::panic_message(&*e.into_panic()));
                    }
                }
            }
            run.ended.cancel();
            (end, internal)
        };
        let observing = futures_util::future::join_all(
            observers
                .into_iter()
                .map(|o| std::panic::AssertUnwindSafe(o).catch_unwind()),
        );
        let ((end, internal), observed) = tokio::join!(ending, observing);
        let observer_panic = observed
            .into_iter()
            .find_map(Result::err)
            .map(|p| crate::error::panic_message(&*p));
        (end, internal.or(observer_panic))
    }
}

/// Drives `drive` until it ends, the run is cancelled, or the deadline passes.
pub(crate) async fn drive_until(
    run: &RunCtx,
    deadline: Option<std::time::Duration>,
    drive: impl std::future::Future<Output = ()>,
) -> End {
    let timer = async {
        match deadline {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        biased;
        _ = run.cancel.cancelled() => End::Cancelled,
        _ = timer => End::Deadline,
        _ = drive => End::Drained,
    }
}

/// Ends a run that was driven until `end` and whose tasks have ended: closes the dead
/// letters and writes the report (or the error that carries it). `internal` is a panic already seen.
pub(crate) async fn conclude(
    run: &RunCtx,
    end: End,
    internal: Option<String>,
    started: tokio::time::Instant,
    deadline: Option<std::time::Duration>,
) -> Result<Report, Error> {
    run.dead.close().await;

    let first_failure = run
        .first_failure
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    let source_error = run
        .source_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    let outcome = match end {
        End::Cancelled => RunOutcome::Cancelled,
        End::Deadline => RunOutcome::DeadlineExceeded,
        End::Drained if source_error.is_some() => RunOutcome::SourceFailed,
        End::Drained if run.stop_requested.load(Ordering::Relaxed) => RunOutcome::Stopped,
        End::Drained => RunOutcome::Completed,
    };
    let report = Box::new(Report {
        stages: run.snapshot_stages(),
        elapsed: started.elapsed(),
        outcome,
        failures: run.dead.count(),
        failure_sample: run.dead.sample(),
    });
    if let Some(msg) = internal {
        return Err(Error::Internal(msg));
    }
    if let Some(failure) = first_failure {
        return Err(Error::ItemFailed { failure, report });
    }
    match end {
        End::Cancelled => Err(Error::Cancelled { report }),
        End::Deadline => Err(Error::DeadlineExceeded {
            deadline: deadline.unwrap_or_default(),
            report,
        }),
        End::Drained => match source_error {
            Some((stage, error)) => Err(Error::Source {
                stage,
                error,
                report,
            }),
            None => Ok(*report),
        },
    }
}
