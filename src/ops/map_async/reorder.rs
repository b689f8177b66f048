//! The reorder buffer of an async stage: gives each item its place in input order, and (an
//! ordered stage) holds finished results until the ones before them are out.

use std::collections::VecDeque;

use crate::runtime::chunk::Ticket;

use super::output::Output;

/// An ordered stage's place for a result until the ones before it are out.
pub(super) enum Done<U> {
    Ok(U, Ticket),
    /// Ended in the stage (failed, or done by `done_if`): nothing goes out.
    Failed,
    /// Left unfinished by a stop (it was waiting to be tried again).
    Left,
}

/// Places in input order, and an ordered stage's results waiting for their turn.
pub(super) struct Reorder<U> {
    ordered: bool,
    /// The place the next new item gets.
    next_seq: u64,
    /// Ordered: the place of `slots[0]`.
    next_emit: u64,
    slots: VecDeque<Option<Done<U>>>,
}

impl<U> Reorder<U> {
    pub(super) fn new(ordered: bool) -> Self {
        Reorder {
            ordered,
            next_seq: 0,
            next_emit: 0,
            slots: VecDeque::new(),
        }
    }

    pub(super) fn is_ordered(&self) -> bool {
        self.ordered
    }

    /// A new item's place, with a slot for its result (ordered).
    pub(super) fn next(&mut self) -> u64 {
        let seq = self.assign();
        self.open();
        seq
    }

    /// A new item's place, without its slot yet: the item either goes out at once
    /// ([`passed`](Self::passed)) or gets its slot ([`open`](Self::open)) before anything
    /// else is placed.
    #[inline]
    pub(super) fn assign(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// Whether a result may go out now, ahead of every slot: nothing placed before it is
    /// still out (or the stage is unordered).
    #[inline]
    pub(super) fn is_clear(&self) -> bool {
        !self.ordered || self.slots.is_empty()
    }

    /// The item just assigned went straight out ([`is_clear`](Self::is_clear) was true).
    #[inline]
    pub(super) fn passed(&mut self) {
        if self.ordered {
            self.next_emit += 1;
        }
    }

    /// The slot of the item just assigned.
    #[inline]
    pub(super) fn open(&mut self) {
        if self.ordered {
            self.slots.push_back(None);
        }
    }

    /// Items placed and not yet out (an ordered stage's window in use).
    pub(super) fn in_window(&self) -> usize {
        (self.next_seq - self.next_emit) as usize
    }

    /// Item `seq` is done: its result goes out now (unordered) or in its turn.
    pub(super) fn fill(&mut self, seq: u64, done: Done<U>, out: &mut Output<U>) {
        if !self.ordered {
            if let Done::Ok(u, t) = done {
                out.push(u, t);
            }
            return;
        }
        self.slots[(seq - self.next_emit) as usize] = Some(done);
        self.emit(out);
    }

    /// Item `seq` is left unfinished: its place is passed over, and the results done behind
    /// it go out now (no later completion may come to send them).
    pub(super) fn leave(&mut self, seq: u64, out: &mut Output<U>) {
        if self.ordered {
            if let Some(slot) = self.slots.get_mut((seq - self.next_emit) as usize) {
                *slot = Some(Done::Left);
            }
            self.emit(out);
        }
    }

    /// Sends on the results at the front of the order that are done.
    pub(super) fn emit(&mut self, out: &mut Output<U>) {
        while let Some(Some(_)) = self.slots.front() {
            if let Some(Some(Done::Ok(u, t))) = self.slots.pop_front() {
                out.push(u, t);
            }
            self.next_emit += 1;
        }
    }

    /// Finished results waiting for an earlier one.
    pub(super) fn held(&self) -> usize {
        self.slots
            .iter()
            .filter(|d| matches!(d, Some(Done::Ok(..))))
            .count()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drained(out: &mut Output<u32>) -> Vec<u32> {
        out.take_items()
    }

    #[test]
    fn ordered_results_wait_for_the_ones_before_them() {
        let (mut r, mut out) = (Reorder::new(true), Output::detached());
        let seqs: Vec<u64> = (0..4).map(|_| r.next()).collect();
        assert_eq!(seqs, vec![0, 1, 2, 3]);
        r.fill(2, Done::Ok(2, Ticket::default()), &mut out);
        r.fill(1, Done::Failed, &mut out);
        assert_eq!(drained(&mut out), Vec::<u32>::new());
        assert_eq!((r.held(), r.in_window()), (1, 4));
        r.fill(0, Done::Ok(0, Ticket::default()), &mut out);
        assert_eq!(drained(&mut out), vec![0, 2]);
        assert_eq!(r.in_window(), 1);
        r.fill(3, Done::Ok(3, Ticket::default()), &mut out);
        assert_eq!(drained(&mut out), vec![3]);
        assert!(r.is_empty());
    }

    #[test]
    fn an_item_left_unfinished_sends_on_the_results_done_behind_it() {
        let (mut r, mut out) = (Reorder::new(true), Output::detached());
        for _ in 0..3 {
            r.next();
        }
        r.fill(1, Done::Ok(1, Ticket::default()), &mut out);
        r.fill(2, Done::Ok(2, Ticket::default()), &mut out);
        assert!(drained(&mut out).is_empty());
        r.leave(0, &mut out);
        assert_eq!(drained(&mut out), vec![1, 2]);
        assert!(r.is_empty());
        // Leaving a place already passed over is a no-op.
        r.leave(5, &mut out);
        assert!(drained(&mut out).is_empty());
    }

    #[test]
    fn a_result_in_order_goes_straight_out_without_a_slot() {
        let (mut r, mut out) = (Reorder::new(true), Output::detached());
        assert!(r.is_clear());
        assert_eq!(r.assign(), 0);
        r.passed();
        assert_eq!(r.in_window(), 0);
        assert_eq!(r.assign(), 1);
        r.open();
        assert!(!r.is_clear());
        assert_eq!(r.assign(), 2);
        r.open();
        r.fill(2, Done::Ok(2, Ticket::default()), &mut out);
        r.fill(1, Done::Ok(1, Ticket::default()), &mut out);
        assert_eq!(drained(&mut out), vec![1, 2]);
    }

    #[test]
    fn unordered_results_go_out_as_they_finish() {
        let (mut r, mut out) = (Reorder::new(false), Output::detached());
        for _ in 0..3 {
            r.next();
        }
        assert!(r.is_clear() && r.is_empty());
        r.fill(2, Done::Ok(2, Ticket::default()), &mut out);
        r.fill(0, Done::Failed, &mut out);
        r.fill(1, Done::Ok(1, Ticket::default()), &mut out);
        assert_eq!(drained(&mut out), vec![2, 1]);
    }
}
