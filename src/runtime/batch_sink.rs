//! The public route for a sink written outside this crate: [`BatchSink`], run with
//! [`Flow::into_sink`](crate::Flow::into_sink), adapted into the crate's own sink so that it
//! gets the same [`Run`] builder (run options, `spawn`) as the built-in terminals.

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};

use futures_util::FutureExt as _;

use crate::failure::{BoxError, Failure, ItemError};
use crate::report::{Report, StageStats};
use crate::runtime::chunk::{Chunk, Outcome};
use crate::runtime::run::Run;
use crate::runtime::sink::Sink;
use crate::runtime::{Plan, RunCtx};

/// Where the items of a run end, written in any crate: a batched database writer, a file, a
/// message queue. Run a pipeline into it with [`Flow::into_sink`](crate::Flow::into_sink).
///
/// [`write`](BatchSink::write) receives the items that reach the end of the pipeline, a
/// batch at a time (whatever is ready, up to 512 items; put a
/// [`batch`](crate::Flow::batch) before it for batches of a fixed size or age). The engine
/// keeps the accounting by what `write` returned:
///
/// - `Ok(())`: every item of the batch is delivered (counted `passed`), and its completion
///   ticket finishes as done, so a cursor checkpoint may pass it and an idempotency key is
///   committed. So return `Ok` only once the batch is written: what a sink keeps in memory
///   across calls is not written yet.
/// - `Err(e)` (or a panic): every item of the batch fails, counted `failed`, with one
///   failure per item in the dead letters (stage = the sink's [`name`](BatchSink::name), the
///   error kept); their tickets finish as failed. The run goes on with the next batch
///   (unless [`ErrorPolicy::Stop`](crate::ErrorPolicy::Stop)).
///
/// One call at a time, in order. When every item has been written, [`finish`](BatchSink::finish)
/// returns the sink's output (totals, or the connection itself, to be closed by the caller).
///
/// ```
/// use flowline::prelude::*;
/// use flowline::BatchSink;
///
/// /// Writes rows in batches; returns how many rows it wrote.
/// struct Rows { written: u64 }
///
/// impl BatchSink<u32> for Rows {
///     type Output = u64;
///     async fn write(&mut self, batch: Vec<u32>) -> Result<(), BoxError> {
///         if batch.contains(&13) {
///             return Err("unlucky batch".into());    // the whole batch fails
///         }
///         self.written += batch.len() as u64;        // e.g. one INSERT of many rows
///         Ok(())
///     }
///     fn finish(self) -> u64 {
///         self.written
///     }
///     fn name(&self) -> &'static str { "rows" }
/// }
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let (written, report) = Pipeline::from_iter(0..100u32)
///     .into_sink(Rows { written: 0 })
///     .await
///     .unwrap();
/// let rows = report.stage("rows").unwrap();
/// assert_eq!(rows.passed, written);
/// assert_eq!(rows.passed + rows.failed, 100);
/// assert_eq!(report.failures, rows.failed);       // one dead letter per failed item
/// # }
/// ```
pub trait BatchSink<T>: Send + 'static {
    /// What the sink returns once the run has ended (awaiting the run gives it with the
    /// report). A sink whose output is `()` can also be [`spawn`](Run::spawn)ed.
    type Output: Send + 'static;

    /// Writes one batch. `Err` (or a panic) fails every item of the batch.
    fn write(&mut self, batch: Vec<T>) -> impl Future<Output = Result<(), BoxError>> + Send;

    /// Called once after the last batch; returns the sink's output.
    fn finish(self) -> Self::Output;

    /// The sink's stage name in the report and in failures. `"sink"` by default.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use flowline::BatchSink;
    ///
    /// struct Null;
    ///
    /// impl BatchSink<u8> for Null {
    ///     type Output = ();
    ///     async fn write(&mut self, _batch: Vec<u8>) -> Result<(), BoxError> { Ok(()) }
    ///     fn finish(self) {}
    ///     fn name(&self) -> &'static str { "null" }
    /// }
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let ((), report) = Pipeline::from_iter([1u8, 2]).into_sink(Null).await.unwrap();
    /// assert_eq!(report.stage("null").unwrap().passed, 2);
    /// # }
    /// ```
    fn name(&self) -> &'static str {
        "sink"
    }
}

/// A [`BatchSink`] adapted into the crate's sink (what [`Run`] drives).
pub struct IntoSink<S>(S);

impl<T, S> Sink<T> for IntoSink<S>
where
    T: Send + 'static,
    S: BatchSink<T>,
{
    type Output = S::Output;

    async fn consume(&mut self, chunk: Chunk<T>, stats: &StageStats, run: &RunCtx) {
        let n = chunk.len();
        let Chunk { items, tickets } = chunk;
        let written = match catch_unwind(AssertUnwindSafe(|| self.0.write(items))) {
            Ok(fut) => match AssertUnwindSafe(fut).catch_unwind().await {
                Ok(result) => result.map_err(ItemError::user),
                Err(panic) => Err(ItemError::from_panic(&*panic)),
            },
            Err(panic) => Err(ItemError::from_panic(&*panic)),
        };
        match written {
            Ok(()) => {
                for ticket in tickets {
                    ticket.finish(Outcome::Done);
                }
                StageStats::add(&stats.passed, n);
            }
            Err(error) => {
                for ticket in tickets {
                    ticket.finish(Outcome::Failed);
                }
                StageStats::add(&stats.failed, n);
                // One failure per item: the dead letters and the report count items.
                for _ in 0..n {
                    run.fail(Failure::new(stats.name.clone(), error.clone(), 1));
                }
            }
        }
    }

    fn finish(self) -> S::Output {
        self.0.finish()
    }
}

/// The run of `p` into `sink`: awaiting it gives the sink's output and the report.
pub(crate) fn into_sink<T, S>(p: Plan<T>, sink: S) -> Run<T, IntoSink<S>, (S::Output, Report)>
where
    T: Send + 'static,
    S: BatchSink<T>,
{
    let name = sink.name();
    Run::new(p, IntoSink(sink), name, |report, out| (out, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prelude::*;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// Records every batch; fails a batch holding an item `fail` accepts, panics on one
    /// holding an item `panic` accepts.
    struct Writer {
        batches: Arc<Mutex<Vec<Vec<u32>>>>,
        fail: fn(u32) -> bool,
        panic: fn(u32) -> bool,
    }

    impl Writer {
        fn new(fail: fn(u32) -> bool, panic: fn(u32) -> bool) -> Self {
            Writer {
                batches: Arc::default(),
                fail,
                panic,
            }
        }
    }

    impl BatchSink<u32> for Writer {
        type Output = usize;
        async fn write(&mut self, batch: Vec<u32>) -> Result<(), BoxError> {
            tokio::task::yield_now().await;
            if batch.iter().any(|x| (self.panic)(*x)) {
                panic!("writer crashed");
            }
            if batch.iter().any(|x| (self.fail)(*x)) {
                return Err(format!("constraint violated in {} rows", batch.len()).into());
            }
            self.batches.lock().unwrap().push(batch);
            Ok(())
        }
        fn finish(self) -> usize {
            self.batches.lock().unwrap().len()
        }
        fn name(&self) -> &'static str {
            "writer"
        }
    }

    #[tokio::test]
    async fn every_item_written_is_delivered() {
        let w = Writer::new(|_| false, |_| false);
        let batches = w.batches.clone();
        let (calls, report) = Pipeline::from_iter(0..1000u32).into_sink(w).await.unwrap();
        let written: Vec<u32> = batches.lock().unwrap().concat();
        assert_eq!(written, (0..1000).collect::<Vec<_>>());
        assert_eq!(calls, batches.lock().unwrap().len());
        let s = report.stage("writer").unwrap();
        assert_eq!((s.received, s.passed, s.failed), (1000, 1000, 0));
        assert!(report.is_balanced());
    }

    #[tokio::test]
    async fn an_error_fails_the_whole_batch_into_the_dead_letters() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(1000);
        let w = Writer::new(|x| x == 50, |_| false);
        let batches = w.batches.clone();
        let (_, report) = Pipeline::from_iter(0..100u32)
            .into_sink(w)
            .dead_letter(DeadLetter::channel(tx))
            .await
            .unwrap();
        let written = batches.lock().unwrap().concat().len() as u64;
        let s = report.stage("writer").unwrap();
        assert_eq!(s.passed, written);
        assert!(s.failed >= 1 && s.passed + s.failed == 100, "{s:?}");
        assert_eq!(report.failures, s.failed);
        let mut letters = 0;
        while let Ok(f) = rx.try_recv() {
            assert_eq!(&*f.stage, "writer");
            assert!(
                f.error.to_string().starts_with("constraint violated"),
                "{}",
                f.error
            );
            letters += 1;
        }
        assert_eq!(letters, s.failed);
        assert!(report.is_balanced());
    }

    #[tokio::test]
    async fn a_panic_fails_the_batch_not_the_run() {
        let w = Writer::new(|_| false, |x| x == 0);
        let (_, report) = Pipeline::from_iter(0..10u32).into_sink(w).await.unwrap();
        let s = report.stage("writer").unwrap();
        assert_eq!((s.received, s.failed), (10, s.failed));
        assert!(s.failed >= 1 && s.passed + s.failed == 10);
        assert_eq!(
            report.failure_sample[0].error.to_string(),
            "panicked: writer crashed"
        );
    }

    #[tokio::test]
    async fn tickets_finish_with_the_batch_so_failed_keys_are_retried() {
        let store = crate::MemoryStore::new();
        let w = Writer::new(|x| x == 3, |_| false);
        let batches = w.batches.clone();
        let (_, report) = Pipeline::from_iter(0..20u32)
            .idempotent(store.clone(), |x| *x)
            .into_sink(w)
            .await
            .unwrap();
        let written = batches.lock().unwrap().concat();
        let failed = report.stage("writer").unwrap().failed;
        assert!(failed >= 1);
        // only the failed batch's keys were released: the next run gets exactly them
        let again = Pipeline::from_iter(0..20u32)
            .idempotent(store, |x| *x)
            .collect()
            .await
            .unwrap();
        assert_eq!(again.len() as u64, failed);
        assert!(again.contains(&3));
        assert!(again.iter().all(|x| !written.contains(x)));
    }

    #[tokio::test]
    async fn the_run_builder_takes_options_and_a_unit_sink_spawns() {
        struct Count(Arc<Mutex<usize>>);
        impl BatchSink<u32> for Count {
            type Output = ();
            async fn write(&mut self, batch: Vec<u32>) -> Result<(), BoxError> {
                *self.0.lock().unwrap() += batch.len();
                Ok(())
            }
            fn finish(self) {}
        }
        let n = Arc::new(Mutex::new(0));
        let report = Pipeline::from_iter(0..50u32)
            .into_sink(Count(n.clone()))
            .deadline(Duration::from_secs(60))
            .spawn()
            .join()
            .await
            .unwrap();
        assert_eq!(*n.lock().unwrap(), 50);
        assert_eq!(report.stage("sink").unwrap().passed, 50);
        let err = Pipeline::from_iter(0..50u32)
            .into_sink(Writer::new(|_| true, |_| false))
            .error_policy(ErrorPolicy::Stop)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::ItemFailed { .. }), "{err}");
    }
}
