//! The shared machinery of fused operators: a step function run over each chunk in the task
//! that pulls it. A boxed fused operator costs one dynamic call per chunk, not per item.

use std::sync::Arc;
use std::task::{Context, Poll};

use crate::failure::Failure;
use crate::report::{OwnedCounts, StageStats};
use crate::runtime::chunk::{Chunk, Emit, Processed, map_chunk, process};
use crate::runtime::{Build, ChunkSource, RunCtx, Upstream};

/// After this many chunks in a row that a filter emptied, yield to the scheduler so that a
/// filter dropping everything from a synchronous source cannot hog its thread.
const EMPTY_CHUNKS_BEFORE_YIELD: usize = 16;

/// What a fused operator does to one chunk.
pub(crate) trait ChunkOp<T, U>: Send {
    fn apply(&mut self, chunk: Chunk<T>) -> Processed<U>;
}

/// An operator written as a per-item step. `AT_MOST_ONE`: the step emits at most one output
/// per input, as its last action (see [`process`]).
pub(crate) struct PerItem<F, const AT_MOST_ONE: bool>(pub(crate) F);

impl<T, U, F: FnMut(T, &mut Emit<U>) + Send, const AT_MOST_ONE: bool> ChunkOp<T, U>
    for PerItem<F, AT_MOST_ONE>
{
    fn apply(&mut self, chunk: Chunk<T>) -> Processed<U> {
        process::<T, U, AT_MOST_ONE>(chunk, &mut self.0)
    }
}

/// A 1:1 transformation, with the fast path of [`map_chunk`].
pub(crate) struct MapOp<F>(pub(crate) F);

impl<T, U, F: FnMut(T) -> U + Send> ChunkOp<T, U> for MapOp<F> {
    fn apply(&mut self, chunk: Chunk<T>) -> Processed<U> {
        map_chunk(chunk, &mut self.0)
    }
}

pub(crate) struct Fused<T, Op> {
    up: Upstream<T>,
    op: Op,
    stats: Arc<StageStats>,
    counts: OwnedCounts,
    run: Arc<RunCtx>,
}

impl<T, U, Op> ChunkSource<U> for Fused<T, Op>
where
    T: Send + 'static,
    U: Send + 'static,
    Op: ChunkOp<T, U>,
{
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Chunk<U>>> {
        for _ in 0..EMPTY_CHUNKS_BEFORE_YIELD {
            let chunk = match self.up.poll_chunk(cx) {
                Poll::Ready(Some(c)) => c,
                other => return other.map(|_| None),
            };
            let n = chunk.len();
            let p = self.op.apply(chunk);
            self.counts.chunk(
                &self.stats,
                n,
                p.passed,
                p.chunk.len(),
                p.dropped,
                p.panics.len(),
            );
            for error in p.panics {
                self.run
                    .fail(Failure::new(self.stats.name.clone(), error, 1));
            }
            if !p.chunk.is_empty() {
                return Poll::Ready(Some(p.chunk));
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn discard(&mut self) -> usize {
        let queued = self.up.discard();
        self.counts.chunk(&self.stats, queued, 0, 0, 0, 0);
        self.stats.left(queued);
        0
    }
}

/// A fused operator named `name` over `up`, registered as a stage of its own.
pub(crate) fn fused<T, U, Op>(
    b: &mut Build,
    up: Upstream<T>,
    name: &'static str,
    op: Op,
) -> Upstream<U>
where
    T: Send + 'static,
    U: Send + 'static,
    Op: ChunkOp<T, U> + 'static,
{
    let stats = b.stage(name, name);
    Box::new(Fused {
        up,
        op,
        stats,
        counts: OwnedCounts::default(),
        run: b.run.clone(),
    })
}
