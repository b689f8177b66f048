//! [`RedisCheckpoints`]: cursor checkpoints in one Redis hash (`flowline:checkpoints` by
//! default; field = pipeline name, value = cursor).

use std::sync::Arc;
use std::time::Duration;

use flowline::{BoxError, CheckpointStore, Outage, StoreFuture};
use redis::aio::ConnectionManager;
use tokio::sync::OnceCell;

use crate::conn;

/// A [`CheckpointStore`] in Redis, for [`Pipeline::from_cursor`](flowline::Pipeline::from_cursor)
/// run by workers on several machines. A commit is durable as far as the server's
/// persistence is: with `appendfsync always` it survives a crash of the server too. Every
/// call rides out Redis being down under its [`outage`](Self::outage) policy (each is
/// idempotent, so a retry after a lost reply is harmless).
///
/// ```no_run
/// use flowline::CheckpointStore;
/// use flowline_redis::RedisCheckpoints;
/// # #[tokio::main] async fn main() {
/// let cp = RedisCheckpoints::open("redis://127.0.0.1/").unwrap();
/// cp.commit("orders", "1000").await.unwrap();
/// assert_eq!(cp.load("orders").await.unwrap().as_deref(), Some("1000"));
/// # }
/// ```
#[derive(Clone)]
pub struct RedisCheckpoints {
    client: redis::Client,
    conn: Arc<OnceCell<ConnectionManager>>,
    key: Arc<str>,
    server: Arc<str>,
    outage: Outage,
}

impl std::fmt::Debug for RedisCheckpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCheckpoints")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl RedisCheckpoints {
    /// Checkpoints at `url`, in the hash `flowline:checkpoints`; nothing connects until the
    /// first call.
    ///
    /// ```
    /// assert!(flowline_redis::RedisCheckpoints::open("nope://").is_err());
    /// ```
    pub fn open(url: &str) -> Result<Self, BoxError> {
        let client = redis::Client::open(url).map_err(|e| format!("redis url {url:?}: {e}"))?;
        Ok(RedisCheckpoints {
            server: conn::server(&client),
            outage: Outage::default(),
            client,
            conn: Arc::new(OnceCell::new()),
            key: Arc::from("flowline:checkpoints"),
        })
    }

    /// Keeps the checkpoints in the hash `key` instead (in a Redis Cluster, give it the
    /// hash tag of the data it belongs with).
    ///
    /// ```
    /// let cp = flowline_redis::RedisCheckpoints::open("redis://127.0.0.1/").unwrap().key("{jobs}:checkpoints");
    /// # let _ = cp;
    /// ```
    pub fn key(mut self, key: &str) -> Self {
        self.key = Arc::from(key);
        self
    }

    /// How long a call rides out Redis being down (default [`Outage::default`]); past it, or
    /// on an error of the command itself, the call fails with an
    /// [`OutageError`](flowline::OutageError) naming the server and the last error.
    ///
    /// ```
    /// let cp = flowline_redis::RedisCheckpoints::open("redis://127.0.0.1/").unwrap()
    ///     .outage(flowline::Outage::forever());
    /// # let _ = cp;
    /// ```
    pub fn outage(mut self, policy: Outage) -> Self {
        self.outage = policy;
        self
    }

    /// Runs `cmd` under the outage policy.
    async fn query<T: redis::FromRedisValue>(&self, cmd: redis::Cmd) -> Result<T, BoxError> {
        let v = conn::call(&self.outage, &self.server, || {
            let cmd = &cmd;
            async move {
                let mut c = self.conn().await?;
                cmd.query_async(&mut c).await
            }
        })
        .await?;
        Ok(v)
    }

    async fn conn(&self) -> Result<ConnectionManager, redis::RedisError> {
        let c = self
            .conn
            .get_or_try_init(|| conn::connect(&self.client, Duration::from_secs(10)))
            .await?;
        Ok(c.clone())
    }
}

impl CheckpointStore for RedisCheckpoints {
    fn load<'a>(&'a self, name: &'a str) -> StoreFuture<'a, Option<String>> {
        Box::pin(async move {
            let mut cmd = redis::cmd("HGET");
            cmd.arg(&*self.key).arg(name);
            self.query(cmd).await
        })
    }

    fn commit<'a>(&'a self, name: &'a str, cursor: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut cmd = redis::cmd("HSET");
            cmd.arg(&*self.key).arg(name).arg(cursor);
            let _: i64 = self.query(cmd).await?;
            Ok(())
        })
    }

    fn clear<'a>(&'a self, name: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut cmd = redis::cmd("HDEL");
            cmd.arg(&*self.key).arg(name);
            let _: i64 = self.query(cmd).await?;
            Ok(())
        })
    }
}
