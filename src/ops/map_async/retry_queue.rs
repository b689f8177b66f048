//! The retry queue of an async stage: items waiting out their backoff (an item in backoff
//! takes no worker), then due to be tried again before new items.

use std::collections::{BinaryHeap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Context;

use tokio::time::{Instant, Sleep};

use crate::runtime::Gate;
use crate::runtime::gate::GateHold;

use super::call::Meta;

/// An item waiting for its next attempt.
struct Parked<T> {
    at: Instant,
    id: u64,
    item: T,
    meta: Meta,
}

impl<T> PartialEq for Parked<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.id) == (other.at, other.id)
    }
}
impl<T> Eq for Parked<T> {}
impl<T> PartialOrd for Parked<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Parked<T> {
    /// Reversed: `BinaryHeap` pops the earliest first (the first parked, at a tie).
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.at, other.id).cmp(&(self.at, self.id))
    }
}

/// The retry delay queue, and the items due to start before new ones.
pub(super) struct RetryQueue<T> {
    heap: BinaryHeap<Parked<T>>,
    /// Backoff over (or an item given back to be tried again): start these before new items.
    due: VecDeque<(T, Meta)>,
    sleep: Option<Pin<Box<Sleep>>>,
    next_id: u64,
    /// The retry pauses the job (`Retry::pause_source`): no first attempt starts, and the
    /// run's source stays paused, while an item is in backoff.
    pauses_job: bool,
    hold: Option<GateHold>,
}

impl<T> RetryQueue<T> {
    pub(super) fn new(pauses_job: bool) -> Self {
        RetryQueue {
            heap: BinaryHeap::new(),
            due: VecDeque::new(),
            sleep: None,
            next_id: 0,
            pauses_job,
            hold: None,
        }
    }

    /// Items in backoff or due.
    pub(super) fn len(&self) -> usize {
        self.heap.len() + self.due.len()
    }

    /// Items still in backoff.
    pub(super) fn in_backoff(&self) -> bool {
        !self.heap.is_empty()
    }

    pub(super) fn due_len(&self) -> usize {
        self.due.len()
    }

    /// Whether new items wait: an item of a stage whose retry pauses the job is in backoff,
    /// so nothing new starts (the source is held too) until its wait is over.
    pub(super) fn job_paused(&self) -> bool {
        self.pauses_job && !self.heap.is_empty()
    }

    /// Parks an item until `at` (and pauses the run's source, if the retry says so).
    pub(super) fn park(&mut self, at: Instant, item: T, meta: Meta, gate: &Arc<Gate>) {
        if self.pauses_job && self.hold.is_none() {
            self.hold = Some(gate.hold());
        }
        let id = self.next_id;
        self.next_id += 1;
        self.heap.push(Parked { at, id, item, meta });
    }

    /// An item to be tried next, before the ones already due.
    pub(super) fn push_due_front(&mut self, item: T, meta: Meta) {
        self.due.push_front((item, meta));
    }

    /// An item to be tried again after the ones already due.
    pub(super) fn push_due(&mut self, item: T, meta: Meta) {
        self.due.push_back((item, meta));
    }

    #[inline]
    pub(super) fn pop_due(&mut self) -> Option<(T, Meta)> {
        self.due.pop_front()
    }

    /// Moves the items whose backoff is over to the due ones; `cx` is woken at the next.
    /// True if one moved.
    pub(super) fn poll(&mut self, cx: &mut Context<'_>) -> bool {
        let mut changed = false;
        loop {
            let now = Instant::now();
            while self.heap.peek().is_some_and(|p| p.at <= now) {
                if let Some(p) = self.heap.pop() {
                    self.due.push_back((p.item, p.meta));
                    changed = true;
                }
            }
            let Some(at) = self.heap.peek().map(|p| p.at) else {
                self.hold = None;
                break;
            };
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
            if sleep.deadline() != at {
                sleep.as_mut().reset(at);
            }
            if sleep.as_mut().poll(cx).is_pending() {
                break;
            }
        }
        changed
    }

    /// A graceful stop: every waiting item is let go (its meta returned, to be left
    /// unfinished), and the source is no longer held.
    pub(super) fn take_all(&mut self) -> Vec<Meta> {
        self.hold = None;
        let mut metas: Vec<Meta> = self.heap.drain().map(|p| p.meta).collect();
        metas.extend(self.due.drain(..).map(|(_, m)| m));
        metas
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::chunk::Ticket;
    use std::time::Duration;

    fn meta(seq: u64) -> Meta {
        Meta::new(seq, Ticket::none())
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test(start_paused = true)]
    async fn items_come_due_at_their_instant_earliest_first() {
        let gate = Arc::new(Gate::new());
        let mut q = RetryQueue::new(false);
        let t0 = Instant::now();
        q.park(t0 + ms(30), 'c', meta(3), &gate);
        q.park(t0 + ms(10), 'a', meta(1), &gate);
        q.park(t0 + ms(10), 'b', meta(2), &gate);
        assert!(!gate.is_paused());
        let waker = futures_util::task::noop_waker_ref();
        let mut cx = Context::from_waker(waker);
        assert!(!q.poll(&mut cx));
        assert_eq!((q.len(), q.due_len()), (3, 0));
        tokio::time::advance(ms(10)).await;
        assert!(q.poll(&mut cx));
        // At a tie, the first parked comes first.
        assert_eq!(q.pop_due().map(|d| d.0), Some('a'));
        assert_eq!(q.pop_due().map(|d| d.0), Some('b'));
        assert!(q.in_backoff());
        tokio::time::advance(ms(19)).await;
        assert!(!q.poll(&mut cx));
        tokio::time::advance(ms(1)).await;
        assert!(q.poll(&mut cx));
        assert_eq!(q.pop_due().map(|d| (d.0, d.1.seq)), Some(('c', 3)));
        assert_eq!(q.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_stage_wakes_when_the_first_backoff_is_over() {
        let gate = Arc::new(Gate::new());
        let mut q = RetryQueue::new(false);
        q.park(Instant::now() + ms(5), 1u32, meta(0), &gate);
        let t0 = Instant::now();
        std::future::poll_fn(|cx| {
            if q.poll(cx) {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await;
        assert_eq!(t0.elapsed(), ms(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_pausing_retry_holds_the_source_while_an_item_is_in_backoff() {
        let gate = Arc::new(Gate::new());
        let mut q = RetryQueue::new(true);
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        q.park(Instant::now() + ms(5), 1u32, meta(0), &gate);
        assert!(gate.is_paused() && q.job_paused());
        tokio::time::advance(ms(5)).await;
        assert!(q.poll(&mut cx));
        assert!(!gate.is_paused() && !q.job_paused());
        // A due item does not pause the job: it starts before new ones anyway.
        assert_eq!(q.due_len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_lets_every_waiting_item_go_and_the_source_run() {
        let gate = Arc::new(Gate::new());
        let mut q = RetryQueue::new(true);
        q.park(Instant::now() + ms(5), 1u32, meta(0), &gate);
        q.push_due(2, meta(1));
        q.push_due_front(3, meta(2));
        let mut seqs: Vec<u64> = q.take_all().iter().map(|m| m.seq).collect();
        seqs.sort_unstable();
        assert_eq!(seqs, vec![0, 1, 2]);
        assert_eq!(q.len(), 0);
        assert!(!gate.is_paused());
    }
}
