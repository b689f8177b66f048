//! Why an item failed: the user's error ([`BoxError`]), the reason ([`ItemError`]), the input
//! kept for it ([`FailedInput`]) and the failure itself ([`Failure`]). Below the report, the
//! dead letters and the run's [`Error`](crate::Error), which all hold failures.

use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

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
