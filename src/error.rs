//! What a run returns instead of a report: [`Error`], and the [`ConfigProblem`]s of a plan.

use std::fmt;
use std::time::Duration;

use crate::failure::{Failure, ItemError};
use crate::report::Report;

/// What a run can end with instead of a [`Report`].
///
/// Every variant that ends a started run carries the report of what happened up to that
/// point, so no count is lost even when the run did not finish.
///
/// ```
/// use flowline::prelude::*;
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let err = Pipeline::from_iter(0..10u32)
///     .map_async("double", |x| async move { x * 2 })
///     .workers(0)
///     .run()
///     .await
///     .unwrap_err();
/// assert!(err.to_string().contains("workers = 0"));
/// # }
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// Options with values they cannot take, every one of them at once. Raised before
    /// anything runs.
    Config {
        /// Each option that was rejected, in the order the plan was written.
        problems: Vec<ConfigProblem>,
    },
    /// `ErrorPolicy::Stop`: the first failed item aborted the run.
    ItemFailed {
        /// The failure that stopped the run.
        failure: Failure,
        /// What happened up to that point.
        report: Box<Report>,
    },
    /// The source itself failed (its generator returned an error or panicked).
    Source {
        /// The source's name.
        stage: String,
        /// Why it failed.
        error: ItemError,
        /// What happened up to that point; the items already pulled were finished.
        report: Box<Report>,
    },
    /// A stage could make no more calls: its [`tower::Service`](https://docs.rs/tower)
    /// failed in `poll_ready`, which means it will never take a call again. The sources
    /// stopped; the items already pulled failed at that stage with `error` (each one in the
    /// dead letters), and the items before the stage finished.
    Stage {
        /// The stage's name.
        stage: String,
        /// The service's error.
        error: ItemError,
        /// What happened up to that point.
        report: Box<Report>,
    },
    /// A server the run needs (a store, a stream, a database) stayed unreachable longer
    /// than the run's [`Outage`](crate::Outage) policy allows, or answered with a
    /// [`Permanent`](crate::Permanent) error. The run was cancelled: the items it held are
    /// unfinished, not failed, and no ack or checkpoint passed them, so a rerun does them.
    Outage {
        /// Which server, for how long, and its last error.
        error: crate::OutageError,
        /// What happened up to that point.
        report: Box<Report>,
    },
    /// The run was cancelled with [`Handle::cancel`](crate::Handle::cancel).
    Cancelled {
        /// What happened up to that point.
        report: Box<Report>,
    },
    /// The run's `deadline` passed before it finished.
    DeadlineExceeded {
        /// The deadline that was set.
        deadline: Duration,
        /// What happened up to that point.
        report: Box<Report>,
    },
    /// Writing dead letters failed (e.g. the JSONL file could not be opened).
    DeadLetter(String),
    /// flowline needs a tokio runtime and none was running.
    NoRuntime,
    /// An internal task of flowline failed; this is a bug in flowline.
    Internal(String),
}

// Written out rather than derived: the crate's two error types do not justify a proc-macro
// crate (and a second copy of `syn`) in every user's first build.
impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Config { problems } => {
                write!(
                    f,
                    "invalid configuration: {}",
                    ConfigProblem::list(problems)
                )
            }
            Error::ItemFailed { failure, .. } => {
                write!(f, "run stopped on the first failure: {failure}")
            }
            Error::Source { stage, error, .. } => write!(f, "source `{stage}` failed: {error}"),
            Error::Stage { stage, error, .. } => write!(
                f,
                "stage `{stage}` failed: its service cannot take calls: {error}"
            ),
            Error::Outage { error, .. } => write!(f, "run ended by an outage: {error}"),
            Error::Cancelled { .. } => f.write_str("run cancelled"),
            Error::DeadlineExceeded { deadline, .. } => {
                write!(f, "deadline of {deadline:?} exceeded")
            }
            Error::DeadLetter(e) => write!(f, "dead-letter target failed: {e}"),
            Error::NoRuntime => f.write_str(
                "no tokio runtime: flowline runs on tokio, call it from within a runtime",
            ),
            Error::Internal(e) => write!(f, "internal error (a bug in flowline): {e}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::ItemFailed { failure, .. } => Some(failure),
            Error::Source { error, .. } | Error::Stage { error, .. } => Some(error),
            Error::Outage { error, .. } => Some(error),
            _ => None,
        }
    }
}

impl Error {
    /// The report of the run, if the run started.
    ///
    /// ```
    /// # use flowline::Error;
    /// assert!(Error::NoRuntime.report().is_none());
    /// ```
    pub fn report(&self) -> Option<&Report> {
        match self {
            Error::ItemFailed { report, .. }
            | Error::Source { report, .. }
            | Error::Stage { report, .. }
            | Error::Cancelled { report }
            | Error::Outage { report, .. }
            | Error::DeadlineExceeded { report, .. } => Some(report),
            _ => None,
        }
    }

    pub(crate) fn config(
        stage: &str,
        option: &'static str,
        value: impl fmt::Debug,
        reason: &'static str,
    ) -> Self {
        Error::config_text(stage, option, format!("{value:?}"), reason)
    }

    /// [`Error::config`] with the value already written out.
    pub(crate) fn config_text(
        stage: &str,
        option: &'static str,
        value: String,
        reason: &'static str,
    ) -> Self {
        Error::Config {
            problems: vec![ConfigProblem {
                stage: stage.to_string(),
                option,
                value,
                reason,
            }],
        }
    }

    /// The problems of a plan as one error: every configuration problem joined into one
    /// [`Error::Config`] (in order); any other error found while planning comes first.
    pub(crate) fn all_config(errors: Vec<Error>) -> Option<Error> {
        let mut problems = Vec::new();
        for e in errors {
            match e {
                Error::Config { problems: p } => problems.extend(p),
                other => return Some(other),
            }
        }
        (!problems.is_empty()).then_some(Error::Config { problems })
    }
}

/// One option with a value it cannot take: which stage, which option, the value, and what
/// the option accepts.
///
/// ```
/// use flowline::prelude::*;
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let err = Pipeline::from_iter(0..10u32)
///     .map_async("fetch", |x| async move { x })
///     .workers(0)
///     .buffer(0)
///     .run()
///     .await
///     .unwrap_err();
/// let Error::Config { problems } = err else { panic!("{err}") };
/// assert_eq!(problems.len(), 2);                 // every problem, at once
/// assert_eq!((problems[0].stage.as_str(), problems[0].option), ("fetch", "workers"));
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The stage (or `run`, `graph`) the option belongs to.
    pub stage: String,
    /// The option's name.
    pub option: &'static str,
    /// The rejected value, as written (`Debug`).
    pub value: String,
    /// What the option accepts.
    pub reason: &'static str,
}

impl ConfigProblem {
    fn list(problems: &[ConfigProblem]) -> String {
        problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    }
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "stage `{}`: {} = {}: {}",
            self.stage, self.option, self.value, self.reason
        )
    }
}
