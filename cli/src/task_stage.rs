//! A task of the pipe (`sh(..)`, `http(..)`) as a flowline async stage with its policies:
//! one builder for the local run and for a queue's worker, which differ only in what goes
//! around a job (the item type, what a stop or a skipped input does) and in where `rate(..)`
//! and `inflight(..)` keep their count (this process, or Redis for every worker).

use std::future::Future;
use std::sync::Arc;

use flowline::prelude::*;
use flowline::{AsyncStage, Committed, Fallible};
use flowline_redis::{RedisInflight, RedisRate};

use crate::exec::{Fail, Failed, Item, Runner, TaskRt, Value};
use crate::run::retry_policy;
use crate::spec::Task;

/// A limit on a task's calls: counted here, or shared through Redis.
pub(crate) enum Gate {
    Rate(Rate),
    Inflight(Inflight),
    SharedRate(RedisRate),
    SharedInflight(RedisInflight),
}

impl Gate {
    fn apply<I, F, Fut>(self, stage: Stage<I, F, Fut>) -> Stage<I, F, Fut>
    where
        I: Clone + Send + 'static,
        F: Fn(I) -> Fut + Send + 'static,
        Fut: Future<Output = Result<I, Failed>> + Send + 'static,
    {
        match self {
            Gate::Rate(r) => stage.rate_limit(r),
            Gate::Inflight(b) => stage.inflight(&b),
            Gate::SharedRate(r) => stage.limit(r),
            Gate::SharedInflight(b) => stage.limit(b),
        }
    }
}

/// The gates and the breaker of one task, built by the caller (the local run shares them
/// with its error continuation; a worker's are in Redis).
#[derive(Default)]
pub(crate) struct Policies {
    pub(crate) rate: Option<Gate>,
    pub(crate) inflight: Option<Gate>,
    pub(crate) breaker: Option<Breaker>,
    /// `--state`: the commits' barrier; no job starts while an input that ended is not
    /// committed.
    pub(crate) committed: Option<Committed>,
}

/// The stage [`task_stage`] builds.
pub(crate) type Stage<I, F, Fut> = AsyncStage<I, I, Fallible<F, Fut>>;

/// Task `t` as a stage over `p`: `call` runs each input's job, on `fork(N)` workers (else
/// `jobs`), in finishing order unless `keep_order`, with the task's rate, retry, breaker,
/// adaptive concurrency, in-flight bound and `--state`'s commit barrier, in that order (the
/// rate is the first gate a call passes, the barrier the last).
pub(crate) fn task_stage<I, F, Fut>(
    p: Pipeline<I>,
    t: &Task,
    jobs: usize,
    keep_order: bool,
    policies: Policies,
    call: F,
) -> Stage<I, F, Fut>
where
    I: Clone + Send + 'static,
    F: Fn(I) -> Fut + Send + 'static,
    Fut: Future<Output = Result<I, Failed>> + Send + 'static,
{
    let stage = p
        .try_map_async(&t.name, call)
        .workers(t.policies.fork.unwrap_or(jobs));
    let mut stage = if keep_order { stage } else { stage.unordered() };
    if let Some(g) = policies.rate {
        stage = g.apply(stage);
    }
    if let Some(r) = &t.policies.retry {
        stage = stage.retry(retry_policy(r));
    }
    if let Some(b) = policies.breaker {
        stage = stage.circuit_breaker(b);
    }
    if let Some((lo, hi)) = t.policies.adaptive {
        stage = stage.adaptive(Adaptive::aimd(lo..=hi));
    }
    if let Some(g) = policies.inflight {
        stage = g.apply(stage);
    }
    // The last gate: the wait for the commits ends right before the job starts.
    if let Some(c) = policies.committed {
        stage = stage.limit(c);
    }
    stage
}

/// Runs the job of task `rt` (step `step` of its chain) for `item`: the item with the job's
/// output as its value, or the job's failure.
pub(crate) async fn run_job(
    runner: &Arc<Runner>,
    rt: &Arc<TaskRt>,
    item: Item,
    step: usize,
) -> Result<Item, Failed> {
    match crate::exec::call_job(runner, rt, &item).await {
        Ok(out) => Ok(Item {
            value: output_value(rt, out),
            ..item
        }),
        Err(error) => Err(Failed(Box::new(Fail {
            item,
            step,
            stage: rt.spec.name.clone(),
            error,
            attempts: 1,
        }))),
    }
}

/// A call's result as the item's value: a process's output as it wrote it; an HTTP body
/// as one record (printed as a line).
pub(crate) fn output_value(rt: &TaskRt, out: Vec<u8>) -> Value {
    if rt.command.is_some() {
        Value::Output(out)
    } else {
        Value::One(out)
    }
}
