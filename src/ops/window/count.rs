//! `Count::every(n)`: per key, a window of `n` items, emitted as soon as it is full; the last,
//! partial one of each key is flushed when the input ends.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::Duration;

use super::aggregate::Aggregate;
use super::state::{Emitted, Rejected, State, Why};
use super::{Spec, WindowKind, sealed};
use crate::Windowed;
use crate::runtime::chunk::Ticket;

/// Count windows: per key, every `n` items make a window, emitted when its `n`-th item
/// arrives; what is left when the input ends is flushed as a shorter window. Time plays no
/// part in closing them, so no item is late; a window's `start` and `end` are the times of
/// its first and last item (`end` one nanosecond after the last, so `[start, end)` holds them).
/// `n` must be at least 1.
///
/// ```
/// use flowline::prelude::*;
/// use flowline::Count;
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let out = Pipeline::from_iter(1..=7u32)
///     .window(Count::every(3))
///     .reduce(|a, b| a + b)
///     .collect().await.unwrap();
/// let sums: Vec<Option<u32>> = out.into_iter().map(|w| w.value).collect();
/// assert_eq!(sums, vec![Some(6), Some(15), Some(7)]);
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Count {
    n: u64,
}

impl Count {
    /// Windows of `n` items.
    ///
    /// ```
    /// let per_hundred = flowline::Count::every(100);
    /// # let _ = per_hundred;
    /// ```
    pub fn every(n: u64) -> Self {
        Count { n }
    }
}

impl sealed::Kind for Count {
    fn spec(&self, stage: &str, errors: &mut Vec<crate::Error>) -> Spec {
        if self.n == 0 {
            errors.push(crate::Error::config(
                stage,
                "count",
                0,
                "must be at least 1",
            ));
        }
        Spec::Count { n: self.n.max(1) }
    }
}

impl WindowKind for Count {}

pub(crate) struct Counts<K, Acc> {
    n: u64,
    keys: HashMap<K, Open<Acc>>,
    /// Keys in the order their windows opened (entries of windows already emitted are
    /// skipped when met): the oldest is evicted first, and the flush goes in this order.
    order: VecDeque<(u64, K)>,
    seq: u64,
    held: u64,
    /// Windows that filled up, emitted by the next `close` (which runs after every chunk).
    full: Vec<(K, Open<Acc>)>,
}

struct Open<Acc> {
    seq: u64,
    first: u64,
    last: u64,
    acc: Acc,
    items: u64,
    tickets: Vec<Ticket>,
}

impl<K, Acc> Counts<K, Acc> {
    pub(crate) fn new(n: u64) -> Self {
        Counts {
            n: n.max(1),
            keys: HashMap::new(),
            order: VecDeque::new(),
            seq: 0,
            held: 0,
            full: Vec::new(),
        }
    }
}

impl<K: Hash + Eq + Clone, Acc> Counts<K, Acc> {
    fn emit<T, A: Aggregate<T, Acc = Acc>>(
        &mut self,
        agg: &mut A,
        key: K,
        w: Open<Acc>,
        evicted: bool,
        out: &mut Emitted<K, A::Output>,
    ) {
        self.held -= w.items;
        out.retired += w.items;
        let window = Windowed {
            key,
            start: Duration::from_nanos(w.first),
            end: Duration::from_nanos(w.last + 1),
            items: w.items,
            value: agg.finish(w.acc),
            evicted,
        };
        out.push(window, Ticket::with_parents(w.tickets, None));
    }

    /// Emits the oldest open window; false if none is open.
    fn emit_oldest<T, A: Aggregate<T, Acc = Acc>>(
        &mut self,
        agg: &mut A,
        evicted: bool,
        out: &mut Emitted<K, A::Output>,
    ) -> bool {
        while let Some((seq, key)) = self.order.pop_front() {
            if self.keys.get(&key).is_some_and(|w| w.seq == seq) {
                let w = self.keys.remove(&key).expect("an open window");
                self.emit(agg, key, w, evicted, out);
                return true;
            }
        }
        false
    }
}

impl<K, T, A> State<K, T, A> for Counts<K, A::Acc>
where
    K: Hash + Eq + Clone + Send + 'static,
    A: Aggregate<T>,
{
    fn add(
        &mut self,
        agg: &mut A,
        key: K,
        t: u64,
        _watermark: u64,
        item: T,
        ticket: &mut Ticket,
        max_open: usize,
    ) -> Result<(), Rejected<K, T>> {
        let w = match self.keys.get_mut(&key) {
            Some(w) => w,
            None => {
                if self.keys.len() >= max_open {
                    return Err(Rejected {
                        why: Why::Full,
                        key,
                        item,
                    });
                }
                self.seq += 1;
                self.order.push_back((self.seq, key.clone()));
                if self.order.len() > 2 * self.keys.len() + 64 {
                    // Drop the entries of windows already emitted.
                    let keys = &self.keys;
                    self.order
                        .retain(|(seq, k)| keys.get(k).is_some_and(|w| w.seq == *seq));
                }
                self.keys.entry(key.clone()).or_insert(Open {
                    seq: self.seq,
                    first: t,
                    last: t,
                    acc: agg.init(),
                    items: 0,
                    tickets: Vec::new(),
                })
            }
        };
        agg.add(&mut w.acc, item);
        w.items += 1;
        w.first = w.first.min(t);
        w.last = w.last.max(t);
        if ticket.is_some() {
            w.tickets.push(std::mem::take(ticket));
        }
        self.held += 1;
        if w.items >= self.n {
            let w = self.keys.remove(&key).expect("the window just added to");
            self.full.push((key, w));
        }
        Ok(())
    }

    fn close(&mut self, agg: &mut A, watermark: u64, out: &mut Emitted<K, A::Output>) {
        for (key, w) in std::mem::take(&mut self.full) {
            self.emit(agg, key, w, false, out);
        }
        if watermark == u64::MAX {
            while self.emit_oldest(agg, false, out) {}
        }
    }

    fn next_end(&self) -> Option<u64> {
        None
    }

    fn evict(&mut self, agg: &mut A, out: &mut Emitted<K, A::Output>) -> bool {
        self.emit_oldest(agg, true, out)
    }

    fn open(&self) -> usize {
        self.keys.len()
    }

    fn held(&self) -> u64 {
        self.held
    }
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;
    use crate::{Count, OnFull};

    #[tokio::test]
    async fn full_windows_per_key_then_the_rest_in_opening_order() {
        let items = [("a", 1), ("b", 2), ("a", 3), ("c", 4), ("a", 5), ("b", 6)];
        let (out, report) = Pipeline::from_iter(items)
            .window(Count::every(2))
            .key_by(|(k, _)| *k)
            .collect_items()
            .collect_with_report()
            .await
            .unwrap();
        let got: Vec<(&str, Vec<i32>)> = out
            .into_iter()
            .map(|w| (w.key, w.value.into_iter().map(|(_, v)| v).collect()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a", vec![1, 3]),
                ("b", vec![2, 6]),
                ("c", vec![4]),
                ("a", vec![5])
            ]
        );
        let w = report.stage("window").unwrap();
        assert_eq!((w.received, w.passed, w.emitted), (6, 6, 4));
    }

    #[tokio::test]
    async fn eviction_emits_the_oldest_window_early_and_marks_it() {
        let (out, report) = Pipeline::from_iter([1u32, 2, 3, 1, 2])
            .window(Count::every(10))
            .key_by(|x| *x)
            .max_open(2)
            .on_full(OnFull::EmitOldest)
            .count()
            .collect_with_report()
            .await
            .unwrap();
        // 3 evicts 1 (oldest); the second 1 evicts 2; 2 evicts 3; the rest flush at the end
        let got: Vec<(u32, u64, bool)> = out.iter().map(|w| (w.key, w.value, w.evicted)).collect();
        assert_eq!(
            got,
            vec![
                (1, 1, true),
                (2, 1, true),
                (3, 1, true),
                (1, 1, false),
                (2, 1, false)
            ]
        );
        assert!(report.is_balanced());
    }

    #[tokio::test]
    async fn a_full_state_fails_the_item_by_default_and_says_why() {
        let (out, report) = Pipeline::from_iter([1u32, 2, 3, 1])
            .window(Count::every(10))
            .key_by(|x| *x)
            .max_open(2)
            .count()
            .collect_with_report()
            .await
            .unwrap();
        assert_eq!(out.iter().map(|w| w.items).sum::<u64>(), 3);
        let w = report.stage("window").unwrap();
        assert_eq!((w.received, w.passed, w.failed), (4, 3, 1));
        assert_eq!(
            report.failure_sample[0].error.to_string(),
            "2 windows open (max_open): no room for a new one"
        );
    }
}
