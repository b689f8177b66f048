//! Sinks: where the items of a run end. Each terminal of [`Flow`](crate::Flow) uses one.

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};

use futures_util::FutureExt as _;
use tokio::sync::mpsc;

use crate::failure::{Failure, ItemError};
use crate::report::StageStats;
use crate::runtime::RunCtx;
use crate::runtime::chunk::{Chunk, Outcome};

/// Consumes the chunks that reach the end of a run. The caller has counted them `received`;
/// the sink counts `passed` (delivered) and `failed`.
pub trait Sink<T>: Send + 'static {
    type Output: Send + 'static;
    /// `consume` never awaits anything: the sink's task may drive the last stage itself
    /// (see [`tail`](crate::runtime::tail)).
    const NEVER_WAITS: bool = false;
    fn consume(
        &mut self,
        chunk: Chunk<T>,
        stats: &StageStats,
        run: &RunCtx,
    ) -> impl Future<Output = ()> + Send;
    fn finish(self) -> Self::Output;
}

/// The chunk a sink is consuming, so that a run cancelled in the middle of it counts what the
/// sink had not delivered or failed by then as left in it.
#[derive(Default)]
pub(crate) struct InHand {
    items: std::sync::atomic::AtomicUsize,
    /// The sink's `passed + failed` before the chunk.
    settled_before: std::sync::atomic::AtomicU64,
}

impl InHand {
    fn settled(stats: &StageStats) -> u64 {
        use std::sync::atomic::Ordering::Relaxed;
        stats.passed.load(Relaxed) + stats.failed.load(Relaxed)
    }

    /// Counts `chunk` received by the sink and consumes it.
    pub(crate) async fn consume<T, K: Sink<T>>(
        &self,
        sink: &mut K,
        chunk: Chunk<T>,
        stats: &StageStats,
        run: &RunCtx,
    ) {
        use std::sync::atomic::Ordering::Relaxed;
        StageStats::add(&stats.received, chunk.len());
        self.settled_before.store(Self::settled(stats), Relaxed);
        self.items.store(chunk.len(), Relaxed);
        sink.consume(chunk, stats, run).await;
        self.items.store(0, Relaxed);
    }

    /// The consuming was cut short: counts what the sink had not settled as left in it.
    pub(crate) fn cut_short(&self, stats: &StageStats) {
        use std::sync::atomic::Ordering::Relaxed;
        let n = self.items.swap(0, Relaxed);
        if n > 0 {
            let done = Self::settled(stats).saturating_sub(self.settled_before.load(Relaxed));
            stats.left(n.saturating_sub(done as usize));
        }
    }
}

/// `run()`: counts and drops.
pub struct Discard;

impl<T: Send + 'static> Sink<T> for Discard {
    type Output = ();
    const NEVER_WAITS: bool = true;
    async fn consume(&mut self, chunk: Chunk<T>, stats: &StageStats, _run: &RunCtx) {
        let n = chunk.len();
        drop(chunk.into_items(Outcome::Done));
        StageStats::add(&stats.passed, n);
    }
    fn finish(self) {}
}

/// `collect()`.
pub struct Collect<T>(pub(crate) Vec<T>);

impl<T: Send + 'static> Sink<T> for Collect<T> {
    type Output = Vec<T>;
    const NEVER_WAITS: bool = true;
    async fn consume(&mut self, chunk: Chunk<T>, stats: &StageStats, _run: &RunCtx) {
        let n = chunk.len();
        self.0.extend(chunk.into_items(Outcome::Done));
        StageStats::add(&stats.passed, n);
    }
    fn finish(self) -> Vec<T> {
        self.0
    }
}

/// `for_each(f)`: one call at a time, in order; a panic fails that item.
pub struct ForEach<F>(pub(crate) F);

impl<T, F, Fut> Sink<T> for ForEach<F>
where
    T: Send + 'static,
    F: FnMut(T) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    type Output = ();
    async fn consume(&mut self, chunk: Chunk<T>, stats: &StageStats, run: &RunCtx) {
        for (item, ticket) in chunk.into_pairs() {
            let result = match catch_unwind(AssertUnwindSafe(|| (self.0)(item))) {
                Ok(fut) => AssertUnwindSafe(fut).catch_unwind().await,
                Err(panic) => Err(panic),
            };
            match result {
                Ok(()) => {
                    ticket.finish(Outcome::Done);
                    StageStats::add(&stats.passed, 1);
                }
                Err(panic) => {
                    ticket.finish(Outcome::Failed);
                    StageStats::add(&stats.failed, 1);
                    run.fail(Failure::new(
                        stats.name.clone(),
                        ItemError::from_panic(&*panic),
                        1,
                    ));
                }
            }
        }
    }
    fn finish(self) {}
}

/// `into_stream()`: hands chunks to the [`ItemStream`](crate::ItemStream).
pub struct Forward<T>(pub(crate) mpsc::Sender<Chunk<T>>);

impl<T: Send + 'static> Sink<T> for Forward<T> {
    type Output = ();
    async fn consume(&mut self, chunk: Chunk<T>, stats: &StageStats, _run: &RunCtx) {
        let n = chunk.len();
        if self.0.send(chunk).await.is_ok() {
            StageStats::add(&stats.passed, n);
        } else {
            // The stream was dropped (which cancels the run): the chunk never reached it.
            stats.left(n);
        }
    }
    fn finish(self) {}
}
