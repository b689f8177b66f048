//! Sinks: where the items of a run end. Each terminal of [`Flow`](crate::Flow) uses one.

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};

use futures_util::FutureExt as _;
use tokio::sync::mpsc;

use crate::error::{Failure, ItemError};
use crate::report::StageStats;
use crate::runtime::RunCtx;
use crate::runtime::chunk::{Chunk, Outcome};

/// Consumes the chunks that reach the end of a run. The caller has counted them `received`;
/// the sink counts `passed` (delivered) and `failed`.
pub trait Sink<T>: Send + 'static {
    type Output: Send + 'static;
    fn consume(
        &mut self,
        chunk: Chunk<T>,
        stats: &StageStats,
        run: &RunCtx,
    ) -> impl Future<Output = ()> + Send;
    fn finish(self) -> Self::Output;
}

/// `run()`: counts and drops.
pub struct Discard;

impl<T: Send + 'static> Sink<T> for Discard {
    type Output = ();
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
        }
    }
    fn finish(self) {}
}
