//! The settings of one run ([`RunOptions`]), whatever its shape: a pipeline's [`Run`] and
//! a [`Graph`](crate::Graph) hold one each and set it through the same names.
//!
//! [`Run`]: crate::Run

use std::time::Duration;

use crate::dead_letter::DeadLetter;
use crate::error::Error;
use crate::runtime::signal::SignalStep;

/// What a run does when an item fails.
///
/// ```
/// use flowline::prelude::*;
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let err = Pipeline::from_iter(0..100u32)
///     .try_map_async("check", |x| async move { if x == 7 { Err("seven") } else { Ok(x) } })
///     .run()
///     .error_policy(ErrorPolicy::Stop)
///     .await
///     .unwrap_err();
/// match err {
///     Error::ItemFailed { failure, .. } => assert_eq!(&*failure.stage, "check"),
///     other => panic!("{other}"),
/// }
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ErrorPolicy {
    /// Send the failed item to the dead letters and go on (the default).
    #[default]
    Continue,
    /// Abort the run on the first failure and return it as [`Error::ItemFailed`].
    Stop,
}

/// The settings of one run, whatever its shape: set on a terminal
/// (`pipeline.run().deadline(..)`) or on a graph's run, never at a point in the chain.
///
/// ```
/// use flowline::prelude::*;
/// use std::time::Duration;
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let options = RunOptions::new()
///     .deadline(Duration::from_secs(60))
///     .error_policy(ErrorPolicy::Stop);
/// let report = Pipeline::from_iter(0..10).run().options(options.clone()).await.unwrap();
/// assert_eq!(report.delivered(), 10);
/// # }
/// ```
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct RunOptions {
    pub(crate) deadline: Option<Duration>,
    pub(crate) policy: ErrorPolicy,
    pub(crate) dead_letter: DeadLetter,
    /// The run's name (`None`: [`RunOptions::DEFAULT_NAME`]).
    pub(crate) name: Option<std::sync::Arc<str>>,
    /// A token from outside whose cancellation cancels the run.
    pub(crate) cancel: Option<tokio_util::sync::CancellationToken>,
    /// A signal that stops the run (once) and cancels it (twice).
    pub(crate) signal: Option<Signal>,
    /// Told of each step a signal takes (`RunOptions::on_signal`).
    pub(crate) signal_hook: Option<SignalHook>,
    /// After the first signal, how long until the run is cancelled as by a second.
    pub(crate) signal_grace: Option<Duration>,
    /// How long the run's own parts ride out a server that is down.
    pub(crate) outage: crate::Outage,
}

/// The listener of [`RunOptions::stop_on_signal`]: makes one wait for the signal each time
/// it is called.
#[derive(Clone)]
pub(crate) struct Signal(
    #[allow(clippy::type_complexity)]
    std::sync::Arc<
        dyn Fn() -> std::pin::Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>>
            + Send
            + Sync,
    >,
);

impl Signal {
    /// Waits for the next signal.
    pub(crate) fn next(
        &self,
    ) -> std::pin::Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>> {
        (self.0)()
    }
}

/// The hook of [`RunOptions::on_signal`].
#[derive(Clone)]
pub(crate) struct SignalHook(std::sync::Arc<dyn Fn(SignalStep) + Send + Sync>);

impl SignalHook {
    /// Tells the hook of `step`.
    pub(crate) fn tell(&self, step: SignalStep) {
        (self.0)(step)
    }
}

impl std::fmt::Debug for SignalHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SignalHook")
    }
}

impl std::fmt::Debug for Signal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signal")
    }
}

impl RunOptions {
    /// The name of a run that was given none: the `pipeline` label of its metrics and the
    /// `pipeline` field of its span.
    pub const DEFAULT_NAME: &'static str = "flowline";

    /// The defaults: no deadline, [`ErrorPolicy::Continue`], dead letters kept in the report.
    ///
    /// ```
    /// let o = flowline::RunOptions::new();
    /// # let _ = o;
    /// ```
    pub fn new() -> Self {
        RunOptions::default()
    }

    /// Ends the whole run if it has not finished within `limit` (on tokio's clock): the run
    /// returns [`Error::DeadlineExceeded`] with the report. Must be more than zero.
    ///
    /// ```
    /// use std::time::Duration;
    /// let o = flowline::RunOptions::new().deadline(Duration::from_secs(30));
    /// # let _ = o;
    /// ```
    pub fn deadline(mut self, limit: Duration) -> Self {
        self.deadline = Some(limit);
        self
    }

    /// How long the run's own parts (an idempotency store, a cursor's checkpoint store and
    /// its fetches of transient errors) ride out a server that is down before the run ends
    /// with [`Error::Outage`](crate::Error::Outage) (default: [`Outage::default`](crate::Outage),
    /// 5 minutes). While they wait, the job pauses; nothing fails for it.
    ///
    /// ```
    /// use flowline::{Outage, RunOptions};
    /// let o = RunOptions::new().outage(Outage::keep_trying_for(std::time::Duration::from_secs(60)));
    /// # let _ = o;
    /// ```
    pub fn outage(mut self, policy: crate::Outage) -> Self {
        self.outage = policy;
        self
    }

    /// What to do when an item fails (default: [`ErrorPolicy::Continue`]).
    ///
    /// ```
    /// use flowline::{ErrorPolicy, RunOptions};
    /// let o = RunOptions::new().error_policy(ErrorPolicy::Stop);
    /// # let _ = o;
    /// ```
    pub fn error_policy(mut self, policy: ErrorPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Where failed items go (default: counted and sampled in the report, and logged).
    ///
    /// ```
    /// use flowline::{DeadLetter, RunOptions};
    /// let o = RunOptions::new().dead_letter(DeadLetter::callback(|f| eprintln!("{f}")));
    /// # let _ = o;
    /// ```
    pub fn dead_letter(mut self, target: DeadLetter) -> Self {
        self.dead_letter = target;
        self
    }

    /// Names the run (default [`RunOptions::DEFAULT_NAME`]): the `pipeline` field of the
    /// run's `tracing` span and the `pipeline` label of its metrics, so that several
    /// pipelines of one process can be told apart. Must not be empty.
    ///
    /// ```
    /// let o = flowline::RunOptions::new().name("orders");
    /// # let _ = o;
    /// ```
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(std::sync::Arc::from(name.into()));
        self
    }

    /// Cancels the run when `token` is cancelled, as [`Handle::cancel`](crate::Handle::cancel)
    /// would: the items in flight are counted unfinished and the run returns
    /// [`Error::Cancelled`] with its report. The run's own token
    /// ([`Handle::cancellation_token`](crate::Handle::cancellation_token)) is a child of
    /// `token`: cancelling the run does not cancel `token`.
    ///
    /// ```
    /// use flowline::CancellationToken;
    /// let shutdown = CancellationToken::new();
    /// let o = flowline::RunOptions::new().cancel_on(shutdown.clone());
    /// # let _ = o;
    /// ```
    pub fn cancel_on(mut self, token: tokio_util::sync::CancellationToken) -> Self {
        self.cancel = Some(token);
        self
    }

    /// Stops the run when a signal comes: `signal()` waits for it. The first signal stops
    /// the run gracefully, as [`Handle::stop`](crate::Handle::stop) (nothing more is pulled,
    /// no new call starts, the calls in flight finish, the items pulled and not started end
    /// unfinished, and the run returns its report with
    /// [`RunOutcome::Stopped`](crate::RunOutcome)); `signal` is called again at once, and a
    /// second signal cancels the run, as [`Handle::cancel`](crate::Handle::cancel).
    ///
    /// Ctrl-C is `.stop_on_signal(tokio::signal::ctrl_c)` (tokio's `signal` feature);
    /// SIGTERM on unix is `.stop_on_signal(|| async {
    /// signal(SignalKind::terminate())?.recv().await; Ok(()) })`. An error from `signal`
    /// means it cannot be listened for: it is logged and the run goes on. While tokio
    /// listens for Ctrl-C, Ctrl-C no longer ends the process, for the rest of the process.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use std::sync::Arc;
    /// use tokio::sync::Notify;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// // A signal of the program's own: raised after the first 1,000 items.
    /// let signal = Arc::new(Notify::new());
    /// let raise = signal.clone();
    /// let options = RunOptions::new().stop_on_signal(move || {
    ///     let signal = signal.clone();
    ///     async move {
    ///         signal.notified().await;
    ///         Ok(())
    ///     }
    /// });
    /// let report = Pipeline::from_iter(0..u64::MAX)
    ///     .inspect(move |&x| if x == 1_000 { raise.notify_one() })
    ///     .run()
    ///     .options(options)
    ///     .await
    ///     .unwrap();
    /// assert_eq!(report.outcome, RunOutcome::Stopped);
    /// # }
    /// ```
    pub fn stop_on_signal<F, Fut>(mut self, signal: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::io::Result<()>> + Send + 'static,
    {
        self.signal = Some(Signal(std::sync::Arc::new(move || Box::pin(signal()))));
        self
    }

    /// Calls `hook` each time a signal of [`stop_on_signal`](RunOptions::stop_on_signal)
    /// acts: with [`SignalStep::Stop`](crate::SignalStep::Stop) for the first,
    /// [`SignalStep::Cancel`](crate::SignalStep::Cancel) for a second and
    /// [`SignalStep::GraceOver`](crate::SignalStep::GraceOver) when the
    /// [`signal_grace`](RunOptions::signal_grace) ran out. The hook runs before the run is
    /// stopped or cancelled, so that what the calls in flight started outside the process
    /// (child processes, remote jobs) can be ended first, and a message can count what is
    /// still running. It runs on the run's task: it must not block.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use flowline::SignalStep;
    /// use std::sync::{Arc, Mutex};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let steps = Arc::new(Mutex::new(Vec::new()));
    /// let seen = steps.clone();
    /// let options = RunOptions::new()
    ///     // A signal of the program's own, at once.
    ///     .stop_on_signal(|| async { Ok(()) })
    ///     .on_signal(move |step| seen.lock().unwrap().push(step));
    /// let _ = Pipeline::from_iter(0..u64::MAX).run().options(options).await;
    /// // Two signals came: the run was stopped, then cancelled.
    /// assert_eq!(*steps.lock().unwrap(), [SignalStep::Stop, SignalStep::Cancel]);
    /// # }
    /// ```
    pub fn on_signal(mut self, hook: impl Fn(SignalStep) + Send + Sync + 'static) -> Self {
        self.signal_hook = Some(SignalHook(std::sync::Arc::new(hook)));
        self
    }

    /// After the first signal of [`stop_on_signal`](RunOptions::stop_on_signal), cancels
    /// the run if it has not ended within `grace` (on tokio's clock), as a second signal
    /// would: the calls still in flight are given that long to finish. Zero cancels it
    /// right after the stop. Without it, only a second signal cancels.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use std::time::Duration;
    /// use std::sync::atomic::{AtomicBool, Ordering};
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// // One signal, after 1 s.
    /// let heard = AtomicBool::new(false);
    /// let options = RunOptions::new()
    ///     .stop_on_signal(move || {
    ///         let first = !heard.swap(true, Ordering::Relaxed);
    ///         async move {
    ///             if !first {
    ///                 std::future::pending::<()>().await;
    ///             }
    ///             tokio::time::sleep(Duration::from_secs(1)).await;
    ///             Ok(())
    ///         }
    ///     })
    ///     .signal_grace(Duration::from_secs(5));
    /// // A call of a minute: stopped at 1 s, cancelled at 6 s.
    /// let err = Pipeline::from_iter(0..u64::MAX)
    ///     .map_async("slow", |x| async move {
    ///         tokio::time::sleep(Duration::from_secs(60)).await;
    ///         x
    ///     })
    ///     .run()
    ///     .options(options)
    ///     .await
    ///     .unwrap_err();
    /// let Error::Cancelled { report } = err else { panic!("{err}") };
    /// assert_eq!(report.elapsed, Duration::from_secs(6));
    /// # }
    /// ```
    pub fn signal_grace(mut self, grace: Duration) -> Self {
        self.signal_grace = Some(grace);
        self
    }

    /// The run's name.
    pub(crate) fn run_name(&self) -> std::sync::Arc<str> {
        self.name
            .clone()
            .unwrap_or_else(|| std::sync::Arc::from(Self::DEFAULT_NAME))
    }

    /// The problems of these options, in `errors`.
    pub(crate) fn check(&self, errors: &mut Vec<Error>) {
        if self.name.as_deref() == Some("") {
            errors.push(Error::config("run", "name", "", "must not be empty"));
        }
        if self.deadline.is_some_and(|d| d.is_zero()) {
            errors.push(Error::config(
                "run",
                "deadline",
                Duration::ZERO,
                "must be more than zero",
            ));
        }
    }
}
