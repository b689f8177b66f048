//! [`RedisStore`]: idempotency keys in Redis, one hash per scope
//! (`flowline:{<scope>}:idempotency`, field = key, value `1` once done or
//! `0:<expires_ms>:<holder>` while reserved). Each call is one script over a whole chunk of
//! keys, so it is atomic and one round trip; expiry is on the server's clock (`TIME`), which
//! every worker shares.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flowline::{BoxError, Reservation, Store, StoreFuture};
use redis::aio::ConnectionManager;
use tokio::sync::OnceCell;

use crate::conn;

/// Longest reservation (thirty years, as flowline caps its timers), in ms.
const FAR_MS: u128 = 86_400 * 365 * 30 * 1000;

const RESERVE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local holder, name, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local out = {}
for i = 4, #ARGV do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  local r = 0
  if v == '1' then
    r = 1
  elseif v then
    local s = string.find(v, ':', 3, true)
    local exp = tonumber(string.sub(v, 3, s - 1))
    local h = string.sub(v, s + 1)
    local earlier_life = name ~= '' and h ~= holder and string.sub(h, 1, #name) == name
    if exp > now or h == holder then
      if not earlier_life or h == holder then r = 2 end
    end
  end
  if r == 0 then
    redis.call('HSET', KEYS[1], ARGV[i], '0:' .. (now + ttl) .. ':' .. holder)
  end
  out[#out + 1] = r
end
return out
";

const COMMIT: &str = r"
for i = 2, #ARGV do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  if v and v ~= '1' then
    local s = string.find(v, ':', 3, true)
    if string.sub(v, s + 1) == ARGV[1] then redis.call('HSET', KEYS[1], ARGV[i], '1') end
  end
end
return 0
";

const RELEASE: &str = r"
for i = 2, #ARGV do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  if v and v ~= '1' then
    local s = string.find(v, ':', 3, true)
    if string.sub(v, s + 1) == ARGV[1] then redis.call('HDEL', KEYS[1], ARGV[i]) end
  end
end
return 0
";

struct Inner {
    client: redis::Client,
    conn: OnceCell<ConnectionManager>,
    scripts: [redis::Script; 3],
}

/// A [`Store`] of idempotency keys in Redis, shared by every worker pointed at the same
/// server. Cheap to clone; clones are one holder. Mirrors `flowline_sqlite::SqliteStore`:
/// scopes, holders, expiry, named holders that take back an earlier life's reservations.
///
/// ```no_run
/// use flowline::prelude::*;
/// use flowline_redis::RedisStore;
/// # #[tokio::main] async fn main() {
/// let store = RedisStore::open("redis://127.0.0.1/").unwrap().scope("orders");
/// let report = Pipeline::from_iter([1, 2, 3]).idempotent(store, |x| *x).run().await.unwrap();
/// # }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
    key: Arc<str>,
    holder: Arc<str>,
    name: Arc<str>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("key", &self.key)
            .field("holder", &self.holder)
            .finish_non_exhaustive()
    }
}

fn new_holder(prefix: &str) -> Arc<str> {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Arc::from(format!("{prefix}{}-{nanos}-{n}", std::process::id()))
}

fn hash_key(scope: &str) -> Arc<str> {
    Arc::from(format!("flowline:{{{scope}}}:idempotency"))
}

impl RedisStore {
    /// A store at `url` with the scope `default`; nothing connects until the first call.
    ///
    /// ```
    /// assert!(flowline_redis::RedisStore::open("not a url").is_err());
    /// ```
    pub fn open(url: &str) -> Result<Self, BoxError> {
        let client = redis::Client::open(url).map_err(|e| format!("redis url {url:?}: {e}"))?;
        Ok(RedisStore {
            inner: Arc::new(Inner {
                client,
                conn: OnceCell::new(),
                scripts: [
                    redis::Script::new(RESERVE),
                    redis::Script::new(COMMIT),
                    redis::Script::new(RELEASE),
                ],
            }),
            key: hash_key("default"),
            holder: new_holder(""),
            name: Arc::from(""),
        })
    }

    /// The same server, keys of another scope (a pipeline of its own). In a Redis Cluster
    /// a scope's keys are one hash, on one node.
    ///
    /// ```
    /// let s = flowline_redis::RedisStore::open("redis://127.0.0.1/").unwrap().scope("mail");
    /// # let _ = s;
    /// ```
    pub fn scope(mut self, scope: &str) -> Self {
        self.key = hash_key(scope);
        self
    }

    /// A new holder on the same state: its reservations make the others' `Busy`.
    ///
    /// ```
    /// let a = flowline_redis::RedisStore::open("redis://127.0.0.1/").unwrap();
    /// let b = a.handle();
    /// # let _ = b;
    /// ```
    pub fn handle(&self) -> Self {
        let mut h = self.clone();
        h.holder = new_holder(&self.name);
        h
    }

    /// A named holder (a worker's stable name): restarted under the same name, it takes
    /// back the reservations its earlier life left, instead of waiting for them to expire.
    ///
    /// ```
    /// let w = flowline_redis::RedisStore::open("redis://127.0.0.1/").unwrap().holder("worker-1");
    /// # let _ = w;
    /// ```
    pub fn holder(mut self, name: &str) -> Self {
        self.name = Arc::from(format!("{name}#"));
        self.holder = new_holder(&self.name);
        self
    }

    async fn conn(&self) -> Result<ConnectionManager, BoxError> {
        let c = self
            .inner
            .conn
            .get_or_try_init(|| conn::connect(&self.inner.client, Duration::from_secs(10)))
            .await?;
        Ok(c.clone())
    }

    async fn call(
        &self,
        which: usize,
        extra: &[String],
        keys: &[String],
    ) -> Result<redis::Value, BoxError> {
        let mut c = self.conn().await?;
        let mut inv = self.inner.scripts[which].prepare_invoke();
        inv.key(&*self.key).arg(&*self.holder);
        for a in extra {
            inv.arg(a);
        }
        for k in keys {
            inv.arg(k);
        }
        Ok(inv.invoke_async(&mut c).await?)
    }
}

impl Store for RedisStore {
    fn reserve<'a>(
        &'a self,
        keys: &'a [String],
        ttl: Duration,
    ) -> StoreFuture<'a, Vec<Reservation>> {
        Box::pin(async move {
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            let ttl_ms = ttl.as_millis().min(FAR_MS).to_string();
            let v = self.call(0, &[self.name.to_string(), ttl_ms], keys).await?;
            let codes: Vec<i64> = redis::from_redis_value(v)?;
            if codes.len() != keys.len() {
                return Err("reserve: a reply of the wrong length".into());
            }
            codes
                .into_iter()
                .map(|c| match c {
                    0 => Ok(Reservation::Reserved),
                    1 => Ok(Reservation::AlreadyDone),
                    2 => Ok(Reservation::Busy),
                    other => Err(format!("reserve: unknown answer {other}").into()),
                })
                .collect()
        })
    }

    fn commit<'a>(&'a self, keys: &'a [String]) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            if !keys.is_empty() {
                self.call(1, &[], keys).await?;
            }
            Ok(())
        })
    }

    fn release<'a>(&'a self, keys: &'a [String]) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            if !keys.is_empty() {
                self.call(2, &[], keys).await?;
            }
            Ok(())
        })
    }
}
