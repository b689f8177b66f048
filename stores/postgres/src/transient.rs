//! Which PostgreSQL errors are faults of infrastructure: a lost or refused connection, a
//! server shutting down or starting up, too many connections. Trying again later succeeds;
//! an error about the statement itself (a syntax error, a constraint, a type) does not.
//!
//! [`is_transient`] fits a stage's `Retry::retry_if`, a breaker's `counts` and a stage's
//! `transient` option as it is; [`is_transient_error`] looks at any error's chain, and
//! [`classify`] marks an error with [`flowline::Transient`] or [`flowline::Permanent`] so
//! that flowline's own parts (a cursor source's fetch, a store call) tell the two apart.

use std::error::Error as StdError;

use deadpool_postgres::PoolError;
use flowline::{BoxError, ItemError, Transient};
use tokio_postgres::error::SqlState;

/// Whether a stage's failure is a fault of infrastructure: somewhere in its chain a
/// PostgreSQL error of a lost, refused or timed-out connection, a server shutting down
/// or not yet accepting connections (SQLSTATE `57P01`, `57P02`, `57P03`, `57P05`), a
/// connection exception (`08xxx`), too many connections (`53300`), a serialization
/// failure or a deadlock (`40001`, `40P01`), a pool that could not hand out a connection
/// in time — or anything [`ItemError::is_transient`] knows (flowline's markers, I/O errors
/// of a lost connection).
///
/// ```
/// use flowline::prelude::*;
/// use std::time::Duration;
/// let retry = Retry::exponential(Duration::from_millis(50))
///     .max_elapsed(Duration::from_secs(60))
///     .retry_if(flowline_postgres::is_transient);
/// let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
/// assert!(retry.is_retryable(&ItemError::user(refused)));
/// assert!(!retry.is_retryable(&ItemError::user("duplicate key value")));
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
/// let e = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
/// assert!(flowline_postgres::is_transient_error(&e));
/// assert!(!flowline_postgres::is_transient_error(&flowline::Permanent::new(e)));
/// ```
pub fn is_transient_error(error: &(dyn StdError + 'static)) -> bool {
    flowline::is_transient_with(error, |e| {
        if let Some(pg) = e.downcast_ref::<tokio_postgres::Error>() {
            return Some(is_transient_pg(pg));
        }
        if let Some(pool) = e.downcast_ref::<PoolError>() {
            match pool {
                PoolError::Backend(pg) => return Some(is_transient_pg(pg)),
                // No connection became free or could be made in time.
                PoolError::Timeout(_) => return Some(true),
                _ => {}
            }
        }
        e.downcast_ref::<tokio_postgres::error::DbError>()
            .map(|db| is_transient_code(db.code()))
    })
}

/// `error`, marked for flowline: wrapped in [`flowline::Transient`] when
/// [`is_transient_error`] says so, else in [`flowline::Permanent`]. Its text is unchanged.
/// For a cursor source's fetch or any call whose error flowline's parts classify.
///
/// ```
/// let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
/// let e = flowline_postgres::classify(refused);
/// assert!(flowline::is_transient(&*e));
/// assert_eq!(e.to_string(), "refused");
/// let e = flowline_postgres::classify("relation \"items\" does not exist");
/// assert!(!flowline::is_transient(&*e));
/// ```
pub fn classify(error: impl Into<BoxError>) -> BoxError {
    let error = error.into();
    let transient = is_transient_error(&*error);
    Transient::or_permanent(error, transient)
}

/// A tokio-postgres error: transient when the connection is gone or could not be made, or
/// the server said so with its SQLSTATE.
pub(crate) fn is_transient_pg(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if let Some(db) = e.as_db_error() {
        return is_transient_code(db.code());
    }
    // The client's I/O errors come from its socket only: any of them is a connection lost.
    if e.source().is_some_and(|s| s.is::<std::io::Error>()) {
        return true;
    }
    // The kinds without a cause are told by their text (the kind is private): a connect
    // that timed out, or failed before an I/O error.
    let text = e.to_string();
    text.starts_with("timeout waiting for server") || text.starts_with("error connecting to server")
}

/// The SQLSTATEs of a server that is going away, not there yet, or overloaded, and of
/// conflicts the server asks to retry.
fn is_transient_code(code: &SqlState) -> bool {
    let c = code.code();
    c.starts_with("08")
        || *code == SqlState::ADMIN_SHUTDOWN
        || *code == SqlState::CRASH_SHUTDOWN
        || *code == SqlState::CANNOT_CONNECT_NOW
        || c == "57P05" // idle_session_timeout: the server closed an idle connection
        || *code == SqlState::TOO_MANY_CONNECTIONS
        || *code == SqlState::T_R_SERIALIZATION_FAILURE
        || *code == SqlState::T_R_DEADLOCK_DETECTED
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowline::Permanent;

    #[test]
    fn shutdown_and_connection_codes_are_transient_and_statement_errors_are_not() {
        for code in [
            "57P01", "57P02", "57P03", "57P05", "08006", "08001", "53300", "40001",
        ] {
            assert!(is_transient_code(&SqlState::from_code(code)), "{code}");
        }
        for code in [
            "42601", "23505", "42P01", "57P04", "57014", "22P02", "28P01",
        ] {
            assert!(!is_transient_code(&SqlState::from_code(code)), "{code}");
        }
    }

    #[test]
    fn markers_and_io_errors_deep_in_a_chain_decide() {
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert!(is_transient(&ItemError::user(reset)));
        assert!(!is_transient(&ItemError::user("no such table")));
        assert!(!is_transient(&ItemError::Timeout(
            std::time::Duration::from_secs(1)
        )));
        assert!(is_transient(&ItemError::user(Transient::new("x"))));
        let e = classify(Permanent::new(Transient::new("x")));
        assert!(!flowline::is_transient(&*e));
    }

    #[test]
    fn a_pool_timeout_is_transient() {
        let e: BoxError = Box::new(PoolError::Timeout(deadpool_postgres::TimeoutType::Wait));
        assert!(is_transient_error(&*e));
        let e: BoxError = Box::new(PoolError::Closed);
        assert!(!is_transient_error(&*e));
    }
}
