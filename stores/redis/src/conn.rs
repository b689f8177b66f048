//! Connections and what to do when a call fails: which errors are worth a retry (the
//! connection dropped, the server is restarting) and which are the caller's to see (a wrong
//! type at the key, a bad argument), and the backoff between retries.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError, ServerErrorKind};

/// The first wait after a failed call; it doubles up to [`MAX_BACKOFF`].
pub(crate) const MIN_BACKOFF: Duration = Duration::from_millis(50);
/// The longest wait between two tries.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// A connection that reconnects by itself. `response_timeout` bounds one call: a blocking
/// read needs more than its block time.
pub(crate) async fn connect(
    client: &redis::Client,
    response_timeout: Duration,
) -> Result<ConnectionManager, RedisError> {
    let cfg = ConnectionManagerConfig::new()
        .set_response_timeout(Some(response_timeout))
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_number_of_retries(2)
        .set_max_delay(MAX_BACKOFF);
    ConnectionManager::new_with_config(client.clone(), cfg).await
}

/// Whether a failed call may succeed if tried again: the connection dropped or timed out,
/// or the server is loading its data or failing over. A server's answer to the command
/// itself (WRONGTYPE, a syntax error, NOSCRIPT handled by the client) is not.
pub(crate) fn is_transient(e: &RedisError) -> bool {
    match e.kind() {
        ErrorKind::Server(k) => matches!(
            k,
            ServerErrorKind::BusyLoading
                | ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::MasterDown
                | ServerErrorKind::ReadOnly
        ),
        ErrorKind::Io | ErrorKind::ClusterConnectionNotFound => true,
        _ => e.is_io_error() || e.is_timeout() || e.is_connection_dropped(),
    }
}

/// The group was removed (or the server came back without it).
pub(crate) fn is_nogroup(e: &RedisError) -> bool {
    e.code() == Some("NOGROUP")
}

/// Doubling waits between retries, from [`MIN_BACKOFF`] to [`MAX_BACKOFF`].
pub(crate) struct Backoff(Duration);

impl Backoff {
    pub(crate) fn new() -> Self {
        Backoff(MIN_BACKOFF)
    }
    pub(crate) fn reset(&mut self) {
        self.0 = MIN_BACKOFF;
    }
    pub(crate) async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(MAX_BACKOFF);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_type_is_not_retried_and_a_dropped_connection_is() {
        let wrong = RedisError::from((
            ErrorKind::Server(ServerErrorKind::ResponseError),
            "WRONGTYPE",
        ));
        assert!(!is_transient(&wrong));
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(is_transient(&io));
        let loading =
            RedisError::from((ErrorKind::Server(ServerErrorKind::BusyLoading), "LOADING"));
        assert!(is_transient(&loading));
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_up_to_its_cap() {
        let mut b = Backoff::new();
        let t = tokio::time::Instant::now();
        for _ in 0..10 {
            b.wait().await;
        }
        // 50+100+200+400+800+1600 ms, then 2 s four times.
        assert_eq!(t.elapsed(), Duration::from_millis(3150 + 8000));
    }
}
