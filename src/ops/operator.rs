//! The public route for a synchronous operator written outside this crate: [`Operator`],
//! plugged in with [`Flow::via`](crate::Flow::via), fused like `map` and `filter` (it runs over
//! a whole chunk inside the task before it).
//!
//! The engine, not the operator, keeps the accounting: the operator only ever sees one input
//! and an [`Out`] bound to it, so each output inherits that input's completion ticket, and the
//! result of the call decides how the input is counted. An operator cannot emit an output
//! that belongs to no input, or finish an input twice.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, OnceLock};

use crate::failure::{BoxError, ItemError};
use crate::ops::fuse;
use crate::plan::Pipeline;
use crate::runtime::chunk::{Chunk, Emit, Outcome, Processed};
use crate::runtime::fused::ChunkOp;
use crate::runtime::gate::SourceStop;

/// What an [`Operator`] wants after an item: more input, or none.
///
/// ```
/// use flowline::Step;
/// let step = Step::Continue;
/// assert_ne!(step, Step::Done);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Go on with the next item.
    Continue,
    /// This operator wants no more input. The sources that feed only this stage stop being
    /// pulled (see [`Flow::via`](crate::Flow::via) for which ones); the items still on their
    /// way are counted as dropped by this stage without reaching the operator.
    Done,
}

/// Where an [`Operator`] puts the outputs of the item it is handling. Every output pushed
/// here belongs to that item: it carries the item's completion ticket (a cursor checkpoint
/// or an idempotency commit waits for all of them), and if the item fails, its outputs are
/// discarded.
///
/// ```
/// use flowline::prelude::*;
///
/// /// Splits a line into words.
/// struct Words;
///
/// impl Operator<String> for Words {
///     type Output = String;
///     fn push(&mut self, line: String, out: &mut Out<'_, String>) -> Result<Step, BoxError> {
///         out.extend(line.split_whitespace().map(String::from));
///         Ok(Step::Continue)
///     }
/// }
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let out = Pipeline::from_iter(["a b".to_string(), "c".into()]).via(Words).collect().await.unwrap();
/// assert_eq!(out, vec!["a", "b", "c"]);
/// # }
/// ```
pub struct Out<'a, U> {
    emit: &'a mut Emit<U>,
}

impl<U> Out<'_, U> {
    /// Emits one output for the current item.
    ///
    /// ```
    /// use flowline::prelude::*;
    ///
    /// struct Twice;
    ///
    /// impl Operator<u32> for Twice {
    ///     type Output = u32;
    ///     fn push(&mut self, x: u32, out: &mut Out<'_, u32>) -> Result<Step, BoxError> {
    ///         out.push(x);
    ///         out.push(x);
    ///         Ok(Step::Continue)
    ///     }
    /// }
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// assert_eq!(Pipeline::from_iter([1u32, 2]).via(Twice).collect().await.unwrap(), vec![1, 1, 2, 2]);
    /// # }
    /// ```
    #[inline]
    pub fn push(&mut self, item: U) {
        self.emit.push(item);
    }

    /// Emits every output of `items` for the current item.
    ///
    /// ```
    /// use flowline::prelude::*;
    ///
    /// struct UpTo;
    ///
    /// impl Operator<u32> for UpTo {
    ///     type Output = u32;
    ///     fn push(&mut self, n: u32, out: &mut Out<'_, u32>) -> Result<Step, BoxError> {
    ///         out.extend(0..n);
    ///         Ok(Step::Continue)
    ///     }
    /// }
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// assert_eq!(Pipeline::from_iter([2u32, 0, 1]).via(UpTo).collect().await.unwrap(), vec![0, 1, 0]);
    /// # }
    /// ```
    pub fn extend(&mut self, items: impl IntoIterator<Item = U>) {
        for item in items {
            self.emit.push(item);
        }
    }
}

/// A synchronous operator written in any crate, plugged into a pipeline with
/// [`Flow::via`](crate::Flow::via). It is fused like `map` and `filter`: it runs in the task
/// before it, over a whole chunk of items per call, with one dynamic call per chunk.
///
/// The engine counts each input by what [`push`](Operator::push) did with it:
///
/// - **passed**: it emitted at least one output (each output carries the input's ticket);
/// - **dropped**: it emitted nothing (its ticket finishes as done, as with `filter`);
/// - **failed**: it returned `Err` or panicked. Its outputs are discarded, its ticket
///   finishes as failed, and the failure (stage = the operator's [`name`](Operator::name),
///   the error or panic message) goes to the dead letters. The next item goes on.
///
/// So `received = passed + dropped + failed` holds for the stage whatever the operator does.
/// After [`Step::Done`], the items that still arrive are counted as dropped without reaching
/// `push`, and their tickets finish as *not processed* (like a cancelled item): a cursor
/// checkpoint stays before them and an idempotency key is released, so a later run sees
/// them again.
///
/// Every output belongs to the input being pushed: an operator that aggregates (a running
/// total, a top-k) emits its current value per item, as [`Flow::scan`](crate::Flow::scan)
/// does; to group items, use [`Flow::batch`](crate::Flow::batch) first.
///
/// ```
/// use flowline::prelude::*;
///
/// /// Emits each reading's change from the previous one; fails a negative reading.
/// struct Delta { last: Option<i64> }
///
/// impl Operator<i64> for Delta {
///     type Output = i64;
///     fn push(&mut self, x: i64, out: &mut Out<'_, i64>) -> Result<Step, BoxError> {
///         if x < 0 {
///             return Err(format!("negative reading {x}").into());
///         }
///         if let Some(last) = self.last.replace(x) {
///             out.push(x - last);
///         }
///         Ok(Step::Continue)
///     }
///     fn name(&self) -> &'static str { "delta" }
/// }
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let (out, report) = Pipeline::from_iter([10, 12, -1, 11])
///     .via(Delta { last: None })
///     .collect_with_report().await.unwrap();
/// assert_eq!(out, vec![2, -1]);
/// let s = report.stage("delta").unwrap();
/// assert_eq!((s.received, s.passed, s.dropped, s.failed), (4, 2, 1, 1));
/// # }
/// ```
pub trait Operator<T>: Send + 'static {
    /// The type of the items it emits.
    type Output: Send + 'static;

    /// Handles one item: push its outputs (none, one or many) into `out`, and say whether
    /// more input is wanted. An `Err` (or a panic) fails this item only.
    fn push(&mut self, item: T, out: &mut Out<'_, Self::Output>) -> Result<Step, BoxError>;

    /// Called once per chunk, before its `len` items are pushed: for work worth doing once
    /// per chunk rather than per item (reading the clock, evicting expired state). A panic
    /// here fails every item of the chunk. Does nothing by default.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use std::time::Instant;
    ///
    /// /// Stamps each item with the time its chunk was handled (one clock read per chunk).
    /// struct Stamp { now: Option<Instant> }
    ///
    /// impl<T: Send + 'static> Operator<T> for Stamp {
    ///     type Output = (T, Instant);
    ///     fn begin_chunk(&mut self, _len: usize) {
    ///         self.now = Some(Instant::now());
    ///     }
    ///     fn push(&mut self, x: T, out: &mut Out<'_, (T, Instant)>) -> Result<Step, BoxError> {
    ///         out.push((x, self.now.ok_or("no chunk begun")?));
    ///         Ok(Step::Continue)
    ///     }
    /// }
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let out = Pipeline::from_iter(0..3).via(Stamp { now: None }).collect().await.unwrap();
    /// assert_eq!(out.len(), 3);
    /// # }
    /// ```
    fn begin_chunk(&mut self, len: usize) {
        let _ = len;
    }

    /// The stage's name in the report and in failures (made unique with `#2`, `#3`, ... if
    /// used twice). `"operator"` by default.
    ///
    /// ```
    /// use flowline::prelude::*;
    ///
    /// struct Keep;
    ///
    /// impl Operator<u8> for Keep {
    ///     type Output = u8;
    ///     fn push(&mut self, x: u8, out: &mut Out<'_, u8>) -> Result<Step, BoxError> {
    ///         out.push(x);
    ///         Ok(Step::Continue)
    ///     }
    ///     fn name(&self) -> &'static str { "keep" }
    /// }
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let report = Pipeline::from_iter([1u8]).via(Keep).run().await.unwrap();
    /// assert_eq!(report.stage("keep").unwrap().passed, 1);
    /// # }
    /// ```
    fn name(&self) -> &'static str {
        "operator"
    }
}

/// The sources this stage may stop, known once its upstream is built.
type Feeds = Arc<OnceLock<Vec<SourceStop>>>;

/// An [`Operator`] run as a fused chunk operator.
struct Via<Op> {
    op: Op,
    /// The operator returned [`Step::Done`]: nothing reaches it any more.
    done: bool,
    feeds: Feeds,
}

impl<Op> Via<Op> {
    fn stop_feeding(&mut self) {
        self.done = true;
        for source in self.feeds.get().into_iter().flatten() {
            source.stop();
        }
    }
}

impl<T, Op> ChunkOp<T, Op::Output> for Via<Op>
where
    T: Send + 'static,
    Op: Operator<T>,
{
    fn apply(&mut self, chunk: Chunk<T>) -> Processed<Op::Output> {
        let n = chunk.len();
        if self.done {
            drop(chunk.into_items(Outcome::Cancelled));
            return Processed {
                chunk: Chunk::default(),
                passed: 0,
                dropped: n,
                panics: Vec::new(),
            };
        }
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| self.op.begin_chunk(n))) {
            let error = ItemError::from_panic(&*payload);
            drop(chunk.into_items(Outcome::Failed));
            return Processed {
                chunk: Chunk::default(),
                passed: 0,
                dropped: 0,
                panics: vec![error; n],
            };
        }
        let mut emit = Emit::for_chunk(n, !chunk.tickets.is_empty());
        let (mut passed, mut dropped) = (0, 0);
        let mut failed = Vec::new();
        for (item, ticket) in chunk.into_pairs() {
            if self.done {
                ticket.finish(Outcome::Cancelled);
                dropped += 1;
                continue;
            }
            let mark = emit.begin(ticket);
            // Per item, so that a panic costs only its own item; on the happy path the
            // guard costs nothing.
            let result = catch_unwind(AssertUnwindSafe(|| {
                self.op.push(item, &mut Out { emit: &mut emit })
            }));
            let step = match result {
                Ok(Ok(step)) => step,
                Ok(Err(e)) => {
                    emit.undo(mark);
                    emit.end(Outcome::Failed);
                    failed.push(ItemError::user(e));
                    continue;
                }
                Err(payload) => {
                    emit.undo(mark);
                    emit.end(Outcome::Failed);
                    failed.push(ItemError::from_panic(&*payload));
                    continue;
                }
            };
            if emit.len() > mark {
                passed += 1;
            } else {
                dropped += 1;
            }
            emit.end(Outcome::Done);
            if step == Step::Done {
                self.stop_feeding();
            }
        }
        Processed {
            chunk: emit.into_chunk(),
            passed,
            dropped,
            panics: failed,
        }
    }
}

/// Appends `op` to `p` as a fused stage named `op.name()`.
pub(crate) fn via<T, Op>(p: Pipeline<T>, op: Op) -> Pipeline<Op::Output>
where
    T: Send + 'static,
    Op: Operator<T>,
{
    let name = op.name();
    let feeds = Feeds::default();
    let slot = feeds.clone();
    let Pipeline { build, settings } = p;
    // The sources built while the upstream is built are the ones this stage may stop
    // (except those behind a split whose other outputs lead elsewhere).
    let p = Pipeline {
        build: Box::new(move |b| {
            let mark = b.run.gate.mark();
            let up = build(b);
            let _ = slot.set(b.run.gate.exclusive_since(mark));
            up
        }),
        settings,
    };
    fuse(
        p,
        name,
        Via {
            op,
            done: false,
            feeds,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prelude::*;
    use crate::runtime::chunk::Ticket;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Test operator: `x % 10` says what it does with `x`: 0 emits nothing, 1 emits twice,
    /// 7 returns an error after pushing, 8 panics after pushing, 9 emits and says Done, the
    /// rest emit once.
    struct Rules;

    impl Operator<u32> for Rules {
        type Output = u32;
        fn push(&mut self, x: u32, out: &mut Out<'_, u32>) -> Result<Step, BoxError> {
            match x % 10 {
                0 => {}
                1 => out.extend([x, x]),
                7 => {
                    out.push(x);
                    return Err(format!("seven: {x}").into());
                }
                8 => {
                    out.push(x);
                    panic!("eight: {x}");
                }
                9 => {
                    out.push(x);
                    return Ok(Step::Done);
                }
                _ => out.push(x),
            }
            Ok(Step::Continue)
        }
        fn name(&self) -> &'static str {
            "rules"
        }
    }

    fn via_op<Op: Operator<u32>>(op: Op) -> Via<Op> {
        Via {
            op,
            done: false,
            feeds: Feeds::default(),
        }
    }

    type Seen = Arc<Mutex<Vec<(u32, Outcome)>>>;

    fn tracked(items: impl IntoIterator<Item = u32>, seen: &Seen) -> Chunk<u32> {
        let mut chunk = Chunk::default();
        for i in items {
            let s = seen.clone();
            chunk.push(i, Ticket::new(move |o| s.lock().unwrap().push((i, o))));
        }
        chunk
    }

    fn sorted(seen: &Seen) -> Vec<(u32, Outcome)> {
        let mut got = seen.lock().unwrap().clone();
        got.sort_by_key(|(i, _)| *i);
        got
    }

    #[test]
    fn tickets_follow_each_item_into_its_outputs() {
        let seen = Seen::default();
        let mut op = via_op(Rules);
        let p = op.apply(tracked([10, 11, 12, 17, 18, 13], &seen));
        assert_eq!(p.chunk.items, vec![11, 11, 12, 13]);
        assert_eq!(p.chunk.tickets.len(), 4, "one ticket per output");
        assert_eq!((p.passed, p.dropped, p.panics.len()), (3, 1, 2));
        assert_eq!(p.panics[0].to_string(), "seven: 17");
        assert_eq!(p.panics[1].to_string(), "panicked: eight: 18");
        // the dropped and the failed items are finished now; the passed ones wait for
        // every one of their outputs
        assert_eq!(
            sorted(&seen),
            vec![
                (10, Outcome::Done),
                (17, Outcome::Failed),
                (18, Outcome::Failed)
            ]
        );
        let mut outputs = p.chunk.into_pairs();
        let (_, first_of_11) = outputs.next().unwrap();
        first_of_11.finish(Outcome::Done);
        assert_eq!(
            seen.lock().unwrap().len(),
            3,
            "11 has a second output alive"
        );
        for (_, t) in outputs {
            t.finish(Outcome::Done);
        }
        assert_eq!(
            sorted(&seen),
            vec![
                (10, Outcome::Done),
                (11, Outcome::Done),
                (12, Outcome::Done),
                (13, Outcome::Done),
                (17, Outcome::Failed),
                (18, Outcome::Failed)
            ]
        );
    }

    #[test]
    fn after_done_items_are_dropped_as_not_processed() {
        let seen = Seen::default();
        let mut op = via_op(Rules);
        let p = op.apply(tracked([2, 19, 3, 4], &seen));
        assert_eq!(p.chunk.items, vec![2, 19]);
        assert_eq!((p.passed, p.dropped, p.panics.len()), (2, 2, 0));
        let later = op.apply(tracked([5, 6], &seen));
        assert!(later.chunk.is_empty());
        assert_eq!((later.passed, later.dropped), (0, 2));
        drop(p.chunk.into_items(Outcome::Done));
        assert_eq!(
            sorted(&seen),
            vec![
                (2, Outcome::Done),
                (3, Outcome::Cancelled),
                (4, Outcome::Cancelled),
                (5, Outcome::Cancelled),
                (6, Outcome::Cancelled),
                (19, Outcome::Done)
            ]
        );
    }

    #[test]
    fn a_panic_in_begin_chunk_fails_the_chunk() {
        struct Bad;
        impl Operator<u32> for Bad {
            type Output = u32;
            fn begin_chunk(&mut self, _len: usize) {
                panic!("no clock");
            }
            fn push(&mut self, x: u32, out: &mut Out<'_, u32>) -> Result<Step, BoxError> {
                out.push(x);
                Ok(Step::Continue)
            }
        }
        let seen = Seen::default();
        let p = via_op(Bad).apply(tracked([1, 2], &seen));
        assert_eq!((p.passed, p.dropped, p.panics.len()), (0, 0, 2));
        assert_eq!(
            sorted(&seen),
            vec![(1, Outcome::Failed), (2, Outcome::Failed)]
        );
    }

    #[tokio::test]
    async fn counts_balance_and_failures_name_the_stage() {
        let (out, report) = Pipeline::from_iter((0..100u32).filter(|x| x % 10 != 9))
            .via(Rules)
            .collect_with_report()
            .await
            .unwrap();
        // per ten: 0 dropped; 1 twice; 7 and 8 failed; 2..=6 once; 9 absent
        assert_eq!(out.len(), 10 * (2 + 5));
        let s = report.stage("rules").unwrap();
        assert_eq!(
            (s.received, s.passed, s.dropped, s.failed, s.emitted),
            (90, 60, 10, 20, 70)
        );
        assert!(report.is_balanced());
        assert_eq!(report.failures, 20);
        assert!(report.failure_sample.iter().all(|f| &*f.stage == "rules"));
    }

    /// Pages of 10 over ids 0..n; the cursor is the next id to read.
    fn pages(
        n: u32,
    ) -> impl FnMut(
        Option<u32>,
    )
        -> std::future::Ready<Result<crate::Page<u32, u32>, std::convert::Infallible>>
    + Clone
    + Send
    + 'static {
        move |c| {
            let from = c.unwrap_or(0);
            let to = (from + 10).min(n);
            std::future::ready(Ok(if to < n {
                crate::Page::next((from..to).collect(), to)
            } else {
                crate::Page::end_at((from..to).collect(), to)
            }))
        }
    }

    #[tokio::test]
    async fn a_cursor_checkpoint_never_passes_an_item_dropped_after_done() {
        let store = crate::MemoryCheckpoints::new();
        // `Rules` says Done at 9: the items after it that were already pulled (the cursor
        // reads pages ahead) are dropped unprocessed, so the checkpoint must stay at 10 (17
        // and 18 failed: finished, as a failure always is), and a resumed run reads them again
        let (out, report) = Pipeline::from_cursor(store.clone(), "ids", pages(100))
            .via(Rules)
            .collect_with_report()
            .await
            .unwrap();
        assert_eq!(out, vec![1, 1, 2, 3, 4, 5, 6, 9]);
        let s = report.stage("rules").unwrap();
        assert!(s.received > 10, "pages after the first were pulled: {s:?}");
        assert_eq!((s.passed, s.failed, s.dropped), (7, 2, s.received - 9));
        assert!(report.is_balanced());
        assert_eq!(store.get("ids").as_deref(), Some("10"));
        let again = Pipeline::from_cursor(store.clone(), "ids", pages(100))
            .collect()
            .await
            .unwrap();
        assert_eq!(again, (10..100).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn idempotency_keys_follow_the_outcome_of_each_item() {
        let store = crate::MemoryStore::new();
        let out = Pipeline::from_iter(0..40u32)
            .idempotent(store.clone(), |x| *x)
            .via(Rules)
            .collect()
            .await
            .unwrap();
        assert_eq!(out, vec![1, 1, 2, 3, 4, 5, 6, 9]);
        // committed: the passed items and 0 (dropped by the operator itself). Released:
        // 7 and 8 (failed) and 10.. (never reached the operator after Done)
        let again = Pipeline::from_iter(0..40u32)
            .idempotent(store, |x| *x)
            .collect()
            .await
            .unwrap();
        let mut expected = vec![7, 8];
        expected.extend(10..40);
        assert_eq!(again, expected);
    }

    fn counted_source(pulls: &Arc<AtomicU64>) -> Pipeline<u64> {
        let pulls = pulls.clone();
        Pipeline::from_fn(move || {
            let n = pulls.fetch_add(1, Ordering::Relaxed);
            async move { Some(n) }
        })
    }

    /// Emits everything until it has seen `n` items.
    struct Until(u64);

    impl Operator<u64> for Until {
        type Output = u64;
        fn push(&mut self, x: u64, out: &mut Out<'_, u64>) -> Result<Step, BoxError> {
            out.push(x);
            Ok(if x + 1 >= self.0 {
                Step::Done
            } else {
                Step::Continue
            })
        }
    }

    #[tokio::test]
    async fn done_stops_an_endless_source_through_async_stages() {
        let pulls = Arc::new(AtomicU64::new(0));
        let (out, report) = counted_source(&pulls)
            .map_async("work", |x| async move { x })
            .workers(4)
            .buffer(64)
            .via(Until(1000))
            .collect_with_report()
            .await
            .unwrap();
        assert_eq!(out, (0..1000).collect::<Vec<_>>());
        assert_eq!(report.outcome, RunOutcome::Completed);
        assert!(report.is_balanced(), "{report}");
        let s = report.stage("operator").unwrap();
        assert_eq!(s.dropped, s.received - 1000);
        assert!(pulls.load(Ordering::Relaxed) < 10_000);
    }

    #[tokio::test]
    async fn done_after_a_merge_stops_every_merged_source() {
        let (a, b) = (Arc::default(), Arc::default());
        // `Ending` is two stages after the merge: its upstream still holds both sources
        let report = counted_source(&a)
            .merge_with(counted_source(&b).map(|x| x + 1_000_000))
            .buffer(256)
            .map(|x| x)
            .via(Ending)
            .run()
            .await
            .unwrap();
        assert!(report.is_balanced());
        assert!(a.load(Ordering::Relaxed) < 10_000 && b.load(Ordering::Relaxed) < 10_000);
    }

    /// Says Done on its first item.
    struct Ending;

    impl Operator<u64> for Ending {
        type Output = u64;
        fn push(&mut self, x: u64, out: &mut Out<'_, u64>) -> Result<Step, BoxError> {
            out.push(x);
            Ok(Step::Done)
        }
    }

    #[tokio::test]
    async fn done_on_one_pipeline_of_a_graph_leaves_the_others_running() {
        let pulls = Arc::new(AtomicU64::new(0));
        let (ended, full) = (Collected::new(), Collected::new());
        let report = Graph::new()
            .collect(counted_source(&pulls).via(Ending), &ended)
            .collect(Pipeline::from_iter(0..5_000u32), &full)
            .run()
            .await
            .unwrap();
        assert_eq!(ended.take(), vec![0]);
        assert_eq!(full.take().len(), 5_000);
        assert!(report.is_balanced());
    }

    #[tokio::test]
    async fn done_on_one_branch_of_a_split_keeps_the_shared_source() {
        let (small, large) = Pipeline::from_iter(0..5_000u64).branch("split", |x| x % 2 == 0);
        let (first, second) = (Collected::new(), Collected::new());
        // built first: this branch builds the shared source, and still must not stop it
        let report = Graph::new()
            .collect(small.via(Ending), &first)
            .collect(large, &second)
            .run()
            .await
            .unwrap();
        assert_eq!(first.take(), vec![0]);
        assert_eq!(second.take().len(), 2_500);
        assert_eq!(report.stage("operator").unwrap().dropped, 2_499);
        assert!(report.is_balanced());
    }

    #[tokio::test]
    async fn done_after_a_partition_stops_its_source() {
        let pulls = Arc::new(AtomicU64::new(0));
        let report = counted_source(&pulls)
            .partition(3, |x| *x, |lane| lane.map(|x| x))
            .via(Until(100))
            .run()
            .await
            .unwrap();
        assert!(report.is_balanced());
        assert!(pulls.load(Ordering::Relaxed) < 100_000);
    }
}
