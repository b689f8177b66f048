//! Errors: what a run returns, and why an item failed.

use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::report::Report;

/// A boxed error from user code. Anything that is `Into<BoxError>` — a `String`, a `&str`,
/// any `std::error::Error`, an `anyhow::Error` — can be returned by a fallible stage.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why one item failed at a stage.
///
/// ```
/// use flowline::ItemError;
/// let e = ItemError::Timeout(std::time::Duration::from_secs(2));
/// assert_eq!(e.to_string(), "timed out after 2s");
/// ```
///
/// For [`ItemError::User`], [`source`](std::error::Error::source) is the user's error itself,
/// so it can be downcast to the type the stage returned:
///
/// ```
/// use std::error::Error as _;
/// # #[derive(Debug)] struct NotFound;
/// # impl std::fmt::Display for NotFound {
/// #     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str("not found") }
/// # }
/// # impl std::error::Error for NotFound {}
/// let e = flowline::ItemError::user(NotFound);
/// assert!(e.source().unwrap().downcast_ref::<NotFound>().is_some());
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ItemError {
    /// The stage's function returned an error.
    User(Arc<dyn std::error::Error + Send + Sync + 'static>),
    /// The stage's `timeout` elapsed before the call finished.
    Timeout(Duration),
    /// User code panicked while handling the item.
    Panic(String),
    /// The stage's circuit breaker was open and set to fail fast
    /// ([`OnOpen::FailFast`](crate::OnOpen::FailFast)): the call was not made.
    CircuitOpen,
    /// A policy of the stage refused the item: the call was not made. `reason` names the
    /// policy that refused (`deadline`, `bulkhead`, ...); it is the word the report, the
    /// dead letters, the failure log and the metrics' `reason` label give for the failure.
    /// Made with [`ItemError::refused`].
    Refused {
        /// The refusing policy's name for the failure: a short `snake_case` word.
        reason: &'static str,
        /// What the policy says about it (the error's text).
        message: Arc<str>,
    },
}

impl fmt::Display for ItemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ItemError::User(e) => write!(f, "{e}"),
            ItemError::Timeout(d) => write!(f, "timed out after {d:?}"),
            ItemError::Panic(msg) => write!(f, "panicked: {msg}"),
            ItemError::CircuitOpen => f.write_str("circuit breaker open: call not made"),
            ItemError::Refused { message, .. } => f.write_str(message),
        }
    }
}

// Written by hand, not derived: a derived `#[source]` on the `Arc` would return the `Arc`
// itself, which cannot be downcast to the user's error type.
impl std::error::Error for ItemError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ItemError::User(e) => Some(&**e),
            _ => None,
        }
    }
}

impl ItemError {
    /// Wraps a user error.
    ///
    /// ```
    /// let e = flowline::ItemError::user("backend said no");
    /// assert_eq!(e.to_string(), "backend said no");
    /// ```
    pub fn user(e: impl Into<BoxError>) -> Self {
        ItemError::User(Arc::from(e.into()))
    }

    /// A refusal by the policy called `reason`: the item fails without a call, counted
    /// under `reason` (see [`kind`](ItemError::kind)).
    ///
    /// ```
    /// let e = flowline::ItemError::refused("deadline", "the item's deadline has passed");
    /// assert_eq!(e.kind(), "deadline");
    /// assert_eq!(e.to_string(), "the item's deadline has passed");
    /// ```
    pub fn refused(reason: &'static str, message: impl Into<Arc<str>>) -> Self {
        ItemError::Refused {
            reason,
            message: message.into(),
        }
    }

    /// Why the item failed, in one word: `error` (the stage's own error), `timeout`,
    /// `panic`, `circuit_open`, or the reason a refusing policy gave
    /// ([`ItemError::Refused`]). The same word in the report's counts by reason, dead-letter
    /// files, the failure log and the metrics' `reason` label, so that one can be matched
    /// with the other.
    ///
    /// ```
    /// assert_eq!(flowline::ItemError::Panic("boom".into()).kind(), "panic");
    /// assert_eq!(flowline::ItemError::user("no").kind(), "error");
    /// ```
    pub fn kind(&self) -> &'static str {
        match self {
            ItemError::User(_) => "error",
            ItemError::Timeout(_) => "timeout",
            ItemError::Panic(_) => "panic",
            ItemError::CircuitOpen => "circuit_open",
            ItemError::Refused { reason, .. } => reason,
        }
    }

    /// A policy refused the item before its call: a fail-fast open breaker, or any
    /// [`ItemError::Refused`]. No call was made, so it says nothing about the backend.
    pub(crate) fn is_refusal(&self) -> bool {
        matches!(self, ItemError::CircuitOpen | ItemError::Refused { .. })
    }

    pub(crate) fn from_panic(payload: &(dyn Any + Send)) -> Self {
        ItemError::Panic(panic_message(payload))
    }
}

pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// The input of a failed item, kept when the stage was asked to `keep_input()` (or
/// `keep_input_json()`). Its text is written out only if the item fails.
///
/// ```
/// use flowline::FailedInput;
/// let input = FailedInput::new(42u64);
/// assert_eq!(input.debug(), "42");
/// assert_eq!(input.downcast_ref::<u64>(), Some(&42));
/// ```
#[derive(Clone)]
pub struct FailedInput(Arc<Kept>);

type AnyValue = dyn Any + Send + Sync;

/// Writes a kept value as JSON.
#[cfg(feature = "jsonl")]
type ToJson = fn(&AnyValue) -> Result<serde_json::Value, serde_json::Error>;

struct Kept {
    value: Box<AnyValue>,
    /// `show(value)`, made on first use.
    text: std::sync::OnceLock<String>,
    show: fn(&AnyValue) -> String,
    /// The value as JSON, for an input kept to be replayed (`keep_input_json`).
    #[cfg(feature = "jsonl")]
    json: Option<ToJson>,
}

impl FailedInput {
    /// Keeps `value`; its text (what dead-letter files and logs show) is its `Debug` text.
    pub fn new<T: fmt::Debug + Send + Sync + 'static>(value: T) -> Self {
        FailedInput(Arc::new(Kept {
            value: Box::new(value),
            text: std::sync::OnceLock::new(),
            show: |v| {
                v.downcast_ref::<T>()
                    .map_or_else(String::new, |v| format!("{v:?}"))
            },
            #[cfg(feature = "jsonl")]
            json: None,
        }))
    }

    /// Keeps `value` as JSON: a dead-letter file ([`DeadLetter::jsonl`](crate::DeadLetter::jsonl))
    /// holds it as a JSON value that [`Pipeline::from_dead_letters`](crate::Pipeline::from_dead_letters)
    /// reads back. Its text is its JSON.
    ///
    /// ```
    /// use flowline::FailedInput;
    /// let input = FailedInput::json(vec![1u32, 2]);
    /// assert_eq!(input.debug(), "[1,2]");
    /// assert_eq!(input.downcast_ref::<Vec<u32>>(), Some(&vec![1, 2]));
    /// ```
    #[cfg(feature = "jsonl")]
    #[cfg_attr(docsrs, doc(cfg(feature = "jsonl")))]
    pub fn json<T: serde_core::Serialize + Send + Sync + 'static>(value: T) -> Self {
        fn to_json<T: serde_core::Serialize + 'static>(
            v: &AnyValue,
        ) -> Result<serde_json::Value, serde_json::Error> {
            match v.downcast_ref::<T>() {
                Some(v) => serde_json::to_value(v),
                None => Ok(serde_json::Value::Null),
            }
        }
        FailedInput(Arc::new(Kept {
            value: Box::new(value),
            text: std::sync::OnceLock::new(),
            show: |v| match to_json::<T>(v) {
                Ok(json) => json.to_string(),
                Err(e) => format!("(cannot be written as JSON: {e})"),
            },
            json: Some(to_json::<T>),
        }))
    }

    /// The input's text (what dead-letter files and logs show): its `Debug` text, or its
    /// JSON for an input kept as JSON.
    pub fn debug(&self) -> &str {
        self.0.text.get_or_init(|| (self.0.show)(&*self.0.value))
    }

    /// The input as JSON, if it was kept as JSON: `None` for a `Debug`-only input,
    /// `Some(Err)` if it cannot be written as JSON (a map with non-string keys).
    #[cfg(feature = "jsonl")]
    pub(crate) fn to_json(&self) -> Option<Result<serde_json::Value, serde_json::Error>> {
        self.0.json.map(|f| f(&*self.0.value))
    }

    /// The input itself, if it is a `T`.
    pub fn downcast_ref<T: 'static>(&self) -> Option<&T> {
        self.0.value.downcast_ref()
    }
}

impl fmt::Debug for FailedInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.debug())
    }
}

/// One failed item: where it failed, why, after how many attempts, and (if kept) its input.
/// Failures go to the run's dead-letter target; they are never silently dropped.
///
/// ```
/// use flowline::{Failure, ItemError};
/// let f = Failure::new("fetch", ItemError::user("404"), 3);
/// assert_eq!(f.to_string(), "stage `fetch` failed after 3 attempt(s): 404");
/// ```
#[derive(Debug, Clone)]
pub struct Failure {
    /// The name of the stage where the item failed.
    pub stage: Arc<str>,
    /// Why it failed.
    pub error: ItemError,
    /// How many attempts were made (1 without retries).
    pub attempts: u32,
    /// The item's input, when the stage keeps inputs (`keep_input()`).
    pub input: Option<FailedInput>,
}

impl Failure {
    /// A failure without a kept input.
    pub fn new(stage: impl Into<Arc<str>>, error: ItemError, attempts: u32) -> Self {
        Failure {
            stage: stage.into(),
            error,
            attempts,
            input: None,
        }
    }
}

/// The source of a failure is its [`ItemError`].
impl std::error::Error for Failure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "stage `{}` failed after {} attempt(s): {}",
            self.stage, self.attempts, self.error
        )?;
        if let Some(input) = &self.input {
            write!(f, " (input: {})", input.debug())?;
        }
        Ok(())
    }
}

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
