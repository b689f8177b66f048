//! [`Gather`]: the parts of one object, identified by a key, arrive from several pipelines;
//! the object is emitted once every expected part is there, or — after a timeout — emitted
//! marked incomplete or sent to the dead letters ([`Incomplete`]).
//!
//! The part pipelines run inside the same run as the gathered one (each is built into the
//! run and drained by a small task of its own), so a gather needs no topology support: it is
//! a source of `Gathered` objects made from other pipelines. At most `max_open` objects are
//! open at once: when that many are waiting for parts, a part of a new object waits — and so
//! do the part pipelines behind it (back-pressure), until an object completes or expires.
//! Expiry is exact on tokio's clock (a timer on the oldest open object, not a coarse sweep).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::error::Error;
use crate::failure::{Failure, ItemError};
use crate::plan::{IntoPipeline, Pipeline, Settings};
use crate::report::StageStats;
use crate::runtime::chunk::{Chunk, Outcome, Ticket};
use crate::runtime::hop::{HOP_CHUNKS, hop};
use crate::runtime::{CancelWatch, RunCtx, Upstream};
use crate::util::time::after;

/// What happens to an object whose parts did not all arrive within the timeout (or before
/// the part pipelines ended).
///
/// ```
/// use flowline::Incomplete;
/// assert_eq!(Incomplete::default(), Incomplete::Emit);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Incomplete {
    /// Emit it with `complete: false` (the default).
    #[default]
    Emit,
    /// Fail its parts: they go to the dead letters, with the missing part names.
    DeadLetter,
}

/// One gathered object: its key, the parts that arrived (by part name) and whether all did.
///
/// ```
/// # use flowline::Gathered;
/// # fn show(g: Gathered<u32, String>) {
/// if g.complete { println!("{} has {:?}", g.key, g.parts) } else { println!("missing {:?}", g.missing) }
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gathered<K, P> {
    /// The object's key.
    pub key: K,
    /// The parts that arrived, by part name.
    pub parts: HashMap<Arc<str>, P>,
    /// The names of the expected parts that did not arrive (empty when complete).
    pub missing: Vec<Arc<str>>,
    /// Whether every expected part arrived.
    pub complete: bool,
}

type Part<K, P> = (usize, Chunk<(K, P)>);
type NamedPart<K, P> = (Arc<str>, Pipeline<(K, P)>);

/// A gather being set up: add parts with [`part`](Gather::part), then use it as a pipeline
/// (it implements [`Flow`](crate::Flow)).
///
/// ```
/// use flowline::prelude::*;
/// use flowline::Gather;
/// use std::time::Duration;
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let profiles = Pipeline::from_iter([(1u32, "ann"), (2, "bob")]).map(|(id, n)| (id, n.to_string()));
/// let orders = Pipeline::from_iter([(2u32, "3 orders"), (1, "no orders")]).map(|(id, o)| (id, o.to_string()));
/// let out = Gather::new(Duration::from_secs(5), 1_000)
///     .part("profile", profiles)
///     .part("orders", orders)
///     .collect().await.unwrap();
/// assert_eq!(out.len(), 2);
/// assert!(out.iter().all(|g| g.complete && g.parts.len() == 2));
/// # }
/// ```
#[must_use = "a gather does nothing until it is run as a pipeline by a terminal"]
pub struct Gather<K, P> {
    parts: Vec<NamedPart<K, P>>,
    timeout: Duration,
    max_open: usize,
    incomplete: Incomplete,
}

impl<K, P> fmt::Debug for Gather<K, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gather")
            .field(
                "parts",
                &self.parts.iter().map(|p| &p.0).collect::<Vec<_>>(),
            )
            .field("timeout", &self.timeout)
            .field("max_open", &self.max_open)
            .finish_non_exhaustive()
    }
}

impl<K, P> Gather<K, P>
where
    K: Hash + Eq + Clone + fmt::Debug + Send + 'static,
    P: Send + 'static,
{
    /// A gather whose objects expire `timeout` after their first part, with at most
    /// `max_open` objects open at once. Both must be more than zero.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use flowline::{Gather, Incomplete};
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let out = Gather::new(Duration::from_secs(1), 100)
    ///     .part("a", Pipeline::from_iter([(1u8, 'x')]))
    ///     .part("b", Pipeline::from_iter([(2u8, 'y')]))
    ///     .incomplete(Incomplete::Emit)
    ///     .collect().await.unwrap();
    /// assert!(out.iter().all(|g| !g.complete));   // keys 1 and 2 each lack a part
    /// # }
    /// ```
    pub fn new(timeout: Duration, max_open: usize) -> Self {
        Gather {
            parts: Vec::new(),
            timeout,
            max_open,
            incomplete: Incomplete::Emit,
        }
    }

    /// Adds an expected part: `name`, and the pipeline that produces `(key, part)` pairs.
    /// Only the parts' configuration errors carry over; run settings (deadline, error
    /// policy, dead letters) are those set on the gathered pipeline.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use flowline::{Gather, Incomplete};
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let out = Gather::new(Duration::from_secs(1), 100)
    ///     .part("a", Pipeline::from_iter([(1u8, 'x')]))
    ///     .part("b", Pipeline::from_iter([(2u8, 'y')]))
    ///     .incomplete(Incomplete::Emit)
    ///     .collect().await.unwrap();
    /// assert!(out.iter().all(|g| !g.complete));   // keys 1 and 2 each lack a part
    /// # }
    /// ```
    pub fn part(mut self, name: &str, pipeline: impl IntoPipeline<Item = (K, P)>) -> Self {
        self.parts.push((Arc::from(name), pipeline.into_pipeline()));
        self
    }

    /// What to do with an object that is still incomplete when it expires.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use flowline::{Gather, Incomplete};
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let out = Gather::new(Duration::from_secs(1), 100)
    ///     .part("a", Pipeline::from_iter([(1u8, 'x')]))
    ///     .part("b", Pipeline::from_iter([(2u8, 'y')]))
    ///     .incomplete(Incomplete::Emit)
    ///     .collect().await.unwrap();
    /// assert!(out.iter().all(|g| !g.complete));   // keys 1 and 2 each lack a part
    /// # }
    /// ```
    pub fn incomplete(mut self, policy: Incomplete) -> Self {
        self.incomplete = policy;
        self
    }

    fn check(&self) -> Vec<Error> {
        let mut errors = Vec::new();
        if self.timeout.is_zero() {
            errors.push(Error::config(
                "gather",
                "timeout",
                self.timeout,
                "must be more than zero",
            ));
        }
        if self.max_open == 0 {
            errors.push(Error::config(
                "gather",
                "max_open",
                self.max_open,
                "must be at least 1",
            ));
        }
        if self.parts.is_empty() {
            errors.push(Error::config(
                "gather",
                "parts",
                0,
                "needs at least one part",
            ));
        }
        let mut names: Vec<&str> = self.parts.iter().map(|p| &*p.0).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            errors.push(Error::config(
                "gather",
                "part",
                w[0],
                "part names must be distinct",
            ));
        }
        errors
    }
}

impl<K, P> crate::IntoPipeline for Gather<K, P>
where
    K: Hash + Eq + Clone + fmt::Debug + Send + 'static,
    P: Send + 'static,
{
    type Item = Gathered<K, P>;

    fn into_pipeline(self) -> Pipeline<Gathered<K, P>> {
        let mut settings = Settings {
            errors: self.check(),
            ..Settings::default()
        };
        let names: Arc<[Arc<str>]> = self.parts.iter().map(|p| p.0.clone()).collect();
        let mut builds = Vec::new();
        for (_, p) in self.parts {
            settings.errors.extend(p.settings.errors);
            builds.push(p.build);
        }
        let cfg = Config {
            names,
            timeout: self.timeout,
            max_open: self.max_open.max(1),
            incomplete: self.incomplete,
        };
        Pipeline {
            build: Box::new(move |b| {
                let (parts_tx, parts_rx) = mpsc::channel::<Part<K, P>>(HOP_CHUNKS);
                let mut ups = Vec::new();
                for build in builds {
                    ups.push(build(b));
                }
                let stats = b.stage("gather", "gather");
                for (i, up) in ups.into_iter().enumerate() {
                    let tx = parts_tx.clone();
                    let run = b.run.clone();
                    let stats = stats.clone();
                    b.spawn(drain_part(i, up, tx, stats, run));
                }
                drop(parts_tx);
                let (tx, rx) = hop(HOP_CHUNKS, &stats);
                let run = b.run.clone();
                b.spawn(gatherer(parts_rx, tx, stats, run, cfg));
                Box::new(rx) as Upstream<Gathered<K, P>>
            }),
            settings,
        }
    }
}

struct Config {
    names: Arc<[Arc<str>]>,
    timeout: Duration,
    max_open: usize,
    incomplete: Incomplete,
}

/// Moves one part pipeline's chunks, tagged with the part's index, into the gather.
async fn drain_part<K: Send + 'static, P: Send + 'static>(
    index: usize,
    mut up: Upstream<(K, P)>,
    tx: mpsc::Sender<Part<K, P>>,
    stats: Arc<StageStats>,
    run: Arc<RunCtx>,
) {
    let mut watch = CancelWatch::new(&run.cancel);
    loop {
        let Some(next) = watch.next_chunk(&mut up).await else {
            break;
        };
        let Some(chunk) = next else { return };
        let n = chunk.len();
        if !watch.send(&tx, (index, chunk)).await {
            stats.discarded(n);
            break;
        }
    }
    // What is queued in this part's pipeline counts as received (unfinished) by the gather.
    stats.discarded(up.discard());
}

struct Open<P> {
    parts: Vec<Option<(P, Ticket)>>,
    have: usize,
    seq: u64,
}

struct State<K, P> {
    open: HashMap<K, Open<P>>,
    /// Open objects by expiry (one timeout for all, so arrival order is expiry order).
    expiry: VecDeque<(Instant, K, u64)>,
    seq: u64,
}

async fn gatherer<K, P>(
    mut parts: mpsc::Receiver<Part<K, P>>,
    tx: mpsc::Sender<Chunk<Gathered<K, P>>>,
    stats: Arc<StageStats>,
    run: Arc<RunCtx>,
    cfg: Config,
) where
    K: Hash + Eq + Clone + fmt::Debug + Send + 'static,
    P: Send + 'static,
{
    let cancel = run.cancel.clone();
    let mut watch = CancelWatch::new(&cancel);
    let mut st = State {
        open: HashMap::new(),
        expiry: VecDeque::new(),
        seq: 0,
    };
    // Parts received but not yet taken in because `max_open` objects are open.
    let mut backlog: VecDeque<(usize, (K, P), Ticket)> = VecDeque::new();
    let mut ended = false;
    loop {
        let mut out = Chunk::default();
        let mut parts_out = 0usize;
        // Take in what the bound allows.
        while let Some((i, (key, part), ticket)) = backlog.pop_front() {
            if !st.open.contains_key(&key) && st.open.len() >= cfg.max_open {
                backlog.push_front((i, (key, part), ticket));
                break;
            }
            parts_out += take(&mut st, &cfg, &stats, i, key, part, ticket, &mut out);
        }
        if ended && backlog.is_empty() {
            // No part can come any more: everything still open is incomplete.
            while let Some((_, key, _)) = st.expiry.pop_front() {
                parts_out += expire(&mut st, &cfg, &stats, &run, key, &mut out);
            }
        }
        if !out.is_empty() {
            if !watch.send_counted(&tx, out, parts_out, &stats).await {
                stats.left(parts_out);
                break;
            }
            continue;
        }
        if ended && backlog.is_empty() && st.open.is_empty() {
            return;
        }
        let next_expiry = st.expiry.front().map(|e| e.0);
        let may_read = backlog.is_empty() && !ended;
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep_until(next_expiry.unwrap_or_else(Instant::now)), if next_expiry.is_some() => {
                let now = Instant::now();
                let mut out = Chunk::default();
                let mut n_parts = 0;
                while st.expiry.front().is_some_and(|e| e.0 <= now) {
                    let (_, key, seq) = st.expiry.pop_front().expect("front exists");
                    if st.open.get(&key).is_some_and(|o| o.seq == seq) {
                        n_parts += expire(&mut st, &cfg, &stats, &run, key, &mut out);
                    }
                }
                if out.is_empty() {
                    StageStats::add(&stats.passed, n_parts);
                } else if !watch.send_counted(&tx, out, n_parts, &stats).await {
                    stats.left(n_parts);
                    break;
                }
            }
            next = parts.recv(), if may_read => match next {
                None => ended = true,
                Some((i, chunk)) => {
                    StageStats::add(&stats.received, chunk.len());
                    for (pair, ticket) in chunk.into_pairs() {
                        backlog.push_back((i, pair, ticket));
                    }
                }
            },
        }
    }
    // Cancelled: what was taken in and what waits in the channel stays unfinished.
    let open: usize = st.open.values().map(|o| o.have).sum();
    stats.left(open + backlog.len());
    parts.close();
    while let Ok((_, c)) = parts.try_recv() {
        stats.discarded(c.len());
    }
}

/// Adds one part; emits the object if it is complete. Returns the parts emitted.
#[allow(clippy::too_many_arguments)]
fn take<K: Hash + Eq + Clone, P>(
    st: &mut State<K, P>,
    cfg: &Config,
    stats: &StageStats,
    index: usize,
    key: K,
    part: P,
    ticket: Ticket,
    out: &mut Chunk<Gathered<K, P>>,
) -> usize {
    let n = cfg.names.len();
    let open = st.open.entry(key.clone()).or_insert_with(|| {
        st.seq += 1;
        st.expiry
            .push_back((after(Instant::now(), cfg.timeout), key.clone(), st.seq));
        Open {
            parts: (0..n).map(|_| None).collect(),
            have: 0,
            seq: st.seq,
        }
    });
    if open.parts[index].is_some() {
        // The same part twice for one open object: the first one stands.
        StageStats::add(&stats.dropped, 1);
        ticket.finish(Outcome::Done);
        return 0;
    }
    open.parts[index] = Some((part, ticket));
    open.have += 1;
    if open.have < n {
        return 0;
    }
    let open = st.open.remove(&key).expect("just updated");
    emit(cfg, key, open, out)
}

fn emit<K, P>(cfg: &Config, key: K, open: Open<P>, out: &mut Chunk<Gathered<K, P>>) -> usize {
    let mut parts = HashMap::new();
    let mut missing = Vec::new();
    let mut tickets = Vec::new();
    for (slot, name) in open.parts.into_iter().zip(cfg.names.iter()) {
        match slot {
            Some((p, t)) => {
                parts.insert(name.clone(), p);
                if t.is_some() {
                    tickets.push(t);
                }
            }
            None => missing.push(name.clone()),
        }
    }
    let n = parts.len();
    let complete = missing.is_empty();
    out.push(
        Gathered {
            key,
            parts,
            missing,
            complete,
        },
        Ticket::with_parents(tickets, None),
    );
    n
}

/// Ends an open object that ran out of time. Returns the parts emitted (0 if dead-lettered).
fn expire<K: Hash + Eq + fmt::Debug, P>(
    st: &mut State<K, P>,
    cfg: &Config,
    stats: &StageStats,
    run: &RunCtx,
    key: K,
    out: &mut Chunk<Gathered<K, P>>,
) -> usize {
    let Some(open) = st.open.remove(&key) else {
        return 0;
    };
    match cfg.incomplete {
        Incomplete::Emit => emit(cfg, key, open, out),
        Incomplete::DeadLetter => {
            let missing: Vec<&str> = open
                .parts
                .iter()
                .zip(cfg.names.iter())
                .filter(|(s, _)| s.is_none())
                .map(|(_, n)| &**n)
                .collect();
            let error = ItemError::user(format!(
                "object {key:?} incomplete after {:?}: missing parts {missing:?}",
                cfg.timeout
            ));
            for (_, ticket) in open.parts.into_iter().flatten() {
                ticket.finish(Outcome::Failed);
                StageStats::add(&stats.failed, 1);
                run.fail(Failure::new(stats.name.clone(), error.clone(), 1));
            }
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Flow;

    /// `(key, part)` pairs, pair `i` arriving at `times[i]` ms.
    fn arrivals(pairs: Vec<(u32, &'static str, u64)>) -> Pipeline<(u32, String)> {
        let start = Instant::now();
        let stream = futures_util::stream::iter(pairs).then(move |(k, p, t)| async move {
            tokio::time::sleep_until(start + Duration::from_millis(t)).await;
            (k, p.to_string())
        });
        Pipeline::from_stream(stream)
    }
    use futures_util::StreamExt as _;

    #[tokio::test(start_paused = true)]
    async fn complete_objects_are_emitted_when_the_last_part_arrives() {
        let start = Instant::now();
        let (out, report) = Gather::new(Duration::from_secs(1), 100)
            .part("a", arrivals(vec![(1, "a1", 10), (2, "a2", 20)]))
            .part("b", arrivals(vec![(2, "b2", 5), (1, "b1", 30)]))
            .map(move |g| (g, start.elapsed().as_millis()))
            .collect_with_report()
            .await
            .unwrap();
        let got: Vec<(u32, bool, u128)> =
            out.iter().map(|(g, t)| (g.key, g.complete, *t)).collect();
        assert_eq!(got, vec![(2, true, 20), (1, true, 30)]);
        assert_eq!(&out[0].0.parts["b"], "b2");
        let g = report.stage("gather").unwrap();
        assert_eq!((g.received, g.passed, g.emitted), (4, 4, 2));
        assert!(report.is_balanced());
    }

    #[tokio::test(start_paused = true)]
    async fn an_object_expires_incomplete_after_the_timeout() {
        let start = Instant::now();
        let out = Gather::new(Duration::from_millis(100), 100)
            .part(
                "a",
                arrivals(vec![(1, "a1", 10), (2, "a2", 20), (9, "a9", 500)]),
            )
            .part("b", arrivals(vec![(1, "b1", 50)]))
            .map(move |g| {
                (
                    g.key,
                    g.complete,
                    g.missing.clone(),
                    start.elapsed().as_millis(),
                )
            })
            .collect()
            .await
            .unwrap();
        assert_eq!(
            out,
            vec![
                (1, true, vec![], 50),
                (2, false, vec![Arc::from("b")], 120),
                // the input ends at 500: nothing more can come for key 9
                (9, false, vec![Arc::from("b")], 500),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn dead_letter_policy_fails_the_parts() {
        let report = Gather::new(Duration::from_millis(100), 100)
            .part("a", arrivals(vec![(1, "a1", 10)]))
            .part("b", arrivals(vec![]))
            .incomplete(Incomplete::DeadLetter)
            .run()
            .await
            .unwrap();
        assert_eq!(report.failures, 1);
        assert_eq!(report.stage("gather").unwrap().failed, 1);
        assert!(
            report.failure_sample[0]
                .error
                .to_string()
                .contains("missing parts [\"b\"]")
        );
        assert!(report.is_balanced());
    }

    #[tokio::test(start_paused = true)]
    async fn the_open_bound_back_pressures_the_parts() {
        // Part "a" sends keys 0..5 at once; part "b" sends key 4 at 150 ms. max_open = 2.
        let start = Instant::now();
        let a: Vec<(u32, &str, u64)> = (0..5).map(|k| (k, "a", 0)).collect();
        let out = Gather::new(Duration::from_millis(100), 2)
            .part("a", arrivals(a))
            .part("b", arrivals(vec![(4, "b4", 150)]))
            .map(move |g| (g.key, g.complete, start.elapsed().as_millis()))
            .collect()
            .await
            .unwrap();
        // keys 0,1 open at 0 and expire at 100; 2,3 open at 100 and expire at 200; key 4
        // cannot open before 200 (the bound), and "b4", sent at 150, waits behind it: at 200
        // key 4 opens and completes at once.
        assert_eq!(
            out,
            vec![
                (0, false, 100),
                (1, false, 100),
                (2, false, 200),
                (3, false, 200),
                (4, true, 200),
            ]
        );
    }

    #[tokio::test]
    async fn bad_config_is_rejected() {
        let err = Gather::<u32, u32>::new(Duration::ZERO, 1)
            .part("a", Pipeline::from_iter([(1u32, 1u32)]))
            .run()
            .await
            .unwrap_err();
        assert!(err.to_string().contains("timeout = 0ns"), "{err}");
        let err = Gather::<u32, u32>::new(Duration::from_secs(1), 0)
            .part("a", Pipeline::from_iter([(1u32, 1u32)]))
            .run()
            .await
            .unwrap_err();
        assert!(err.to_string().contains("max_open = 0"), "{err}");
    }
}
