//! Redis for flowline.
//!
//! ## Shared limits
//!
//! [`RedisRate`] and [`RedisInflight`] are limits shared by every process (on one machine or
//! many) that uses the same name on the same Redis server. Both are [`flowline::Limit`]s,
//! given to a stage with [`.limit(..)`](flowline::AsyncStage::limit), where a local
//! [`Rate`](flowline::Rate) or [`Inflight`](flowline::Inflight) would go:
//!
//! ```no_run
//! use flowline::prelude::*;
//! use flowline_redis::{RedisInflight, RedisRate};
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let redis = redis::Client::open("redis://10.0.0.5/")?;
//! Pipeline::from_iter(0..10_000u32)
//!     .map_async("api", |x| async move { x })
//!     .workers(32)
//!     .limit(RedisInflight::new(&redis, "api", 50))      // 50 calls at once, all workers together
//!     .limit(RedisRate::per_second(&redis, "api", 1_000)) // 1,000 calls a second, all together
//!     .run()
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! **Semantics.** A `RedisRate` of `n` per `period` is the local `Rate` across processes:
//! calls are `period / n` apart, and no window of one period (sliding, starting anywhere)
//! holds more than `n` grants across every process; with `.burst(b)`, `b` pass at once
//! after an idle time, a window holds at most `n + b - 1`, and the long-run rate is
//! unchanged. It is GCRA plus a log of the last period's grants, in one Lua script: the log
//! holds the sliding bound when a process that was woken late claims the slots it was owed
//! (up to a twentieth of the period, as the local `Rate` does; without that claim a timer's
//! millisecond of lateness would cost a rate of 1,000/s a large share). A `RedisInflight`
//! of `n` lets at most `n` calls run at once across every process.
//!
//! **Clock.** Every instant is the server's (`TIME`, in microseconds), read inside the
//! script: the processes' own clocks never enter, so machines whose clocks disagree share a
//! rate exactly. A call counts from the instant the server granted it
//! ([`RateGrant::server_time`]). The local `Rate` counts a permit from the instant its call
//! starts (a call held after its grant, by a later gate or a late thread, is counted again
//! when it starts), because one clock sees both; across processes no clock sees a call
//! start, and a second round trip to report it would be late by a reply too. So the script
//! keeps each grant in its log for a period and a slack of 1/200 of it (5 ms of a second):
//! calls that start one reply after their grants, however that delay varies up to the
//! slack, still keep the bound. The slack costs at most 0.5 % of the rate, and only while
//! the log is full. A process stalled longer than that between a grant and its call (a
//! preempted thread on an overloaded machine) can start `n + 1` calls in a period of its
//! own clock; the grants never exceed `n`. Give a shared rate as the **last** gate of a
//! stage, or a grant may wait for the gates after it.
//!
//! **When Redis is down** (refused, timed out after 1 s, a wrong type at a key, a reply of
//! the wrong shape): the acquire fails, the stage logs it (`tracing`, `warn`) and asks again
//! after a backoff (10 ms doubling to 1 s). No call starts meanwhile; no item is failed or
//! lost: the items wait in the stage, the source is held back, and the run goes on when
//! Redis is back. A script the server forgot (`SCRIPT FLUSH`, a restart) is loaded again
//! (`EVALSHA`, then `EVAL` on `NOSCRIPT`). A restarted server without persistence forgets
//! the last period: across the restart, a window may hold up to `burst` grants more.
//!
//! **Leases.** Each in-flight permit is a member of a sorted set (holder → end of lease).
//! A live process renews its permits' leases every third of the lease
//! ([`RedisInflight::lease`], default 30 s), so a call may run as long as it needs; a call
//! that ends gives its permit back at once; a process that dies stops renewing, and its
//! permits come back when their leases end, not before. A process cut off from Redis for
//! longer than a lease loses its leases while its calls still run: the bound may be
//! exceeded until they end (logged).
//!
//! **Keys and Redis Cluster.** A limit named `api` keeps its state in
//! `flowline:{api}:rate`, `flowline:{api}:rate_log` and `flowline:{api}:inflight`. The
//! braces are a hash tag: every key of one limit is on one slot, as a script needs. A name
//! is 1 to 200 bytes, without braces, spaces or control characters (else a configuration
//! error before the run). The keys expire on their own once idle.
//!
//! **Limits of the approach.** Every call costs one round trip and one script run on the
//! server: a single Redis runs tens of thousands of them a second, for all the limits it
//! holds. Every process must give the same settings for one name (the script trusts the
//! caller's). The connection is to one server (`redis::Client`); a Cluster client is not
//! wired in. A waiting process sees another process's release at its next poll (10 ms at
//! most); its own releases wake it at once. The clock is the server's: a failover to a
//! replica whose clock differs shifts the schedule by the difference.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod limit;

pub use limit::inflight::{InflightLease, RedisInflight};
pub use limit::rate::{RateGrant, RedisRate};
