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
//! A key that another holder has reserved (not expired) is not done: some other run is
//! processing it, or a run that crashed left it reserved. Its item waits — the stage asks
//! for the key again, with growing pauses, while later items go on — until the other holder
//! commits it (the item is then dropped as done), lets go of it or its reservation expires
//! (the item then goes on), or `.busy_wait(d)` passes (default: the reservation TTL); then
//! the item fails with an error saying whose key it waited for, and goes to the dead
//! letters. It is never counted as done: a cursor's checkpoint stays behind it, and the
//! report shows it. A reservation expires after its TTL (default 10 minutes, `.ttl(d)`), so
//! a crashed run does not block its keys forever, and with the default wait a restarted run
//! takes them over once they expire. A graceful stop does not wait for busy keys: their items
//! are left unfinished (the checkpoint stays before them) and a rerun takes them up.
//!
//! An item that waited comes out after the items that did not: the stage keeps input order
//! only among items whose keys were free.

use std::collections::VecDeque;
use std::fmt::Display;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::Pipeline;
use crate::error::{Failure, ItemError};
use crate::report::StageStats;
use crate::runtime::chunk::{CHUNK_CAP, Chunk, Outcome, Ticket};
use crate::runtime::hop::{HOP_CHUNKS, hop};
use crate::runtime::time::after;
use crate::runtime::{CancelWatch, RunCtx, Upstream, next_chunk};
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
    busy_wait: Option<Duration>,
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

    /// How long an item whose key another holder has reserved waits for that holder before
    /// it fails (default: the TTL, so that a reservation left by a crashed run with the same
    /// TTL expires within the wait and is taken over). While it waits, the stage asks for
    /// the key again with growing pauses (50 ms up to 5 s) and later items go on. Zero: such
    /// an item fails at once. It is never passed over as done.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use flowline::{MemoryStore, Store};
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let store = MemoryStore::new();
    /// // Another holder (a second process) has "a" reserved and never finishes it.
    /// store.handle().reserve(&["a".to_string()], Duration::from_secs(600)).await.unwrap();
    /// let report = Pipeline::from_iter(["a", "b"])
    ///     .idempotent(store, |s| s.to_string())
    ///         .busy_wait(Duration::from_secs(1))
    ///     .run().await.unwrap();
    /// assert_eq!((report.delivered(), report.failures), (1, 1));   // "a" is not skipped as done
    /// # }
    /// ```
    pub fn busy_wait(mut self, wait: Duration) -> Self {
        self.busy_wait = Some(wait);
        self
    }
}

pub(crate) fn idempotent<T, S, F>(p: Pipeline<T>, store: S, key: F) -> Idempotent<T, S, F> {
    Idempotent {
        p,
        store,
        key,
        ttl: DEFAULT_RESERVATION_TTL,
        busy_wait: None,
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
        let Idempotent {
            p,
            store,
            key,
            ttl,
            busy_wait,
        } = self;
        let busy_wait = busy_wait.unwrap_or(ttl);
        p.then(move |b, up| {
            let stats = b.stage("idempotent", "idempotent");
            let store: Arc<dyn Store> = Arc::new(store);
            let (done_tx, done_rx) = mpsc::unbounded_channel();
            b.spawn(committer(store.clone(), done_rx));
            let (tx, rx) = hop(HOP_CHUNKS, &stats);
            let stage = Reserver {
                stats,
                run: b.run.clone(),
                store,
                ttl,
                busy_wait,
                done: done_tx,
                busy: VecDeque::new(),
                recheck: None,
                pause: FIRST_RECHECK,
            };
            b.spawn(stage.drive(up, tx, key));
            Box::new(rx) as Upstream<T>
        })
    }
}

type Finished = (String, Outcome);

/// The first pause before a busy key is asked for again; each later pause doubles, up to
/// [`LAST_RECHECK`].
const FIRST_RECHECK: Duration = Duration::from_millis(50);
const LAST_RECHECK: Duration = Duration::from_secs(5);
/// The most items that may wait for busy keys; at this many the stage stops taking new
/// items until some are settled (memory stays bounded).
const MAX_BUSY: usize = 8 * CHUNK_CAP;

/// An item whose key another holder has reserved, waiting for it.
struct Busy<T> {
    item: T,
    ticket: Ticket,
    key: String,
    /// When it stops waiting and fails.
    until: Instant,
}

/// The task of an idempotent stage: reserves each chunk's keys, passes on the items it got,
/// drops the done ones, and keeps the items whose keys are busy until they are settled.
struct Reserver<T> {
    stats: Arc<StageStats>,
    run: Arc<RunCtx>,
    store: Arc<dyn Store>,
    ttl: Duration,
    busy_wait: Duration,
    done: mpsc::UnboundedSender<Finished>,
    busy: VecDeque<Busy<T>>,
    /// When the busy keys are asked for next.
    recheck: Option<Instant>,
    pause: Duration,
}

/// What the task waits for next.
enum Next<T> {
    Chunk(Chunk<T>),
    Ended,
    Recheck,
    Cancelled,
}

impl<T: Send + 'static> Reserver<T> {
    async fn drive<K, F>(mut self, mut up: Upstream<T>, tx: mpsc::Sender<Chunk<T>>, mut key: F)
    where
        F: FnMut(&T) -> K + Send + 'static,
        K: Display + 'static,
    {
        let cancel = self.run.cancel.clone();
        let mut watch = CancelWatch::new(&cancel);
        let mut up_done = false;
        loop {
            // A graceful stop finishes the work in hand, not a wait on another holder's keys
            // (which may last the whole TTL): the items still waiting are left unfinished, so
            // a cursor's checkpoint stays before them and a rerun takes them up.
            if up_done && (self.busy.is_empty() || self.run.stop_requested.load(Ordering::Relaxed))
            {
                break;
            }
            let pull = !up_done && self.busy.len() < MAX_BUSY;
            let next = match self.recheck {
                None => match watch.next_chunk(&mut up).await {
                    None => Next::Cancelled,
                    Some(Some(c)) => Next::Chunk(c),
                    Some(None) => Next::Ended,
                },
                Some(at) => tokio::select! {
                    biased;
                    _ = cancel.cancelled() => Next::Cancelled,
                    c = next_chunk(&mut up), if pull => c.map_or(Next::Ended, Next::Chunk),
                    _ = tokio::time::sleep_until(at) => Next::Recheck,
                },
            };
            let out = match next {
                Next::Cancelled => break,
                Next::Ended => {
                    up_done = true;
                    continue;
                }
                Next::Chunk(chunk) => {
                    StageStats::add(&self.stats.received, chunk.len());
                    if self.busy.is_empty() {
                        // A new wait starts with a short pause.
                        self.pause = FIRST_RECHECK;
                    }
                    let keys: Vec<String> =
                        chunk.items.iter().map(|x| key(x).to_string()).collect();
                    let pairs = chunk.into_pairs().zip(keys).map(|((item, ticket), key)| {
                        (item, ticket, key, after(Instant::now(), self.busy_wait))
                    });
                    match self.settle(pairs.collect(), &cancel).await {
                        Some(out) => out,
                        None => break,
                    }
                }
                Next::Recheck => {
                    let waiting: Vec<_> = self
                        .busy
                        .drain(..)
                        .map(|b| (b.item, b.ticket, b.key, b.until))
                        .collect();
                    self.recheck = None;
                    match self.settle(waiting, &cancel).await {
                        Some(out) => out,
                        None => break,
                    }
                }
            };
            if !out.is_empty() {
                let m = out.len();
                if !watch.send_counted(&tx, out, m, &self.stats).await {
                    self.stats.left(m);
                    break;
                }
            }
            tokio::task::consume_budget().await;
        }
        // Cancelled (or the next stage is gone): what waits here is left unfinished.
        self.stats.left(self.busy.len());
        self.stats.discarded(up.discard());
    }

    /// Reserves the keys of `items` and sorts them: reserved ones into the returned chunk,
    /// done ones dropped, busy ones kept waiting (or failed once their wait is over). `None`:
    /// the run was cancelled meanwhile (the items are counted as left).
    async fn settle(
        &mut self,
        items: Vec<(T, Ticket, String, Instant)>,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Option<Chunk<T>> {
        let n = items.len();
        let keys: Vec<String> = items.iter().map(|i| i.2.clone()).collect();
        let reserved = tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                self.stats.left(n);
                return None;
            }
            r = self.store.reserve(&keys, self.ttl) => r,
        };
        drop(keys);
        let error = match reserved {
            Ok(a) if a.len() == n => {
                return Some(self.sort(items, a));
            }
            Ok(a) => ItemError::user(format!(
                "idempotency store answered {} reservations for {n} keys",
                a.len()
            )),
            Err(e) => ItemError::user(format!("idempotency store: {e}")),
        };
        StageStats::add(&self.stats.failed, n);
        for (_, ticket, _, _) in items {
            ticket.finish(Outcome::Failed);
            self.run
                .fail(Failure::new(self.stats.name.clone(), error.clone(), 1));
        }
        self.schedule();
        Some(Chunk::default())
    }

    fn sort(
        &mut self,
        items: Vec<(T, Ticket, String, Instant)>,
        answers: Vec<Reservation>,
    ) -> Chunk<T> {
        let now = Instant::now();
        let mut out = Chunk::default();
        let mut dropped = 0usize;
        let mut failed = 0usize;
        for ((item, ticket, key, until), answer) in items.into_iter().zip(answers) {
            match answer {
                Reservation::Reserved => {
                    let done = self.done.clone();
                    let on_done = Box::new(move |o: Outcome| {
                        let _ = done.send((key, o));
                    });
                    out.push(item, Ticket::with_parents(vec![ticket], Some(on_done)));
                }
                Reservation::AlreadyDone => {
                    dropped += 1;
                    ticket.finish(Outcome::Done);
                }
                Reservation::Busy if now >= until => {
                    failed += 1;
                    ticket.finish(Outcome::Failed);
                    let error = ItemError::user(format!(
                        "idempotency key {key:?} is reserved by another holder: waited {:?} for it",
                        self.busy_wait
                    ));
                    self.run
                        .fail(Failure::new(self.stats.name.clone(), error, 1));
                }
                Reservation::Busy => {
                    self.busy.push_back(Busy {
                        item,
                        ticket,
                        key,
                        until,
                    });
                }
            }
        }
        StageStats::add(&self.stats.dropped, dropped);
        StageStats::add(&self.stats.failed, failed);
        self.schedule();
        out
    }

    /// Plans the next look at the busy keys: after the current pause (which then doubles),
    /// or when the first waiting item's wait is over, whichever comes first.
    fn schedule(&mut self) {
        if self.recheck.is_some() {
            return;
        }
        let Some(first) = self.busy.front() else {
            return;
        };
        let now = Instant::now();
        let at = after(now, self.pause).min(first.until.max(now));
        self.pause = (self.pause * 2).min(LAST_RECHECK);
        self.recheck = Some(at);
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

    fn keys(range: std::ops::Range<u32>) -> Vec<String> {
        range.map(|k| k.to_string()).collect()
    }

    /// A holder that reserved keys and never finishes them: a process that crashed.
    async fn crashed_holder(store: &MemoryStore, range: std::ops::Range<u32>) {
        let dead = store.handle();
        let r = dead.reserve(&keys(range), Duration::from_secs(600)).await;
        assert!(r.unwrap().iter().all(|a| *a == Reservation::Reserved));
    }

    #[tokio::test(start_paused = true)]
    async fn keys_a_crashed_holder_reserved_are_waited_for_and_taken_over_by_default() {
        let store = MemoryStore::new();
        crashed_holder(&store, 100..1100).await;
        let started = tokio::time::Instant::now();
        let (mut out, report) = Pipeline::from_iter(0..2000u32)
            .idempotent(store.clone(), |x| *x)
            .collect_with_report()
            .await
            .unwrap();
        out.sort_unstable();
        assert_eq!(
            out,
            (0..2000).collect::<Vec<_>>(),
            "no item passed over as done"
        );
        let s = report.stage("idempotent").unwrap();
        assert_eq!((s.passed, s.dropped, s.failed), (2000, 0, 0));
        assert!(report.is_balanced());
        // The crashed holder's reservations ran out (600 s) before they were taken over.
        assert!(started.elapsed() >= Duration::from_secs(600));
        let r = store.reserve(&keys(0..2000), Duration::from_secs(1)).await;
        assert!(r.unwrap().iter().all(|a| *a == Reservation::AlreadyDone));
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_still_busy_after_the_wait_fails_visibly_and_is_not_committed() {
        let store = MemoryStore::new();
        crashed_holder(&store, 3..5).await;
        let started = tokio::time::Instant::now();
        let (out, report) = Pipeline::from_iter(0..8u32)
            .idempotent(store.clone(), |x| *x)
            .busy_wait(Duration::from_secs(1))
            .collect_with_report()
            .await
            .unwrap();
        assert_eq!(out, vec![0, 1, 2, 5, 6, 7]);
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        let s = report.stage("idempotent").unwrap();
        assert_eq!((s.received, s.passed, s.dropped, s.failed), (8, 6, 0, 2));
        assert_eq!(report.failures, 2);
        assert_eq!(
            report.failure_sample[0].error.to_string(),
            "idempotency key \"3\" is reserved by another holder: waited 1s for it"
        );
        // Still the crashed holder's: not marked done by this run.
        let r = store.reserve(&keys(3..5), Duration::from_secs(1)).await;
        assert_eq!(r.unwrap(), vec![Reservation::Busy, Reservation::Busy]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_key_the_other_holder_commits_is_dropped_and_one_it_releases_goes_on() {
        let store = MemoryStore::new();
        let other = store.handle();
        other
            .reserve(&keys(0..2), Duration::from_secs(600))
            .await
            .unwrap();
        let o = other.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            o.commit(&keys(0..1)).await.unwrap();
            o.release(&keys(1..2)).await.unwrap();
        });
        let (out, report) = Pipeline::from_iter(0..3u32)
            .idempotent(store, |x| *x)
            .collect_with_report()
            .await
            .unwrap();
        assert_eq!(out, vec![2, 1]);
        let s = report.stage("idempotent").unwrap();
        assert_eq!((s.passed, s.dropped, s.failed), (2, 1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cursor_row_with_a_busy_key_is_delivered_or_dead_lettered_never_passed_as_done() {
        use crate::{MemoryCheckpoints, Page};
        let fetch = |after: Option<u32>| async move {
            let after = after.unwrap_or(0);
            let page: Vec<u32> = (after + 1..=30).take(10).collect();
            Ok::<_, std::convert::Infallible>(match page.last() {
                Some(&last) => Page::next(page, last),
                None => Page::end(page),
            })
        };
        // Default wait: the crashed holder's reservation runs out and row 15 is delivered.
        let checkpoints = MemoryCheckpoints::new();
        let store = MemoryStore::new();
        crashed_holder(&store, 15..16).await;
        let report = Pipeline::from_cursor(checkpoints.clone(), "rows", fetch)
            .idempotent(store, |x| *x)
            .run()
            .await
            .unwrap();
        assert_eq!((report.delivered(), report.failures), (30, 0));
        assert_eq!(checkpoints.get("rows").as_deref(), Some("30"));
        // A shorter wait: row 15 ends in the dead letters, named, before the checkpoint
        // passes it.
        let checkpoints = MemoryCheckpoints::new();
        let store = MemoryStore::new();
        crashed_holder(&store, 15..16).await;
        let (tx, mut dead) = tokio::sync::mpsc::channel(4);
        let report = Pipeline::from_cursor(checkpoints.clone(), "rows", fetch)
            .idempotent(store, |x| *x)
            .busy_wait(Duration::from_secs(5))
            .run()
            .dead_letter(DeadLetter::channel(tx))
            .await
            .unwrap();
        assert_eq!((report.delivered(), report.failures), (29, 1));
        assert!(report.is_balanced());
        let failure = dead.recv().await.unwrap();
        assert!(
            failure.error.to_string().contains("key \"15\""),
            "{failure}"
        );
        assert_eq!(checkpoints.get("rows").as_deref(), Some("30"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancel_counts_the_items_waiting_for_busy_keys_as_unfinished() {
        let store = MemoryStore::new();
        crashed_holder(&store, 0..5).await;
        let handle = Pipeline::from_iter(0..10u32)
            .idempotent(store, |x| *x)
            .run()
            .spawn();
        tokio::time::sleep(Duration::from_secs(1)).await;
        handle.cancel();
        let Err(crate::Error::Cancelled { report }) = handle.join().await else {
            panic!("cancelled")
        };
        let s = report.stage("idempotent").unwrap();
        assert_eq!((s.received, s.passed, s.unfinished), (10, 5, 5));
        assert!(report.is_balanced());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_leaves_the_items_waiting_for_busy_keys_unfinished_without_waiting_out_the_ttl()
    {
        let store = MemoryStore::new();
        crashed_holder(&store, 0..5).await;
        let handle = Pipeline::from_iter(0..10u32)
            .idempotent(store.clone(), |x| *x)
            .run()
            .spawn();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let stopped = tokio::time::Instant::now();
        handle.stop();
        let report = handle.join().await.unwrap();
        assert!(
            stopped.elapsed() < Duration::from_secs(10),
            "no wait for the TTL"
        );
        assert_eq!(report.outcome, crate::RunOutcome::Stopped);
        let s = report.stage("idempotent").unwrap();
        assert_eq!((s.received, s.passed, s.unfinished), (10, 5, 5));
        assert!(report.is_balanced());
        // The waiting keys were not committed: a rerun takes them up once they are free.
        let r = store.reserve(&keys(0..5), Duration::from_secs(1)).await;
        assert!(r.unwrap().iter().all(|a| *a == Reservation::Busy));
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
