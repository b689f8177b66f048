//! The last task-backed stage of a chain, as its consumer sees it: the stage's task and the
//! hop it fills. Spawned once the whole plan is built, unless the run's sink pulls it in
//! first and drives it in its own task.
//!
//! Why: a stage task hands every chunk to the sink through a channel, and on a machine with
//! several workers the two tasks sit on different threads, so each hand-over wakes another
//! core (tens of nanoseconds per item for a trivial stage). A sink that never waits between
//! pulls (`run()`, `collect()`) loses nothing by driving the stage itself: the calls in
//! flight are polled at every pull, exactly as often as the stage's own task would poll
//! them, and the chunks move through the same hop without crossing a thread. A sink that
//! awaits something else (`for_each`'s callback, a stream's reader, a batch writer) keeps
//! the stage as a task of its own, so that its calls progress while the sink waits.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_util::FutureExt as _;

use crate::runtime::chunk::Chunk;
use crate::runtime::hop::HopRx;
use crate::runtime::{ChunkSource, RunCtx};

/// A stage's task, not spawned yet.
pub(crate) type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Where a stage's task waits until the plan is built: the build spawns what is still here.
pub(crate) type Slot = Arc<Mutex<Option<Task>>>;

/// The receiving end of a stage whose task may be pulled into its consumer.
pub(crate) struct Tail<T> {
    rx: HopRx<T>,
    slot: Slot,
    /// The stage's task, once pulled in: polled before each pull of the hop.
    task: Option<Task>,
    run: Arc<RunCtx>,
}

impl<T> Tail<T> {
    pub(crate) fn new(rx: HopRx<T>, slot: Slot, run: Arc<RunCtx>) -> Self {
        Tail {
            rx,
            slot,
            task: None,
            run,
        }
    }

    /// Polls the pulled-in task, if any. A panic in it is the run's internal error (as a
    /// panic of a spawned task is) and cancels the run.
    fn poll_task(&mut self, cx: &mut Context<'_>) {
        let Some(task) = self.task.as_mut() else {
            return;
        };
        match AssertUnwindSafe(task.as_mut())
            .catch_unwind()
            .poll_unpin(cx)
        {
            Poll::Pending => {}
            Poll::Ready(Ok(())) => self.task = None,
            Poll::Ready(Err(panic)) => {
                self.task = None;
                self.run.internal(crate::failure::panic_message(&*panic));
                self.run.cancel.cancel();
            }
        }
    }
}

impl<T: Send + 'static> ChunkSource<T> for Tail<T> {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Chunk<T>>> {
        // The stage first: it fills the hop this pull reads, and its calls move on.
        self.poll_task(cx);
        self.rx.poll_chunk(cx)
    }

    fn discard(&mut self) -> usize {
        // The run is cancelled: a pulled-in stage ends at its next poll, counting what it
        // held and what was queued before it, as its own task would.
        if self.task.is_some() {
            let waker = futures_util::task::noop_waker();
            self.poll_task(&mut Context::from_waker(&waker));
        }
        self.rx.discard()
    }

    fn pull_in(&mut self) -> bool {
        if self.task.is_none() {
            self.task = self.slot.lock().unwrap_or_else(|p| p.into_inner()).take();
        }
        self.task.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dead_letter::DeadLetters;
    use crate::runtime::hop::hop;

    fn run_ctx() -> Arc<RunCtx> {
        Arc::new(RunCtx::new(
            &crate::RunOptions::new(),
            DeadLetters::open(&crate::DeadLetter::report()).unwrap(),
        ))
    }

    fn feeder() -> Arc<crate::report::StageStats> {
        Arc::new(crate::report::StageStats::new(
            Arc::from("upstream"),
            "test",
        ))
    }

    #[tokio::test]
    async fn a_pulled_in_task_that_panics_is_the_runs_internal_error_and_cancels_it() {
        let run = run_ctx();
        let (tx, rx) = hop::<u32>(1, &feeder());
        let task: Task = Box::pin(async move {
            let _keep = tx;
            panic!("driver bug");
        });
        let mut tail = Tail::new(rx, Arc::new(Mutex::new(Some(task))), run.clone());
        assert!(tail.pull_in());
        let end = std::future::poll_fn(|cx| tail.poll_chunk(cx)).await;
        assert!(end.is_none(), "the hop closes with the task");
        assert!(run.cancel.is_cancelled());
        let message = run.panicked.lock().unwrap().clone();
        assert_eq!(message.as_deref(), Some("driver bug"));
    }

    #[tokio::test]
    async fn a_task_left_in_its_slot_is_not_polled_by_the_consumer() {
        let run = run_ctx();
        let (tx, rx) = hop::<u32>(1, &feeder());
        let polled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let p = polled.clone();
        let task: Task = Box::pin(async move {
            p.store(true, std::sync::atomic::Ordering::Relaxed);
            drop(tx);
        });
        let slot: Slot = Arc::new(Mutex::new(Some(task)));
        let mut tail = Tail::new(rx, slot.clone(), run);
        let waker = futures_util::task::noop_waker();
        assert!(
            tail.poll_chunk(&mut Context::from_waker(&waker))
                .is_pending()
        );
        assert!(!polled.load(std::sync::atomic::Ordering::Relaxed));
        // The build spawns what is still in the slot.
        assert!(slot.lock().unwrap().is_some());
    }

    #[tokio::test]
    async fn discarding_a_pulled_in_task_lets_it_end_and_counts_the_queue() {
        let run = run_ctx();
        let (tx, rx) = hop::<u32>(4, &feeder());
        let cancel = run.cancel.clone();
        let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let e = ended.clone();
        let task: Task = Box::pin(async move {
            tx.send(Chunk::untracked(vec![1, 2, 3])).await.unwrap();
            cancel.cancelled().await;
            e.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        let mut tail = Tail::new(rx, Arc::new(Mutex::new(Some(task))), run.clone());
        assert!(tail.pull_in());
        run.cancel.cancel();
        // The task runs to its end, and what it queued that the sink never took is counted.
        assert_eq!(tail.discard(), 3);
        assert!(ended.load(std::sync::atomic::Ordering::Relaxed));
    }
}
