//! Which SQLite errors are faults of infrastructure: the file locked by another connection
//! or process (`SQLITE_BUSY`, `SQLITE_LOCKED`) past the busy timeout. Trying again later
//! succeeds; an error about the statement itself (a syntax error, a constraint) does not.
//!
//! [`is_transient`] fits a stage's `Retry::retry_if`, a breaker's `counts` and a stage's
//! `transient` option as it is; [`is_transient_error`] looks at any error's chain, and
//! [`classify`] marks an error with [`flowline::Transient`] or [`flowline::Permanent`] so
//! that flowline's own parts (a cursor source's fetch, a store call) tell the two apart.

use std::error::Error as StdError;

use flowline::{BoxError, ItemError, Transient};
use rusqlite::ErrorCode;

/// Whether a stage's failure is a fault of infrastructure: somewhere in its chain a SQLite
/// error `SQLITE_BUSY` or `SQLITE_LOCKED` (another connection holds the lock it needs) — or
/// anything [`ItemError::is_transient`] knows (flowline's markers, I/O errors of a lost
/// connection).
///
/// ```
/// use flowline::prelude::*;
/// use std::time::Duration;
/// let retry = Retry::exponential(Duration::from_millis(50))
///     .max_elapsed(Duration::from_secs(60))
///     .retry_if(flowline_sqlite::is_transient);
/// let busy = rusqlite::Error::SqliteFailure(
///     rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
///     Some("database is locked".into()),
/// );
/// assert!(retry.is_retryable(&ItemError::user(busy)));
/// assert!(!retry.is_retryable(&ItemError::user("UNIQUE constraint failed")));
/// ```
pub fn is_transient(error: &ItemError) -> bool {
    match error {
        ItemError::User(e) => is_transient_error(&**e),
        other => other.is_transient(),
    }
}

/// [`is_transient`] of any error: walks its chain of causes (outermost first). A
/// [`flowline::Permanent`] marker met first makes it permanent, a [`flowline::Transient`]
/// marker transient.
///
/// ```
/// let locked = rusqlite::Error::SqliteFailure(
///     rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_LOCKED),
///     None,
/// );
/// assert!(flowline_sqlite::is_transient_error(&locked));
/// assert!(!flowline_sqlite::is_transient_error(&rusqlite::Error::InvalidQuery));
/// ```
pub fn is_transient_error(error: &(dyn StdError + 'static)) -> bool {
    flowline::is_transient_with(error, |e| {
        if let Some(sql) = e.downcast_ref::<rusqlite::Error>() {
            return Some(is_transient_sqlite(sql));
        }
        e.downcast_ref::<rusqlite::ffi::Error>()
            .map(|ffi| is_busy(ffi.code))
    })
}

/// `error`, marked for flowline: wrapped in [`flowline::Transient`] when
/// [`is_transient_error`] says so, else in [`flowline::Permanent`]. Its text is unchanged.
///
/// ```
/// let busy = rusqlite::Error::SqliteFailure(
///     rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
///     Some("database is locked".into()),
/// );
/// let e = flowline_sqlite::classify(busy);
/// assert!(flowline::is_transient(&*e));
/// assert_eq!(e.to_string(), "database is locked");
/// assert!(!flowline::is_transient(&*flowline_sqlite::classify("no such table: items")));
/// ```
pub fn classify(error: impl Into<BoxError>) -> BoxError {
    let error = error.into();
    let transient = is_transient_error(&*error);
    Transient::or_permanent(error, transient)
}

pub(crate) fn is_transient_sqlite(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if is_busy(f.code))
}

fn is_busy(code: ErrorCode) -> bool {
    matches!(code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowline::Permanent;
    use rusqlite::ffi;

    fn failure(code: i32) -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(ffi::Error::new(code), None)
    }

    #[test]
    fn busy_and_locked_are_transient_and_statement_errors_are_not() {
        assert!(is_transient_error(&failure(ffi::SQLITE_BUSY)));
        assert!(is_transient_error(&failure(ffi::SQLITE_LOCKED)));
        assert!(is_transient_error(&failure(ffi::SQLITE_BUSY_SNAPSHOT)));
        assert!(!is_transient_error(&failure(ffi::SQLITE_CONSTRAINT)));
        assert!(!is_transient_error(&failure(ffi::SQLITE_CORRUPT)));
        assert!(!is_transient_error(&failure(ffi::SQLITE_READONLY)));
        assert!(!is_transient(&ItemError::Panic("boom".into())));
    }

    #[test]
    fn a_marker_outside_wins_and_classify_keeps_the_text() {
        let e = classify(failure(ffi::SQLITE_BUSY));
        assert!(flowline::is_transient(&*e));
        assert!(is_transient(&ItemError::user(e)));
        let e = classify(Permanent::new(failure(ffi::SQLITE_BUSY)));
        assert!(!flowline::is_transient(&*e));
        let e = classify(failure(ffi::SQLITE_CONSTRAINT));
        assert!(e.is::<Permanent>());
        // A Transient marker outside a statement error: the marker decides.
        assert!(is_transient_error(&Transient::new(failure(
            ffi::SQLITE_CONSTRAINT
        ))));
    }
}
