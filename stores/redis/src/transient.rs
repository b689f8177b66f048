//! [`is_transient`]: whether an item's error is Redis (or the network) failing rather than
//! the item, for the retry, breaker and stage options that take a classifier.

use flowline::ItemError;

/// Whether an item failed because Redis could not answer for now: a Redis error anywhere in
/// the error's chain that a later try may not meet (the connection dropped, refused or timed
/// out; the server `LOADING` its data, `READONLY` or `MASTERDOWN` in a failover, `TRYAGAIN`,
/// `CLUSTERDOWN`), else what [`ItemError::is_transient`] says (the
/// [`Transient`](flowline::Transient)/[`Permanent`](flowline::Permanent) markers, connection-loss I/O errors). A Redis error that is
/// the command's own fault (`WRONGTYPE`, a syntax error, a script error) is not transient:
/// it is the item's failure. The outermost marker wins over what is inside it.
///
/// Give it to [`Retry::retry_if`](flowline::Retry::retry_if) and
/// [`Breaker::counts`](flowline::Breaker::counts), so a stage whose effect writes to Redis
/// waits for the server instead of failing its items:
///
/// ```
/// use flowline::prelude::*;
/// use flowline::ItemError;
/// use std::time::Duration;
/// let retry = Retry::exponential(Duration::from_millis(50))
///     .max_delay(Duration::from_secs(1))
///     .max_elapsed(Duration::from_secs(300))
///     .max_attempts(u32::MAX)
///     .jitter()
///     .retry_if(flowline_redis::is_transient);
/// let breaker = Breaker::consecutive_failures(5).counts(flowline_redis::is_transient);
/// let reset = redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
/// assert!(flowline_redis::is_transient(&ItemError::user(reset)));
/// let wrong = redis::RedisError::from((redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError), "WRONGTYPE"));
/// assert!(!flowline_redis::is_transient(&ItemError::user(wrong)));
/// # let _ = (retry, breaker);
/// ```
pub fn is_transient(error: &ItemError) -> bool {
    let ItemError::User(e) = error else {
        return error.is_transient();
    };
    flowline::is_transient_with(&**e, |e| {
        e.downcast_ref::<redis::RedisError>()
            .map(crate::conn::is_transient)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowline::{Permanent, Transient};
    use redis::{ErrorKind, RedisError, ServerErrorKind};

    fn server(kind: ServerErrorKind, text: &'static str) -> RedisError {
        RedisError::from((ErrorKind::Server(kind), text))
    }

    #[derive(Debug)]
    struct Wrapped(RedisError);
    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("effect failed")
        }
    }
    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn server_states_and_lost_connections_are_transient_the_commands_faults_are_not() {
        for (kind, text) in [
            (ServerErrorKind::BusyLoading, "LOADING"),
            (ServerErrorKind::ReadOnly, "READONLY"),
            (ServerErrorKind::MasterDown, "MASTERDOWN"),
            (ServerErrorKind::TryAgain, "TRYAGAIN"),
            (ServerErrorKind::ClusterDown, "CLUSTERDOWN"),
        ] {
            assert!(is_transient(&ItemError::user(server(kind, text))), "{text}");
            assert!(is_transient(&ItemError::user(Wrapped(server(kind, text)))));
        }
        let reset = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(is_transient(&ItemError::user(Wrapped(reset))));
        for e in [
            server(ServerErrorKind::ResponseError, "WRONGTYPE"),
            server(ServerErrorKind::ResponseError, "ERR syntax error"),
            server(ServerErrorKind::NoScript, "NOSCRIPT"),
        ] {
            assert!(!is_transient(&ItemError::user(e)));
        }
        let loading = server(ServerErrorKind::BusyLoading, "LOADING");
        assert!(!is_transient(&ItemError::user(Permanent::new(loading))));
        assert!(is_transient(&ItemError::user(Transient::new("x"))));
        assert!(!is_transient(&ItemError::user("404")));
        assert!(!is_transient(&ItemError::Timeout(
            std::time::Duration::from_secs(1)
        )));
    }
}
