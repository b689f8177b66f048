//! `Transient` and `Permanent`: what an error says about trying again.
//!
//! A fault of infrastructure (a connection refused, reset or timed out, a server restarting)
//! is not an item's failure: trying again later succeeds. [`is_transient`] is the one
//! classifier flowline's parts use, and the one to give to a stage's `retry_if`, a breaker's
//! `counts` and a stage's `transient`. It knows the markers below and the I/O errors of a
//! lost connection anywhere in an error's chain; the store crates (`flowline-redis`,
//! `flowline-postgres`, `flowline-sqlite`) each add their client's errors (a Redis `LOADING`,
//! a PostgreSQL `57P01`, a SQLite `BUSY`) in an `is_transient` of their own.

use std::error::Error as StdError;
use std::fmt;
use std::io::ErrorKind;

use crate::failure::{BoxError, ItemError};

/// Marks an error as a fault of infrastructure: trying again later is expected to succeed.
///
/// ```
/// use flowline::{ItemError, Transient};
/// let e = ItemError::user(Transient::new("upstream reset the connection"));
/// assert!(e.is_transient());
/// assert_eq!(e.to_string(), "upstream reset the connection");
/// ```
#[derive(Debug)]
pub struct Transient(BoxError);

impl Transient {
    /// Wraps `error`, marking it transient.
    ///
    /// ```
    /// let e = flowline::Transient::new("server is restarting");
    /// assert!(flowline::is_transient(&e));
    /// ```
    pub fn new(error: impl Into<BoxError>) -> Self {
        Transient(error.into())
    }

    /// The wrapped error.
    ///
    /// ```
    /// let e = flowline::Transient::new("reset");
    /// assert_eq!(e.into_inner().to_string(), "reset");
    /// ```
    pub fn into_inner(self) -> BoxError {
        self.0
    }

    /// `error` marked one way or the other: wrapped in `Transient` when `transient`, else in
    /// [`Permanent`]; its text is unchanged. What a client crate's `classify` returns once
    /// its own classifier has looked at the error.
    ///
    /// ```
    /// let e = flowline::Transient::or_permanent("connection reset", true);
    /// assert!(flowline::is_transient(&*e));
    /// let e = flowline::Transient::or_permanent("no such table", false);
    /// assert!(!flowline::is_transient(&*e));
    /// assert_eq!(e.to_string(), "no such table");
    /// ```
    pub fn or_permanent(error: impl Into<BoxError>, transient: bool) -> BoxError {
        let error = error.into();
        if transient {
            Box::new(Transient(error))
        } else {
            Box::new(Permanent::new(error))
        }
    }
}

impl fmt::Display for Transient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl StdError for Transient {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.0)
    }
}

/// Marks an error as one that trying again cannot fix (a wrong type at a key, a malformed
/// reply, bad credentials): a part that talks to a server stops at it instead of riding it
/// out as an outage. It wins over any transient cause inside it.
///
/// ```
/// use flowline::{ItemError, Permanent};
/// let e = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
/// assert!(flowline::is_transient(&e));
/// assert!(!flowline::is_transient(&Permanent::new(e)));
/// ```
#[derive(Debug)]
pub struct Permanent(BoxError);

impl Permanent {
    /// Wraps `error`, marking it permanent.
    ///
    /// ```
    /// let e = flowline::Permanent::new("WRONGTYPE");
    /// assert_eq!(e.to_string(), "WRONGTYPE");
    /// ```
    pub fn new(error: impl Into<BoxError>) -> Self {
        Permanent(error.into())
    }
}

impl fmt::Display for Permanent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl StdError for Permanent {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.0)
    }
}

/// Whether `error` is a fault of infrastructure: somewhere in its chain of causes (outermost
/// first) a [`Transient`] marker, or an I/O error of a lost or refused connection
/// (`ConnectionRefused`, `ConnectionReset`, `ConnectionAborted`, `NotConnected`,
/// `BrokenPipe`, `TimedOut`, `UnexpectedEof`, `HostUnreachable`, `NetworkUnreachable`,
/// `NetworkDown`, `AddrNotAvailable`) — unless a [`Permanent`] marker comes first.
///
/// ```
/// use std::io::{Error, ErrorKind};
/// assert!(flowline::is_transient(&Error::new(ErrorKind::ConnectionRefused, "refused")));
/// assert!(!flowline::is_transient(&Error::new(ErrorKind::NotFound, "no such file")));
/// ```
pub fn is_transient(error: &(dyn StdError + 'static)) -> bool {
    is_transient_with(error, |_| None)
}

/// [`is_transient`] with a client's own verdict: walking `error`'s chain of causes
/// (outermost first), a [`Permanent`] or [`Transient`] marker decides first, then `client`
/// (`Some(transient)` for an error of its own types, `None` to go on to the cause), then a
/// lost or refused connection's I/O error. The classifiers of the store crates are this
/// with their driver's errors, so the markers mean the same everywhere.
///
/// ```
/// use std::io::{Error, ErrorKind};
/// #[derive(Debug)]
/// struct Busy;
/// impl std::fmt::Display for Busy {
///     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str("busy") }
/// }
/// impl std::error::Error for Busy {}
/// let client = |e: &(dyn std::error::Error + 'static)| e.is::<Busy>().then_some(true);
/// assert!(flowline::is_transient_with(&Busy, client));
/// assert!(!flowline::is_transient_with(&flowline::Permanent::new(Busy), client));
/// let lost = Error::new(ErrorKind::ConnectionReset, "reset");
/// assert!(flowline::is_transient_with(&lost, client));
/// ```
pub fn is_transient_with(
    error: &(dyn StdError + 'static),
    client: impl Fn(&(dyn StdError + 'static)) -> Option<bool>,
) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if e.is::<Permanent>() {
            return false;
        }
        if e.is::<Transient>() {
            return true;
        }
        if let Some(verdict) = client(e) {
            return verdict;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && is_connection_fault(io.kind())
        {
            return true;
        }
        next = e.source();
    }
    false
}

/// Whether a [`Permanent`] marker is in `error`'s chain.
pub(crate) fn is_permanent(error: &(dyn StdError + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if e.is::<Permanent>() {
            return true;
        }
        next = e.source();
    }
    false
}

fn is_connection_fault(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::ConnectionRefused
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::NotConnected
            | ErrorKind::BrokenPipe
            | ErrorKind::TimedOut
            | ErrorKind::UnexpectedEof
            | ErrorKind::HostUnreachable
            | ErrorKind::NetworkUnreachable
            | ErrorKind::NetworkDown
            | ErrorKind::AddrNotAvailable
    )
}

impl ItemError {
    /// Whether this failure is a fault of infrastructure ([`is_transient`] of the stage's
    /// error; a timeout, a panic or an open breaker are not). Fits `Retry::retry_if` and
    /// `Breaker::counts` as it is.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use flowline::Transient;
    /// let retry = Retry::exponential(std::time::Duration::from_millis(10)).retry_if(ItemError::is_transient);
    /// assert!(retry.is_retryable(&ItemError::user(Transient::new("reset"))));
    /// assert!(!retry.is_retryable(&ItemError::user("404")));
    /// ```
    pub fn is_transient(&self) -> bool {
        match self {
            ItemError::User(e) => is_transient(&**e),
            _ => false,
        }
    }
}

/// An error and its causes as one line, `outer: cause: cause`, leaving out a cause whose
/// text the line already ends with (many errors repeat their source in their own message),
/// with line breaks made spaces: what a log line or a one-line exit message wants.
///
/// ```
/// use std::error::Error;
/// use std::fmt;
///
/// #[derive(Debug)]
/// struct Query(std::io::Error);
/// impl fmt::Display for Query {
///     fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
///         f.write_str("query failed")
///     }
/// }
/// impl Error for Query {
///     fn source(&self) -> Option<&(dyn Error + 'static)> {
///         Some(&self.0)
///     }
/// }
///
/// let e = Query(std::io::Error::other("connection reset\nby peer"));
/// assert_eq!(flowline::error_chain(&e), "query failed: connection reset by peer");
/// ```
pub fn error_chain(error: &(dyn StdError + 'static)) -> String {
    let mut out = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        let text = e.to_string();
        if !text.is_empty() && !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = e.source();
    }
    out.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Wrapper(std::io::Error);
    impl fmt::Display for Wrapper {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("query failed")
        }
    }
    impl StdError for Wrapper {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_connection_error_deep_in_the_chain_is_transient() {
        let e = Wrapper(std::io::Error::new(
            ErrorKind::ConnectionReset,
            "reset by peer",
        ));
        assert!(is_transient(&e));
        assert!(ItemError::user(e).is_transient());
    }

    #[test]
    fn other_errors_and_other_kinds_are_not() {
        assert!(!is_transient(&Wrapper(std::io::Error::new(
            ErrorKind::PermissionDenied,
            "no"
        ))));
        assert!(!ItemError::user("404 not found").is_transient());
        assert!(!ItemError::Timeout(std::time::Duration::from_secs(1)).is_transient());
        assert!(!ItemError::Panic("boom".into()).is_transient());
    }

    #[test]
    fn the_outermost_marker_wins() {
        let inner = Transient::new("reset");
        assert!(!is_transient(&Permanent::new(inner)));
        assert!(is_transient(&Transient::new(Permanent::new("x"))));
        assert!(is_permanent(&Transient::new(Permanent::new("x"))));
    }

    #[test]
    fn a_chain_reads_as_one_line_without_repeats() {
        let e = Wrapper(std::io::Error::new(
            ErrorKind::ConnectionReset,
            "reset\nby peer",
        ));
        assert_eq!(error_chain(&e), "query failed: reset by peer");
        let t = Transient::new("same");
        assert_eq!(error_chain(&t), "same");
    }
}
