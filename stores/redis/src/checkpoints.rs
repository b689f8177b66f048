//! [`RedisCheckpoints`]: cursor checkpoints in one Redis hash (`flowline:checkpoints` by
//! default; field = pipeline name, value = cursor).

use std::sync::Arc;
use std::time::Duration;

use flowline::{BoxError, CheckpointStore, StoreFuture};
use redis::aio::ConnectionManager;
use tokio::sync::OnceCell;

use crate::conn;

/// A [`CheckpointStore`] in Redis, for [`Pipeline::from_cursor`](flowline::Pipeline::from_cursor)
/// run by workers on several machines. A commit is durable as far as the server's
/// persistence is: with `appendfsync always` it survives a crash of the server too.
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

    async fn conn(&self) -> Result<ConnectionManager, BoxError> {
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
            let mut c = self.conn().await?;
            let v: Option<String> = redis::cmd("HGET")
                .arg(&*self.key)
                .arg(name)
                .query_async(&mut c)
                .await?;
            Ok(v)
        })
    }

    fn commit<'a>(&'a self, name: &'a str, cursor: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut c = self.conn().await?;
            let _: i64 = redis::cmd("HSET")
                .arg(&*self.key)
                .arg(name)
                .arg(cursor)
                .query_async(&mut c)
                .await?;
            Ok(())
        })
    }

    fn clear<'a>(&'a self, name: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut c = self.conn().await?;
            let _: i64 = redis::cmd("HDEL")
                .arg(&*self.key)
                .arg(name)
                .query_async(&mut c)
                .await?;
            Ok(())
        })
    }
}
