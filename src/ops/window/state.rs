//! What the engine asks of a window kind's state (panes, sessions, count windows), and
//! where the state puts the windows it closes.

use std::collections::BTreeMap;

use super::aggregate::Aggregate;
use crate::Windowed;
use crate::runtime::chunk::Ticket;

/// Why an item was not added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Why {
    /// Every window that would hold it has closed.
    Late,
    /// It needs a new window (or pane) and `max_open` are open.
    Full,
}

/// An item the state did not take, given back with its key.
pub(crate) struct Rejected<K, T> {
    pub(crate) why: Why,
    pub(crate) key: K,
    pub(crate) item: T,
}

/// The windows closed by one call, with one ticket each (when tracked), and how many items
/// the state let go of (their every window emitted).
pub(crate) struct Emitted<K, V> {
    pub(crate) windows: Vec<Windowed<K, V>>,
    pub(crate) tickets: Vec<Ticket>,
    /// Some item seen had a ticket: every window carries one.
    pub(crate) tracked: bool,
    pub(crate) retired: u64,
}

impl<K, V> Default for Emitted<K, V> {
    fn default() -> Self {
        Emitted {
            windows: Vec::new(),
            tickets: Vec::new(),
            tracked: false,
            retired: 0,
        }
    }
}

impl<K, V> Emitted<K, V> {
    pub(crate) fn push(&mut self, window: Windowed<K, V>, ticket: Ticket) {
        if ticket.is_some() && !self.tracked {
            self.tickets.resize_with(self.windows.len(), Ticket::none);
            self.tracked = true;
        }
        self.windows.push(window);
        if self.tracked {
            self.tickets.push(ticket);
        }
    }
}

/// The state of one window kind over keys `K`, items `T`, aggregation `A`. Times are
/// nanoseconds since the time domain's epoch; a window `[start, end)` closes when the
/// watermark reaches `end`.
pub(crate) trait State<K, T, A: Aggregate<T>>: Send + 'static {
    /// Adds `item` (at `t`, under `watermark`) to the windows of `key` that hold it. The
    /// item's `ticket` is taken once the item is in (left in place if the aggregation
    /// panics, so the caller can fail it).
    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        agg: &mut A,
        key: K,
        t: u64,
        watermark: u64,
        item: T,
        ticket: &mut Ticket,
        max_open: usize,
    ) -> Result<(), Rejected<K, T>>;

    /// Emits every window that ends at or before `watermark` (`u64::MAX`: all of them), in
    /// end order.
    fn close(&mut self, agg: &mut A, watermark: u64, out: &mut Emitted<K, A::Output>);

    /// The earliest end of an open window, if the kind closes windows on time (possibly of a
    /// window already gone: a timer then finds nothing to do).
    fn next_end(&self) -> Option<u64>;

    /// Emits the open window that would close first, early (marked `evicted`), to make room;
    /// false if nothing was freed.
    fn evict(&mut self, agg: &mut A, out: &mut Emitted<K, A::Output>) -> bool;

    /// Windows (panes, sessions) open now: what `max_open` bounds.
    #[cfg_attr(not(test), allow(dead_code))]
    fn open(&self) -> usize;

    /// Items held in open windows.
    fn held(&self) -> u64;
}

/// Adds `key` to the schedule at `end`.
pub(crate) fn schedule<K>(schedule: &mut BTreeMap<u64, Vec<K>>, end: u64, key: K) {
    schedule.entry(end).or_default().push(key);
}
