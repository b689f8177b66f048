//! The machinery every split shares (`branch`, `branch_result`, `route`, `partition`,
//! `broadcast`): one upstream, built once, with several outputs that are separate
//! [`Pipeline`]s.
//!
//! A split returns several pipelines whose build closures share one [`Fork`]. The first output
//! built (in whichever order the graph builds its ends) builds the upstream and the router task
//! and leaves the other outputs' channel ends in the fork for their own pipelines to take. Once
//! the whole graph is built, a check fails the run if an output was never taken: a branch
//! without a sink is a configuration error, not a silent drop.

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};

use tokio::sync::mpsc;

use crate::error::Error;
use crate::failure::{Failure, ItemError};
use crate::plan::{Pipeline, Settings};
use crate::report::StageStats;
use crate::runtime::chunk::{CHUNK_CAP, Chunk, Ticket};
use crate::runtime::{Build, CancelWatch, ChunkSource, RunCtx, Upstream};

/// Builds the upstream and the router of a split; returns one end per output. Every output
/// of a split has the split's item type (`branch_result` splits `Result`s and unwraps each
/// side after the split), so the ends need no type erasure.
type BuildEnds<T> = Box<dyn FnOnce(&mut Build) -> Vec<Upstream<T>> + Send>;

enum State<T> {
    /// Not built yet: builds the upstream and the router, returns one end per output.
    Plan(BuildEnds<T>),
    /// Being built by the first output (the lock is not held while the upstream builds).
    Building,
    /// Built in the run `run`; the outputs not taken yet.
    Built {
        run: Weak<RunCtx>,
        ends: Vec<Option<Upstream<T>>>,
    },
}

/// A value shown as is in a configuration error (no quotes).
pub(crate) struct Plain(pub(crate) String);

impl fmt::Debug for Plain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The shared part of the outputs of one split.
pub(crate) struct Fork<T> {
    /// The split's stage name (for errors).
    name: String,
    /// What each output is called in errors: `0 (matching)`, `1 (err)`, `2`.
    labels: Vec<String>,
    state: Mutex<State<T>>,
}

impl<T: Send + 'static> Fork<T> {
    /// A split named `name` with one output per label; `build` builds the upstream and the
    /// router and returns the outputs' ends, in label order.
    pub(crate) fn new(
        name: &str,
        labels: Vec<String>,
        build: impl FnOnce(&mut Build) -> Vec<Upstream<T>> + Send + 'static,
    ) -> Arc<Fork<T>> {
        Arc::new(Fork {
            name: name.to_string(),
            labels,
            state: Mutex::new(State::Plan(Box::new(build))),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes output `i` in the run being built by `b`, building the split if it is the first.
    fn take(self: &Arc<Self>, b: &mut Build, i: usize) -> Upstream<T> {
        let plan = {
            let mut state = self.lock();
            match std::mem::replace(&mut *state, State::Building) {
                State::Plan(plan) => Some(plan),
                other => {
                    *state = other;
                    None
                }
            }
        };
        // The split's sources feed every output: a stage that wants no more input may stop
        // them only if all the outputs lead to it (see `Gate::exclusive_since`).
        let id = Arc::as_ptr(self) as usize;
        if let Some(plan) = plan {
            let mark = b.run.gate.mark();
            let ends = plan(b).into_iter().map(Some).collect();
            b.run.gate.shared_since(mark, id, self.labels.len());
            *self.lock() = State::Built {
                run: Arc::downgrade(&b.run),
                ends,
            };
            let fork = self.clone();
            b.check(move || fork.all_taken());
        }
        b.run.gate.took(id);
        let mut state = self.lock();
        let end = match &mut *state {
            State::Built { run, ends } if Weak::ptr_eq(run, &Arc::downgrade(&b.run)) => {
                ends.get_mut(i).and_then(Option::take)
            }
            _ => None,
        };
        drop(state);
        match end {
            Some(up) => up,
            None => {
                b.reject(Error::config(
                    &self.name,
                    "branch",
                    Plain(self.labels[i].clone()),
                    "was already run in another run: every branch of a split must end in the same run (see Graph)",
                ));
                Box::new(Ended)
            }
        }
    }

    /// After the graph is built: every output must have been taken. Outputs left over are
    /// dropped here, so the router sees them closed and the run can end.
    fn all_taken(&self) -> Result<(), Error> {
        let mut state = self.lock();
        let State::Built { ends, .. } = &mut *state else {
            return Ok(());
        };
        let left: Vec<usize> = ends
            .iter_mut()
            .enumerate()
            .filter_map(|(i, e)| e.take().map(|_| i))
            .collect();
        match left.first() {
            None => Ok(()),
            Some(&i) => Err(Error::config(
                &self.name,
                "branch",
                Plain(self.labels[i].clone()),
                "was built but never given a sink: end every branch of a split in the same run (see Graph)",
            )),
        }
    }
}

/// Output `i` of `fork` as a pipeline with `settings`.
pub(crate) fn output<T: Send + 'static>(
    fork: &Arc<Fork<T>>,
    i: usize,
    settings: Settings,
) -> Pipeline<T> {
    let fork = fork.clone();
    Pipeline {
        build: Box::new(move |b| fork.take(b, i)),
        settings,
    }
}

/// The settings each output of a split starts with: the upstream's run-wide settings. Only
/// the first output carries the upstream's configuration errors (a run reports them once).
pub(crate) fn split_settings(mut upstream: Settings, n: usize, total: bool) -> Vec<Settings> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        out.push(Settings {
            errors: if i == 0 {
                std::mem::take(&mut upstream.errors)
            } else {
                Vec::new()
            },
            total: if total { upstream.total } else { None },
        });
    }
    out
}

/// An upstream that has ended (stands in for an output that could not be taken).
pub(crate) struct Ended;

impl<T: Send + 'static> ChunkSource<T> for Ended {
    fn poll_chunk(&mut self, _cx: &mut Context<'_>) -> Poll<Option<Chunk<T>>> {
        Poll::Ready(None)
    }
    fn discard(&mut self) -> usize {
        0
    }
}

/// Routes one chunk: `pick` says which lane each item goes to. An index out of range, or a
/// panic in `pick`, fails that item (dead letter) and routing goes on with the next one.
/// `catch_unwind` wraps the loop, not each item.
pub(crate) fn split_chunk<T>(
    chunk: Chunk<T>,
    lanes: &mut [Chunk<T>],
    pick: &mut impl FnMut(&T) -> usize,
    stats: &StageStats,
    run: &RunCtx,
) {
    let n = lanes.len();
    // A lane's part starts with room for a whole chunk, as an operator's output does: the
    // router adds chunks to the parts until one is about full, so a part grown item by item
    // from empty would be reallocated several times per hand-over.
    let room = chunk.len();
    if !chunk.is_tracked() && lanes.iter().all(|l| !l.is_tracked()) {
        return split_untracked(chunk.items, lanes, pick, room, stats, run);
    }
    let mut pairs = chunk.into_pairs();
    let mut failed = 0usize;
    loop {
        let result = catch_unwind(AssertUnwindSafe(|| {
            for (item, ticket) in &mut pairs {
                let i = pick(&item);
                if i < n {
                    if lanes[i].is_empty() {
                        lanes[i].reserve(room);
                    }
                    lanes[i].push(item, ticket);
                } else {
                    return Some((i, ticket));
                }
            }
            None
        }));
        let (error, ticket): (ItemError, Option<Ticket>) = match result {
            Ok(None) => break,
            Ok(Some((i, ticket))) => (out_of_range(i, n), Some(ticket)),
            // The ticket of the item whose `pick` panicked was dropped with it: it counts as
            // cancelled for its owner, and as failed here.
            Err(payload) => (ItemError::from_panic(&*payload), None),
        };
        if let Some(t) = ticket {
            t.finish(crate::runtime::chunk::Outcome::Failed);
        }
        failed += 1;
        run.fail(Failure::new(stats.name.clone(), error, 1));
    }
    StageStats::add(&stats.failed, failed);
}

/// The failure of an item whose lane `i` is not one of the `n`.
fn out_of_range(i: usize, n: usize) -> ItemError {
    ItemError::user(format!("route index {i} is out of range for {n} branches"))
}

/// [`split_chunk`] for items without tickets going to parts without tickets (every
/// pipeline that tracks nothing): items move straight into the parts' item lists, with no
/// per-item ticket to carry or drop.
fn split_untracked<T>(
    items: Vec<T>,
    lanes: &mut [Chunk<T>],
    pick: &mut impl FnMut(&T) -> usize,
    room: usize,
    stats: &StageStats,
    run: &RunCtx,
) {
    let n = lanes.len();
    let mut items = items.into_iter();
    let mut failed = 0usize;
    loop {
        let result = catch_unwind(AssertUnwindSafe(|| {
            for item in &mut items {
                let i = pick(&item);
                let Some(lane) = lanes.get_mut(i) else {
                    return Some(i);
                };
                if lane.items.is_empty() {
                    lane.items.reserve(room);
                }
                lane.items.push(item);
            }
            None
        }));
        let error = match result {
            Ok(None) => break,
            Ok(Some(i)) => out_of_range(i, n),
            Err(payload) => ItemError::from_panic(&*payload),
        };
        failed += 1;
        run.fail(Failure::new(stats.name.clone(), error, 1));
    }
    StageStats::add(&stats.failed, failed);
}

/// The router task of a split: pulls chunks from `up`, splits each with `split` into one
/// chunk per lane, and sends every non-empty part on (one channel operation per lane per
/// chunk). Counts items `received` when pulled, `passed` once sent (`split` counts the ones
/// it fails); `emitted` counts the copies sent (`copies`: a broadcast, every lane gets every
/// item). A lane whose
/// receiver is gone is skipped (its items stay unfinished); when every lane is gone, or the
/// run is cancelled, the router stops and counts what is queued upstream as unfinished.
pub(crate) async fn router<T: Send + 'static>(
    mut up: Upstream<T>,
    lanes: Vec<mpsc::Sender<Chunk<T>>>,
    stats: Arc<StageStats>,
    run: Arc<RunCtx>,
    copies: bool,
    mut split: impl FnMut(Chunk<T>, &mut Vec<Chunk<T>>, &StageStats, &RunCtx) + Send,
) {
    let mut watch = CancelWatch::new(&run.cancel);
    let mut open: Vec<Option<mpsc::Sender<Chunk<T>>>> = lanes.into_iter().map(Some).collect();
    let mut parts: Vec<Chunk<T>> = Vec::new();
    loop {
        let Some(next) = watch.next_chunk(&mut up).await else {
            break;
        };
        let Some(chunk) = next else { return };
        let mut n = chunk.len();
        StageStats::add(&stats.received, n);
        parts.clear();
        parts.resize_with(open.len(), Chunk::default);
        split(chunk, &mut parts, &stats, &run);
        // Take more of what is ready right now (never waiting for it), so that each lane
        // gets chunks of a useful size rather than 1/n of one: fewer channel operations per
        // item. Bounded by about one full chunk per lane.
        let mut ended = false;
        while n < open.len() * CHUNK_CAP && parts.iter().all(|p| p.len() < CHUNK_CAP) {
            match std::future::poll_fn(|cx| Poll::Ready(up.poll_chunk(cx))).await {
                Poll::Ready(Some(more)) => {
                    n += more.len();
                    StageStats::add(&stats.received, more.len());
                    split(more, &mut parts, &stats, &run);
                }
                Poll::Ready(None) => {
                    ended = true;
                    break;
                }
                Poll::Pending => break,
            }
        }
        let mut sent = 0usize;
        // Items a split did not send (the lane was gone, or the run was cancelled first).
        let mut unsent = 0usize;
        // The items that went on to the parts (a split may have failed or dropped some).
        let mut routed = 0usize;
        let mut cancelled = false;
        for (lane, part) in open.iter_mut().zip(parts.drain(..)) {
            let k = part.len();
            routed = if copies { k } else { routed + k };
            if part.is_empty() {
                continue;
            }
            match lane {
                Some(tx) if !cancelled => {
                    if watch.send(tx, part).await {
                        sent += k;
                    } else if run.cancel.is_cancelled() {
                        cancelled = true;
                        unsent += k;
                    } else {
                        *lane = None;
                        unsent += k;
                    }
                }
                _ => unsent += k,
            }
        }
        // A split passes what it sent (items for a closed lane stay unfinished); a broadcast
        // passes an item once any branch still listening got its copy.
        let passed = match (copies, sent) {
            (false, _) => sent,
            (true, 0) => 0,
            (true, _) => n,
        };
        let left = match (copies, sent) {
            (false, _) => unsent,
            (true, 0) => routed,
            (true, _) => 0,
        };
        StageStats::add(&stats.passed, passed);
        StageStats::add(&stats.emitted, sent);
        stats.left(left);
        if cancelled {
            break;
        }
        if ended {
            return;
        }
        if open.iter().all(Option::is_none) {
            break;
        }
        tokio::task::consume_budget().await;
    }
    stats.discarded(up.discard());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dead_letter::DeadLetters;

    #[test]
    fn a_lane_that_gets_an_item_has_room_for_the_whole_chunk_and_an_idle_lane_none() {
        let run = RunCtx::new(
            &crate::RunOptions::new(),
            DeadLetters::open(&crate::DeadLetter::report()).unwrap(),
        );
        let stats = StageStats::new(Arc::from("split"), "split");
        let mut lanes: Vec<Chunk<u32>> = (0..4).map(|_| Chunk::default()).collect();
        let chunk = Chunk::untracked((0..100).collect());
        split_chunk(chunk, &mut lanes, &mut |x| (*x % 3) as usize, &stats, &run);
        assert_eq!(
            lanes.iter().map(Chunk::len).collect::<Vec<_>>(),
            [34, 33, 33, 0]
        );
        assert!(lanes[..3].iter().all(|l| l.items.capacity() >= 100));
        assert_eq!(lanes[3].items.capacity(), 0);
    }

    /// Item 5 names a lane out of range and item 7 panics in `pick`: each fails alone and
    /// routing goes on, with and without tickets (two paths).
    #[test]
    fn an_item_whose_lane_is_out_of_range_or_whose_pick_panics_fails_alone() {
        use crate::runtime::chunk::Outcome;
        use std::sync::Mutex;
        let pick = |x: &u32| match *x {
            5 => 9,
            7 => panic!("no lane for 7"),
            x => (x % 2) as usize,
        };
        for tracked in [false, true] {
            let run = RunCtx::new(
                &crate::RunOptions::new(),
                DeadLetters::open(&crate::DeadLetter::report()).unwrap(),
            );
            let stats = StageStats::new(Arc::from("split"), "split");
            let ends = Arc::new(Mutex::new(Vec::new()));
            let mut chunk = Chunk::default();
            for x in 0..10u32 {
                let ends = ends.clone();
                let ticket = if tracked {
                    Ticket::new(move |o| ends.lock().unwrap().push((x, o)))
                } else {
                    Ticket::none()
                };
                chunk.push(x, ticket);
            }
            let mut lanes: Vec<Chunk<u32>> = (0..2).map(|_| Chunk::default()).collect();
            split_chunk(chunk, &mut lanes, &mut { pick }, &stats, &run);
            assert_eq!(lanes[0].items, [0, 2, 4, 6, 8], "tracked: {tracked}");
            assert_eq!(lanes[1].items, [1, 3, 9], "tracked: {tracked}");
            assert_eq!(lanes[0].is_tracked(), tracked);
            assert_eq!(stats.failed.load(std::sync::atomic::Ordering::Relaxed), 2);
            if tracked {
                drop(lanes);
                let mut ends = ends.lock().unwrap().clone();
                ends.sort_by_key(|e| e.0);
                // The item out of range failed; the one whose `pick` panicked was dropped
                // with its ticket (cancelled for its owner, failed in the report).
                assert_eq!(ends[5], (5, Outcome::Failed));
                assert_eq!(ends[7], (7, Outcome::Cancelled));
            }
        }
    }
}
