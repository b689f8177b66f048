//! `Pipeline::from_tracked`: items from a stream, each with a [`Completion`] that learns how
//! the item ended — the hook a source outside this crate (a message queue that must
//! acknowledge an entry only once it has finished) builds on.
//!
//! A completion is the same ticket the cursor source's checkpoint watermark uses: shared by
//! everything derived from the item (a `flat_map`'s outputs, a batch holding it), it fires
//! once, when the last holder lets go, with the worst outcome any holder reported.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::Stream;

use super::{Pull, Pulled, Source};
use crate::failure::{BoxError, ItemError};
use crate::plan::{Pipeline, Settings};
use crate::runtime::Upstream;
use crate::runtime::chunk::{Outcome, Ticket};

/// How a tracked item ended.
///
/// ```
/// use flowline::ItemEnd;
/// assert_ne!(ItemEnd::Done, ItemEnd::Cancelled);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ItemEnd {
    /// Delivered to the sink, or dropped by an operator whose job is to drop (a filter, a
    /// dedup, an idempotency skip).
    Done,
    /// Failed at a stage: handed to the run's [`DeadLetter`](crate::DeadLetter) target.
    Failed,
    /// Never finished: the run was cancelled (or ended by an error) with the item in it.
    Cancelled,
}

impl From<Outcome> for ItemEnd {
    fn from(o: Outcome) -> Self {
        match o {
            Outcome::Done => ItemEnd::Done,
            Outcome::Failed => ItemEnd::Failed,
            Outcome::Cancelled => ItemEnd::Cancelled,
        }
    }
}

/// Learns how one item of [`Pipeline::from_tracked`] ended: its callback runs exactly once,
/// synchronously, on whichever task let go of the item last (so it should only record the
/// outcome and wake a task of its own). A completion dropped without being handed to a
/// pipeline reports [`ItemEnd::Cancelled`].
///
/// ```
/// use flowline::{Completion, ItemEnd};
/// use std::sync::{Arc, Mutex};
/// let seen = Arc::new(Mutex::new(None));
/// let s = seen.clone();
/// drop(Completion::new(move |end| *s.lock().unwrap() = Some(end)));
/// assert_eq!(*seen.lock().unwrap(), Some(ItemEnd::Cancelled));
/// ```
pub struct Completion(Ticket);

impl Completion {
    /// A completion that calls `on_end` with the item's end.
    ///
    /// ```
    /// let c = flowline::Completion::new(|end| println!("{end:?}"));
    /// # drop(c);
    /// ```
    pub fn new(on_end: impl FnOnce(ItemEnd) + Send + Sync + 'static) -> Self {
        Completion(Ticket::new(move |o| on_end(o.into())))
    }
}

impl std::fmt::Debug for Completion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Completion")
    }
}

struct TrackedPull<S> {
    stream: Pin<Box<S>>,
    tickets: Vec<Ticket>,
    failed: Option<ItemError>,
    run: std::sync::Arc<crate::runtime::RunCtx>,
}

/// A stream's error that is an [`OutageError`](crate::OutageError) (its server stayed down
/// past the outage policy) ends the run as an outage: the items it holds end unfinished,
/// not failed. Any other error fails the source.
fn source_error(run: &crate::runtime::RunCtx, e: BoxError) -> Option<ItemError> {
    match e.downcast::<crate::OutageError>() {
        Ok(outage) => {
            run.outage_ended(*outage);
            None
        }
        Err(e) => Some(ItemError::user(e)),
    }
}

impl<T, E, S> Pull<T> for TrackedPull<S>
where
    E: Into<BoxError>,
    S: Stream<Item = Result<(T, Completion), E>> + Send,
{
    fn poll_pull(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
        out: &mut Vec<T>,
    ) -> Poll<Result<Pulled, ItemError>> {
        if let Some(e) = self.failed.take() {
            return Poll::Ready(Err(e));
        }
        while out.len() < max {
            match self.stream.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok((x, c)))) => {
                    out.push(x);
                    self.tickets.push(c.0);
                }
                // What was appended goes out first; the error ends the source on the next
                // call (a stream that failed is not polled again).
                Poll::Ready(Some(Err(e))) => match source_error(&self.run, e.into()) {
                    Some(e) if out.is_empty() => return Poll::Ready(Err(e)),
                    Some(e) => {
                        self.failed = Some(e);
                        break;
                    }
                    None if out.is_empty() => return Poll::Ready(Ok(Pulled::End)),
                    None => break,
                },
                Poll::Ready(None) => return Poll::Ready(Ok(Pulled::End)),
                Poll::Pending if out.is_empty() => return Poll::Pending,
                Poll::Pending => break,
            }
        }
        Poll::Ready(Ok(Pulled::More))
    }

    fn take_tickets(&mut self) -> Vec<Ticket> {
        std::mem::take(&mut self.tickets)
    }
}

impl<T: Send + 'static> Pipeline<T> {
    /// A pipeline over a stream of items with their [`Completion`]s: each completion learns
    /// whether its item was delivered (or dropped by an operator), failed, or cancelled.
    /// An `Err` from the stream ends the source and fails the run with it (as a failed
    /// fetch of [`from_cursor`](Pipeline::from_cursor) does); the items before it still run.
    /// `task` runs beside the pipeline (acknowledging what finished, say) and the run
    /// returns only once it has ended, so it must end on its own once the stream has been
    /// dropped and the completions it waits for have fired.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use flowline::{Completion, ItemEnd};
    /// use std::sync::{Arc, Mutex};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let ends = Arc::new(Mutex::new(Vec::new()));
    /// let record = ends.clone();
    /// let items = (1..=4u32).map(move |i| {
    ///     let ends = record.clone();
    ///     Ok::<_, String>((i, Completion::new(move |e| ends.lock().unwrap().push((i, e)))))
    /// });
    /// let report = Pipeline::from_tracked(futures_util::stream::iter(items), async {})
    ///     .filter(|x| *x != 2)
    ///     .try_map_async("check", |x| async move { if x == 3 { Err("three") } else { Ok(x) } })
    ///     .run()
    ///     .await
    ///     .unwrap();
    /// assert_eq!(report.delivered(), 2);
    /// let mut ends = ends.lock().unwrap().clone();
    /// ends.sort_by_key(|e| e.0);
    /// assert_eq!(ends, vec![(1, ItemEnd::Done), (2, ItemEnd::Done), (3, ItemEnd::Failed), (4, ItemEnd::Done)]);
    /// # }
    /// ```
    pub fn from_tracked<S, E, F>(stream: S, task: F) -> Pipeline<T>
    where
        S: Stream<Item = Result<(T, Completion), E>> + Send + 'static,
        E: Into<BoxError> + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        Pipeline {
            build: Box::new(move |b| {
                let stats = b.stage("source", "source");
                b.spawn(task);
                let pull = TrackedPull {
                    stream: Box::pin(stream),
                    tickets: Vec::new(),
                    failed: None,
                    run: b.run.clone(),
                };
                Box::new(Source::new(pull, stats, b.run.clone())) as Upstream<T>
            }),
            settings: Settings::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prelude::*;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use futures_util::StreamExt;

    type Ends = Arc<Mutex<Vec<(u32, ItemEnd)>>>;

    type Item = Result<(u32, Completion), String>;

    fn tracked(n: u32, ends: &Ends) -> impl Stream<Item = Item> + Send + 'static {
        let ends = ends.clone();
        futures_util::stream::iter((0..n).map(move |i| {
            let ends = ends.clone();
            Ok((
                i,
                Completion::new(move |e| ends.lock().unwrap().push((i, e))),
            ))
        }))
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_items_report_cancelled_and_finished_ones_done() {
        let ends: Ends = Arc::default();
        let h = Pipeline::from_tracked(tracked(10, &ends), async {})
            .map_async("work", |x| async move {
                let d = if x < 3 { 1 } else { 3600 };
                tokio::time::sleep(Duration::from_secs(d)).await;
                x
            })
            .workers(10)
            .unordered()
            .spawn();
        tokio::time::sleep(Duration::from_secs(10)).await;
        h.cancel();
        let _ = h.join().await;
        let mut ends = ends.lock().unwrap().clone();
        ends.sort_by_key(|e| e.0);
        let want: Vec<(u32, ItemEnd)> = (0..10)
            .map(|i| {
                let e = if i < 3 {
                    ItemEnd::Done
                } else {
                    ItemEnd::Cancelled
                };
                (i, e)
            })
            .collect();
        assert_eq!(ends, want);
    }

    #[tokio::test(start_paused = true)]
    async fn the_run_waits_for_its_task() {
        let ends: Ends = Arc::default();
        let flag = Arc::new(Mutex::new(false));
        let f = flag.clone();
        let task = async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            *f.lock().unwrap() = true;
        };
        let report = Pipeline::from_tracked(tracked(3, &ends), task)
            .run()
            .await
            .unwrap();
        assert_eq!(report.delivered(), 3);
        assert!(*flag.lock().unwrap(), "returned before the task ended");
        assert_eq!(ends.lock().unwrap().len(), 3);
    }

    #[tokio::test]
    async fn an_error_fails_the_run_after_the_items_before_it() {
        let ends: Ends = Arc::default();
        let items =
            tracked(3, &ends).chain(futures_util::stream::iter([
                Err("stream broke".to_string()),
            ]));
        let err = Pipeline::from_tracked(items, async {})
            .run()
            .await
            .unwrap_err();
        assert!(err.to_string().contains("stream broke"), "{err}");
        assert_eq!(err.report().unwrap().delivered(), 3);
        assert_eq!(ends.lock().unwrap().len(), 3);
    }

    #[tokio::test]
    async fn a_flat_map_ends_its_input_once_every_output_has_ended() {
        let ends: Ends = Arc::default();
        Pipeline::from_tracked(tracked(2, &ends), async {})
            .flat_map(|x| vec![x; 3])
            .try_map_async(
                "odd",
                |x| async move { if x == 1 { Err("one") } else { Ok(x) } },
            )
            .run()
            .await
            .unwrap();
        let mut ends = ends.lock().unwrap().clone();
        ends.sort_by_key(|e| e.0);
        assert_eq!(ends, vec![(0, ItemEnd::Done), (1, ItemEnd::Failed)]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_error_ends_the_run_as_an_outage_with_its_items_unfinished() {
        let ends: Ends = Arc::default();
        let e2 = ends.clone();
        let outage = crate::Outage::keep_trying_for(Duration::ZERO)
            .watch("redis 127.0.0.1:1")
            .failed("connection refused")
            .unwrap_err();
        let items = tracked(3, &ends)
            .map(|r| r.map_err(crate::BoxError::from))
            .chain(futures_util::stream::iter([Err(crate::BoxError::from(
                outage,
            ))]));
        let err = Pipeline::from_tracked(items, async {})
            .map_async("slow", |x| async move {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                x
            })
            .workers(3)
            .run()
            .await
            .unwrap_err();
        let crate::Error::Outage { error, report } = err else {
            panic!("not an outage: {err}")
        };
        assert_eq!(error.server(), "redis 127.0.0.1:1");
        assert_eq!(report.outcome, crate::RunOutcome::Outage);
        assert_eq!(report.failures, 0);
        let got = e2.lock().unwrap().clone();
        assert_eq!(got.len(), 3);
        assert!(got.iter().all(|(_, e)| *e == ItemEnd::Cancelled), "{got:?}");
    }
}
