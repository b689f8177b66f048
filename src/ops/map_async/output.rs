//! The output of an async stage: results gathered into a chunk, sent on when the next hop
//! has room.

use std::task::{Context, Poll};

use tokio::sync::mpsc::Sender;
use tokio_util::sync::PollSender;

use crate::report::StageStats;
use crate::runtime::chunk::{CHUNK_CAP, Chunk, Ticket};

/// Results not yet sent on, and the hop they go into.
pub(super) struct Output<U> {
    out: Chunk<U>,
    tx: PollSender<Chunk<U>>,
}

impl<U: Send + 'static> Output<U> {
    pub(super) fn new(tx: Sender<Chunk<U>>) -> Self {
        Output {
            out: Chunk::default(),
            tx: PollSender::new(tx),
        }
    }

    /// Sends the gathered results if the hop has room: `Ok(true)` if it sent some.
    /// `Ready(Err)` means the downstream is gone (the results stay, counted as left).
    pub(super) fn poll_flush(
        &mut self,
        cx: &mut Context<'_>,
        stats: &StageStats,
    ) -> Poll<Result<bool, ()>> {
        if self.out.is_empty() {
            return Poll::Ready(Ok(false));
        }
        match self.tx.poll_reserve(cx) {
            Poll::Ready(Ok(())) => {
                let chunk = std::mem::take(&mut self.out);
                let n = chunk.len();
                if let Err(e) = self.tx.send_item(chunk) {
                    // Kept, so that the stage counts it as left in it.
                    if let Some(chunk) = e.into_inner() {
                        self.out = chunk;
                    }
                    return Poll::Ready(Err(()));
                }
                StageStats::add(&stats.passed, n);
                StageStats::add(&stats.emitted, n);
                Poll::Ready(Ok(true))
            }
            Poll::Ready(Err(_)) => Poll::Ready(Err(())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<U> Output<U> {
    #[inline]
    pub(super) fn push(&mut self, item: U, ticket: Ticket) {
        self.out.push(item, ticket);
    }

    /// A chunk's worth is gathered: no call starts until it is sent.
    pub(super) fn is_full(&self) -> bool {
        self.out.len() >= CHUNK_CAP
    }

    pub(super) fn len(&self) -> usize {
        self.out.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.out.is_empty()
    }
}

#[cfg(test)]
impl<U: Send + 'static> Output<U> {
    /// An output whose hop nobody reads (for the tests of the parts that fill it).
    pub(super) fn detached() -> Self {
        Output::new(tokio::sync::mpsc::channel(1).0)
    }

    pub(super) fn take_items(&mut self) -> Vec<U> {
        std::mem::take(&mut self.out).items
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::task::noop_waker_ref;
    use tokio::sync::mpsc;

    #[test]
    fn results_go_out_as_one_chunk_when_the_hop_has_room() {
        let stats = StageStats::new("s".into(), "async");
        let (tx, mut rx) = mpsc::channel(1);
        let mut out = Output::new(tx);
        let mut cx = Context::from_waker(noop_waker_ref());
        assert_eq!(out.poll_flush(&mut cx, &stats), Poll::Ready(Ok(false)));
        out.push(1u32, Ticket::none());
        out.push(2, Ticket::none());
        assert_eq!(out.poll_flush(&mut cx, &stats), Poll::Ready(Ok(true)));
        assert!(out.is_empty());
        // The hop is full: the next results wait.
        out.push(3, Ticket::none());
        assert_eq!(out.poll_flush(&mut cx, &stats), Poll::Pending);
        assert_eq!(out.len(), 1);
        assert_eq!(rx.try_recv().unwrap().items, vec![1, 2]);
        assert_eq!(out.poll_flush(&mut cx, &stats), Poll::Ready(Ok(true)));
        assert_eq!(stats.passed.load(std::sync::atomic::Ordering::Relaxed), 3);
    }

    #[test]
    fn a_closed_hop_keeps_the_results_to_count_them_as_left() {
        let stats = StageStats::new("s".into(), "async");
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let mut out = Output::new(tx);
        let mut cx = Context::from_waker(noop_waker_ref());
        out.push(1u32, Ticket::none());
        assert_eq!(out.poll_flush(&mut cx, &stats), Poll::Ready(Err(())));
        assert_eq!(out.len(), 1);
        assert_eq!(stats.passed.load(std::sync::atomic::Ordering::Relaxed), 0);
    }

    #[test]
    fn a_full_chunk_stops_new_calls() {
        let mut out = Output::detached();
        for i in 0..CHUNK_CAP {
            assert!(!out.is_full());
            out.push(i, Ticket::none());
        }
        assert!(out.is_full());
    }
}
