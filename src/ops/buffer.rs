//! `buffer(n)`: an explicit async boundary. The stages before it run in their own task and
//! may work ahead by about `n` items while the stages after it are busy.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::error::Error;
use crate::plan::Pipeline;
use crate::report::StageStats;
use crate::runtime::chunk::{CHUNK_CAP, Chunk};
use crate::runtime::hop::hop;
use crate::runtime::{CancelWatch, RunCtx, Upstream};

pub(crate) fn buffer<T: Send + 'static>(mut p: Pipeline<T>, n: usize) -> Pipeline<T> {
    if n == 0 {
        p.settings.errors.push(Error::config(
            "buffer",
            "capacity",
            n,
            "must be at least 1 item",
        ));
    }
    let chunks = n.div_ceil(CHUNK_CAP).max(1);
    p.then(move |b, up| {
        let stats = b.stage("buffer", "buffer");
        let (tx, rx) = hop(chunks, &stats);
        let run = b.run.clone();
        b.spawn(pump(up, tx, stats, run));
        Box::new(rx) as Upstream<T>
    })
}

/// Moves chunks from `up` into `tx` until the upstream ends, the downstream goes away, or
/// the run is cancelled. Counts an item `received` when pulled and `passed` once sent.
pub(crate) async fn pump<T: Send + 'static>(
    mut up: Upstream<T>,
    tx: mpsc::Sender<Chunk<T>>,
    stats: Arc<StageStats>,
    run: Arc<RunCtx>,
) {
    let mut cancel = CancelWatch::new(&run.cancel);
    loop {
        let Some(next) = cancel.next_chunk(&mut up).await else {
            break;
        };
        let Some(chunk) = next else { return };
        let n = chunk.len();
        StageStats::add(&stats.received, n);
        if !cancel.send_counted(&tx, chunk, n, &stats).await {
            stats.left(n);
            break;
        }
        tokio::task::consume_budget().await;
    }
    stats.discarded(up.discard());
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;

    #[tokio::test]
    async fn keeps_order_across_many_boundaries() {
        let mut p = Pipeline::from_iter(0..10_000u32).map(|x| x);
        for _ in 0..8 {
            p = p.buffer(64).map(|x| x);
        }
        let out = p.collect().await.unwrap();
        assert_eq!(out, (0..10_000).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn zero_capacity_is_rejected_with_field_and_value() {
        let err = Pipeline::from_iter(0..3).buffer(0).run().await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: stage `buffer`: capacity = 0: must be at least 1 item"
        );
    }
}
