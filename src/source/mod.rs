//! Sources: where items come from. Every source is pulled: it produces only when the stage
//! after it has room, and it asks the run's gate before each pull (pause, step, stop).

mod cursor;
mod from_channel;
#[cfg(feature = "jsonl")]
mod from_dead_letters;
mod from_fn;
mod from_iter;
mod from_stream;
mod tracked;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::task::{Context, Poll};

pub use cursor::{CursorOptions, Page};
pub use tracked::{Completion, ItemEnd};

use crate::failure::ItemError;
use crate::plan::{Pipeline, Settings};
use crate::report::{OwnedCounts, StageStats};
use crate::runtime::chunk::{CHUNK_CAP, Chunk, Ticket};
use crate::runtime::gate::SourceStop;
use crate::runtime::{ChunkSource, RunCtx, Upstream};

impl<T: Send + 'static> Pipeline<T> {
    /// A pipeline over a puller, registered as a source stage named `name`.
    pub(crate) fn from_pull<P: Pull<T> + 'static>(name: &'static str, pull: P) -> Pipeline<T> {
        Pipeline {
            build: Box::new(move |b| {
                let stats = b.stage(name, "source");
                Box::new(Source::new(pull, stats, b.run.clone())) as Upstream<T>
            }),
            settings: Settings::default(),
        }
    }
}

/// What a puller says after one call.
pub(crate) enum Pulled {
    /// Appended at least one item; there may be more.
    More,
    /// The source has ended (it may have appended items first).
    End,
}

/// The part of a source that differs between kinds: append up to `max` ready items.
/// Return `Pending` only when nothing was appended.
pub(crate) trait Pull<T>: Send {
    fn poll_pull(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
        out: &mut Vec<T>,
    ) -> Poll<Result<Pulled, ItemError>>;

    /// After a graceful stop (the gate admits nothing more): append up to `max` items that
    /// the source still owes so that the run ends on a clean resume point — the rest of a
    /// page it has begun handing out (the cursor source) — then `End`. The default owes
    /// nothing.
    fn poll_finish(
        &mut self,
        _cx: &mut Context<'_>,
        _max: usize,
        _out: &mut Vec<T>,
    ) -> Poll<Result<Pulled, ItemError>> {
        Poll::Ready(Ok(Pulled::End))
    }

    /// The tickets of the items the last `poll_pull` appended (one per item, in order), for
    /// a source that tracks completion (the cursor source); the default tracks nothing.
    fn take_tickets(&mut self) -> Vec<Ticket> {
        Vec::new()
    }
}

/// A source stage: a puller behind the gate, counted as a stage of the report.
pub(crate) struct Source<P> {
    pull: P,
    stats: Arc<StageStats>,
    counts: OwnedCounts,
    run: Arc<RunCtx>,
    done: bool,
    /// This source's own switch, thrown by a stage downstream that wants no more input.
    stop: SourceStop,
}

impl<P> Source<P> {
    pub(crate) fn new(pull: P, stats: Arc<StageStats>, run: Arc<RunCtx>) -> Self {
        let stop = run.gate.register_source();
        Source {
            pull,
            stats,
            counts: OwnedCounts::default(),
            run,
            done: false,
            stop,
        }
    }

    /// After a `Pending`: a stage may have stopped this source between its check and the
    /// registration of the waker (the switch is thrown under the gate's lock, and the waker
    /// registered under it, so one of the two sees the other).
    fn stopped_while_registering(&mut self) -> bool {
        if self.stop.is_stopped() {
            self.done = true;
        }
        self.done
    }
}

impl<T: Send + 'static, P: Pull<T>> ChunkSource<T> for Source<P> {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Chunk<T>>> {
        if self.done || self.stop.is_stopped() {
            self.done = true;
            return Poll::Ready(None);
        }
        let (admitted, metered) = match self.run.gate.poll_admit(cx, CHUNK_CAP) {
            Poll::Pending if self.stopped_while_registering() => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
            Poll::Ready(a) => a,
        };
        // Stopped: nothing new is pulled, but what the source owes is still handed out.
        let finishing = admitted == 0;
        let mut items = Vec::with_capacity(if finishing {
            0
        } else {
            admitted.min(CHUNK_CAP)
        });
        let pulled = catch_unwind(AssertUnwindSafe(|| {
            if finishing {
                self.pull.poll_finish(cx, CHUNK_CAP, &mut items)
            } else {
                self.pull.poll_pull(cx, admitted, &mut items)
            }
        }));
        if metered && items.len() < admitted {
            self.run.gate.refund((admitted - items.len()) as u64);
        }
        match pulled {
            Ok(Poll::Pending) => {
                // Waiting on the source's own input: let `stop` wake us too.
                self.run.gate.register(cx.waker());
                if self.stopped_while_registering() {
                    return Poll::Ready(None);
                }
                return Poll::Pending;
            }
            Ok(Poll::Ready(Ok(Pulled::More))) => {}
            Ok(Poll::Ready(Ok(Pulled::End))) => self.done = true,
            Ok(Poll::Ready(Err(e))) => {
                self.done = true;
                self.run.source_failed(&self.stats.name, e);
            }
            Err(payload) => {
                self.done = true;
                self.run
                    .source_failed(&self.stats.name, ItemError::from_panic(&*payload));
            }
        }
        let n = items.len();
        self.counts.chunk(&self.stats, n, n, n, 0, 0);
        if n == 0 {
            return if self.done {
                Poll::Ready(None)
            } else {
                cx.waker().wake_by_ref();
                Poll::Pending
            };
        }
        let mut tickets = self.pull.take_tickets();
        if tickets.len() != n {
            // Only after a panic mid-pull: the dropped tickets count as cancelled, which
            // keeps a checkpoint from passing these items.
            tickets.clear();
        }
        Poll::Ready(Some(if tickets.is_empty() {
            Chunk::untracked(items)
        } else {
            Chunk { items, tickets }
        }))
    }

    fn discard(&mut self) -> usize {
        0
    }
}
