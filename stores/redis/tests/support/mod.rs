//! What the Redis tests share.

/// A connection of the test's own to the server at `url`, to look at or change what the
/// pipeline under test reads and writes.
pub async fn conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}
