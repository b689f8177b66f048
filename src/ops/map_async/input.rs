//! The input buffer of an async stage: at most one chunk received and not yet started.

use std::collections::VecDeque;
use std::task::{Context, Poll};

use crate::report::StageStats;
use crate::runtime::Upstream;
use crate::runtime::chunk::Ticket;

/// The stage's upstream and the items pulled from it, not yet started.
pub(super) struct Input<T> {
    up: Upstream<T>,
    /// The upstream has ended.
    done: bool,
    waiting: VecDeque<(T, Ticket)>,
}

impl<T> Input<T> {
    pub(super) fn new(up: Upstream<T>) -> Self {
        Input {
            up,
            done: false,
            waiting: VecDeque::new(),
        }
    }

    /// Pulls the next chunk if none is waiting (counted as received).
    pub(super) fn fill(&mut self, cx: &mut Context<'_>, stats: &StageStats) {
        if !self.waiting.is_empty() || self.done {
            return;
        }
        match self.up.poll_chunk(cx) {
            Poll::Ready(Some(chunk)) => {
                StageStats::add(&stats.received, chunk.len());
                self.waiting.extend(chunk.into_pairs());
            }
            Poll::Ready(None) => self.done = true,
            Poll::Pending => {}
        }
    }

    /// Stopping: what comes from upstream is received and left unfinished.
    pub(super) fn drain(&mut self, cx: &mut Context<'_>, stats: &StageStats) {
        while !self.done {
            match self.up.poll_chunk(cx) {
                Poll::Ready(Some(chunk)) => stats.discarded(chunk.len()),
                Poll::Ready(None) => self.done = true,
                Poll::Pending => break,
            }
        }
    }

    #[inline]
    pub(super) fn pop(&mut self) -> Option<(T, Ticket)> {
        self.waiting.pop_front()
    }

    /// Items received and not started.
    pub(super) fn len(&self) -> usize {
        self.waiting.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// The upstream has ended (items may still wait here).
    pub(super) fn is_done(&self) -> bool {
        self.done
    }

    /// Drops the items not started (a graceful stop); returns how many.
    pub(super) fn clear(&mut self) -> usize {
        let n = self.waiting.len();
        self.waiting.clear();
        n
    }

    /// Throws away what is queued upstream (a cancel): how many items to count as received.
    pub(super) fn discard(&mut self) -> usize {
        self.up.discard()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::ChunkSource;
    use crate::runtime::chunk::Chunk;
    use futures_util::task::noop_waker_ref;
    use std::sync::atomic::Ordering::Relaxed;

    /// Chunks handed out one a poll, `Pending` where a chunk is `None`.
    struct Scripted(VecDeque<Option<Vec<u32>>>, usize);

    impl ChunkSource<u32> for Scripted {
        fn poll_chunk(&mut self, _cx: &mut Context<'_>) -> Poll<Option<Chunk<u32>>> {
            match self.0.pop_front() {
                Some(Some(items)) => Poll::Ready(Some(Chunk::untracked(items))),
                Some(None) => Poll::Pending,
                None => Poll::Ready(None),
            }
        }
        fn discard(&mut self) -> usize {
            self.1
        }
    }

    fn input(script: Vec<Option<Vec<u32>>>) -> Input<u32> {
        Input::new(Box::new(Scripted(script.into(), 5)))
    }

    #[test]
    fn pulls_one_chunk_at_a_time_and_counts_it_received() {
        let stats = StageStats::new("s".into(), "async");
        let mut cx = Context::from_waker(noop_waker_ref());
        let mut i = input(vec![Some(vec![1, 2]), None, Some(vec![3])]);
        i.fill(&mut cx, &stats);
        i.fill(&mut cx, &stats);
        assert_eq!(i.len(), 2, "a chunk waits: no second pull");
        assert_eq!(i.pop().map(|p| p.0), Some(1));
        assert_eq!(i.pop().map(|p| p.0), Some(2));
        i.fill(&mut cx, &stats);
        assert!(i.is_empty() && !i.is_done(), "pending upstream");
        i.fill(&mut cx, &stats);
        i.fill(&mut cx, &stats);
        assert_eq!((i.len(), i.is_done()), (1, false));
        assert_eq!(i.pop().map(|p| p.0), Some(3));
        i.fill(&mut cx, &stats);
        assert!(i.is_done());
        assert_eq!(stats.received.load(Relaxed), 3);
    }

    #[test]
    fn a_stopping_stage_drains_what_comes_as_unfinished() {
        let stats = StageStats::new("s".into(), "async");
        let mut cx = Context::from_waker(noop_waker_ref());
        let mut i = input(vec![Some(vec![1, 2]), Some(vec![3]), None, Some(vec![4])]);
        i.fill(&mut cx, &stats);
        assert_eq!(i.clear(), 2);
        i.drain(&mut cx, &stats);
        assert_eq!(stats.unfinished.load(Relaxed), 1, "up to the pending poll");
        i.drain(&mut cx, &stats);
        i.drain(&mut cx, &stats);
        assert!(i.is_done());
        assert_eq!(stats.unfinished.load(Relaxed), 2);
        assert_eq!(stats.received.load(Relaxed), 4);
        assert_eq!(i.discard(), 5);
    }
}
