//! The state of tumbling and sliding windows: per key, the panes that hold items.
//!
//! A pane is a stretch of `gcd(size, step)`: every window is a whole number of panes, so an
//! item is added to one pane only (one `add`, whatever the number of windows it is in), and a
//! window's value is its panes merged when it closes. A tumbling window is one pane and is
//! emitted without a merge.
//!
//! Only panes that hold items exist. A key whose last pane is emitted keeps its (empty)
//! slot until the next close that finds more empty slots than busy ones sweeps it: a busy
//! key's next item, usually moments away, then finds its slot and buffer still there
//! instead of a removal, a new slot and a new buffer per key and window. Memory follows the
//! keys of the windows that are open (at most about twice as many slots), not the keys
//! ever seen. A schedule
//! ordered by window end says which key has a window to emit next; an entry may be stale
//! (the key's next window moved earlier), which costs a lookup when it comes up, never a
//! wrong window.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::Hash;
use std::time::Duration;

use super::aggregate::Aggregate;
use super::state::{Emitted, Rejected, State, Why, schedule};
use crate::Windowed;
use crate::runtime::chunk::{Outcome, Ticket};

pub(crate) struct Panes<K, Acc> {
    size: u64,
    step: u64,
    /// The pane's length: `gcd(size, step)`.
    pane: u64,
    keys: HashMap<K, KeyPanes<Acc>>,
    schedule: BTreeMap<u64, Vec<K>>,
    open: usize,
    held: u64,
    /// Keys whose slot holds no pane (swept in `close` once they outnumber the busy ones).
    idle: usize,
    /// The pane the last item fell in (its start, and the end of the first window holding
    /// it): items come mostly in time order, so the next one usually falls in it too and
    /// its two divisions are not made again. No window starts or ends inside a pane.
    last: (u64, u64),
}

struct KeyPanes<Acc> {
    /// By start, oldest first (an out-of-order item inserts in place).
    panes: VecDeque<Pane<Acc>>,
    /// The newest pane, kept in the key's map slot while items come to it: an item is
    /// counted where its key was looked up, not in the panes' buffer (one cache miss an
    /// item instead of two). Newer than every pane in `panes`; put back with `settle`
    /// before anything reads `panes`.
    newest: Option<Pane<Acc>>,
    /// The end of the next window of this key to emit.
    next_end: u64,
}

impl<Acc> KeyPanes<Acc> {
    /// The oldest pane (the newest is newer than every one in `panes`).
    fn oldest(&self) -> Option<&Pane<Acc>> {
        self.panes.front().or(self.newest.as_ref())
    }

    /// Puts the newest pane back at the end of `panes`.
    fn settle(&mut self) {
        if let Some(p) = self.newest.take() {
            self.panes.push_back(p);
        }
    }
}

struct Pane<Acc> {
    start: u64,
    acc: Acc,
    items: u64,
    /// Its items' tickets, only when the input is tracked: boxed, so that an untracked
    /// pane is 32 bytes for a count (a key's panes are the state's memory, and the cache
    /// misses on them its cost).
    tickets: Option<Box<PaneTickets>>,
}

/// The items' tickets of a pane, until the pane is first in an emitted window: then one
/// ticket over them (`shared`), which each window that holds the pane gets a part of.
#[derive(Default)]
struct PaneTickets {
    items: Vec<Ticket>,
    shared: Ticket,
}

impl<Acc> Pane<Acc> {
    /// The pane's one ticket over its items, made the first time a window needs it.
    fn shared(&mut self) -> Ticket {
        let Some(t) = self.tickets.as_mut() else {
            return Ticket::none();
        };
        if !t.items.is_empty() {
            t.shared = Ticket::with_parents(std::mem::take(&mut t.items), None);
        }
        t.shared.clone()
    }

    /// Keeps an item's ticket (a tracked input).
    fn keep(&mut self, ticket: &mut Ticket) {
        if ticket.is_some() {
            let t = self.tickets.get_or_insert_with(Box::default);
            t.items.push(std::mem::take(ticket));
        }
    }
}

/// The end of the first window (`k ≥ 0`) of `size` every `step` that holds time `t`.
fn first_end(size: u64, step: u64, t: u64) -> u64 {
    if t < size {
        size
    } else {
        ((t - size) / step + 1) * step + size
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl<K, Acc> Panes<K, Acc> {
    pub(crate) fn new(size: u64, step: u64) -> Self {
        let (size, step) = (size.max(1), step.max(1));
        Panes {
            size,
            step,
            pane: gcd(size, step),
            keys: HashMap::new(),
            schedule: BTreeMap::new(),
            open: 0,
            held: 0,
            idle: 0,
            last: (u64::MAX, 0),
        }
    }

    /// The end of the first window (`k ≥ 0`) that holds time `t`.
    fn first_end(&self, t: u64) -> u64 {
        first_end(self.size, self.step, t)
    }

    /// The end of the last window that holds time `t`.
    fn last_end(&self, t: u64) -> u64 {
        t / self.step * self.step + self.size
    }
}

impl<K, Acc> Panes<K, Acc>
where
    K: Hash + Eq + Clone,
{
    /// Emits `key`'s windows that end at or before `until` (in end order), retires the panes
    /// no later window holds, and schedules the key's next window.
    fn emit_key<T, A>(
        &mut self,
        agg: &mut A,
        key: &K,
        until: u64,
        evicted: bool,
        out: &mut Emitted<K, A::Output>,
    ) where
        A: Aggregate<T, Acc = Acc>,
    {
        let Some(kp) = self.keys.get_mut(key) else {
            return;
        };
        if kp.panes.is_empty() && kp.newest.is_none() {
            return; // an idle slot (a stale entry of the schedule): counted idle once
        }
        kp.settle();
        let before = kp.next_end;
        let tumbling = self.pane == self.size;
        while kp.next_end <= until {
            let Some(front) = kp.panes.front() else {
                break;
            };
            let end = kp.next_end;
            if front.start >= end {
                // Nothing of this key until its next pane: no empty windows.
                kp.next_end = first_end(self.size, self.step, front.start);
                continue;
            }
            let start = end - self.size;
            if tumbling {
                let p = kp.panes.pop_front().expect("a front pane");
                self.open -= 1;
                self.held -= p.items;
                out.retired += p.items;
                if p.items > 0 {
                    let items = p.tickets.map(|t| t.items).unwrap_or_default();
                    let ticket = Ticket::with_parents(items, None);
                    out.push(
                        window(key, start, end, p.items, agg.finish(p.acc), evicted),
                        ticket,
                    );
                }
            } else {
                let mut acc = agg.init();
                let mut items = 0;
                let mut parts = Vec::new();
                for p in kp.panes.iter_mut().take_while(|p| p.start < end) {
                    if p.items == 0 {
                        continue;
                    }
                    agg.merge(&mut acc, &p.acc);
                    items += p.items;
                    if out.tracked {
                        parts.push(p.shared());
                    }
                }
                if items > 0 {
                    let ticket = Ticket::with_parents(parts, None);
                    out.push(
                        window(key, start, end, items, agg.finish(acc), evicted),
                        ticket,
                    );
                }
            }
            kp.next_end = end + self.step;
            let next_start = kp.next_end - self.size;
            while kp
                .panes
                .front()
                .is_some_and(|p| p.start + self.pane <= next_start)
            {
                let mut p = kp.panes.pop_front().expect("a front pane");
                self.open -= 1;
                self.held -= p.items;
                out.retired += p.items;
                // Every pane was in a window before it retires: its tickets went into
                // `shared`, whose windows now hold them.
                p.shared().finish(Outcome::Done);
                if let Some(mut t) = p.tickets.take() {
                    std::mem::take(&mut t.shared).finish(Outcome::Done);
                }
            }
        }
        if kp.panes.is_empty() {
            // Nothing scheduled: the next pane schedules the key again.
            kp.next_end = u64::MAX;
            self.idle += 1;
        } else if kp.next_end != before {
            schedule(&mut self.schedule, kp.next_end, key.clone());
        }
    }
}

fn window<K: Clone, V>(
    key: &K,
    start: u64,
    end: u64,
    items: u64,
    value: V,
    evicted: bool,
) -> Windowed<K, V> {
    Windowed {
        key: key.clone(),
        start: Duration::from_nanos(start),
        end: Duration::from_nanos(end),
        items,
        value,
        evicted,
    }
}

impl<K, T, A> State<K, T, A> for Panes<K, A::Acc>
where
    K: Hash + Eq + Clone + Send + 'static,
    A: Aggregate<T>,
{
    fn add(
        &mut self,
        agg: &mut A,
        key: K,
        t: u64,
        watermark: u64,
        item: T,
        ticket: &mut Ticket,
        max_open: usize,
    ) -> Result<(), Rejected<K, T>> {
        let (start, first_end) = if t >= self.last.0 && t - self.last.0 < self.pane {
            self.last
        } else {
            self.last = (t - t % self.pane, self.first_end(t));
            self.last
        };
        if first_end <= watermark {
            return Err(Rejected {
                why: Why::Late,
                key,
                item,
            });
        }
        if let Some(kp) = self.keys.get_mut(&key) {
            if let Some(p) = kp.newest.as_mut().filter(|p| p.start == start) {
                agg.add(&mut p.acc, item);
                p.items += 1;
                p.keep(ticket);
                self.held += 1;
                return Ok(());
            }
            if kp.newest.is_none() && kp.panes.is_empty() {
                self.idle -= 1;
            }
            kp.settle();
            // Usually the newest pane: searched from the back.
            let at = kp.panes.iter().rposition(|p| p.start <= start);
            let pane = match at {
                Some(i) if kp.panes[i].start == start => &mut kp.panes[i],
                _ => {
                    if self.open >= max_open {
                        if kp.panes.is_empty() {
                            self.idle += 1;
                        }
                        return Err(Rejected {
                            why: Why::Full,
                            key,
                            item,
                        });
                    }
                    let i = at.map_or(0, |i| i + 1);
                    kp.panes.insert(
                        i,
                        Pane {
                            start,
                            acc: agg.init(),
                            items: 0,
                            tickets: None,
                        },
                    );
                    self.open += 1;
                    if first_end < kp.next_end {
                        kp.next_end = first_end;
                        schedule(&mut self.schedule, first_end, key.clone());
                    }
                    &mut kp.panes[i]
                }
            };
            agg.add(&mut pane.acc, item);
            pane.items += 1;
            pane.keep(ticket);
            // The newest pane goes to the key's slot: items come mostly to it.
            if kp.panes.back().is_some_and(|p| p.start == start) {
                kp.newest = kp.panes.pop_back();
            }
        } else {
            if self.open >= max_open {
                return Err(Rejected {
                    why: Why::Full,
                    key,
                    item,
                });
            }
            let mut acc = agg.init();
            agg.add(&mut acc, item);
            let mut pane = Pane {
                start,
                acc,
                items: 1,
                tickets: None,
            };
            pane.keep(ticket);
            // Room for a window's panes and the next one at once (a key's panes stay that
            // many once it is busy), so that the buffer is not grown and copied several times.
            let room = (self.size / self.pane).saturating_add(1).min(64) as usize;
            self.open += 1;
            schedule(&mut self.schedule, first_end, key.clone());
            self.keys.insert(
                key,
                KeyPanes {
                    panes: VecDeque::with_capacity(room),
                    newest: Some(pane),
                    next_end: first_end,
                },
            );
        }
        self.held += 1;
        Ok(())
    }

    fn close(&mut self, agg: &mut A, watermark: u64, out: &mut Emitted<K, A::Output>) {
        while let Some(entry) = self.schedule.first_entry() {
            let end = *entry.key();
            if end > watermark {
                break;
            }
            for key in entry.remove() {
                // One window per entry: windows go out in end order across keys.
                self.emit_key(agg, &key, end, false, out);
            }
        }
        if self.idle > self.keys.len() / 2 {
            self.keys
                .retain(|_, kp| !(kp.panes.is_empty() && kp.newest.is_none()));
            self.idle = 0;
        }
    }

    fn next_end(&self) -> Option<u64> {
        self.schedule.first_key_value().map(|(end, _)| *end)
    }

    fn evict(&mut self, agg: &mut A, out: &mut Emitted<K, A::Output>) -> bool {
        // The key whose next window ends first: every window holding its oldest pane goes
        // out now, and the pane is retired.
        while let Some(mut entry) = self.schedule.first_entry() {
            let Some(key) = entry.get_mut().pop() else {
                entry.remove();
                continue;
            };
            if entry.get().is_empty() {
                entry.remove();
            }
            let Some(front) = self.keys.get(&key).and_then(KeyPanes::oldest) else {
                continue;
            };
            let until = self.last_end(front.start);
            let open = self.open;
            self.emit_key(agg, &key, until, true, out);
            if self.open < open {
                return true;
            }
        }
        false
    }

    fn open(&self) -> usize {
        self.open
    }

    fn held(&self) -> u64 {
        self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CountItems;

    impl<K: Hash + Eq, Acc> Panes<K, Acc> {
        fn next_end_of(&self, key: &K) -> u64 {
            self.keys[key].next_end
        }
    }

    fn count_state(size: u64, step: u64) -> Panes<u8, u64> {
        Panes::new(size, step)
    }

    fn add(s: &mut Panes<u8, u64>, key: u8, t: u64, wm: u64) -> Result<(), Why> {
        State::<u8, u64, CountItems>::add(
            s,
            &mut CountItems,
            key,
            t,
            wm,
            t,
            &mut Ticket::none(),
            100,
        )
        .map_err(|r| r.why)
    }

    #[test]
    fn an_emptied_key_keeps_its_slot_until_idle_slots_outnumber_busy_ones() {
        let mut s = count_state(10, 10);
        for k in 1..=4 {
            assert_eq!(add(&mut s, k, 0, 0), Ok(()));
        }
        for k in 1..=3 {
            assert_eq!(add(&mut s, k, 12, 0), Ok(()));
        }
        let mut out = Emitted::default();
        State::<u8, u64, CountItems>::close(&mut s, &mut CountItems, 10, &mut out);
        assert_eq!(out.windows.len(), 4);
        // key 4 is idle, one slot of four: kept, and found again by its next item
        assert_eq!((s.keys.len(), s.idle), (4, 1));
        assert_eq!(add(&mut s, 4, 15, 10), Ok(()));
        assert_eq!((s.keys.len(), s.idle), (4, 0));
        assert_eq!(s.next_end_of(&4), 20);
        let mut out = Emitted::default();
        State::<u8, u64, CountItems>::close(&mut s, &mut CountItems, u64::MAX, &mut out);
        let got: Vec<(u8, u64)> = out.windows.iter().map(|w| (w.key, w.value)).collect();
        assert_eq!(got.len(), 4);
        assert!(got.iter().all(|&(_, c)| c == 1), "{got:?}");
        // all idle: swept
        assert_eq!((s.keys.len(), s.idle, s.open, s.held), (0, 0, 0, 0));
    }

    #[test]
    fn a_stale_entry_for_an_idle_key_counts_it_idle_once() {
        let mut s = count_state(10, 10);
        assert_eq!(add(&mut s, 1, 25, 0), Ok(()));
        // an earlier pane moves the key's next window earlier: two entries (10 and 30)
        assert_eq!(add(&mut s, 1, 5, 0), Ok(()));
        assert_eq!(add(&mut s, 2, 5, 0), Ok(()));
        assert_eq!(add(&mut s, 3, 35, 0), Ok(()));
        let mut out = Emitted::default();
        State::<u8, u64, CountItems>::close(&mut s, &mut CountItems, 30, &mut out);
        assert_eq!(out.windows.len(), 3);
        // keys 1 and 2 idle, 3 busy: 2 > 3 / 2, swept; key 3 stays
        assert_eq!((s.keys.len(), s.idle), (1, 0));
    }

    #[test]
    fn first_and_last_window_ends() {
        let s = count_state(10, 4);
        assert_eq!(s.pane, 2);
        // windows [0,10) [4,14) [8,18) [12,22)
        assert_eq!((s.first_end(0), s.last_end(0)), (10, 10));
        assert_eq!((s.first_end(9), s.last_end(9)), (10, 18));
        assert_eq!((s.first_end(10), s.last_end(10)), (14, 18));
        assert_eq!((s.first_end(13), s.last_end(13)), (14, 22));
    }

    #[test]
    fn late_means_the_first_window_holding_it_has_closed() {
        let mut s = count_state(10, 10);
        assert_eq!(add(&mut s, 1, 5, 9), Ok(()));
        assert_eq!(add(&mut s, 1, 5, 10), Err(Why::Late));
        assert_eq!(add(&mut s, 1, 10, 10), Ok(()));
    }

    #[test]
    fn the_limit_counts_panes_and_eviction_frees_the_oldest() {
        let mut s = count_state(10, 10);
        let mut out = Emitted::default();
        for (k, t) in [(1, 0), (2, 0), (1, 10), (1, 11)] {
            assert_eq!(
                State::<u8, u64, CountItems>::add(
                    &mut s,
                    &mut CountItems,
                    k,
                    t,
                    0,
                    t,
                    &mut Ticket::none(),
                    3
                )
                .map_err(|r| r.why),
                Ok(())
            );
        }
        assert_eq!(State::<u8, u64, CountItems>::open(&s), 3);
        let full = State::<u8, u64, CountItems>::add(
            &mut s,
            &mut CountItems,
            3,
            0,
            0,
            0,
            &mut Ticket::none(),
            3,
        );
        assert_eq!(full.map_err(|r| r.why), Err(Why::Full));
        assert!(State::<u8, u64, CountItems>::evict(
            &mut s,
            &mut CountItems,
            &mut out
        ));
        assert_eq!(out.windows.len(), 1);
        assert!(out.windows[0].evicted);
        assert_eq!(out.retired, 1);
        assert_eq!(State::<u8, u64, CountItems>::open(&s), 2);
    }
}
