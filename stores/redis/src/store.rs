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

/// A value that is not `1` nor `0:<expires_ms>:<holder>` (written by something else) is
/// refused with an error naming the field, not misread.
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
    local exp = s and string.sub(v, 1, 2) == '0:' and tonumber(string.sub(v, 3, s - 1))
    if not exp then
      return redis.error_reply('ERR malformed reservation at field ' .. ARGV[i] .. ' of ' .. KEYS[1])
    end
    local h = string.sub(v, s + 1)
    -- An earlier life of this named holder is `name` and a unique id without `#`: the
    -- holder `w1#2` is not an earlier life of `w1`.
    local earlier_life = name ~= '' and h ~= holder and string.sub(h, 1, #name) == name
      and not string.find(h, '#', #name + 1, true)
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

/// The holder of a reserved value, or nil.
const HOLDER: &str = r"
local function holder_of(v)
  if not v or v == '1' then return nil end
  local s = string.find(v, ':', 3, true)
  if not s then return nil end
  return string.sub(v, s + 1)
end
";

const COMMIT: &str = r"
for i = 2, #ARGV do
  if holder_of(redis.call('HGET', KEYS[1], ARGV[i])) == ARGV[1] then
    redis.call('HSET', KEYS[1], ARGV[i], '1')
  end
end
return 0
";

const RELEASE: &str = r"
for i = 2, #ARGV do
  if holder_of(redis.call('HGET', KEYS[1], ARGV[i])) == ARGV[1] then
    redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return 0
";

/// `ARGV`: holder, the number of keys `k`, the `k` keys, then each effect command as its
/// number of arguments and the arguments. Every key must be reserved by this holder, else
/// nothing is written: `{code, key}` (-1 not reserved, -2 done, -3 another holder's). Then
/// the commands run in order; one that fails stops the script with `{-4, its index, the
/// error}` (Redis has no rollback: the commands before it stay applied, the keys stay
/// reserved). Then the keys are done: `{0, replies}`.
const COMMIT_WITH: &str = r"
local holder, k = ARGV[1], tonumber(ARGV[2])
for i = 3, 2 + k do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  if not v then return {-1, ARGV[i]} end
  if v == '1' then return {-2, ARGV[i]} end
  if holder_of(v) ~= holder then return {-3, ARGV[i]} end
end
local out = {}
local i = 3 + k
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  local r = redis.pcall(unpack(ARGV, i + 1, i + n))
  if type(r) == 'table' and r.err then return {-4, #out + 1, r.err} end
  out[#out + 1] = r
  i = i + 1 + n
end
for j = 3, 2 + k do redis.call('HSET', KEYS[1], ARGV[j], '1') end
return {0, out}
";

/// Arguments of one effect command at most: the script spreads them with `unpack`, which
/// Redis's Lua bounds at 8,000 values.
const MAX_EFFECT_ARGS: usize = 7_000;

struct Inner {
    client: redis::Client,
    conn: OnceCell<ConnectionManager>,
    scripts: [redis::Script; 4],
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
    /// Why the scope cannot be used, when it cannot: every call fails with it.
    bad_scope: Option<Arc<str>>,
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
                    redis::Script::new(&format!("{HOLDER}{COMMIT}")),
                    redis::Script::new(&format!("{HOLDER}{RELEASE}")),
                    redis::Script::new(&format!("{HOLDER}{COMMIT_WITH}")),
                ],
            }),
            key: hash_key("default"),
            holder: new_holder(""),
            name: Arc::from(""),
            bad_scope: None,
        })
    }

    /// The same server, keys of another scope (a pipeline of its own). In a Redis Cluster
    /// a scope's keys are one hash, on one node; the scope is its hash tag, so effects
    /// given to [`commit_with`](Self::commit_with) go on keys tagged `{scope}`. A scope is 1
    /// to 200 bytes without braces, spaces or control characters; any other fails every
    /// call of the store with an error naming it.
    ///
    /// ```
    /// let s = flowline_redis::RedisStore::open("redis://127.0.0.1/").unwrap().scope("mail");
    /// # let _ = s;
    /// ```
    pub fn scope(mut self, scope: &str) -> Self {
        self.key = hash_key(scope);
        self.bad_scope = crate::limit::bad_name(scope).map(|why| {
            let why = why.replace("the limit's keys", "the store's keys");
            Arc::from(format!("redis store: scope {scope:?} {why}"))
        });
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

    /// Applies `effect` (Redis commands) and marks `keys` done, in one script on the
    /// server: both happen or neither, and no other client's command runs in between. When
    /// an item's effect is a write to this Redis (a counter, a hash field, an entry added
    /// to a stream), this makes it exactly-once across crashes: a key is done if and only if
    /// its effect is there, and a done key is never processed again (its item is skipped).
    /// The `RedisStore` counterpart of `flowline_sqlite::SqliteStore::commit_with`.
    ///
    /// Each key must be reserved by this holder (as
    /// [`idempotent`](flowline::Flow::idempotent) does when the item enters). If one is not
    /// — never reserved, already done, or reserved by another holder because this one's
    /// reservation expired and was taken over (a worker cut off past the `ttl`, whose entry
    /// another worker runs now) — nothing is applied and the call fails, naming the key.
    ///
    /// Returns the replies of the commands, one per command (`.ignore()` does not apply).
    /// Redis has no rollback: a command that fails when it runs (a wrong type at its key)
    /// stops the script with an error naming it, and the commands before it stay applied
    /// while the keys stay reserved; give commands that cannot fail, or the failing one
    /// first. A call whose reply is lost (the connection dropped) was applied once or not
    /// at all; it is not retried here. Blocking commands and `MULTI` are refused by Redis
    /// inside a script. In a Redis Cluster the effect's keys must share the scope's hash
    /// tag (`{scope}`), or the server refuses the call.
    ///
    /// Effects outside Redis (an HTTP call, a mail) cannot be part of the script: they stay
    /// at least once. Do them first and commit after, keyed so that the other side drops a
    /// repeat (an idempotency key the service honours); then only an item whose worker died
    /// between the two runs the outside effect again.
    ///
    /// ```no_run
    /// use flowline::prelude::*;
    /// use flowline_redis::{RedisStore, RedisStream, StreamOptions};
    /// # #[tokio::main] async fn main() -> Result<(), flowline::Error> {
    /// let opts = StreamOptions::new().min_idle(std::time::Duration::from_secs(30));
    /// let store = RedisStore::open("redis://127.0.0.1/").unwrap().scope("jobs").holder("worker-1");
    /// let effects = store.clone();
    /// RedisStream::new("redis://127.0.0.1/", "{jobs}", "workers", "worker-1", opts)?
    ///     .pipeline()
    ///     // Reservations expire before a dead worker's entries are reclaimed.
    ///     .idempotent(store, |e| e.id().to_string())
    ///     .ttl(std::time::Duration::from_secs(15))
    ///     .try_map_async("count", move |e| {
    ///         let store = effects.clone();
    ///         async move {
    ///             let mut effect = redis::pipe();
    ///             effect.hincr("{jobs}:totals", e.get_str("account").unwrap_or("?"), 1);
    ///             store.commit_with(&[e.id().to_string()], &effect).await
    ///         }
    ///     })
    ///     .workers(16)
    ///     .run()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn commit_with(
        &self,
        keys: &[String],
        effect: &redis::Pipeline,
    ) -> Result<Vec<redis::Value>, BoxError> {
        if let Some(why) = &self.bad_scope {
            return Err(why.to_string().into());
        }
        let mut inv = self.inner.scripts[3].prepare_invoke();
        inv.key(&*self.key).arg(&*self.holder).arg(keys.len());
        for k in keys {
            inv.arg(k);
        }
        let mut names = Vec::new();
        for (i, cmd) in effect.cmd_iter().enumerate() {
            let args: Vec<&[u8]> = cmd
                .args_iter()
                .map(|a| match a {
                    redis::Arg::Simple(b) => Ok(b),
                    _ => Err(format!(
                        "commit_with: effect command {} has a cursor argument",
                        i + 1
                    )),
                })
                .collect::<Result<_, _>>()?;
            if args.is_empty() || args.len() > MAX_EFFECT_ARGS {
                return Err(format!(
                    "commit_with: effect command {} has {} arguments (1 to {MAX_EFFECT_ARGS}): nothing applied",
                    i + 1,
                    args.len()
                )
                .into());
            }
            names.push(String::from_utf8_lossy(args[0]).into_owned());
            inv.arg(args.len());
            for a in args {
                inv.arg(a);
            }
        }
        let mut c = self.conn().await?;
        let reply: redis::Value = inv.invoke_async(&mut c).await?;
        let bad = || format!("commit_with: a reply of the wrong shape: {reply:?}");
        let mut parts = crate::entry::items(reply.clone())
            .ok_or_else(bad)?
            .into_iter();
        let code = parts
            .next()
            .as_ref()
            .and_then(crate::entry::int)
            .ok_or_else(bad)?;
        let arg = parts.next();
        let text = |v: Option<&redis::Value>| v.and_then(crate::entry::text).unwrap_or_default();
        let holder = &self.holder;
        Err(match code {
            0 => return crate::entry::items(arg.unwrap_or(redis::Value::Nil)).ok_or_else(|| bad().into()),
            -1 => format!("commit_with: key {:?} is not reserved (by holder {holder}): nothing applied", text(arg.as_ref())),
            -2 => format!("commit_with: key {:?} is already done: nothing applied", text(arg.as_ref())),
            -3 => format!(
                "commit_with: key {:?} is reserved by another holder (the reservation of {holder} expired and was taken over): nothing applied",
                text(arg.as_ref())
            ),
            -4 => {
                let n = arg.as_ref().and_then(crate::entry::int).unwrap_or(0);
                let name = usize::try_from(n).ok().and_then(|n| names.get(n.wrapping_sub(1))).cloned().unwrap_or_default();
                format!(
                    "commit_with: effect command {n} ({name}) failed: {}; the commands before it were applied, the keys stay reserved",
                    text(parts.next().as_ref())
                )
            }
            _ => bad(),
        }
        .into())
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
        if let Some(why) = &self.bad_scope {
            return Err(why.to_string().into());
        }
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

    fn renew<'a>(&'a self, keys: &'a [String], ttl: Duration) -> StoreFuture<'a, Vec<bool>> {
        /// `ARGV`: holder, ttl ms, keys. A key this holder reserves gets a new expiry on the
        /// server's clock (`1`); any other is left alone (`0`).
        const RENEW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local holder, ttl = ARGV[1], tonumber(ARGV[2])
local out = {}
for i = 3, #ARGV do
  local r = 0
  if holder_of(redis.call('HGET', KEYS[1], ARGV[i])) == holder then
    redis.call('HSET', KEYS[1], ARGV[i], '0:' .. (now + ttl) .. ':' .. holder)
    r = 1
  end
  out[#out + 1] = r
end
return out
";
        static SCRIPT: std::sync::LazyLock<redis::Script> =
            std::sync::LazyLock::new(|| redis::Script::new(&format!("{HOLDER}{RENEW}")));
        Box::pin(async move {
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            if let Some(why) = &self.bad_scope {
                return Err(why.to_string().into());
            }
            let mut inv = SCRIPT.prepare_invoke();
            inv.key(&*self.key)
                .arg(&*self.holder)
                .arg(ttl.as_millis().min(FAR_MS).to_string());
            for k in keys {
                inv.arg(k);
            }
            let mut c = self.conn().await?;
            let codes: Vec<i64> = inv.invoke_async(&mut c).await?;
            if codes.len() != keys.len() {
                return Err("renew: a reply of the wrong length".into());
            }
            Ok(codes.into_iter().map(|c| c == 1).collect())
        })
    }
}
