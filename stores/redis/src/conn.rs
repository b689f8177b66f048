//! Connections ([`connect`], [`connect_lazy`]) and what to do when a call fails: which
//! errors are worth a retry (the connection dropped, the server is restarting) and which are
//! the caller's to see (a wrong type at the key, a bad argument), and calls tried again
//! under an outage policy ([`call`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use flowline::{BoxError, Outage, OutageError, Transient};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError, ServerErrorKind};

/// The longest wait of the connection manager between two reconnection attempts.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// How a connection waits and reconnects. `response_timeout` bounds one call: a blocking
/// read needs more than its block time.
fn config(response_timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_response_timeout(Some(response_timeout))
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_number_of_retries(2)
        .set_max_delay(MAX_RECONNECT_DELAY)
}

/// A connection that reconnects by itself, as flowline-redis's own parts use: 2 s to
/// connect, `response_timeout` for one call's answer (a blocking read needs more than its
/// block time), reconnection attempts at most 1 s apart. Fails if the server cannot be
/// reached now; [`connect_lazy`] waits for it instead.
///
/// ```no_run
/// # #[tokio::main] async fn main() -> Result<(), redis::RedisError> {
/// let client = redis::Client::open("redis://127.0.0.1:6379/")?;
/// let mut conn = flowline_redis::connect(&client, std::time::Duration::from_secs(10)).await?;
/// let _: () = redis::cmd("PING").query_async(&mut conn).await?;
/// # Ok(()) }
/// ```
pub async fn connect(
    client: &redis::Client,
    response_timeout: Duration,
) -> Result<ConnectionManager, RedisError> {
    ConnectionManager::new_with_config(client.clone(), config(response_timeout)).await
}

/// [`connect`], made on first use: a program started while its server is down gets its
/// connection now and its calls fail as transient until the server is up (under
/// [`call`], they are tried again). An error only for a client that cannot make one.
///
/// ```
/// use std::time::Duration;
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// // Nothing listens on port 1: the connection is made anyway, and a call says why it failed.
/// let client = redis::Client::open("redis://127.0.0.1:1/").unwrap();
/// let conn = flowline_redis::connect_lazy(&client, Duration::from_secs(1)).unwrap();
/// let policy = flowline::Outage::keep_trying_for(Duration::ZERO);
/// let err = flowline_redis::call(&policy, "redis 127.0.0.1:1", || {
///     let mut c = conn.clone();
///     async move { redis::cmd("PING").query_async::<String>(&mut c).await }
/// })
/// .await
/// .unwrap_err();
/// assert!(!err.is_permanent(), "a server that is down is an outage: {err}");
/// # }
/// ```
pub fn connect_lazy(
    client: &redis::Client,
    response_timeout: Duration,
) -> Result<ConnectionManager, RedisError> {
    ConnectionManager::new_lazy_with_config(client.clone(), config(response_timeout))
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

/// The server as outage errors and logs name it: `redis 127.0.0.1:6379`.
pub(crate) fn server(client: &redis::Client) -> Arc<str> {
    Arc::from(format!("redis {}", client.get_connection_info().addr()))
}

/// A failed call as the outage policy reads it: a transient one is marked so (tried again),
/// any other is permanent (it ends the wait at once, with this error).
pub(crate) fn mark(e: RedisError) -> BoxError {
    let transient = is_transient(&e);
    Transient::or_permanent(e, transient)
}

/// Runs `op` until it succeeds, under `policy`: transient failures (a dropped or refused
/// connection, a timeout, a server `LOADING` or failing over: see
/// [`is_transient`](crate::is_transient)) are tried again after the policy's waits, the
/// connection reconnecting meanwhile; an error of the command itself (`WRONGTYPE`, a
/// syntax error), or an outage past the policy's limit, is the [`OutageError`], which
/// names `server`.
///
/// ```
/// use flowline::Outage;
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let mut tries = 0;
/// let v = flowline_redis::call(&Outage::default(), "redis 127.0.0.1:6379", || {
///     tries += 1;
///     let reply = if tries < 3 {
///         Err(redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset)))
///     } else {
///         Ok(tries)
///     };
///     async move { reply }
/// })
/// .await
/// .unwrap();
/// assert_eq!(v, 3);
/// # }
/// ```
pub async fn call<T, F, Fut>(policy: &Outage, server: &str, mut op: F) -> Result<T, OutageError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, RedisError>>,
{
    policy
        .retry(server, || {
            let f = op();
            async move { f.await.map_err(mark) }
        })
        .await
}

/// The group was removed (or the server came back without it).
pub(crate) fn is_nogroup(e: &RedisError) -> bool {
    e.code() == Some("NOGROUP")
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
    async fn a_call_rides_out_transient_errors_and_stops_at_a_permanent_one() {
        let mut n = 0;
        let v = call(&Outage::default(), "redis x", || {
            n += 1;
            let r = if n < 4 {
                Err(RedisError::from(std::io::Error::from(
                    std::io::ErrorKind::ConnectionRefused,
                )))
            } else {
                Ok(n)
            };
            async move { r }
        })
        .await
        .unwrap();
        assert_eq!(v, 4);
        let mut n = 0;
        let err = call(&Outage::default(), "redis x", || {
            n += 1;
            async {
                Err::<(), _>(RedisError::from((
                    ErrorKind::Server(ServerErrorKind::ResponseError),
                    "WRONGTYPE",
                )))
            }
        })
        .await
        .unwrap_err();
        assert_eq!(n, 1);
        assert!(err.is_permanent());
        assert!(err.to_string().starts_with("redis x: "), "{err}");
        let err = call(
            &Outage::keep_trying_for(Duration::from_secs(2)),
            "redis x",
            || async {
                Err::<(), _>(RedisError::from((
                    ErrorKind::Server(ServerErrorKind::BusyLoading),
                    "LOADING",
                )))
            },
        )
        .await
        .unwrap_err();
        assert!(!err.is_permanent());
        assert_eq!(err.elapsed(), Duration::from_secs(2));
    }
}
