//! `RedisInflight`: a bound on calls in flight shared by every process, with leases.

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use flowline::{BoxError, ConfigProblem, Limit};
use tokio::sync::Notify;

use super::{Conn, bad_name, key, problem, two_ints, unexpected, wait_us};

/// The shortest lease: a holder renews it three times per lease, over the network.
const MIN_LEASE: Duration = Duration::from_millis(100);
/// The longest lease: a day (a dead process's permits must come back some day).
const MAX_LEASE: Duration = Duration::from_secs(86_400);
/// How often a waiting process asks again when the bound is full (another process's
/// release is seen at the latest this much later; this process's own releases wake its
/// waiters at once).
const POLL: Duration = Duration::from_millis(10);

/// The holders are a sorted set, holder → the instant its lease ends (the server's `TIME`,
/// in ms). ARGV: limit, lease (ms), holder. Expired leases are dropped first: a dead
/// process's permits come back when its leases end. Replies `{1, 0}` (held) or `{0, wait}`
/// (full: the first lease ends in `wait` ms).
const ACQUIRE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], now + lease, ARGV[3])
  if redis.call('PTTL', KEYS[1]) < lease + 1000 then
    redis.call('PEXPIRE', KEYS[1], lease + 1000)
  end
  return {1, 0}
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, tonumber(first[2]) - now}
";

/// Extends the leases of the holders in ARGV[2..] that still hold one (a lease that ended
/// is not revived: its permit may have gone to another process). ARGV[1]: lease (ms).
/// Replies how many were extended.
const RENEW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
local n = 0
for i = 2, #ARGV do
  local s = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if s and tonumber(s) > now then
    redis.call('ZADD', KEYS[1], 'XX', now + lease, ARGV[i])
    n = n + 1
  end
end
if n > 0 and redis.call('PTTL', KEYS[1]) < lease + 1000 then
  redis.call('PEXPIRE', KEYS[1], lease + 1000)
end
return n
";

struct Inner {
    conn: Conn,
    name: String,
    key: String,
    limit: usize,
    lease: Duration,
    /// This handle's prefix for holder names: unique across processes.
    me: String,
    next: AtomicU64,
    /// The holders this process has now (their leases are renewed).
    held: Mutex<HashSet<String>>,
    /// Wakes this process's waiters when one of its permits is given back.
    freed: Notify,
    renewing: std::sync::Once,
    acquire: redis::Script,
    renew: redis::Script,
}

impl Inner {
    fn held(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// At most `n` calls in flight across every process that uses the same name on the same
/// Redis server, the shared counterpart of flowline's [`Inflight`](flowline::Inflight).
///
/// Each call holds a permit with a lease (a sorted set of holder → expiry, on the server's
/// clock). A live process renews the leases of its calls every third of the lease, so a
/// call may run as long as it needs; a process that dies (killed, frozen, cut off) stops
/// renewing, and its permits come back to the others when their leases end, not before. A
/// call that ends gives its permit back at once. Every process must give the same `n` for
/// one name.
///
/// ```no_run
/// use flowline::prelude::*;
/// use flowline_redis::RedisInflight;
/// use std::time::Duration;
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let redis = redis::Client::open("redis://127.0.0.1/")?;
/// // The database takes 20 queries at once, from all the workers together.
/// let db = RedisInflight::new(&redis, "db", 20).lease(Duration::from_secs(10));
/// Pipeline::from_iter(0..1_000u32)
///     .map_async("query", |x| async move { x })
///     .workers(16)
///     .limit(db)
///     .run()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisInflight(Arc<Inner>);

impl fmt::Debug for RedisInflight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RedisInflight({:?}: {}, lease {:?})",
            self.0.name, self.0.limit, self.0.lease
        )
    }
}

/// A permit of a [`RedisInflight`]: the call holds it while it runs; dropping it gives it
/// back (at once if the runtime is still running, else when its lease ends).
///
/// ```no_run
/// use flowline::Limit;
/// # #[tokio::main] async fn main() -> Result<(), flowline::BoxError> {
/// let redis = redis::Client::open("redis://127.0.0.1/")?;
/// let db = flowline_redis::RedisInflight::new(&redis, "db", 2);
/// let lease = db.acquire().await?;
/// drop(lease);
/// # Ok(()) }
/// ```
pub struct InflightLease {
    inner: Arc<Inner>,
    holder: String,
}

impl fmt::Debug for InflightLease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InflightLease({:?})", self.holder)
    }
}

impl Drop for InflightLease {
    fn drop(&mut self) {
        self.inner.held().remove(&self.holder);
        self.inner.freed.notify_waiters();
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return; // No runtime to send it on: the lease ends by itself.
        };
        let (inner, holder) = (self.inner.clone(), std::mem::take(&mut self.holder));
        rt.spawn(async move {
            if let Ok(mut con) = inner.conn.get().await {
                let released: redis::RedisResult<redis::Value> = redis::cmd("ZREM")
                    .arg(&inner.key)
                    .arg(&holder)
                    .query_async(&mut con)
                    .await;
                if let Err(e) = released {
                    tracing::warn!(limit = %inner.name, "could not give back an in-flight permit (its lease ends by itself): {e}");
                }
            }
        });
    }
}

impl RedisInflight {
    /// At most `n` calls in flight under `name`, leases of 30 s. Connects on first use.
    ///
    /// ```
    /// let redis = redis::Client::open("redis://127.0.0.1/").unwrap();
    /// let db = flowline_redis::RedisInflight::new(&redis, "db", 20);
    /// assert_eq!(db.limit(), 20);
    /// ```
    pub fn new(client: &redis::Client, name: &str, n: usize) -> Self {
        RedisInflight::build(Conn::new(client), name, n, Duration::from_secs(30))
    }

    /// How long a permit stays held without a renewal (default 30 s, from 100 ms to a day):
    /// how long a dead process's permits stay lost. Renewals go every third of it.
    ///
    /// ```
    /// use std::time::Duration;
    /// let redis = redis::Client::open("redis://127.0.0.1/").unwrap();
    /// let db = flowline_redis::RedisInflight::new(&redis, "db", 20).lease(Duration::from_secs(5));
    /// assert_eq!(db.lease_time(), Duration::from_secs(5));
    /// ```
    #[must_use]
    pub fn lease(self, lease: Duration) -> Self {
        RedisInflight::build(self.0.conn.clone(), &self.0.name, self.0.limit, lease)
    }

    /// How long an acquire rides out Redis being down (default [`Outage::default`](flowline::Outage::default):
    /// 5 minutes): meanwhile no call starts and no item fails; past it the acquire fails
    /// with an [`OutageError`](flowline::OutageError).
    ///
    /// ```
    /// let redis = redis::Client::open("redis://127.0.0.1/").unwrap();
    /// let db = flowline_redis::RedisInflight::new(&redis, "db", 20).outage(flowline::Outage::forever());
    /// # let _ = db;
    /// ```
    #[must_use]
    pub fn outage(self, policy: flowline::Outage) -> Self {
        let mut conn = self.0.conn.clone();
        conn.outage = policy;
        RedisInflight::build(conn, &self.0.name, self.0.limit, self.0.lease)
    }

    fn build(conn: Conn, name: &str, limit: usize, lease: Duration) -> Self {
        let pid = std::process::id();
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        RedisInflight(Arc::new(Inner {
            conn,
            name: name.to_string(),
            key: key(name, "inflight"),
            limit,
            lease,
            me: format!("{pid}-{:016x}", h.finish()),
            next: AtomicU64::new(0),
            held: Mutex::new(HashSet::new()),
            freed: Notify::new(),
            renewing: std::sync::Once::new(),
            acquire: redis::Script::new(ACQUIRE),
            renew: redis::Script::new(RENEW),
        }))
    }

    /// The bound.
    pub fn limit(&self) -> usize {
        self.0.limit
    }

    /// The lease of a permit.
    pub fn lease_time(&self) -> Duration {
        self.0.lease
    }

    /// Permits this process holds now.
    ///
    /// ```
    /// let redis = redis::Client::open("redis://127.0.0.1/").unwrap();
    /// assert_eq!(flowline_redis::RedisInflight::new(&redis, "db", 2).held_here(), 0);
    /// ```
    pub fn held_here(&self) -> usize {
        self.0.held().len()
    }

    /// Starts the task that renews this process's leases (once per handle); it ends when
    /// the last clone and the last permit are gone.
    fn renew_in_background(&self) {
        let weak = Arc::downgrade(&self.0);
        let every = self.0.lease / 3;
        self.0.renewing.call_once(|| {
            tokio::spawn(renew(weak, every));
        });
    }
}

async fn renew(weak: Weak<Inner>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(inner) = weak.upgrade() else { return };
        let holders: Vec<String> = inner.held().iter().cloned().collect();
        if holders.is_empty() {
            continue;
        }
        let result: Result<i64, BoxError> = async {
            let mut con = inner.conn.get().await?;
            let mut call = inner.renew.key(&inner.key);
            call.arg(inner.lease.as_millis() as u64);
            for h in &holders {
                call.arg(h);
            }
            let reply: redis::Value = call.invoke_async(&mut con).await?;
            match reply {
                redis::Value::Int(n) => Ok(n),
                other => Err(unexpected("renew", &other)),
            }
        }
        .await;
        match result {
            Ok(n) if n < holders.len() as i64 => tracing::warn!(
                limit = %inner.name,
                lost = holders.len() as i64 - n,
                "in-flight permits whose leases ended before they were renewed: the bound may be exceeded until their calls end"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(limit = %inner.name, "could not renew in-flight leases: {e}"),
        }
    }
}

impl Limit for RedisInflight {
    type Permit = InflightLease;

    /// Waits for a permit: asks the script; when the bound is full, asks again when this
    /// process gives one back, or after at most 10 ms.
    fn acquire(&self) -> impl Future<Output = Result<InflightLease, BoxError>> + Send + 'static {
        let me = self.clone();
        async move {
            me.renew_in_background();
            let i = &me.0;
            let holder = format!("{}:{}", i.me, i.next.fetch_add(1, Ordering::Relaxed));
            loop {
                // Registered before asking: a permit given back meanwhile still wakes us.
                let freed = i.freed.notified();
                let reply: redis::Value = i
                    .conn
                    .run(|mut con| {
                        let mut call = i.acquire.key(&i.key);
                        call.arg(i.limit)
                            .arg(i.lease.as_millis() as u64)
                            .arg(&holder);
                        async move { call.invoke_async(&mut con).await }
                    })
                    .await?;
                match two_ints("in-flight", reply)? {
                    (1, _) => {
                        i.held().insert(holder.clone());
                        return Ok(InflightLease {
                            inner: me.0.clone(),
                            holder,
                        });
                    }
                    (0, wait_ms) => {
                        let wait = wait_us(wait_ms.saturating_mul(1000), POLL);
                        tokio::select! {
                            _ = freed => {}
                            _ = tokio::time::sleep(wait.max(Duration::from_millis(1))) => {}
                        }
                    }
                    _ => return Err("unexpected reply from Redis to the in-flight script".into()),
                }
            }
        }
    }

    fn check(&self) -> Result<(), ConfigProblem> {
        let i = &self.0;
        if let Some(reason) = bad_name(&i.name) {
            return Err(problem("key", format!("{:?}", i.name), reason));
        }
        if i.limit == 0 {
            return Err(problem("redis_inflight", "0".into(), "must be at least 1"));
        }
        if i.limit > u32::MAX as usize {
            return Err(problem(
                "redis_inflight",
                i.limit.to_string(),
                "at most 4294967295",
            ));
        }
        if !(MIN_LEASE..=MAX_LEASE).contains(&i.lease) {
            return Err(problem(
                "lease",
                format!("{:?}", i.lease),
                "from 100 ms to a day",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_settings_name_the_option_and_value() {
        let c = redis::Client::open("redis://127.0.0.1:1/").unwrap();
        let bad = |r: RedisInflight| {
            let p = r.check().unwrap_err();
            (p.option, p.value)
        };
        assert_eq!(
            bad(RedisInflight::new(&c, "db", 0)),
            ("redis_inflight", "0".into())
        );
        assert_eq!(
            bad(RedisInflight::new(&c, "db", usize::MAX)).0,
            "redis_inflight"
        );
        assert_eq!(
            bad(RedisInflight::new(&c, "db", 2).lease(Duration::ZERO)),
            ("lease", "0ns".into())
        );
        assert_eq!(
            bad(RedisInflight::new(&c, "db", 2).lease(Duration::MAX)).0,
            "lease"
        );
        assert_eq!(bad(RedisInflight::new(&c, "d b", 2)).0, "key");
        assert!(RedisInflight::new(&c, "db", 2).check().is_ok());
    }
}
