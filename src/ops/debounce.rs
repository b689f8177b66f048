//! `debounce(d)` and `debounce_by(key, d)`: emit the latest item (per key) once `d` has passed
//! without a newer one; `.max_wait(m)` emits at most `m` after the first item it replaced, so
//! a stream that is never quiet still emits. A replaced item is counted as dropped (its
//! ticket finishes as done: dropping it is the operator's job).
//!
//! A task of its own: it emits on timers while its input is quiet. When the input ends
//! (also after a graceful stop) the pending items are emitted at once, in the order they
//! were due: nothing can replace them any more.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::Pipeline;
use crate::report::StageStats;
use crate::runtime::chunk::{Chunk, Outcome, Ticket};
use crate::runtime::hop::{HOP_CHUNKS, hop};
use crate::runtime::{CancelWatch, RunCtx, Upstream, next_chunk};
use crate::util::time::after;

/// A debounce stage being configured; returned by [`Flow::debounce`](crate::Flow::debounce)
/// and [`Flow::debounce_by`](crate::Flow::debounce_by). Add [`max_wait`](Debounce::max_wait),
/// then go on with any operator.
///
/// ```
/// use flowline::prelude::*;
/// use std::time::Duration;
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let out = Pipeline::from_iter(["a", "ab", "abc"])        // keystrokes, all at once
///     .debounce(Duration::from_millis(300))
///         .max_wait(Duration::from_secs(2))
///     .collect().await.unwrap();
/// assert_eq!(out, vec!["abc"]);
/// # }
/// ```
#[must_use = "a stage builder does nothing until its pipeline is run by a terminal"]
pub struct Debounce<T, K, F> {
    p: Pipeline<T>,
    name: &'static str,
    key: F,
    quiet: Duration,
    max_wait: Option<Duration>,
    _key: std::marker::PhantomData<fn() -> K>,
}

impl<T, K, F> Debounce<T, K, F> {
    /// Emits an item at most `m` after the first item it replaced, even if the input is
    /// never quiet for the debounce period. Must be more than zero.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let report = Pipeline::from_iter(0..10)
    ///     .debounce(Duration::from_millis(100))
    ///         .max_wait(Duration::from_secs(1))
    ///     .run().await.unwrap();
    /// assert_eq!(report.stage("debounce").unwrap().dropped, 9);
    /// # }
    /// ```
    pub fn max_wait(mut self, m: Duration) -> Self {
        self.p.settings.require_positive(self.name, "max_wait", m);
        self.max_wait = Some(m);
        self
    }
}

pub(crate) fn debounce_by<T, K, F>(
    mut p: Pipeline<T>,
    name: &'static str,
    key: F,
    quiet: Duration,
) -> Debounce<T, K, F> {
    p.settings.require_positive(name, "period", quiet);
    Debounce {
        p,
        name,
        key,
        quiet,
        max_wait: None,
        _key: std::marker::PhantomData,
    }
}

impl<T, K, F> crate::IntoPipeline for Debounce<T, K, F>
where
    T: Send + 'static,
    K: Hash + Eq + Clone + Send + 'static,
    F: FnMut(&T) -> K + Send + 'static,
{
    type Item = T;

    fn into_pipeline(self) -> Pipeline<T> {
        let Debounce {
            p,
            name,
            key,
            quiet,
            max_wait,
            ..
        } = self;
        p.then(move |b, up| {
            let stats = b.stage(name, "debounce");
            let (tx, rx) = hop(HOP_CHUNKS, &stats);
            let run = b.run.clone();
            let timing = Timing { quiet, max_wait };
            b.spawn(debouncer(up, tx, stats, run, key, timing));
            Box::new(rx) as Upstream<T>
        })
    }
}

#[derive(Clone, Copy)]
struct Timing {
    quiet: Duration,
    max_wait: Option<Duration>,
}

struct Pending<T> {
    item: T,
    ticket: Ticket,
    /// When the first item of this run of replacements arrived (for `max_wait`).
    first: Instant,
    due: Instant,
    seq: u64,
}

/// The pending item per key, and the keys ordered by when they are due.
struct State<K, T> {
    pending: HashMap<K, Pending<T>>,
    due: BTreeMap<(Instant, u64), K>,
    seq: u64,
}

impl<K: Hash + Eq + Clone, T> State<K, T> {
    /// Takes `item`; returns true if it replaced a pending one.
    fn offer(&mut self, key: K, item: T, ticket: Ticket, now: Instant, t: Timing) -> bool {
        self.seq += 1;
        let seq = self.seq;
        match self.pending.get_mut(&key) {
            Some(p) => {
                let old = std::mem::replace(&mut p.ticket, ticket);
                old.finish(Outcome::Done);
                p.item = item;
                self.due.remove(&(p.due, p.seq));
                let mut due = after(now, t.quiet);
                if let Some(m) = t.max_wait {
                    due = due.min(after(p.first, m));
                }
                p.due = due;
                p.seq = seq;
                self.due.insert((due, seq), key);
                true
            }
            None => {
                let mut due = after(now, t.quiet);
                if let Some(m) = t.max_wait {
                    due = due.min(after(now, m));
                }
                self.due.insert((due, seq), key.clone());
                self.pending.insert(
                    key,
                    Pending {
                        item,
                        ticket,
                        first: now,
                        due,
                        seq,
                    },
                );
                false
            }
        }
    }

    /// Moves every item due at or before `now` (all of them if `None`) into `out`.
    fn take_due(&mut self, now: Option<Instant>, out: &mut Chunk<T>) {
        while let Some(entry) = self.due.first_entry() {
            if now.is_some_and(|now| entry.key().0 > now) {
                break;
            }
            let key = entry.remove();
            if let Some(p) = self.pending.remove(&key) {
                out.push(p.item, p.ticket);
            }
        }
    }
}

async fn debouncer<T, K, F>(
    mut up: Upstream<T>,
    tx: mpsc::Sender<Chunk<T>>,
    stats: Arc<StageStats>,
    run: Arc<RunCtx>,
    mut key: F,
    timing: Timing,
) where
    T: Send + 'static,
    K: Hash + Eq + Clone + Send + 'static,
    F: FnMut(&T) -> K + Send + 'static,
{
    let cancel = run.cancel.clone();
    let mut watch = CancelWatch::new(&cancel);
    let mut state = State {
        pending: HashMap::new(),
        due: BTreeMap::new(),
        seq: 0,
    };
    loop {
        let mut out = Chunk::default();
        let mut ended = false;
        let next_due = state.due.first_key_value().map(|(k, _)| k.0);
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep_until(next_due.unwrap_or_else(Instant::now)), if next_due.is_some() => {
                state.take_due(Some(Instant::now()), &mut out);
            }
            next = next_chunk(&mut up) => match next {
                None => {
                    state.take_due(None, &mut out);
                    ended = true;
                }
                Some(chunk) => {
                    StageStats::add(&stats.received, chunk.len());
                    let now = Instant::now();
                    let mut replaced = 0usize;
                    for (item, ticket) in chunk.into_pairs() {
                        let k = key(&item);
                        replaced += usize::from(state.offer(k, item, ticket, now, timing));
                    }
                    StageStats::add(&stats.dropped, replaced);
                }
            },
        }
        if !out.is_empty() {
            let n = out.len();
            if !watch.send_counted(&tx, out, n, &stats).await {
                stats.left(n);
                break;
            }
        }
        if ended {
            return;
        }
        tokio::task::consume_budget().await;
    }
    stats.left(state.pending.len());
    stats.discarded(up.discard());
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;
    use std::time::Duration;
    use tokio::time::Instant;

    /// Items whose value is their arrival time (ms from the start); the input ends at `end`.
    fn arrivals(times: &'static [u64], end: u64) -> Pipeline<u64> {
        let start = Instant::now();
        let stream = futures_util::stream::unfold(0usize, move |i| async move {
            if i < times.len() {
                tokio::time::sleep_until(start + Duration::from_millis(times[i])).await;
                Some((times[i], i + 1))
            } else {
                tokio::time::sleep_until(start + Duration::from_millis(end)).await;
                None
            }
        });
        Pipeline::from_stream(stream)
    }

    async fn timed<T: Send + 'static>(p: impl Flow<Item = T>) -> (Vec<(T, u64)>, Report) {
        let start = Instant::now();
        p.into_pipeline()
            .map(move |x| (x, start.elapsed().as_millis() as u64))
            .collect_with_report()
            .await
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn emits_the_latest_after_a_quiet_period() {
        // bursts at 0,10,20 and 100,105; quiet 30 ms
        let (out, report) =
            timed(arrivals(&[0, 10, 20, 100, 105], 500).debounce(Duration::from_millis(30))).await;
        assert_eq!(out, vec![(20, 50), (105, 135)]);
        let d = report.stage("debounce").unwrap();
        assert_eq!((d.received, d.passed, d.dropped), (5, 2, 3));
        assert!(report.is_balanced());
    }

    #[tokio::test(start_paused = true)]
    async fn max_wait_fires_under_a_constant_stream() {
        // one item every 10 ms for 200 ms: never 30 ms quiet
        static TIMES: [u64; 20] = [
            0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120, 130, 140, 150, 160, 170, 180, 190,
        ];
        let (out, _) = timed(
            arrivals(&TIMES, 300)
                .debounce(Duration::from_millis(30))
                .max_wait(Duration::from_millis(75)),
        )
        .await;
        // first pending at 0 -> due 75: latest is 70; next first at 80 -> 155: latest 150;
        // next first at 160 -> quiet after 190 -> 220
        assert_eq!(out, vec![(70, 75), (150, 155), (190, 220)]);
    }

    #[tokio::test(start_paused = true)]
    async fn per_key_debounce_keeps_the_latest_of_each_key() {
        // key = value % 2; 0,2 even; 1,3 odd, arriving at 0,5,10,40 ms
        static TIMES: [u64; 4] = [0, 5, 10, 40];
        let (out, report) = timed(
            arrivals(&TIMES, 200)
                .map(|t| (t / 5) % 2 == 0)
                .debounce_by(|even: &bool| *even, Duration::from_millis(20)),
        )
        .await;
        // t=0 even, t=5 odd, t=10 even (replaces), t=40 even
        // odd due 25; even due 30; even again at 40 -> 60
        assert_eq!(out, vec![(false, 25), (true, 30), (true, 60)]);
        assert_eq!(report.stage("debounce").unwrap().dropped, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn pending_items_flush_when_the_input_ends() {
        let (out, _) = timed(
            Pipeline::from_iter([(1, 'a'), (2, 'b'), (1, 'c')])
                .debounce_by(|x: &(i32, char)| x.0, Duration::from_secs(10)),
        )
        .await;
        assert_eq!(out, vec![((2, 'b'), 0), ((1, 'c'), 0)]);
    }

    #[tokio::test]
    async fn zero_period_is_rejected() {
        let err = Pipeline::from_iter(0..3)
            .debounce(Duration::ZERO)
            .run()
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: stage `debounce`: period = 0ns: must be more than zero"
        );
    }
}
