//! `Session::gap(g)`: per key, items closer than `g` to each other form one window, which
//! closes `g` after its last item. An item that bridges two sessions merges them.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::time::Duration;

use super::aggregate::Aggregate;
use super::state::{Emitted, Rejected, State, Why, schedule};
use super::{Spec, WindowKind, sealed};
use crate::Windowed;
use crate::runtime::chunk::Ticket;

/// Session windows: per key, a window of activity that ends after `gap` without an item.
/// An item at `t` lasts `[t, t + gap)`; items whose spans overlap are in one session, from
/// its first item to its last item plus `gap`. An item that arrives out of order and
/// bridges two sessions merges them (the aggregation must merge: see
/// [`Fold::merge`](crate::Fold::merge)). An item is late when its own span has closed
/// (`t + gap` at or before the watermark). `gap` must be more than zero.
///
/// ```
/// use flowline::prelude::*;
/// use flowline::Session;
/// use std::time::Duration;
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let clicks = [("ann", 0u64), ("ann", 20), ("bob", 25), ("ann", 100)];   // seconds
/// let out = Pipeline::from_iter(clicks)
///     .window(Session::gap(Duration::from_secs(30)))
///         .key_by(|(user, _)| *user)
///         .event_time(|(_, s)| Duration::from_secs(*s))
///     .count()
///     .collect().await.unwrap();
/// let got: Vec<(&str, u64, u64, u64)> =
///     out.iter().map(|w| (w.key, w.start.as_secs(), w.end.as_secs(), w.value)).collect();
/// assert_eq!(got, vec![("ann", 0, 50, 2), ("bob", 25, 55, 1), ("ann", 100, 130, 1)]);
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    gap: Duration,
}

impl Session {
    /// Sessions that end after `gap` without an item.
    ///
    /// ```
    /// let visits = flowline::Session::gap(std::time::Duration::from_secs(30 * 60));
    /// # let _ = visits;
    /// ```
    pub fn gap(gap: Duration) -> Self {
        Session { gap }
    }
}

impl sealed::Kind for Session {
    fn spec(&self, stage: &str, errors: &mut Vec<crate::Error>) -> Spec {
        Spec::Session {
            gap: super::check_length(stage, "gap", self.gap, errors),
        }
    }
}

impl WindowKind for Session {}

pub(crate) struct Sessions<K, Acc> {
    gap: u64,
    /// Per key, its open sessions by start.
    keys: HashMap<K, Vec<Open<Acc>>>,
    schedule: BTreeMap<u64, Vec<K>>,
    open: usize,
    held: u64,
}

struct Open<Acc> {
    start: u64,
    /// The time of its latest item: it ends `gap` after.
    last: u64,
    acc: Acc,
    items: u64,
    tickets: Vec<Ticket>,
}

impl<K, Acc> Sessions<K, Acc> {
    pub(crate) fn new(gap: u64) -> Self {
        Sessions {
            gap: gap.max(1),
            keys: HashMap::new(),
            schedule: BTreeMap::new(),
            open: 0,
            held: 0,
        }
    }
}

impl<K: Hash + Eq + Clone, Acc> Sessions<K, Acc> {
    /// Emits `key`'s sessions that end at or before `until`.
    fn emit_key<T, A>(
        &mut self,
        agg: &mut A,
        key: &K,
        until: u64,
        evicted: bool,
        out: &mut Emitted<K, A::Output>,
    ) -> usize
    where
        A: Aggregate<T, Acc = Acc>,
    {
        let Some(list) = self.keys.get_mut(key) else {
            return 0;
        };
        let gap = self.gap;
        let mut closed = 0;
        let mut i = 0;
        while i < list.len() {
            if list[i].last + gap > until {
                i += 1;
                continue;
            }
            let s = list.remove(i);
            closed += 1;
            self.open -= 1;
            self.held -= s.items;
            out.retired += s.items;
            if s.items > 0 {
                let w = Windowed {
                    key: key.clone(),
                    start: Duration::from_nanos(s.start),
                    end: Duration::from_nanos(s.last + gap),
                    items: s.items,
                    value: agg.finish(s.acc),
                    evicted,
                };
                out.push(w, Ticket::with_parents(s.tickets, None));
            }
        }
        if list.is_empty() {
            self.keys.remove(key);
        }
        closed
    }
}

impl<K, T, A> State<K, T, A> for Sessions<K, A::Acc>
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
        let gap = self.gap;
        if t + gap <= watermark {
            return Err(Rejected {
                why: Why::Late,
                key,
                item,
            });
        }
        // The key is cloned only for a key not seen yet (the map keeps one, the schedule
        // the other); a known key is looked up by reference and moved into the schedule
        // only if its session's end moves.
        if !self.keys.contains_key(&key) {
            self.keys.insert(key.clone(), Vec::new());
        }
        let list = self.keys.get_mut(&key).expect("inserted above");
        // The sessions whose spans overlap [t, t + gap): a run of neighbours by start.
        let first = list.iter().position(|s| t < s.last + gap);
        let touching = first.map_or(0, |f| {
            list[f..].iter().take_while(|s| s.start < t + gap).count()
        });
        let at = match (first, touching) {
            (Some(f), n) if n > 0 => {
                // Merge every touched session into the first.
                for _ in 1..n {
                    let other = list.remove(f + 1);
                    let s = &mut list[f];
                    agg.merge(&mut s.acc, &other.acc);
                    s.last = s.last.max(other.last);
                    s.items += other.items;
                    s.tickets.extend(other.tickets);
                    self.open -= 1;
                }
                f
            }
            _ => {
                if self.open >= max_open {
                    if list.is_empty() {
                        self.keys.remove(&key);
                    }
                    return Err(Rejected {
                        why: Why::Full,
                        key,
                        item,
                    });
                }
                let i = first.unwrap_or(list.len());
                list.insert(
                    i,
                    Open {
                        start: t,
                        last: t,
                        acc: agg.init(),
                        items: 0,
                        tickets: Vec::new(),
                    },
                );
                self.open += 1;
                i
            }
        };
        let s = &mut list[at];
        let end = s.last + gap;
        s.start = s.start.min(t);
        s.last = s.last.max(t);
        agg.add(&mut s.acc, item);
        s.items += 1;
        if ticket.is_some() {
            s.tickets.push(std::mem::take(ticket));
        }
        let new_end = s.last + gap;
        if new_end != end || s.items == 1 {
            schedule(&mut self.schedule, new_end, key);
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
                self.emit_key(agg, &key, end, false, out);
            }
        }
    }

    fn next_end(&self) -> Option<u64> {
        self.schedule.first_key_value().map(|(end, _)| *end)
    }

    fn evict(&mut self, agg: &mut A, out: &mut Emitted<K, A::Output>) -> bool {
        while let Some(mut entry) = self.schedule.first_entry() {
            let Some(key) = entry.get_mut().pop() else {
                entry.remove();
                continue;
            };
            if entry.get().is_empty() {
                entry.remove();
            }
            let Some(end) = self
                .keys
                .get(&key)
                .and_then(|l| l.iter().map(|s| s.last + self.gap).min())
            else {
                continue;
            };
            if self.emit_key(agg, &key, end, true, out) > 0 {
                if let Some(next) = self
                    .keys
                    .get(&key)
                    .and_then(|l| l.iter().map(|s| s.last + self.gap).min())
                {
                    schedule(&mut self.schedule, next, key);
                }
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
    use crate::prelude::*;
    use crate::{Fold, Session};
    use std::time::Duration;

    const S: fn(u64) -> Duration = Duration::from_secs;

    async fn sessions(
        events: &[(u8, u64)],
        lateness: u64,
    ) -> (Vec<(u8, u64, u64, Vec<u64>)>, Report) {
        let (out, report) = Pipeline::from_iter(events.to_vec())
            .window(Session::gap(S(10)))
            .key_by(|(k, _)| *k)
            .event_time(|(_, t)| S(*t))
            .allowed_lateness(S(lateness))
            .aggregate(
                Fold::new(Vec::new(), |v: &mut Vec<u64>, (_, t): (u8, u64)| v.push(t))
                    .merge(|a, b| a.extend(b)),
            )
            .collect_with_report()
            .await
            .unwrap();
        let got = out
            .into_iter()
            .map(|w| (w.key, w.start.as_secs(), w.end.as_secs(), w.value))
            .collect();
        (got, report)
    }

    /// A key that counts its clones (per thread: the tests run side by side).
    #[derive(Debug, PartialEq, Eq, Hash)]
    struct Counted(u8);

    thread_local! {
        static CLONES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    impl Clone for Counted {
        fn clone(&self) -> Self {
            CLONES.with(|c| c.set(c.get() + 1));
            Counted(self.0)
        }
    }

    #[test]
    fn a_known_key_is_not_cloned_and_is_rescheduled_only_when_its_end_moves() {
        use super::super::aggregate::CountItems;
        use super::super::state::State;
        use crate::runtime::chunk::Ticket;
        let mut s = super::Sessions::<Counted, u64>::new(10);
        let mut agg = CountItems;
        let mut add = |s: &mut super::Sessions<Counted, u64>, t: u64| {
            let mut ticket = Ticket::none();
            assert!(
                State::<Counted, u64, CountItems>::add(
                    s,
                    &mut agg,
                    Counted(1),
                    t,
                    0,
                    t,
                    &mut ticket,
                    usize::MAX
                )
                .is_ok()
            );
        };
        CLONES.with(|c| c.set(0));
        // five items at one time: one session, one end, scheduled once
        for _ in 0..5 {
            add(&mut s, 3);
        }
        assert_eq!(CLONES.with(|c| c.get()), 1, "cloned for the map only");
        assert_eq!(s.schedule.values().map(Vec::len).sum::<usize>(), 1);
        // a later item moves the end: scheduled once more, still no clone
        add(&mut s, 7);
        assert_eq!(CLONES.with(|c| c.get()), 1);
        assert_eq!(s.schedule.keys().copied().collect::<Vec<_>>(), vec![13, 17]);
        // an earlier one inside the session does not move the end
        add(&mut s, 4);
        assert_eq!(s.schedule.values().map(Vec::len).sum::<usize>(), 2);
        assert_eq!(CLONES.with(|c| c.get()), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn sessions_split_on_the_gap_exactly() {
        // 0 and 9: one session (9 < 0 + 10); 19 is exactly 10 after 9: a new one
        let (got, _) = sessions(&[(1, 0), (1, 9), (1, 19)], 0).await;
        assert_eq!(got, vec![(1, 0, 19, vec![0, 9]), (1, 19, 29, vec![19])]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_item_out_of_order_bridges_and_merges_two_sessions() {
        // 0 and 15 are apart; 8 arrives late (within the lateness) and joins them
        let (got, report) = sessions(&[(1, 0), (1, 15), (1, 8), (2, 3)], 30).await;
        assert_eq!(got, vec![(2, 3, 13, vec![3]), (1, 0, 25, vec![0, 15, 8])]);
        let w = report.stage("window").unwrap();
        assert_eq!((w.received, w.passed, w.emitted, w.late), (4, 4, 2, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn an_item_past_its_span_is_late() {
        // after 100, the watermark (no lateness) is 100: 85 + 10 <= 100 is late, 91 is not
        let (got, report) = sessions(&[(1, 100), (1, 85), (1, 91)], 0).await;
        assert_eq!(got, vec![(1, 91, 110, vec![100, 91])]);
        let w = report.stage("window").unwrap();
        assert_eq!((w.late, w.failed, w.passed), (1, 1, 2));
        assert!(report.is_balanced());
    }
}
