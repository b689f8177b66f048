//! Limits shared by every process through one Redis server: [`RedisRate`] and
//! [`RedisInflight`], both [`flowline::Limit`]s.
//!
//! What they share: a connection made on first use (so building one needs no runtime and
//! no server), the check of a limit's name, and the reading of a script's reply, which is
//! never trusted.

pub(crate) mod inflight;
pub(crate) mod rate;

use std::sync::Arc;
use std::time::Duration;

use flowline::{BoxError, ConfigProblem, Outage};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// How long a connection attempt or a reply may take before the call is tried again under
/// the limit's outage policy: a server that hangs is a server that is down.
const TIMEOUT: Duration = Duration::from_secs(1);

/// The longest name a limit may have: its keys stay short.
const MAX_NAME: usize = 200;

/// The key of a limit's `part`: `flowline:{name}:part`. The braces are a hash tag: every key
/// of one limit lands on one slot of a Redis Cluster, so a script may touch them all.
pub(crate) fn key(name: &str, part: &str) -> String {
    format!("flowline:{{{name}}}:{part}")
}

/// Why a limit's name cannot be used, if it cannot.
pub(crate) fn bad_name(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("must not be empty");
    }
    if name.len() > MAX_NAME {
        return Some("at most 200 bytes");
    }
    if name.contains(['{', '}']) {
        return Some("must not contain `{` or `}`: the name is the hash tag of the limit's keys");
    }
    if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Some("no spaces or control characters");
    }
    None
}

/// A configuration problem of a limit (the stage is filled in by the stage).
pub(crate) fn problem(option: &'static str, value: String, reason: &'static str) -> ConfigProblem {
    ConfigProblem {
        stage: String::new(),
        option,
        value,
        reason,
    }
}

/// One connection per limit (clones share it), made on first use and remade by the
/// connection manager after a loss.
#[derive(Clone)]
pub(crate) struct Conn {
    client: redis::Client,
    cell: Arc<tokio::sync::OnceCell<ConnectionManager>>,
    server: Arc<str>,
    pub(crate) outage: Outage,
}

impl Conn {
    pub(crate) fn new(client: &redis::Client) -> Self {
        Conn {
            client: client.clone(),
            cell: Arc::new(tokio::sync::OnceCell::new()),
            server: crate::conn::server(client),
            outage: Outage::default(),
        }
    }

    pub(crate) async fn get(&self) -> redis::RedisResult<ConnectionManager> {
        self.cell
            .get_or_try_init(|| async {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(TIMEOUT))
                    .set_response_timeout(Some(TIMEOUT))
                    .set_number_of_retries(1);
                ConnectionManager::new_lazy_with_config(self.client.clone(), config)
            })
            .await
            .cloned()
    }

    /// Runs `op` until it succeeds, under the outage policy: while Redis is down the acquire
    /// waits (no call starts); past the limit, or on an error of the script itself, it
    /// fails with an [`OutageError`](flowline::OutageError).
    pub(crate) async fn run<T, F, Fut>(&self, mut op: F) -> Result<T, BoxError>
    where
        F: FnMut(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let con = self.get().await?;
        Ok(crate::conn::call(&self.outage, &self.server, || op(con.clone())).await?)
    }
}

/// A script replied something it never sends: the server is not what we think it is.
pub(crate) fn unexpected(script: &str, reply: &redis::Value) -> BoxError {
    format!("unexpected reply from Redis to the {script} script: {reply:?}").into()
}

/// Reads a script's `{int, int}` reply.
pub(crate) fn two_ints(script: &str, reply: redis::Value) -> Result<(i64, i64), BoxError> {
    if let redis::Value::Array(items) = &reply {
        if let [redis::Value::Int(a), redis::Value::Int(b)] = items.as_slice() {
            return Ok((*a, *b));
        }
    }
    Err(unexpected(script, &reply))
}

/// A wait a script asked for, in microseconds, clamped to `0..=max` (a reply is never
/// trusted to be sane).
pub(crate) fn wait_us(us: i64, max: Duration) -> Duration {
    Duration::from_micros(us.max(0) as u64).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_cannot_be_keys_are_refused() {
        assert_eq!(bad_name(""), Some("must not be empty"));
        assert!(bad_name("a{b").unwrap().contains("hash tag"));
        assert!(bad_name("a}").is_some());
        assert!(bad_name("a b").is_some());
        assert!(bad_name("a\nb").is_some());
        assert!(bad_name(&"x".repeat(201)).is_some());
        assert_eq!(bad_name("api:v2-eu.1"), None);
        assert_eq!(key("api", "rate"), "flowline:{api}:rate");
    }

    #[test]
    fn replies_of_the_wrong_shape_are_errors() {
        use redis::Value;
        let ok = Value::Array(vec![Value::Int(1), Value::Int(5)]);
        assert_eq!(two_ints("x", ok).unwrap(), (1, 5));
        for bad in [
            Value::Nil,
            Value::Int(1),
            Value::Array(vec![Value::Int(1)]),
            Value::Array(vec![Value::Int(1), Value::Nil]),
            Value::Array(vec![Value::Int(1), Value::Int(2), Value::Int(3)]),
            Value::SimpleString("OK".into()),
        ] {
            let err = two_ints("rate", bad).unwrap_err().to_string();
            assert!(err.contains("unexpected reply"), "{err}");
        }
        assert_eq!(wait_us(-5, Duration::from_secs(1)), Duration::ZERO);
        assert_eq!(
            wait_us(i64::MAX, Duration::from_secs(1)),
            Duration::from_secs(1)
        );
    }
}
