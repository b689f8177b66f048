//! The shared machinery of fused operators: a step function run over each chunk in the task
//! that pulls it. A boxed fused operator costs one dynamic call per chunk, not per item.

use std::sync::Arc;
use std::task::{Context, Poll};

use crate::chunk::{Chunk, Emit, process};
use crate::error::Failure;
use crate::pipeline::Pipeline;
use crate::report::StageStats;
use crate::runtime::{ChunkSource, RunCtx, Upstream};

/// After this many chunks in a row that a filter emptied, yield to the scheduler so that a
/// filter dropping everything from a synchronous source cannot hog its thread.
const EMPTY_CHUNKS_BEFORE_YIELD: usize = 16;

pub(crate) struct Fused<T, F> {
    up: Upstream<T>,
    step: F,
    stats: Arc<StageStats>,
    run: Arc<RunCtx>,
}

impl<T, U, F> ChunkSource<U> for Fused<T, F>
where
    T: Send + 'static,
    U: Send + 'static,
    F: FnMut(T, &mut Emit<U>) + Send,
{
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Chunk<U>>> {
        for _ in 0..EMPTY_CHUNKS_BEFORE_YIELD {
            let chunk = match self.up.poll_chunk(cx) {
                Poll::Ready(Some(c)) => c,
                other => return other.map(|_| None),
            };
            let n = chunk.len();
            let p = process(chunk, &mut self.step);
            self.stats
                .chunk(n, p.passed, p.chunk.len(), p.dropped, p.panics.len());
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
        StageStats::add(&self.stats.received, queued);
        0
    }
}

/// Appends a fused operator named `name` (kind `kind`) to `p`.
pub(crate) fn fuse<T, U, F>(p: Pipeline<T>, name: &'static str, step: F) -> Pipeline<U>
where
    T: Send + 'static,
    U: Send + 'static,
    F: FnMut(T, &mut Emit<U>) + Send + 'static,
{
    p.then(move |b, up| {
        let stats = b.stage(name, name);
        Box::new(Fused {
            up,
            step,
            stats,
            run: b.run.clone(),
        }) as Upstream<U>
    })
}
