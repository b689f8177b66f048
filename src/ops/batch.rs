//! `batch(size, max_wait)`: groups items into `Vec`s of up to `size`, emitted when full or
//! when `max_wait` has passed since the batch's first item, whichever comes first.
//!
//! Pulled, like a fused operator, not a task of its own: the stage after it polls it, and
//! while its upstream is quiet it polls its own timer in the same call, so a batch still goes
//! out `max_wait` after its first item. That saves a hop (a channel and a cross-thread
//! wake-up per chunk) — the whole cost of a batch stage on a multi-threaded runtime. The
//! deadline is checked before more items are pulled, so a batch never takes in an item that
//! came after its deadline. Add `.buffer(n)` before it to let the stages in front work ahead
//! in a task of their own.
//!
//! A batch is never empty; what is collected when the input ends (also after a graceful
//! stop) is flushed. A batch carries one ticket whose parents are its parts' tickets, so
//! completion tracking (cursor checkpoints, idempotency commits) passes through a batch: a
//! part finishes when its batch does.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use crate::error::Error;
use crate::plan::Pipeline;
use crate::report::StageStats;
use crate::runtime::chunk::{Chunk, Outcome, Ticket};
use crate::runtime::{ChunkSource, Upstream};
use crate::util::time::after;

/// Decides whether an item joins the current batch (the dedup variant drops repeated keys).
pub(crate) trait Admit<T>: Send + 'static {
    /// Every item joins: the batcher then moves an untracked chunk's items in runs, without
    /// asking per item.
    const ALL: bool = false;
    fn admit(&mut self, item: &T) -> bool;
    /// The current batch was closed.
    fn clear(&mut self);
}

/// Every item joins.
pub(crate) struct AdmitAll;

impl<T> Admit<T> for AdmitAll {
    const ALL: bool = true;
    #[inline]
    fn admit(&mut self, _: &T) -> bool {
        true
    }
    fn clear(&mut self) {}
}

pub(crate) fn batch<T: Send + 'static>(
    p: Pipeline<T>,
    size: usize,
    max_wait: Duration,
) -> Pipeline<Vec<T>> {
    batch_with(p, "batch", size, max_wait, AdmitAll)
}

/// The batch stage, with an admission rule; `name` names it in errors and the report.
pub(crate) fn batch_with<T: Send + 'static, A: Admit<T>>(
    mut p: Pipeline<T>,
    name: &'static str,
    size: usize,
    max_wait: Duration,
    admit: A,
) -> Pipeline<Vec<T>> {
    if size == 0 {
        p.settings
            .errors
            .push(Error::config(name, "size", size, "must be at least 1"));
    }
    p.settings.require_positive(name, "max_wait", max_wait);
    p.then(move |b, up| {
        let stats = b.stage(name, "batch");
        let size = size.max(1);
        let cap = size.min(crate::runtime::chunk::CHUNK_CAP);
        Box::new(Batcher {
            up,
            open: Open {
                items: Vec::with_capacity(cap),
                tickets: Vec::new(),
                due: None,
            },
            admit,
            size,
            cap,
            max_wait,
            timer: None,
            armed: None,
            ended: false,
            stats,
        }) as Upstream<Vec<T>>
    })
}

/// The batch being filled.
struct Open<T> {
    items: Vec<T>,
    tickets: Vec<Ticket>,
    /// When it must be emitted even if not full (`max_wait` after its first item).
    due: Option<Instant>,
}

impl<T> Open<T> {
    /// Closes the batch into `out` (never an empty one); returns how many inputs it held.
    fn close(&mut self, out: &mut Chunk<Vec<T>>, cap: usize) -> usize {
        self.due = None;
        if self.items.is_empty() {
            return 0;
        }
        let items = std::mem::replace(&mut self.items, Vec::with_capacity(cap));
        let ticket = Ticket::with_parents(std::mem::take(&mut self.tickets), None);
        let n = items.len();
        out.push(items, ticket);
        n
    }
}

/// After this many input chunks without a batch to emit, yield to the scheduler (a batch
/// that drops every item — the dedup variant — must not hog its thread).
const CHUNKS_BEFORE_YIELD: usize = 16;

struct Batcher<T, A> {
    up: Upstream<T>,
    open: Open<T>,
    admit: A,
    size: usize,
    cap: usize,
    max_wait: Duration,
    /// One timer for the stage, re-armed at most once per batch and only when the stage
    /// waits for input (created on first use, inside the run's runtime).
    timer: Option<Pin<Box<Sleep>>>,
    armed: Option<Instant>,
    ended: bool,
    stats: Arc<StageStats>,
}

impl<T: Send + 'static, A: Admit<T>> Batcher<T, A> {
    /// Whether the open batch's deadline has passed; if not, arms the timer to wake the
    /// task at the deadline. Called only when the stage is about to wait for input: while
    /// input keeps coming, a clock read decides (see `poll_chunk`), and the timer, whose
    /// arming takes the timer driver's lock, stays untouched.
    fn poll_due(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(due) = self.open.due else {
            return false;
        };
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        if self.armed != Some(due) {
            timer.as_mut().reset(due);
            self.armed = Some(due);
        }
        timer.as_mut().poll(cx).is_ready()
    }

    /// Closes the open batch into `out`; returns how many inputs it held.
    fn close(&mut self, out: &mut Chunk<Vec<T>>) -> usize {
        let n = self.open.close(out, self.cap);
        self.admit.clear();
        n
    }

    fn take(&mut self, chunk: Chunk<T>, out: &mut Chunk<Vec<T>>) -> usize {
        StageStats::add(&self.stats.received, chunk.len());
        // The items of a chunk arrived together, when it was pulled: one clock read per
        // chunk serves every batch it opens.
        let mut now = None;
        let mut inputs = 0usize;
        if A::ALL && chunk.tickets.is_empty() {
            // Runs of items move into the open batch in one `extend` each: no per-item call,
            // branch or ticket.
            let mut items = chunk.items.into_iter();
            while items.len() > 0 {
                if self.open.items.is_empty() {
                    let at = *now.get_or_insert_with(Instant::now);
                    self.open.due = Some(after(at, self.max_wait));
                }
                let room = self.size - self.open.items.len();
                self.open.items.extend(items.by_ref().take(room));
                if self.open.items.len() >= self.size {
                    inputs += self.close(out);
                }
            }
            return inputs;
        }
        let Chunk { items, tickets } = chunk;
        let tracked = !tickets.is_empty();
        let mut tickets = tickets.into_iter();
        let mut dropped = 0usize;
        for item in items {
            let ticket = if tracked { tickets.next() } else { None };
            if !self.admit.admit(&item) {
                dropped += 1;
                if let Some(t) = ticket {
                    t.finish(Outcome::Done);
                }
                continue;
            }
            if self.open.items.is_empty() {
                let at = *now.get_or_insert_with(Instant::now);
                self.open.due = Some(after(at, self.max_wait));
            }
            self.open.items.push(item);
            if let Some(t) = ticket.filter(Ticket::is_some) {
                self.open.tickets.push(t);
            }
            if self.open.items.len() >= self.size {
                inputs += self.close(out);
            }
        }
        StageStats::add(&self.stats.dropped, dropped);
        inputs
    }
}

impl<T: Send + 'static, A: Admit<T>> ChunkSource<Vec<T>> for Batcher<T, A> {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Chunk<Vec<T>>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let mut out = Chunk::default();
        let mut inputs = 0usize;
        let mut yield_now = true;
        for _ in 0..CHUNKS_BEFORE_YIELD {
            // The deadline first: items pulled now arrived after it.
            if self.open.due.is_some_and(|due| due <= Instant::now()) {
                inputs += self.close(&mut out);
                yield_now = false;
                break;
            }
            match self.up.poll_chunk(cx) {
                Poll::Ready(Some(chunk)) => {
                    inputs += self.take(chunk, &mut out);
                    if !out.is_empty() {
                        yield_now = false;
                        break;
                    }
                }
                Poll::Ready(None) => {
                    inputs += self.open.close(&mut out, self.cap);
                    self.ended = true;
                    yield_now = false;
                    break;
                }
                Poll::Pending => {
                    // Waiting for input: the timer wakes us at the deadline, unless it has
                    // just passed.
                    if self.poll_due(cx) {
                        inputs += self.close(&mut out);
                    }
                    yield_now = false;
                    break;
                }
            }
        }
        if !out.is_empty() {
            StageStats::add(&self.stats.passed, inputs);
            StageStats::add(&self.stats.emitted, out.len());
            return Poll::Ready(Some(out));
        }
        if self.ended {
            return Poll::Ready(None);
        }
        if yield_now {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }

    fn discard(&mut self) -> usize {
        // The open batch's items were counted received; they stay unfinished.
        self.stats.left(self.open.items.len());
        self.open.items.clear();
        self.open.tickets.clear();
        self.stats.discarded(self.up.discard());
        0
    }
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;
    use std::time::Duration;
    use tokio::time::Instant;

    /// Items `0..n`, item `i` arriving at `(i + 1) * every` after the start.
    fn ticking(n: u64, every: Duration) -> Pipeline<u64> {
        Pipeline::from_iter(0..n)
            .map_async("tick", move |x| async move {
                tokio::time::sleep(every).await;
                x
            })
            .into_pipeline()
    }

    #[tokio::test(start_paused = true)]
    async fn full_batches_by_size_and_a_flush_at_the_end_in_order() {
        let (out, report) = Pipeline::from_iter(0..10u32)
            .batch(4, Duration::from_secs(60))
            .collect_with_report()
            .await
            .unwrap();
        assert_eq!(out, vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![8, 9]]);
        let b = report.stage("batch").unwrap();
        assert_eq!((b.received, b.passed, b.emitted), (10, 10, 3));
        assert!(report.is_balanced());
    }

    #[tokio::test(start_paused = true)]
    async fn batches_span_and_split_input_chunks_in_order() {
        // sizes below, between and above the chunk size: batches cut across chunks
        for size in [3usize, 100, 700, 1500] {
            let n = 5000u32;
            let (out, report) = Pipeline::from_iter(0..n)
                .batch(size, Duration::from_secs(60))
                .collect_with_report()
                .await
                .unwrap();
            let want: Vec<Vec<u32>> = (0..n)
                .collect::<Vec<_>>()
                .chunks(size)
                .map(<[u32]>::to_vec)
                .collect();
            assert_eq!(out, want, "size {size}");
            let b = report.stage("batch").unwrap();
            assert_eq!((b.received, b.passed), (n as u64, n as u64));
            assert_eq!(b.emitted, want.len() as u64);
            assert!(report.is_balanced());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_is_emitted_max_wait_after_its_first_item() {
        let start = Instant::now();
        // one item per 10 ms; batches of up to 100, at most 35 ms after their first item
        let mut times = Vec::new();
        let mut got = Vec::new();
        let out = ticking(10, Duration::from_millis(10))
            .batch(100, Duration::from_millis(35))
            .map(move |b| (b, start.elapsed()))
            .collect()
            .await
            .unwrap();
        for (b, t) in out {
            got.push(b);
            times.push(t.as_millis());
        }
        // first item at 10 ms -> emitted at 45 ms with items at 10, 20, 30, 40
        assert_eq!(got, vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![8, 9]]);
        // the last batch is flushed when the input ends (at 100 ms), not at 125 ms
        assert_eq!(times, vec![45, 85, 100]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_input_never_yields_an_empty_batch() {
        let out = Pipeline::from_iter(0..2u64)
            .map_async("slow", |x| async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                x
            })
            .batch(10, Duration::from_millis(10))
            .collect()
            .await
            .unwrap();
        assert_eq!(out, vec![vec![0], vec![1]]);
    }

    #[tokio::test(start_paused = true)]
    async fn graceful_stop_flushes_the_open_batch() {
        let handle = ticking(u64::MAX, Duration::from_millis(10))
            .batch(1000, Duration::from_secs(3600))
            .spawn();
        tokio::time::sleep(Duration::from_millis(55)).await;
        handle.stop();
        let report = handle.join().await.unwrap();
        assert_eq!(report.outcome, RunOutcome::Stopped);
        let b = report.stage("batch").unwrap();
        assert_eq!(b.emitted, 1);
        assert_eq!(b.passed, b.received);
        assert!(b.received >= 5);
        assert!(report.is_balanced());
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_run_counts_the_open_batch_as_unfinished() {
        let handle = ticking(u64::MAX, Duration::from_millis(10))
            .batch(1000, Duration::from_secs(3600))
            .spawn();
        tokio::time::sleep(Duration::from_millis(55)).await;
        handle.cancel();
        let err = handle.join().await.unwrap_err();
        let report = err.report().unwrap();
        let b = report.stage("batch").unwrap();
        assert_eq!((b.passed, b.emitted), (0, 0));
        assert_eq!(b.unfinished, b.received);
        assert!(b.received >= 5);
        assert!(report.is_balanced());
    }

    #[tokio::test]
    async fn zero_size_and_zero_wait_are_rejected() {
        let err = Pipeline::from_iter(0..3)
            .batch(0, Duration::from_millis(1))
            .run()
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: stage `batch`: size = 0: must be at least 1"
        );
        let err = Pipeline::from_iter(0..3)
            .batch(2, Duration::ZERO)
            .run()
            .await
            .unwrap_err();
        assert!(err.to_string().contains("max_wait = 0ns"), "{err}");
    }
}
