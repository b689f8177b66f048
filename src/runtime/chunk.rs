//! The unit that moves between tasks: a chunk of items, with optional completion tickets.
//!
//! Items cross task boundaries in chunks (up to [`CHUNK_CAP`]) so that a busy hop costs one
//! channel operation per chunk, not per item; fused operators run over a whole chunk in one call.
//! Tickets exist only when some part of the pipeline asked to know when an item has finished
//! (cursor checkpoints, idempotency commits); an untracked chunk carries none and pays nothing.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::failure::ItemError;

/// The most items one chunk carries across a hop.
pub(crate) const CHUNK_CAP: usize = 512;

/// How an item ended, as far as its ticket is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Delivered to a sink, or dropped by an operator whose job is to drop (filter, dedup).
    Done,
    /// Failed at a stage (dead-lettered).
    Failed,
    /// Discarded because the run was cancelled.
    Cancelled,
}

const FAILED: u8 = 1;
const CANCELLED: u8 = 2;

type OnDone = Box<dyn FnOnce(Outcome) + Send + Sync>;

struct TicketInner {
    marks: AtomicU8,
    on_done: Option<OnDone>,
    parents: Vec<Ticket>,
}

impl Drop for TicketInner {
    fn drop(&mut self) {
        let marks = *self.marks.get_mut();
        // Not processed outranks failed: a page (or batch) with one failed item and one
        // cancelled one has not finished, and a checkpoint must stay before it.
        let outcome = if marks & CANCELLED != 0 {
            Outcome::Cancelled
        } else if marks & FAILED != 0 {
            Outcome::Failed
        } else {
            Outcome::Done
        };
        if let Some(f) = self.on_done.take() {
            f(outcome);
        }
        for parent in self.parents.drain(..) {
            parent.finish(outcome);
        }
    }
}

/// A completion ticket: shared by every item derived from one tracked input (a `flat_map`
/// clones it, a batch holds its parts' tickets as parents). When the last holder lets go, the
/// callback runs once with the worst outcome any holder reported (cancelled, then failed, then done). A ticket dropped without
/// [`Ticket::finish`] counts as cancelled, so an item lost on an unexpected path can never
/// be mistaken for a finished one.
#[derive(Default)]
pub(crate) struct Ticket(Option<Arc<TicketInner>>);

impl Clone for Ticket {
    fn clone(&self) -> Self {
        Ticket(self.0.clone())
    }
}

impl Ticket {
    /// A ticket that tracks nothing.
    pub(crate) const fn none() -> Self {
        Ticket(None)
    }

    /// A ticket whose `on_done` runs when every holder has finished.
    pub(crate) fn new(on_done: impl FnOnce(Outcome) + Send + Sync + 'static) -> Self {
        Ticket(Some(Arc::new(TicketInner {
            marks: AtomicU8::new(0),
            on_done: Some(Box::new(on_done)),
            parents: Vec::new(),
        })))
    }

    /// A ticket that finishes `parents` (with its own outcome) when it finishes.
    pub(crate) fn with_parents(
        parents: Vec<Ticket>,
        on_done: Option<Box<dyn FnOnce(Outcome) + Send + Sync>>,
    ) -> Self {
        let parents: Vec<Ticket> = parents.into_iter().filter(|t| t.is_some()).collect();
        if parents.is_empty() && on_done.is_none() {
            return Ticket::none();
        }
        Ticket(Some(Arc::new(TicketInner {
            marks: AtomicU8::new(0),
            on_done,
            parents,
        })))
    }

    pub(crate) fn is_some(&self) -> bool {
        self.0.is_some()
    }

    /// Reports this holder's outcome and lets go.
    pub(crate) fn finish(mut self, outcome: Outcome) {
        if let Some(inner) = self.0.take() {
            match outcome {
                Outcome::Done => {}
                Outcome::Failed => {
                    inner.marks.fetch_or(FAILED, Ordering::Relaxed);
                }
                Outcome::Cancelled => {
                    inner.marks.fetch_or(CANCELLED, Ordering::Relaxed);
                }
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(inner) = self.0.take() {
            inner.marks.fetch_or(CANCELLED, Ordering::Relaxed);
        }
    }
}

/// A chunk of items. `tickets` is either empty (untracked) or holds one ticket per item.
pub struct Chunk<T> {
    pub(crate) items: Vec<T>,
    pub(crate) tickets: Vec<Ticket>,
}

impl<T> Default for Chunk<T> {
    fn default() -> Self {
        Chunk {
            items: Vec::new(),
            tickets: Vec::new(),
        }
    }
}

impl<T> Chunk<T> {
    pub(crate) fn untracked(items: Vec<T>) -> Self {
        Chunk {
            items,
            tickets: Vec::new(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub(crate) fn is_tracked(&self) -> bool {
        !self.tickets.is_empty()
    }

    /// Makes room for `n` more items (and their tickets, if tracked).
    pub(crate) fn reserve(&mut self, n: usize) {
        self.items.reserve(n);
        if self.is_tracked() {
            self.tickets.reserve(n);
        }
    }

    /// Appends one item, keeping the ticket invariant.
    #[inline]
    pub(crate) fn push(&mut self, item: T, ticket: Ticket) {
        if ticket.is_some() && !self.is_tracked() {
            self.tickets.resize_with(self.items.len(), Ticket::none);
        }
        if self.is_tracked() || ticket.is_some() {
            self.tickets.push(ticket);
        }
        self.items.push(item);
    }

    /// Moves every item of `other` to the end of `self`.
    pub(crate) fn append(&mut self, mut other: Chunk<T>) {
        match (self.is_tracked(), other.is_tracked()) {
            (false, false) => {}
            (true, false) => other.tickets.resize_with(other.items.len(), Ticket::none),
            (false, true) => self.tickets.resize_with(self.items.len(), Ticket::none),
            (true, true) => {}
        }
        self.items.append(&mut other.items);
        self.tickets.append(&mut other.tickets);
    }

    /// Splits into (item, ticket) pairs; untracked items get `Ticket::none()`.
    pub(crate) fn into_pairs(self) -> impl Iterator<Item = (T, Ticket)> {
        let tracked = self.is_tracked();
        let mut tickets = self.tickets.into_iter();
        self.items.into_iter().map(move |item| {
            let t = if tracked {
                tickets.next().unwrap_or_default()
            } else {
                Ticket::none()
            };
            (item, t)
        })
    }

    /// Finishes every ticket with `outcome` and returns the items.
    pub(crate) fn into_items(self, outcome: Outcome) -> Vec<T> {
        for t in self.tickets {
            t.finish(outcome);
        }
        self.items
    }
}

/// Lets go of the tickets of discarded outputs without a mark of their own: the input they
/// came from reports its outcome (failed) through its own hold. Dropped, they would count as
/// cancelled, which outranks failed.
fn let_go(tickets: impl Iterator<Item = Ticket>) {
    for t in tickets {
        t.finish(Outcome::Done);
    }
}

/// Where a fused operator puts what it produces for the current input item.
pub(crate) struct Emit<U> {
    items: Vec<U>,
    tickets: Vec<Ticket>,
    tracked: bool,
    current: Ticket,
}

impl<U> Emit<U> {
    /// Emits one output for the current input item.
    #[inline]
    pub(crate) fn push(&mut self, item: U) {
        self.items.push(item);
        if self.tracked {
            self.tickets.push(self.current.clone());
        }
    }
}

/// The per-item bookkeeping of [`process`], for an operator that drives its own loop over a
/// chunk (the public `Operator` route, whose items may also fail by an error or end the
/// stage's input): outputs of the current input share its ticket, as in `process`.
impl<U> Emit<U> {
    pub(crate) fn for_chunk(n: usize, tracked: bool) -> Self {
        Emit {
            items: Vec::with_capacity(n),
            tickets: if tracked {
                Vec::with_capacity(n)
            } else {
                Vec::new()
            },
            tracked,
            current: Ticket::none(),
        }
    }

    /// Makes `ticket` the one the next outputs share; returns how many outputs there are
    /// so far (to tell whether this input produced any, or to undo its outputs).
    pub(crate) fn begin(&mut self, ticket: Ticket) -> usize {
        self.current = ticket;
        self.items.len()
    }

    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    /// Finishes the current input's own hold on its ticket (its outputs keep theirs).
    pub(crate) fn end(&mut self, outcome: Outcome) {
        std::mem::take(&mut self.current).finish(outcome);
    }

    /// Discards the outputs pushed since `mark` (the current input failed).
    pub(crate) fn undo(&mut self, mark: usize) {
        self.items.truncate(mark);
        if self.tracked {
            let_go(self.tickets.drain(mark..));
        }
    }

    pub(crate) fn into_chunk(self) -> Chunk<U> {
        Chunk {
            items: self.items,
            tickets: self.tickets,
        }
    }
}

/// What a fused operator did with one chunk.
pub(crate) struct Processed<U> {
    pub(crate) chunk: Chunk<U>,
    /// Inputs that produced at least one output.
    pub(crate) passed: usize,
    /// Inputs that produced nothing (filtered out).
    pub(crate) dropped: usize,
    /// Inputs whose handling panicked; each is one failed item.
    pub(crate) panics: Vec<ItemError>,
}

/// Runs `step` for every item of `chunk`. A panic in `step` fails that one item (its partial
/// outputs are discarded) and processing goes on with the next one: a panic in user code is a
/// failure of the item, not of the pipeline. `catch_unwind` wraps the loop, not each item, so
/// the common path costs nothing extra per item.
///
/// `AT_MOST_ONE` says `step` emits at most one output per input and pushes it last (`map`,
/// `filter`, `filter_map`, `inspect`): then the outputs alone tell how many inputs passed and
/// where a panic struck, and the loop keeps no per-item bookkeeping.
pub(crate) fn process<T, U, const AT_MOST_ONE: bool>(
    chunk: Chunk<T>,
    step: &mut impl FnMut(T, &mut Emit<U>),
) -> Processed<U> {
    let n = chunk.items.len();
    let tracked = chunk.is_tracked();
    let mut emit = Emit::for_chunk(n, tracked);
    let mut items = chunk.items.into_iter();
    let mut tickets = chunk.tickets.into_iter();
    let mut passed = 0usize;
    let mut panics = Vec::new();
    loop {
        let mut mark = 0usize;
        let result = if AT_MOST_ONE && !tracked {
            catch_unwind(AssertUnwindSafe(|| {
                for item in &mut items {
                    step(item, &mut emit);
                }
            }))
        } else {
            catch_unwind(AssertUnwindSafe(|| {
                for item in &mut items {
                    if tracked {
                        emit.current = tickets.next().unwrap_or_default();
                    }
                    mark = emit.items.len();
                    step(item, &mut emit);
                    if emit.items.len() > mark {
                        passed += 1;
                    }
                    if tracked {
                        std::mem::take(&mut emit.current).finish(Outcome::Done);
                    }
                }
            }))
        };
        match result {
            Ok(()) => break,
            Err(payload) => {
                if AT_MOST_ONE && !tracked {
                    // The panicking item pushed nothing (its push comes last).
                } else {
                    emit.items.truncate(mark);
                    if tracked {
                        let_go(emit.tickets.drain(mark..));
                        std::mem::take(&mut emit.current).finish(Outcome::Failed);
                    }
                }
                panics.push(ItemError::from_panic(&*payload));
            }
        }
    }
    if AT_MOST_ONE && !tracked {
        passed = emit.items.len();
    }
    let dropped = n - passed - panics.len();
    Processed {
        chunk: Chunk {
            items: emit.items,
            tickets: emit.tickets,
        },
        passed,
        dropped,
        panics,
    }
}

/// `map` over a chunk: one pass, in place when the layouts allow, with a panic failing only
/// its own item.
///
/// A tracked chunk takes the same path: `map` is 1:1, so each output keeps its input's ticket
/// as it is, moved and never cloned (no atomic operation per item). Only a panicking input's
/// ticket is taken out of line and finished as failed.
pub(crate) fn map_chunk<T, U>(chunk: Chunk<T>, f: &mut impl FnMut(T) -> U) -> Processed<U> {
    let Chunk { items, mut tickets } = chunk;
    let mut panics = Vec::new();
    let mut failed_at = Vec::new();
    let mut index = 0usize;
    // `Vec::into_iter().filter_map().collect()` maps in place when `T` and `U` have the
    // same layout (std's in-place collect): no allocation and one pass over memory that is
    // already in cache. The per-item `catch_unwind` costs nothing on the happy path (no
    // landing pad runs, and none is emitted when `f` cannot unwind).
    let out: Vec<U> = items
        .into_iter()
        .filter_map(|item| {
            let at = index;
            index += 1;
            match catch_unwind(AssertUnwindSafe(|| f(item))) {
                Ok(u) => Some(u),
                Err(payload) => {
                    panics.push(ItemError::from_panic(&*payload));
                    failed_at.push(at);
                    None
                }
            }
        })
        .collect();
    if !tickets.is_empty() {
        // Taken out from the back (indices stay valid), finished in input order.
        let failed: Vec<Ticket> = failed_at
            .iter()
            .rev()
            .map(|&at| tickets.remove(at))
            .collect();
        for t in failed.into_iter().rev() {
            t.finish(Outcome::Failed);
        }
    }
    Processed {
        passed: out.len(),
        dropped: 0,
        chunk: Chunk {
            items: out,
            tickets,
        },
        panics,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn process_isolates_a_panicking_item() {
        let chunk = Chunk::untracked(vec![1, 2, 3, 4]);
        let p = process::<_, _, true>(chunk, &mut |x: i32, out: &mut Emit<i32>| {
            if x == 3 {
                panic!("three");
            }
            out.push(x * 10)
        });
        assert_eq!(p.chunk.items, vec![10, 20, 40]);
        assert_eq!((p.passed, p.dropped, p.panics.len()), (3, 0, 1));
        assert_eq!(p.panics[0].to_string(), "panicked: three");
    }

    #[test]
    fn map_chunk_isolates_panics_on_the_fast_path() {
        let p = map_chunk(Chunk::untracked(vec![1, 2, 3, 4, 5]), &mut |x: i32| {
            if x % 2 == 0 {
                panic!("even");
            }
            x * 10
        });
        assert_eq!(p.chunk.items, vec![10, 30, 50]);
        assert_eq!((p.passed, p.dropped, p.panics.len()), (3, 0, 2));
    }

    #[test]
    fn map_chunk_moves_tickets_and_fails_only_the_panicking_item() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut chunk = Chunk::default();
        for i in 0..5 {
            let s = seen.clone();
            chunk.push(i, Ticket::new(move |o| s.lock().unwrap().push((i, o))));
        }
        let p = map_chunk(chunk, &mut |x: i32| {
            if x == 1 || x == 4 {
                panic!("bad");
            }
            x * 10
        });
        assert_eq!(p.chunk.items, vec![0, 20, 30]);
        assert_eq!(p.chunk.tickets.len(), 3);
        assert_eq!((p.passed, p.dropped, p.panics.len()), (3, 0, 2));
        assert_eq!(
            *seen.lock().unwrap(),
            vec![(1, Outcome::Failed), (4, Outcome::Failed)]
        );
        drop(p.chunk.into_items(Outcome::Done));
        let mut got = seen.lock().unwrap().clone();
        got.sort_by_key(|(i, _)| *i);
        assert_eq!(
            got,
            vec![
                (0, Outcome::Done),
                (1, Outcome::Failed),
                (2, Outcome::Done),
                (3, Outcome::Done),
                (4, Outcome::Failed)
            ]
        );
    }

    #[test]
    fn ticket_reports_worst_outcome_once_all_holders_finish() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let t = Ticket::new(move |o| s.lock().unwrap().push(o));
        let a = t.clone();
        let b = t.clone();
        t.finish(Outcome::Done);
        a.finish(Outcome::Failed);
        assert!(seen.lock().unwrap().is_empty(), "one holder is still alive");
        b.finish(Outcome::Done);
        assert_eq!(*seen.lock().unwrap(), vec![Outcome::Failed]);
    }

    #[test]
    fn a_cancelled_holder_outranks_a_failed_one() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let page = Ticket::new(move |o| s.lock().unwrap().push(o));
        let (a, b) = (page.clone(), page.clone());
        drop(page);
        a.finish(Outcome::Failed);
        drop(b);
        assert_eq!(*seen.lock().unwrap(), vec![Outcome::Cancelled]);
    }

    #[test]
    fn dropped_ticket_counts_as_cancelled_and_parents_follow() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let parent = Ticket::new(move |o| s.lock().unwrap().push(o));
        let child = Ticket::with_parents(vec![parent], None);
        drop(child);
        assert_eq!(*seen.lock().unwrap(), vec![Outcome::Cancelled]);
    }

    #[test]
    fn tracked_chunk_flat_map_shares_ticket_and_filter_finishes_it() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut chunk = Chunk::default();
        for i in 0..3 {
            let s = seen.clone();
            chunk.push(i, Ticket::new(move |o| s.lock().unwrap().push((i, o))));
        }
        // item 0 -> two outputs, item 1 -> none (filtered), item 2 -> one output
        let p = process::<_, _, false>(chunk, &mut |x: i32, out: &mut Emit<i32>| {
            for _ in 0..[2, 0, 1][x as usize] {
                out.push(x)
            }
        });
        assert_eq!(p.chunk.items, vec![0, 0, 2]);
        assert_eq!(p.chunk.tickets.len(), 3);
        assert_eq!(*seen.lock().unwrap(), vec![(1, Outcome::Done)]);
        drop(p.chunk.into_items(Outcome::Done));
        let mut got = seen.lock().unwrap().clone();
        got.sort_by_key(|(i, _)| *i);
        assert_eq!(
            got,
            vec![(0, Outcome::Done), (1, Outcome::Done), (2, Outcome::Done)]
        );
    }

    #[test]
    fn append_keeps_ticket_invariant() {
        let mut a = Chunk::untracked(vec![1, 2]);
        let mut b = Chunk::default();
        b.push(3, Ticket::new(|_| {}));
        a.append(b);
        assert_eq!(a.items.len(), a.tickets.len());
    }
}
