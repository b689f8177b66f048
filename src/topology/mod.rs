//! Topology: splitting one pipeline into several (`branch`, `branch_result`, `route`,
//! `partition`, `broadcast`), joining several into one (`merge`, `zip`), and running a graph
//! that ends in several sinks ([`Graph`]).
//!
//! Every split is a router task between the upstream and its branches: it moves whole chunks
//! (one channel operation per branch per chunk), counts each item out of the router and into
//! the branch that receives it, and waits for a full branch, so the slowest branch
//! back-pressures the source. A branch that must not hold the others up takes a `buffer(n)`.

pub(crate) mod branch;
pub(crate) mod broadcast;
pub(crate) mod fork;
pub mod gather;
pub(crate) mod graph;
pub(crate) mod merge;
pub(crate) mod partition;
pub(crate) mod route;
pub(crate) mod zip;

use crate::plan::Pipeline;
use crate::report::StageStats;
use crate::runtime::chunk::Chunk;
use crate::runtime::hop::{HOP_CHUNKS, hop};
use crate::runtime::{RunCtx, Upstream};
use fork::{Fork, output, router, split_settings};

/// Splits `p` into `labels.len()` pipelines of the same item type, behind one router task
/// (stage `name`, kind `kind`) that calls `split` on each chunk to add its items to the parts, one per lane.
pub(crate) fn split_by<T, S>(
    p: Pipeline<T>,
    name: &str,
    kind: &'static str,
    labels: Vec<String>,
    copies: bool,
    split: S,
) -> Vec<Pipeline<T>>
where
    T: Send + 'static,
    S: FnMut(Chunk<T>, &mut Vec<Chunk<T>>, &StageStats, &RunCtx) + Send + 'static,
{
    let n = labels.len();
    let Pipeline { build, settings } = p;
    let stage = name.to_string();
    let fork = Fork::new(name, labels, move |b| {
        let up = build(b);
        let stats = b.stage(&stage, kind);
        let mut txs = Vec::with_capacity(n);
        let mut ends: Vec<Upstream<T>> = Vec::with_capacity(n);
        for _ in 0..n {
            let (tx, rx) = hop::<T>(HOP_CHUNKS, &stats);
            txs.push(tx);
            ends.push(Box::new(rx) as Upstream<T>);
        }
        let run = b.run.clone();
        b.spawn(router(up, txs, stats, run, copies, split));
        ends
    });
    split_settings(settings, n, copies)
        .into_iter()
        .enumerate()
        .map(|(i, s)| output(&fork, i, s))
        .collect()
}

/// For n = 0 (a configuration error): one pipeline that carries `error`, so whatever runs it
/// reports the error instead of the split silently producing nothing.
pub(crate) fn rejected<T: Send + 'static>(
    mut p: Pipeline<T>,
    error: crate::Error,
) -> Vec<Pipeline<T>> {
    p.settings.errors.push(error);
    vec![p]
}
