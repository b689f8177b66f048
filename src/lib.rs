//! # flowline
//!
//! Concurrent pipelines over streaming data, on tokio: a source produces items, stages
//! transform them with bounded concurrency, and a sink consumes them — with nothing lost,
//! bounded memory, and a report of what happened to every item.
//!
//! ```
//! use flowline::prelude::*;
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! let report = Pipeline::from_iter(1..=1_000u64)
//!     .try_map_async("fetch", |id| async move {
//!         tokio::time::sleep(Duration::from_millis(5)).await;   // a call to a service
//!         if id % 100 == 0 { Err(format!("user {id} not found")) } else { Ok(id * 2) }
//!     })
//!         .workers(16)
//!         .timeout(Duration::from_secs(2))
//!         .keep_input()
//!     .filter(|x| x % 3 != 0)
//!     .run()
//!     .await
//!     .unwrap();
//! assert_eq!(report.failures, 10);           // kept, counted and logged: never dropped
//! assert!(report.is_balanced());             // in = ok + dropped + failed, per stage
//! println!("{report}");
//! # }
//! ```
//!
//! ## Cookbook
//!
//! | I want to… | Use |
//! |---|---|
//! | run at most *n* requests in flight | [`.map_async(..).workers(n)`](AsyncStage::workers); one bound shared by several stages or pipelines: [`.inflight(&limit)`](AsyncStage::inflight) with an [`Inflight::new(n)`](Inflight::new) |
//! | share one rate or in-flight bound between processes or machines | [`.limit(l)`](AsyncStage::limit) with `flowline_redis::RedisRate` / `RedisInflight`, or any [`Limit`] |
//! | run at most *n* requests per second, no burst | [`.rate_limit(Rate::per_second(n))`](AsyncStage::rate_limit) on the stage ([`Rate::per_second`], [`Rate::per`]) |
//! | … with bursts of up to *b* | [`.rate_limit(Rate::per_second(n).burst(b))`](Rate::burst) |
//! | pause the job on an error and retry after a sleep | [`.retry(Retry::exponential(base).pause_source())`](Retry::pause_source): the source pulls nothing and the stage starts no new item while an item waits; when the backend is down, [`.circuit_breaker(Breaker::consecutive_failures(k))`](AsyncStage::circuit_breaker) pauses the job until a probe succeeds ([`OnOpen::Pause`], the default; the calls that failed are tried again, so an outage that ends costs no item; [`Breaker::counts`] says which errors are the backend's) |
//! | stream rows from SQL by cursor pagination, resume after a crash | [`Pipeline::from_cursor`] with a checkpoint store ([`MemoryCheckpoints`], `flowline_sqlite::SqliteCheckpoints`, `flowline_postgres::PgCheckpoints`); pages are [`Page`]s, [`CursorOptions`] for read-ahead; `stores/sqlite/examples/sql_cursor.rs` |
//! | batch, dedup and look up (ids → one batched fetch) | [`Flow::dedup_by`] (TTL or last-*n* [`Window`]), [`Flow::batch`], [`Flow::batch_dedup_by`]; a dataloader any stage can call: [`Loader`] |
//! | wait for the results of several pipelines for one object | [`Gather`]: one [`part`](Gather::part) per pipeline, joined by key, with a timeout ([`Incomplete`]) |
//! | `generator \| fork(10) \| task1 \| task2 \| branch \| error:retry success:print` | [`Pipeline::from_iter`], [`.map_async("task1", ..).workers(10)`](Flow::map_async), again for `task2`, [`.branch_result()`](Flow::branch_result), a retrying stage on the `Err` side, and both ends in one [`Graph`]; `examples/branch_retry.rs` |
//! | call a `tower::Service` (a `ServiceBuilder` stack) per item | `Flow::call_service` (feature `tower`); one rate for stages and plain service calls: a [`Rate`] is a `tower::Layer` (`RateLimited`) |
//! | call a shared client (`Arc<Api>`) without cloning it in the closure | [`Flow::map_async_with`], [`Flow::try_map_async_with`] |
//! | run the failed items again later | [`.keep_input_json()`](AsyncStage::keep_input_json) with [`DeadLetter::jsonl`], then [`Pipeline::from_dead_letters`] |
//! | fail a call that takes too long | [`.timeout(d)`](AsyncStage::timeout) |
//! | scale the number of workers to what the backend takes | [`.adaptive(Adaptive::vegas(min..=max))`](AsyncStage::adaptive) |
//! | cut the tail latency of a backend with rare slow calls | [`.hedge(Hedge::percentile(0.95))`](AsyncStage::hedge): a second call for a slow one, the first answer wins, extra calls within a budget |
//! | skip items already done by an earlier run | [`Flow::idempotent`] over a [`Store`] ([`MemoryStore`], `flowline_sqlite::SqliteStore`, `flowline_postgres::PgStore`) |
//! | debounce or throttle | [`Flow::debounce`], [`Flow::debounce_by`], [`Flow::throttle`] |
//! | count or aggregate per key per minute (tumbling, sliding, session, count windows) | [`Flow::window`] with [`Tumbling`], [`Sliding`], [`Session`], [`Count`]; [`Windows::event_time`] and [`Windows::allowed_lateness`] for event time; late items counted ([`StageReport::late`]) and dead-lettered, or on a side output ([`Windows::aggregate_with_late`]) |
//! | pause, resume, step or stop a running job | [`Flow::spawn`] → [`Handle`]; from other tasks: [`Handle::control`] → [`Control`] (cloneable) |
//! | cancel a run with my service's shutdown token | [`Run::cancel_on`] ([`RunOptions::cancel_on`]); a running job's own token: [`Handle::cancellation_token`] |
//! | stop on Ctrl-C and still get the report | [`Run::stop_on_signal`]`(tokio::signal::ctrl_c)`: the first stops gracefully, a second cancels; SIGINT, SIGTERM and SIGHUP: `UnixSignals::stop()` (feature `signal`); a grace before the cancel: [`Run::signal_grace`]; act on each step (end child processes, say what still runs): [`Run::on_signal`] |
//! | see the run in my traces and logs | `tracing` spans: `run{pipeline}` (under the span current where the run starts), `stage{stage, kind}` per stage task, `call{seq, attempt, outcome}` with [`AsyncStage::trace_calls`]; failures are logged as one `WARN` line per stage and 5 s with counts by reason and a sample |
//! | export metrics to Prometheus | feature `metrics`: per-stage counters and gauges through the `metrics` facade, labelled `pipeline` ([`Run::name`]) and `stage`; the application installs the exporter (`examples/prometheus/`) |
//! | see progress, a heartbeat, a stall | [`Flow::progress`], [`Flow::heartbeat`], [`Flow::stall_after`] |
//! | make several calls at once inside one step | not a pipeline's job: `tokio::try_join!` (or a `JoinSet`) inside the stage's closure |
//!
//! ## Features
//!
//! - `jsonl` (default): [`DeadLetter::jsonl`], failures appended to a JSON-lines file, and
//!   [`Report::to_json`]; turns on `serde`.
//! - `serde`: [`Report`] is `Serialize` (written out, no derive macro in the build).
//! - `progress`: [`Flow::progress`] draws bars on a terminal; without it, plain lines.
//! - `signal` (unix): `UnixSignals`, a listener for the signals that stop a run (SIGINT,
//!   SIGTERM, SIGHUP, or any set) for [`RunOptions::stop_on_signal`]; turns on tokio's
//!   `signal`.
//! - `tower`: `Flow::call_service` (a `tower::Service` as a stage) and [`Rate`] as a
//!   `tower::Layer`; depends on tower's two trait crates (`tower-service`, `tower-layer`) only.
//! - `metrics`: per-stage metrics through the [`metrics`](https://docs.rs/metrics) facade:
//!   `flowline_stage_received_items_total`, `flowline_stage_sent_items_total`,
//!   `flowline_stage_failed_items_total` (label `reason`: `error`, `timeout`, `panic`,
//!   `circuit_open`), `flowline_stage_dropped_items_total`, `flowline_stage_retries_total`,
//!   the gauges `flowline_stage_in_flight`, `flowline_stage_queue_depth` (items a stage sent
//!   on, waiting in the queue to the next stage), `flowline_adaptive_limit`,
//!   `flowline_breaker_state` (0 closed, 1 half-open, 2 open) and the histogram
//!   `flowline_stage_sampled_call_duration_seconds` (the sampled calls of the report's
//!   percentiles: its count is the sample's, not the calls'),
//!   all labelled `pipeline` and `stage`. They are brought up to the stages' own counters
//!   every second and when the run ends (exact then), so the stages' hot path pays nothing.
//!
//! ## Stores
//!
//! The stores that keep state across runs in a database are crates of their own, so that a
//! pipeline that needs none builds no database driver:
//!
//! - `flowline-sqlite`: `SqliteCheckpoints` (cursor checkpoints) and `SqliteStore`
//!   (idempotency keys) in one embedded SQLite file;
//! - `flowline-postgres`: `PgCheckpoints` and `PgStore` in PostgreSQL tables over a
//!   connection pool, shared by workers on several machines (`PgOptions`).
//!
//! Any other store implements [`CheckpointStore`] or [`Store`].
//!
//! ## Where did it go
//!
//! Names that moved, for code written against earlier versions:
//!
//! - `Flow::rate_limit` (items a second through the pipe) is [`Flow::pace`]; `rate_limit` on
//!   an async stage ([`AsyncStage::rate_limit`]) still limits its calls.
//! - `deadline`, `dead_letter`, `error_policy` and `name` are settings of the run, after the
//!   terminal: `pipeline.run().deadline(d)` ([`Run::deadline`], [`Run::dead_letter`]), or
//!   the same on a [`Graph`].
//! - The metric `flowline_stage_call_duration_seconds` is
//!   `flowline_stage_sampled_call_duration_seconds`: it holds the report's sample of call
//!   times, so its count is not the number of calls.
//! - `SqliteCheckpoints` and `SqliteStore` are in the `flowline-sqlite` crate, the
//!   PostgreSQL stores in `flowline-postgres`, the Redis source and stores in
//!   `flowline-redis`.
//!
//! ## How it runs
//!
//! A [`Pipeline`] is a lazy plan; a terminal ([`Flow::run`], [`Flow::collect`],
//! [`Flow::for_each`], [`Flow::into_stream`], [`Flow::spawn`]) builds it into tasks:
//!
//! - Synchronous operators (`map`, `filter`, `filter_map`, `flat_map`, `inspect`) are fused
//!   into the task before them and run over a whole chunk of items per call.
//! - Each async stage ([`Flow::map_async`]) and each [`Flow::buffer`] is a task of its own;
//!   tasks are joined by bounded channels that carry chunks of up to 512 items — whatever is
//!   ready, never waiting to fill one. A slow stage back-pressures the source, which is
//!   pulled, never pushed.
//! - Every item ends delivered, dropped (by an operator whose job is to drop), or failed; a
//!   failure keeps the stage name, error, attempts and (with `keep_input`) the input, and
//!   goes to the [`DeadLetter`] target. A panic in user code fails the item, not the run.
//! - When a run ends, by any path, every task it spawned has ended.

#![warn(missing_docs)]
#![forbid(unsafe_code)]
// On docs.rs (nightly, `--cfg docsrs`), items behind a feature say which one.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod dead_letter;
mod error;
mod failure;
mod fault;
mod flow;
#[cfg(test)]
mod layers;
mod loader;
mod observe;
mod ops;
mod plan;
mod policy;
mod report;
mod runtime;
mod source;
mod store;
mod topology;
mod util;

pub use dead_letter::DeadLetter;
#[cfg(feature = "jsonl")]
#[cfg_attr(docsrs, doc(cfg(feature = "jsonl")))]
pub use dead_letter::DeadLetterFile;
pub use error::{ConfigProblem, Error};
pub use failure::{BoxError, FailedInput, Failure, ItemError};
pub use fault::{
    Outage, OutageError, OutageWatch, Permanent, Transient, error_chain, is_transient,
    is_transient_with,
};
pub use flow::Flow;
pub use loader::{LoadError, Loader};
pub use observe::progress::{ProgressOptions, StderrAboveProgress};
pub use observe::stall::{Stall, StallAction};
pub use ops::debounce::Debounce;
pub use ops::dedup::{Dedup, Window};
pub use ops::idempotent::Idempotent;
#[cfg(feature = "tower")]
pub use ops::map_async::ServiceCall;
pub use ops::map_async::{
    AsyncStage, Failed, Fallible, FallibleWith, Infallible, InfallibleWith, Routed, StageFn,
    attempt,
};
pub use ops::operator::{Operator, Out, Step};
pub use ops::throttle::Throttle;
pub use ops::window::aggregate::{Aggregate, CollectItems, CountItems, Fold, Reduce};
pub use ops::window::count::Count;
pub use ops::window::session::Session;
pub use ops::window::sliding::Sliding;
pub use ops::window::tumbling::Tumbling;
pub use ops::window::{
    DEFAULT_MAX_OPEN, EventTime, LateItem, OnFull, ProcessingTime, TimeOf, WindowKind, Windowed,
    Windows,
};
pub use plan::{IntoPipeline, Pipeline};
pub use policy::adaptive::Adaptive;
pub use policy::breaker::{Breaker, BreakerReport, BreakerState, OnOpen};
pub use policy::committed::Committed;
pub use policy::gcra;
pub use policy::hedge::Hedge;
pub use policy::inflight::Inflight;
pub use policy::limit::Limit;
pub use policy::rate::Rate;
#[cfg(feature = "tower")]
pub use policy::rate_layer::RateLimited;
pub use policy::retry::{Retry, RetryAfter, RetryBudget};
pub use report::{FailureReasons, LatencySummary, LiveLimits, Report, RunOutcome, StageReport};
pub use runtime::batch_sink::BatchSink;
pub use runtime::handle::{Control, Handle, ItemStream};
pub use runtime::options::{ErrorPolicy, RunOptions};
pub use runtime::run::Run;
pub use runtime::signal::SignalStep;
#[cfg(all(unix, feature = "signal"))]
#[cfg_attr(docsrs, doc(cfg(all(unix, feature = "signal"))))]
pub use runtime::unix_signals::UnixSignals;
pub use source::{Completion, CursorOptions, ItemEnd, Page};
pub use store::checkpoint::{CheckpointStore, MemoryCheckpoints};
pub use store::{MemoryStore, Reservation, Store, StoreFuture};
/// The token that cancels a run from outside ([`RunOptions::cancel_on`]) and that a running
/// one gives out ([`Handle::cancellation_token`]): tokio-util's.
pub use tokio_util::sync::CancellationToken;
pub use topology::gather::{Gather, Gathered, Incomplete};
pub use topology::graph::{Collected, Graph};

// The README's code blocks are compiled and run as doc tests, so the README cannot drift from
// the API. Its example writes dead letters with `DeadLetter::jsonl`, hence the feature.
#[cfg(all(doctest, feature = "jsonl"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// Everything a pipeline author needs: `use flowline::prelude::*;`.
pub mod prelude {
    pub use crate::{
        Adaptive, BatchSink, BoxError, Breaker, BreakerState, Collected, DeadLetter, Error,
        ErrorPolicy, Failed, Failure, Flow, Graph, Handle, Hedge, Inflight, IntoPipeline,
        ItemError, Limit, Loader, OnOpen, Operator, Out, Pipeline, Rate, Report, Retry, RetryAfter,
        RetryBudget, RunOptions, RunOutcome, Step, Throttle, Window,
    };
}
