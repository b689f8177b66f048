//! `RedisRate`: a rate shared by every process, GCRA in one Lua script on the server's clock.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flowline::{BoxError, ConfigProblem, Limit};
use tokio::time::Instant;

use super::{Conn, bad_name, key, problem, two_ints, wait_us};

/// The longest period: thirty years, as for flowline's own durations.
const FAR: Duration = Duration::from_secs(86_400 * 365 * 30);

/// How far back a caller that has been waiting may claim the slots that passed while it
/// waited: `period / CATCH_UP_SHARE`, at least [`CATCH_UP_MIN`] (the same as flowline's
/// `Rate`). A timer wakes a caller a millisecond or more late; without a catch-up every late
/// wake-up loses its slot, a large share of a rate of one per millisecond. The log holds the
/// sliding bound whatever this is.
const CATCH_UP_SHARE: u32 = 20;
/// See [`CATCH_UP_SHARE`].
const CATCH_UP_MIN: Duration = Duration::from_millis(2);
/// Starts granted within `period / LOG_MERGE` of each other share one record of the log
/// (counted at the latest of them), so the log holds about this many records at most.
const LOG_MERGE: u32 = 2048;
/// Each grant stays in the log for `period + period / SLACK_SHARE` (5 ms of a second). A
/// grant is made on the server's clock but its call starts one reply later on the caller's,
/// and that delay varies (a busy network, a preempted thread): grants exactly `count` per
/// period would let a delay longer than the one after it put `count + 1` call starts into
/// one period. The slack absorbs such jitter up to its length, at the cost of at most
/// `1 / SLACK_SHARE` of the rate (0.5 %), and only while the log is full.
const SLACK_SHARE: u32 = 200;
/// A process that asks again within this time of its last grant is still waiting (its
/// demand goes on), so it keeps its claim to the slots that passed meanwhile; one that asks
/// later starts afresh and is owed nothing (an idle process never comes back to a burst).
const DEMAND_GAP: Duration = Duration::from_millis(2);

/// GCRA's decision in Lua, the same as [`flowline::gcra::decide`] on the server's
/// microseconds (the tests hold the two to a table of cases): `tat` the theoretical arrival
/// time (nil: never used), `tol` the burst tolerance, `floor` the earliest instant the
/// caller is owed slots from. Returns `1, slot, tat after` (admitted) or `0, slot` (wait
/// until `slot`). A macro, so that the script and its tests are built from one text.
macro_rules! gcra_lua {
    () => {
        r"
local function gcra(tat, interval, tol, floor, now)
  local t0 = tat or floor
  local slot = math.max(t0 - tol, floor)
  if slot > now then
    return 0, slot
  end
  return 1, slot, math.max(t0, slot) + interval
end
"
    };
}

/// The rate's state is two keys: a hash (`tat`, the theoretical arrival time of the next
/// permit, and `total`, the starts in the log) and a list, the log of the last period's
/// starts, oldest first, as `opened:at:count` records. Times are the server's `TIME`, in
/// microseconds. ARGV: interval, tolerance ((burst - 1) × interval), period, cap
/// (count + burst - 1), catch-up, how long the caller has waited, merge, the log's slack
/// (see [`SLACK_SHARE`]); all microseconds but the cap. Replies `{1, 0}` (granted) or `{0, wait}` (ask again in `wait` µs).
///
/// The two rules of flowline's `Rate`, kept for every start: GCRA spacing (a permit conforms
/// from `tat - tolerance`, and a caller waiting since `floor` is owed the slots since then),
/// and the sliding bound (never more than `cap` starts in any window of one period) held by
/// the log, which the catch-up needs: a late caller's owed slots and the on-time ones after
/// them could otherwise fall into one period.
const SCRIPT: &str = concat!(
    gcra_lua!(),
    r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tol = tonumber(ARGV[2])
local period = tonumber(ARGV[3])
local cap = tonumber(ARGV[4])
local catch = tonumber(ARGV[5])
local waited = tonumber(ARGV[6])
local merge = tonumber(ARGV[7])
local held = period + tonumber(ARGV[8])
local st = redis.call('HMGET', KEYS[1], 'tat', 'total')
local tat = tonumber(st[1])
local total = tonumber(st[2]) or 0
local function parse(r)
  local o, a, c = string.match(r, '^(%d+):(%d+):(%d+)$')
  return tonumber(o), tonumber(a), tonumber(c)
end
while true do
  local head = redis.call('LINDEX', KEYS[2], 0)
  if not head then
    total = 0
    break
  end
  local o, a, c = parse(head)
  if not c then
    redis.call('LPOP', KEYS[2])
  elseif a + held > now then
    break
  else
    redis.call('LPOP', KEYS[2])
    total = total - c
  end
end
if total < 0 then total = 0 end
local floor = now - math.min(waited, catch)
local admit, slot, next_tat = gcra(tat, interval, tol, floor, now)
if total >= cap then
  local o, a, c = parse(redis.call('LINDEX', KEYS[2], 0))
  redis.call('HSET', KEYS[1], 'total', string.format('%d', total))
  return {0, math.max(a + held, slot) - now}
end
if admit == 0 then
  return {0, slot - now}
end
tat = next_tat
local at = now
local merged = false
local last = redis.call('LINDEX', KEYS[2], -1)
if last then
  local o, a, c = parse(last)
  if c then
    at = math.max(now, a)
    if at < o + merge then
      redis.call('LSET', KEYS[2], -1, string.format('%d:%d:%d', o, at, c + 1))
      merged = true
    end
  end
end
if not merged then
  redis.call('RPUSH', KEYS[2], string.format('%d:%d:1', at, at))
end
total = total + 1
redis.call('HSET', KEYS[1], 'tat', string.format('%d', tat), 'total', string.format('%d', total))
local ttl = math.floor((math.max(tat - now, 0) + held) / 1000) + 1000
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return {1, now}
"
);

struct Inner {
    conn: Conn,
    name: String,
    /// The state hash and the log list.
    keys: [String; 2],
    count: u64,
    period: Duration,
    burst: u64,
    /// When this process's current demand began, and when it was last granted a permit.
    demand: Mutex<Option<(Instant, Instant)>>,
    script: redis::Script,
}

/// A rate shared by every process that uses the same name on the same Redis server: at
/// most `count` calls per `period`, evenly spaced, across all of them, with the semantics of
/// flowline's local [`Rate`](flowline::Rate):
///
/// - without a [`burst`](RedisRate::burst), calls start `period / count` apart and no
///   window of one period (a sliding one, starting anywhere) holds more than `count` grants;
/// - with a burst `b`, `b` calls may start at once after an idle time, no window of one
///   period holds more than `count + b - 1`, and the long-run rate is unchanged.
///
/// The rule is GCRA, run by one Lua script on the server's clock (`TIME`), so processes on
/// machines whose clocks disagree share it exactly. A call counts from the instant the server
/// granted it (see the crate's front page for what that means for the calls' start times). A
/// rate limit delays calls, it never drops them; when Redis cannot be reached, the stage
/// waits and retries (see [`flowline::Limit`]).
///
/// Clones share one connection. Every process must give the same `count`, `period` and
/// `burst` for one name.
///
/// ```no_run
/// use flowline::prelude::*;
/// use flowline_redis::RedisRate;
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let redis = redis::Client::open("redis://127.0.0.1/")?;
/// // 100 calls per second to the API, whatever the number of workers running this.
/// let api = RedisRate::per_second(&redis, "api", 100);
/// Pipeline::from_iter(0..1_000u32)
///     .map_async("call", |x| async move { x })
///     .workers(8)
///     .limit(api)
///     .run()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisRate(Arc<Inner>);

impl fmt::Debug for RedisRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RedisRate({:?}: {} per {:?}, burst {})",
            self.0.name, self.0.count, self.0.period, self.0.burst
        )
    }
}

impl RedisRate {
    /// `count` calls per second under `name`, no burst. Connects on first use.
    ///
    /// ```
    /// let redis = redis::Client::open("redis://127.0.0.1/").unwrap();
    /// let r = flowline_redis::RedisRate::per_second(&redis, "api", 100);
    /// assert_eq!(r.interval(), std::time::Duration::from_millis(10));
    /// ```
    pub fn per_second(client: &redis::Client, name: &str, count: u64) -> Self {
        RedisRate::per(client, name, count, Duration::from_secs(1))
    }

    /// `count` calls per `period` under `name`, no burst. Connects on first use.
    ///
    /// ```
    /// use std::time::Duration;
    /// let redis = redis::Client::open("redis://127.0.0.1/").unwrap();
    /// let r = flowline_redis::RedisRate::per(&redis, "api", 3, Duration::from_millis(30));
    /// assert_eq!(r.interval(), Duration::from_millis(10));
    /// ```
    pub fn per(client: &redis::Client, name: &str, count: u64, period: Duration) -> Self {
        RedisRate::build(Conn::new(client), name, count, period, 1)
    }

    /// Lets up to `burst` calls start at once after an idle time (default 1: no burst); a
    /// window of one period holds at most `count + burst - 1`.
    ///
    /// ```
    /// let redis = redis::Client::open("redis://127.0.0.1/").unwrap();
    /// let r = flowline_redis::RedisRate::per_second(&redis, "api", 100).burst(20);
    /// assert_eq!(r.burst_size(), 20);
    /// ```
    #[must_use]
    pub fn burst(self, burst: u64) -> Self {
        let i = &self.0;
        RedisRate::build(i.conn.clone(), &i.name, i.count, i.period, burst)
    }

    /// How long an acquire rides out Redis being down (default [`Outage::default`](flowline::Outage::default):
    /// 5 minutes): meanwhile no call starts and no item fails; past it the acquire fails
    /// with an [`OutageError`](flowline::OutageError).
    ///
    /// ```
    /// let redis = redis::Client::open("redis://127.0.0.1/").unwrap();
    /// let r = flowline_redis::RedisRate::per_second(&redis, "api", 100).outage(flowline::Outage::forever());
    /// # let _ = r;
    /// ```
    #[must_use]
    pub fn outage(self, policy: flowline::Outage) -> Self {
        let i = &self.0;
        let mut conn = i.conn.clone();
        conn.outage = policy;
        RedisRate::build(conn, &i.name, i.count, i.period, i.burst)
    }

    fn build(conn: Conn, name: &str, count: u64, period: Duration, burst: u64) -> Self {
        RedisRate(Arc::new(Inner {
            conn,
            name: name.to_string(),
            keys: [key(name, "rate"), key(name, "rate_log")],
            count,
            period,
            burst,
            demand: Mutex::new(None),
            script: redis::Script::new(SCRIPT),
        }))
    }

    /// The time between two calls when no burst is allowed (`period / count`, whole
    /// microseconds: the server's clock counts microseconds).
    pub fn interval(&self) -> Duration {
        match self.0.count {
            0 => Duration::ZERO,
            n => Duration::from_micros((self.0.period.as_micros() / n as u128) as u64),
        }
    }

    /// The burst size (1 = no burst).
    pub fn burst_size(&self) -> u64 {
        self.0.burst
    }

    /// The script's arguments but the wait, in microseconds: interval, tolerance, period,
    /// cap, catch-up, merge, slack.
    fn args(&self) -> [u64; 7] {
        let i = &self.0;
        let us = |d: Duration| d.as_micros().min(u64::MAX as u128) as u64;
        let interval = us(self.interval());
        let catch_up = (i.period / CATCH_UP_SHARE).max(CATCH_UP_MIN);
        [
            interval,
            interval.saturating_mul(i.burst.saturating_sub(1)),
            us(i.period),
            i.count.saturating_add(i.burst.saturating_sub(1)),
            us(catch_up),
            us(i.period / LOG_MERGE),
            us(i.period / SLACK_SHARE),
        ]
    }

    /// When this process's demand began: kept if it asked again right after its last grant.
    fn since(&self, now: Instant) -> Instant {
        let demand = self.0.demand.lock().unwrap_or_else(|p| p.into_inner());
        match *demand {
            Some((since, last)) if now.saturating_duration_since(last) <= DEMAND_GAP => since,
            _ => now,
        }
    }

    fn granted(&self, since: Instant) {
        let mut demand = self.0.demand.lock().unwrap_or_else(|p| p.into_inner());
        *demand = Some((since, Instant::now()));
    }

    /// Asks the server once: `Ok(Ok(grant))` granted, `Ok(Err(wait))` ask again after `wait`.
    async fn ask(&self, waited: Duration) -> Result<Result<RateGrant, Duration>, BoxError> {
        let [interval, tolerance, period, cap, catch_up, merge, slack] = self.args();
        let waited = waited.as_micros().min(u64::MAX as u128) as u64;
        let reply: redis::Value = self
            .0
            .conn
            .run(|mut con| {
                let mut call = self.0.script.key(&self.0.keys[0]);
                call.key(&self.0.keys[1])
                    .arg(interval)
                    .arg(tolerance)
                    .arg(period)
                    .arg(cap)
                    .arg(catch_up)
                    .arg(waited)
                    .arg(merge)
                    .arg(slack);
                async move { call.invoke_async(&mut con).await }
            })
            .await?;
        match two_ints("rate", reply)? {
            (1, at) if at >= 0 => Ok(Ok(RateGrant {
                at: Duration::from_micros(at as u64),
            })),
            (0, wait) => Ok(Err(wait_us(wait, self.0.period * 2))),
            _ => Err("unexpected reply from Redis to the rate script: not 0 or 1".into()),
        }
    }
}

/// A call's leave from a [`RedisRate`]: it holds nothing (a rate's permit is spent when
/// granted), and says when the server granted it.
///
/// ```no_run
/// use flowline::Limit;
/// # #[tokio::main] async fn main() -> Result<(), flowline::BoxError> {
/// let redis = redis::Client::open("redis://127.0.0.1/")?;
/// let rate = flowline_redis::RedisRate::per_second(&redis, "api", 10);
/// let grant = rate.acquire().await?;
/// println!("granted at {:?} since 1970 on the server's clock", grant.server_time());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateGrant {
    at: Duration,
}

impl RateGrant {
    /// When the server granted it: its `TIME`, since the Unix epoch. The instant the rate
    /// counts the call at; the same clock for every process.
    pub fn server_time(&self) -> Duration {
        self.at
    }
}

impl Limit for RedisRate {
    type Permit = RateGrant;

    /// Waits for a permit: asks the script, sleeps as long as it says, asks again.
    fn acquire(&self) -> impl Future<Output = Result<RateGrant, BoxError>> + Send + 'static {
        let me = self.clone();
        async move {
            let since = me.since(Instant::now());
            loop {
                match me.ask(since.elapsed()).await? {
                    Ok(grant) => {
                        me.granted(since);
                        return Ok(grant);
                    }
                    Err(wait) => tokio::time::sleep(wait).await,
                }
            }
        }
    }

    fn check(&self) -> Result<(), ConfigProblem> {
        let i = &self.0;
        if let Some(reason) = bad_name(&i.name) {
            return Err(problem("key", format!("{:?}", i.name), reason));
        }
        let rate = || format!("{} per {:?}", i.count, i.period);
        if i.count == 0 {
            return Err(problem("redis_rate", rate(), "count must be at least 1"));
        }
        if i.period > FAR {
            return Err(problem(
                "redis_rate",
                rate(),
                "the period must be at most 30 years",
            ));
        }
        if self.interval().is_zero() {
            return Err(problem(
                "redis_rate",
                rate(),
                "the period must be more than zero and at least 1 µs per call (the server's clock counts microseconds)",
            ));
        }
        if i.burst == 0 {
            return Err(problem("burst", "0".into(), "must be at least 1"));
        }
        if self
            .interval()
            .saturating_mul(i.burst.min(u32::MAX as u64) as u32)
            > FAR
            || i.burst > u32::MAX as u64
        {
            return Err(problem(
                "burst",
                i.burst.to_string(),
                "at most 30 years' worth of calls",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> redis::Client {
        redis::Client::open("redis://127.0.0.1:1/").unwrap()
    }

    /// `decide` in Lua on a real server, for `(tat or "", interval, tol, floor, now)`:
    /// `(admitted, slot, tat after or -1)`.
    fn lua_decide(
        con: &mut redis::Connection,
        case: (Option<u64>, u64, u64, u64, u64),
    ) -> (i64, i64, i64) {
        let (tat, interval, tol, floor, now) = case;
        let script = redis::Script::new(concat!(
            gcra_lua!(),
            r"
local admit, slot, tat = gcra(tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]))
return {admit, slot, tat or -1}
"
        ));
        let got: Vec<i64> = script
            .arg(tat.map_or(String::new(), |t| t.to_string()))
            .arg(interval)
            .arg(tol)
            .arg(floor)
            .arg(now)
            .invoke(con)
            .unwrap();
        (got[0], got[1], got[2])
    }

    #[test]
    fn the_script_decides_as_flowline_gcra_does() {
        use flowline::gcra::{Decision, decide};
        let server = crate::test_server::RedisServer::start(false);
        let mut con = server.client().get_connection().unwrap();
        // Microseconds of the server's clock: now about 2026, 30 years at most in a setting
        // (what `check` lets through), all within a Lua number's exact integers (2^53).
        let now = 1_796_000_000_000_000u64;
        let year = 365 * 86_400 * 1_000_000u64;
        let cases = [
            (None, 10_000, 0, now, now),
            (Some(now + 10_000), 10_000, 0, now, now),
            (Some(now + 10_000), 10_000, 0, now - 2_000, now),
            (Some(now - 5_000_000), 10_000, 0, now - 2_000, now),
            (Some(now - 5_000), 10_000, 0, now - 20_000, now),
            (Some(now + 190_000), 10_000, 190_000, now, now),
            (Some(now + 200_000), 10_000, 190_000, now, now),
            (Some(now + 30 * year), 1, 30 * year, now, now),
            (Some(now + 30 * year + 1), 30 * year, 30 * year, now, now),
            (None, 1, 0, 0, 0),
            (Some(5), 1, 30 * year, 0, 0),
            (Some(0), 0, 0, 0, 0),
            (Some(1), 1, 0, 0, 0),
        ];
        for case in cases {
            let (tat, interval, tol, floor, at) = case;
            let rust = match decide(tat, interval, tol, floor, at) {
                Decision::Admit { at, tat } => (1, at as i64, tat as i64),
                Decision::Wait { until } => (0, until as i64, -1),
            };
            assert_eq!(lua_decide(&mut con, case), rust, "{case:?}");
        }
    }

    #[test]
    fn hostile_settings_name_the_option_and_value() {
        let c = client();
        let bad = |r: RedisRate| {
            let p = r.check().unwrap_err();
            (p.option, p.value)
        };
        assert_eq!(
            bad(RedisRate::per_second(&c, "api", 0)),
            ("redis_rate", "0 per 1s".into())
        );
        assert_eq!(
            bad(RedisRate::per(&c, "api", 5, Duration::ZERO)),
            ("redis_rate", "5 per 0ns".into())
        );
        // 2 per µs: finer than the server's clock.
        assert_eq!(
            bad(RedisRate::per(&c, "api", 2, Duration::from_micros(1))).0,
            "redis_rate"
        );
        assert_eq!(
            bad(RedisRate::per(&c, "api", 1, Duration::MAX)).0,
            "redis_rate"
        );
        assert_eq!(
            bad(RedisRate::per_second(&c, "api", 1).burst(0)),
            ("burst", "0".into())
        );
        assert_eq!(
            bad(RedisRate::per_second(&c, "api", 1).burst(u64::MAX)).0,
            "burst"
        );
        assert_eq!(
            bad(RedisRate::per_second(&c, "a{b}", 1)),
            ("key", "\"a{b}\"".into())
        );
        assert_eq!(bad(RedisRate::per_second(&c, "", 1)).0, "key");
        assert!(RedisRate::per_second(&c, "api", u64::MAX).check().is_err());
        assert!(RedisRate::per_second(&c, "api", 1_000_000).check().is_ok());
        assert!(
            RedisRate::per_second(&c, "api", 10)
                .burst(1000)
                .check()
                .is_ok()
        );
    }
}
