//! `idempotent(store, key)`: an item whose key is already done (in this run or an earlier
//! one) is skipped and counted as dropped.
//!
//! Two-phase: the key is reserved when the item enters the stage (one store call per
//! chunk), and committed only when the item has finished the whole pipeline successfully —
//! delivered to the sink, or dropped by design further on. If the item fails (or the run is
//! cancelled before it finished), the reservation is released, so the next run processes
//! it again. This rides on the item's completion ticket: the stage wraps each item's ticket
//! in one whose callback queues the key for a committer task, which commits and releases in
//! batches and finishes before the run returns.
//!
//! A key that another holder has reserved (not expired) is skipped too: some other run is
//! processing it. A reservation expires after its TTL (default 10 minutes, `.ttl(d)`), so a
//! crashed run does not block its keys forever.

use std::fmt::Display;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::Pipeline;
use crate::error::{Failure, ItemError};
use crate::report::StageStats;
use crate::runtime::chunk::{Chunk, Outcome, Ticket};
use crate::runtime::hop::{HOP_CHUNKS, hop};
use crate::runtime::{CancelWatch, RunCtx, Upstream};
use crate::store::{Reservation, Store};

/// How long a reservation lasts unless [`Idempotent::ttl`] says otherwise.
pub(crate) const DEFAULT_RESERVATION_TTL: Duration = Duration::from_secs(600);

/// An idempotent stage being configured; returned by [`Flow::idempotent`](crate::Flow::idempotent).
///
/// ```
/// use flowline::prelude::*;
/// use flowline::MemoryStore;
/// use std::time::Duration;
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let report = Pipeline::from_iter(["a", "b", "a"])
///     .idempotent(MemoryStore::new(), |s| s.to_string())
///         .ttl(Duration::from_secs(60))
///     .run().await.unwrap();
/// assert_eq!(report.delivered(), 2);   // the second "a" is skipped
/// # }
/// ```
#[must_use = "a stage builder does nothing until its pipeline is run by a terminal"]
pub struct Idempotent<T, S, F> {
    p: Pipeline<T>,
    store: S,
    key: F,
    ttl: Duration,
}

impl<T, S, F> Idempotent<T, S, F> {
    /// How long a reservation lasts before another run may take the key over. It must
    /// exceed the time an item takes to go through the pipeline. Must be more than zero.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use flowline::MemoryStore;
    /// use std::time::Duration;
    /// let plan = Pipeline::from_iter(0..3).idempotent(MemoryStore::new(), |x| *x).ttl(Duration::from_secs(30));
    /// # let _ = plan;
    /// ```
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.p.settings.require_positive("idempotent", "ttl", ttl);
        self.ttl = ttl;
        self
    }
}

pub(crate) fn idempotent<T, S, F>(p: Pipeline<T>, store: S, key: F) -> Idempotent<T, S, F> {
    Idempotent {
        p,
        store,
        key,
        ttl: DEFAULT_RESERVATION_TTL,
    }
}

impl<T, S, F, K> crate::IntoPipeline for Idempotent<T, S, F>
where
    T: Send + 'static,
    S: Store,
    F: FnMut(&T) -> K + Send + 'static,
    K: Display + 'static,
{
    type Item = T;

    fn into_pipeline(self) -> Pipeline<T> {
        let Idempotent { p, store, key, ttl } = self;
        p.then(move |b, up| {
            let stats = b.stage("idempotent", "idempotent");
            let store: Arc<dyn Store> = Arc::new(store);
            let (done_tx, done_rx) = mpsc::unbounded_channel();
            b.spawn(committer(store.clone(), done_rx));
            let (tx, rx) = hop(HOP_CHUNKS);
            let run = b.run.clone();
            b.spawn(reserver(up, tx, stats, run, store, key, ttl, done_tx));
            Box::new(rx) as Upstream<T>
        })
    }
}

type Finished = (String, Outcome);

#[allow(clippy::too_many_arguments)]
async fn reserver<T, K, F>(
    mut up: Upstream<T>,
    tx: mpsc::Sender<Chunk<T>>,
    stats: Arc<StageStats>,
    run: Arc<RunCtx>,
    store: Arc<dyn Store>,
    mut key: F,
    ttl: Duration,
    done: mpsc::UnboundedSender<Finished>,
) where
    T: Send + 'static,
    F: FnMut(&T) -> K + Send + 'static,
    K: Display + 'static,
{
    let cancel = run.cancel.clone();
    let mut watch = CancelWatch::new(&cancel);
    loop {
        let Some(next) = watch.next_chunk(&mut up).await else {
            break;
        };
        let Some(chunk) = next else { return };
        let n = chunk.len();
        StageStats::add(&stats.received, n);
        let keys: Vec<String> = chunk.items.iter().map(|x| key(x).to_string()).collect();
        let reserved = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            r = store.reserve(&keys, ttl) => r,
        };
        let answers = match reserved {
            Ok(a) if a.len() == n => a,
            Ok(a) => {
                let e = ItemError::user(format!(
                    "idempotency store answered {} reservations for {n} keys",
                    a.len()
                ));
                fail_chunk(&run, &stats, chunk, e);
                continue;
            }
            Err(e) => {
                fail_chunk(
                    &run,
                    &stats,
                    chunk,
                    ItemError::user(format!("idempotency store: {e}")),
                );
                continue;
            }
        };
        let mut out = Chunk::default();
        let mut skipped = 0usize;
        for (((item, ticket), key), answer) in chunk.into_pairs().zip(keys).zip(answers) {
            match answer {
                Reservation::Reserved => {
                    let done = done.clone();
                    let on_done = Box::new(move |o: Outcome| {
                        let _ = done.send((key, o));
                    });
                    out.push(item, Ticket::with_parents(vec![ticket], Some(on_done)));
                }
                Reservation::AlreadyDone | Reservation::Busy => {
                    skipped += 1;
                    ticket.finish(Outcome::Done);
                }
            }
        }
        StageStats::add(&stats.dropped, skipped);
        if !out.is_empty() {
            let m = out.len();
            if !watch.send_counted(&tx, out, m, &stats).await {
                break;
            }
        }
        tokio::task::consume_budget().await;
    }
    StageStats::add(&stats.received, up.discard());
}

fn fail_chunk<T>(run: &RunCtx, stats: &StageStats, chunk: Chunk<T>, error: ItemError) {
    let n = chunk.len();
    drop(chunk.into_items(Outcome::Failed));
    StageStats::add(&stats.failed, n);
    for _ in 0..n {
        run.fail(Failure::new(stats.name.clone(), error.clone(), 1));
    }
}

/// Commits the keys of items that finished well and releases the others, a batch at a
/// time. It ends when every ticket it could hear from has finished (all senders dropped),
/// which the run awaits: the commits are written before the run returns.
async fn committer(store: Arc<dyn Store>, mut done: mpsc::UnboundedReceiver<Finished>) {
    let mut buf = Vec::with_capacity(256);
    while done.recv_many(&mut buf, 1024).await > 0 {
        let mut commit = Vec::new();
        let mut release = Vec::new();
        for (key, outcome) in buf.drain(..) {
            match outcome {
                Outcome::Done => commit.push(key),
                Outcome::Failed | Outcome::Cancelled => release.push(key),
            }
        }
        if !commit.is_empty() {
            if let Err(e) = store.commit(&commit).await {
                tracing::warn!(error = %e, keys = commit.len(), "idempotency commit failed");
            }
        }
        if !release.is_empty() {
            if let Err(e) = store.release(&release).await {
                tracing::warn!(error = %e, keys = release.len(), "idempotency release failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;
    use crate::{MemoryStore, Reservation, Store};
    use std::time::Duration;

    #[tokio::test]
    async fn duplicates_in_one_run_and_done_keys_are_skipped() {
        let store = MemoryStore::new();
        let (out, report) = Pipeline::from_iter([1, 2, 1, 3, 2])
            .idempotent(store.clone(), |x| *x)
            .collect_with_report()
            .await
            .unwrap();
        assert_eq!(out, vec![1, 2, 3]);
        let s = report.stage("idempotent").unwrap();
        assert_eq!((s.received, s.passed, s.dropped), (5, 3, 2));
        let k: Vec<String> = ["1", "2", "3", "4"].iter().map(|s| s.to_string()).collect();
        let r = store.reserve(&k, Duration::from_secs(1)).await.unwrap();
        assert_eq!(
            r,
            vec![
                Reservation::AlreadyDone,
                Reservation::AlreadyDone,
                Reservation::AlreadyDone,
                Reservation::Reserved
            ]
        );
    }

    #[tokio::test]
    async fn a_failed_item_is_released_and_processed_next_run() {
        let store = MemoryStore::new();
        let report = Pipeline::from_iter([1, 2, 3])
            .idempotent(store.clone(), |x| *x)
            .try_map_async(
                "work",
                |x| async move { if x == 2 { Err("no") } else { Ok(x) } },
            )
            .run()
            .await
            .unwrap();
        assert_eq!((report.delivered(), report.failures), (2, 1));
        let out = Pipeline::from_iter([1, 2, 3])
            .idempotent(store, |x| *x)
            .collect()
            .await
            .unwrap();
        assert_eq!(out, vec![2]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_commits_its_parts_only_when_it_finishes() {
        let store = MemoryStore::new();
        let report = Pipeline::from_iter(0..10u32)
            .idempotent(store.clone(), |x| *x)
            .batch(4, Duration::from_millis(10))
            .try_map_async("write", |b| async move {
                if b.contains(&5) {
                    Err("batch failed")
                } else {
                    Ok(b)
                }
            })
            .run()
            .await
            .unwrap();
        assert_eq!(report.failures, 1);
        // the failed batch [4..8) is retried next run; the others are done
        let out = Pipeline::from_iter(0..10u32)
            .idempotent(store, |x| *x)
            .collect()
            .await
            .unwrap();
        assert_eq!(out, vec![4, 5, 6, 7]);
    }

    #[tokio::test]
    async fn zero_ttl_is_rejected() {
        let err = Pipeline::from_iter(0..3)
            .idempotent(MemoryStore::new(), |x| *x)
            .ttl(Duration::ZERO)
            .run()
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: stage `idempotent`: ttl = 0ns: must be more than zero"
        );
    }
}
