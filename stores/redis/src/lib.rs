//! # flowline-redis
//!
//! Redis for [flowline] pipelines, so that one job runs on several processes or machines:
//!
//! - [`RedisStream`]: a source reading a stream through a consumer group. An entry is
//!   acknowledged only once its item has finished (delivered, dropped by an operator, or
//!   failed *and* written to the dead-letter stream); a cancelled item stays pending. A
//!   restarted consumer re-reads its own pending entries first; idle entries of dead
//!   consumers are reclaimed after `min_idle` (`XAUTOCLAIM`); a live consumer renews its
//!   in-flight entries' leases so a long call is not stolen; an entry delivered more than
//!   `max_deliveries` times goes to the dead letters ([`StreamOptions`]). An entry
//!   delivered before and not acknowledged (a suspect: it may have killed its consumer)
//!   runs alone, so a poison entry does not take its neighbours to the dead letters with
//!   it ([`StreamOptions::isolate_suspects`]).
//! - [`StreamSink`]: a pipeline that ends in a stream (`XADD`, pipelined per batch), so stages
//!   chain across processes.
//! - [`RedisStore`] (idempotency keys) and [`RedisCheckpoints`] (cursor checkpoints), the
//!   same traits as the SQLite and PostgreSQL stores; [`RedisStore::commit_with`] writes an
//!   effect in Redis together with its key, for effects applied exactly once.
//! - [`RedisRate`] and [`RedisInflight`]: a rate and an in-flight bound shared by every
//!   process, given to a stage where the local `Rate` and `Inflight` go (see below).
//! - [`is_transient`]: whether an item's error is Redis failing (a dropped connection, a
//!   server `LOADING` or failing over) rather than the item, for the user's own effects.
//! - For code of your own beside them: [`connect`] / [`connect_lazy`] (a connection that
//!   reconnects by itself), [`call`] (a command tried again while the server is down, under
//!   an [`Outage`](flowline::Outage) policy), and [`parse_streams`] / [`parse_entries`]
//!   (`XREAD` and `XRANGE` replies read into [`StreamEntry`]s, a malformed reply an error).
//!
//! ```no_run
//! use flowline::prelude::*;
//! use flowline_redis::{RedisStream, StreamOptions};
//! use std::time::Duration;
//! # #[tokio::main] async fn main() -> Result<(), flowline::Error> {
//! // The same program on every machine; only the consumer name differs.
//! let name = std::env::var("WORKER").unwrap_or_else(|_| "worker-1".into());
//! let opts = StreamOptions::new().min_idle(Duration::from_secs(30)).max_deliveries(5);
//! let report = RedisStream::new("redis://10.0.0.5/", "{jobs}", "workers", &name, opts)?
//!     .pipeline()
//!     .map_async("work", |e| async move { e.get_str("url").map(str::to_owned) })
//!     .workers(32)
//!     .run()
//!     .await?;
//! println!("{report}");
//! # Ok(()) }
//! ```
//!
//! ## When Redis fails
//!
//! A fault of the server is never an item's failure. Every connection of the crate is a
//! `ConnectionManager` (it reconnects by itself), and every request — reads, acks, dead
//! letters, lease renewals, reclaims, the stores' scripts, checkpoints, the shared limits,
//! the sink's writes — is tried again under an [`Outage`](flowline::Outage) policy
//! ([`StreamOptions::outage`], [`RedisStore::outage`], [`RedisCheckpoints::outage`],
//! [`StreamSink::outage`], [`RedisRate::outage`], [`RedisInflight::outage`]; default
//! [`Outage::default`](flowline::Outage::default): keep trying for 5 minutes, waits of
//! 50 ms doubling to 1 s, jittered). Transient are: connection and I/O errors, timeouts,
//! `LOADING`, `READONLY`, `MASTERDOWN`, `TRYAGAIN`, `CLUSTERDOWN`; an error of the command
//! itself (`WRONGTYPE`, a syntax error) is not, and a script the server forgot (`NOSCRIPT`
//! after a restart) is loaded again. While Redis is down the job pauses: no entry is read,
//! no call starts, acknowledgements wait (none is dropped, none is sent for an item that did
//! not end), and nothing is dead-lettered for it. When it is back the job goes on by itself.
//! Past the policy's limit the run ends with [`Error::Outage`](flowline::Error::Outage),
//! naming the server and its last error; the entries it held stay pending, run again by a
//! rerun or another consumer.
//!
//! A request whose reply was lost (the connection dropped after the server applied it) is
//! safe to try again: a read or a reclaim that may have delivered entries unseen makes the
//! source re-read its own pending entries (skipping those in flight or ended); a
//! reservation or a `commit_with` tried again finds its own first try's work. A pause of
//! every consumer at once (the server frozen or restarting; idle times run on the server's
//! clock) is not taken for their deaths: claims wait one `min_idle` after such a pause, so
//! live owners renew first.
//!
//! The user's own effects on Redis reconnect with a `ConnectionManager` and use
//! [`is_transient`] with [`Retry::retry_if`](flowline::Retry::retry_if) and
//! [`Breaker::counts`](flowline::Breaker::counts), so they wait for the server rather
//! than fail (`examples/redis_workers.rs`). Tested with three worker processes and 20,000
//! jobs while connections are killed every 2 s, the server is restarted, or frozen for 5 s:
//! no job lost, none dead-lettered, no effect applied twice, the run finishing by itself.
//!
//! ## On N machines
//!
//! Every worker points at the same Redis and reads the same stream in the same group, each
//! under a name of its own that it keeps across restarts (the host name, a pod's stable
//! name). Redis hands each entry to one consumer; throughput grows with workers until Redis
//! (one core: some 100,000 small entries/s read and acknowledged) or the service the stages
//! call saturates. A machine that dies leaves its entries pending; they run elsewhere after
//! `min_idle` (plus at most a second), or on that machine when it comes back under its name.
//! Consumers are never deleted: a consumer's name holds its pending entries.
//!
//! **Redis Cluster**: a stream lives on one node, so put the stream and every key that goes
//! with it under one hash tag — the stream `{jobs}`, its dead letters `{jobs}:dead`
//! ([`StreamOptions::dead_letter_stream`]), checkpoints `{jobs}:checkpoints`
//! ([`RedisCheckpoints::key`]); the idempotency keys of a scope are one hash,
//! `flowline:{scope}:idempotency`, so a scope named like the stream's tag (`jobs`) puts
//! them on its slot, and the keys an effect given to [`RedisStore::commit_with`] writes
//! take the same tag (`{jobs}:totals`). The scripts (dead-lettering, lease renewal,
//! reservations, effects with their commits) then touch one slot each. A source checks
//! this before it runs: a stream's hash tag must close and not be empty, and a dead-letter
//! stream given by name must carry the stream's tag (else a configuration error naming
//! it). One stream is one node's throughput: to go past it, shard the
//! job over several streams (`{jobs-0}`, `{jobs-1}`, ...) with a source per stream.
//!
//! **Limits**:
//! - Delivery is at least once. An entry runs twice only when its consumer dies, or stops
//!   (starved of CPU, cut off from Redis) longer than `min_idle` minus one lease period
//!   (`min_idle / 5`) while the other consumers run on, with the entry held; or when the
//!   acknowledgement is lost with the process. **The bound** is what the consumer held: its
//!   calls in flight *and* its read-ahead — the entries read but not yet started (up to
//!   `batch` in the source's buffer and one batch being handed out, plus what the stages
//!   buffer before the call) — since they are pending under its name too. Each such entry
//!   runs at most twice per takeover.
//! - **Effects once**: key the stage with [`Flow::idempotent`](flowline::Flow::idempotent)
//!   over a [`RedisStore`] whose reservation `ttl` is shorter than `min_idle` (so a reclaimed
//!   entry's reservation has expired), and write an effect that is a Redis write with
//!   [`RedisStore::commit_with`]: the effect and the key's commit are one script, applied only
//!   by the key's current holder. A worker killed after it is applied leaves the key done
//!   (the entry is skipped where it is reclaimed); killed before, it left nothing. Tested
//!   with three worker processes, one SIGKILLed: zero effects applied twice.
//! - Effects **outside Redis** (an HTTP call, a mail, another database) stay at least once:
//!   no script can take them back. Do the outside effect first and commit its key right
//!   after (`commit_with` with no command, or the idempotent stage's own commit at the
//!   item's end); only an item whose worker died between the two repeats the effect, so
//!   give the outside service the entry id as its idempotency key when it takes one:
//!
//! ```no_run
//! use flowline::prelude::*;
//! use flowline_redis::{RedisStore, RedisStream, StreamOptions};
//! use std::time::Duration;
//! # async fn send_mail(to: &str, idempotency_key: &str) -> Result<(), flowline::BoxError> { Ok(()) }
//! # #[tokio::main] async fn main() -> Result<(), flowline::Error> {
//! let opts = StreamOptions::new().min_idle(Duration::from_secs(60));
//! let keys = RedisStore::open("redis://10.0.0.5/").unwrap().scope("mail").holder("worker-1");
//! let commits = keys.clone();
//! RedisStream::new("redis://10.0.0.5/", "{mail}", "senders", "worker-1", opts)?
//!     .pipeline()
//!     .idempotent(keys, |e| e.id().to_string())
//!     .ttl(Duration::from_secs(30))
//!     .try_map_async("send", move |e| {
//!         let commits = commits.clone();
//!         async move {
//!             let key = e.id().to_string();
//!             // At least once: repeated only if this worker dies before the next line.
//!             send_mail(e.get_str("to").unwrap_or_default(), &key).await?;
//!             // Exactly once, with the key: a Redis counter of what was sent.
//!             let mut effect = redis::pipe();
//!             effect.incr("{mail}:sent", 1);
//!             commits.commit_with(&[key], &effect).await?;
//!             Ok::<_, flowline::BoxError>(())
//!         }
//!     })
//!     .workers(16)
//!     .run()
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! - `min_idle` must exceed the longest pause of a live worker (a GC-free Rust process rarely
//!   pauses, but a machine can be cut off or starved of CPU); leases are renewed every
//!   `min_idle / 5`, so a worker keeps its entries through a stall of up to four fifths of
//!   `min_idle`. Each source measures its margin (the longest gap between two renewals,
//!   logged at the end of the run, and a warning once it passes half of `min_idle`). Where
//!   a takeover still happens, the holder that lost an entry applies no effect written with
//!   [`RedisStore::commit_with`]: its reservation was taken over, and the script refuses
//!   the effect of a holder that no longer holds the key (fenced); keep the reservation
//!   `ttl` below `min_idle` so that it is.
//! - Acknowledgements survive a Redis restart only as far as its persistence does: run Redis
//!   with AOF (`appendfsync everysec` repeats at most a second of work after a crash of the
//!   server; `always` repeats none). Without persistence a restart loses the stream itself.
//! - Every part connects to one server (`redis::Client`): a Cluster client, which follows
//!   `MOVED` redirects, is not wired in. On a Redis Cluster, point a job's source, sink and
//!   stores at the node (or its failover address) that holds the job's hash tag; a
//!   resharding that moves the slot fails the calls with `MOVED` until the address changes.
//! - A failed item's dead letter holds the entry's fields, id, delivery count and reason;
//!   the error text goes to the run's own [`DeadLetter`](flowline::DeadLetter) target.
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
//! **When Redis is down** (refused, timed out after 1 s): the acquire waits, trying again
//! under the limit's outage policy ([`RedisRate::outage`], [`RedisInflight::outage`]). A
//! wrong type at a key, a reply of the wrong shape, or an outage past the policy's limit
//! fails the acquire: the stage logs it (`tracing`, `warn`) and asks again after a backoff
//! (10 ms doubling to 1 s). No call starts meanwhile; no item is failed or lost: the items
//! wait in the stage, the source is held back, and the run goes on when Redis is back. A script the server forgot (`SCRIPT FLUSH`, a restart) is loaded again
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
//!
//! Tests, examples and benchmarks start their own server with [`test_server`] (feature
//! `test-server`). `examples/redis_workers.rs` shows three workers sharing a job, one killed.

#![warn(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod ack;
mod checkpoints;
mod conn;
mod entry;
mod lease;
mod limit;
mod names;
mod options;
mod reclaim;
mod sink;
mod source;
mod store;
#[cfg(any(test, feature = "test-server"))]
#[cfg_attr(docsrs, doc(cfg(feature = "test-server")))]
pub mod test_server;
mod transient;

pub use checkpoints::RedisCheckpoints;
pub use conn::{call, connect, connect_lazy};
pub use entry::{ReadEntry, ReplyError, StreamEntry, parse_entries, parse_streams};
pub use limit::inflight::{InflightLease, RedisInflight};
pub use limit::rate::{RateGrant, RedisRate};
pub use options::StreamOptions;
pub use sink::StreamSink;
pub use source::RedisStream;
pub use store::RedisStore;
pub use transient::is_transient;
