//! A hop: the bounded channel between two segments, carrying chunks, and the pump that
//! feeds one from a task of its own.

use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::mpsc;

use crate::report::StageStats;
use crate::runtime::chunk::{CHUNK_CAP, Chunk};
use crate::runtime::{CancelWatch, ChunkSource, RunCtx, Upstream};

/// Chunks a hop holds by default (so at most `4 × CHUNK_CAP` items wait in it).
pub(crate) const HOP_CHUNKS: usize = 4;

/// A hop of `chunks` chunks that `feeder` sends into (it counts what it sent as
/// `emitted`); the reader counts what it took in `feeder`, so the queue's depth is known.
pub(crate) fn hop<T: Send + 'static>(
    chunks: usize,
    feeder: &Arc<StageStats>,
) -> (mpsc::Sender<Chunk<T>>, HopRx<T>) {
    let (tx, rx) = mpsc::channel(chunks.max(1));
    feeder.sends_through_queue();
    let feeder = feeder.clone();
    (tx, HopRx { rx, feeder })
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

/// The receiving end of a hop. It merges chunks that are already waiting (up to
/// `CHUNK_CAP` items) so that small chunks do not stay small, but never waits to fill one.
pub(crate) struct HopRx<T> {
    rx: mpsc::Receiver<Chunk<T>>,
    feeder: Arc<StageStats>,
}

impl<T: Send + 'static> ChunkSource<T> for HopRx<T> {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Chunk<T>>> {
        let mut chunk = match self.rx.poll_recv(cx) {
            Poll::Ready(Some(c)) => c,
            other => return other,
        };
        while chunk.len() < CHUNK_CAP / 2 {
            match self.rx.try_recv() {
                Ok(more) => chunk.append(more),
                Err(_) => break,
            }
        }
        self.feeder.taken_on(chunk.len());
        Poll::Ready(Some(chunk))
    }

    fn discard(&mut self) -> usize {
        self.rx.close();
        let mut n = 0;
        while let Ok(c) = self.rx.try_recv() {
            n += c.len();
        }
        n
    }
}
