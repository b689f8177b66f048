//! `idempotent(store, key)`: an item whose key is already done (in this run or an earlier
//! one) is skipped and counted as dropped.
//!
//! Two-phase: the key is reserved when the item enters the stage (one store call per
//! chunk), and committed only when the item has finished the whole pipeline successfully —
//! delivered to the sink, or dropped by design further on. If the item fails, the store is
//! told so ([`Store::fail`](crate::Store::fail): the reservation is released, and a store
//! may remember the key as failed); if the run is cancelled before the item finished, the
//! reservation is released. Either way the next run processes it again. This rides on the
//! item's completion ticket: the stage wraps each item's ticket in one whose callback
//! queues the key for a committer task, which writes in batches and finishes before the run
//! returns. [`Idempotent::committed`] is the barrier of those writes: a later stage that
//! waits on it starts no call while an item that ended is not yet written.
//!
//! A key that another holder has reserved (not expired) is not done: some other run is
//! processing it, or a run that crashed left it reserved. Its item waits — the stage asks
//! for the key again, with growing pauses, while later items go on — until the other holder
//! commits it (the item is then dropped as done), lets go of it or its reservation expires
//! (the item then goes on), or `.busy_wait(d)` passes (default: the reservation TTL); then
//! the item fails with an error saying whose key it waited for, and goes to the dead
//! letters. It is never counted as done: a cursor's checkpoint stays behind it, and the
//! report shows it. A reservation is a lease of the TTL (default 20 seconds, `.ttl(d)`),
//! renewed every third of the TTL while its item is worked on, so a live run keeps its keys
//! however long an item takes, and a crashed run's keys are free again within the TTL: with
//! the default wait a restarted run takes them over once they expire. A graceful stop does
//! not wait for busy keys: their items are left unfinished (the checkpoint stays before
//! them) and a rerun takes them up.
//!
//! The store is a server the run needs, not a part of any item: a failed store call never
//! fails an item. Every call (reserve, commit, renew, release) goes through the run's
//! [`Outage`](crate::Outage) policy: while the store fails, the job pauses (the sources pull
//! nothing) and the call is tried again after a growing wait; commits and releases are never
//! dropped. An outage longer than the policy ends the run with
//! [`Error::Outage`](crate::Error::Outage): the items it held are left unfinished, their
//! keys are not committed, and no checkpoint passes them, so a rerun does them.
//!
//! An item that waited comes out after the items that did not: the stage keeps input order
//! only among items whose keys were free.

use std::collections::{HashMap, VecDeque};
use std::fmt::Display;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::Permanent;
use crate::Pipeline;
use crate::failure::{BoxError, Failure, ItemError};
use crate::policy::committed::Committed;
use crate::report::StageStats;
use crate::runtime::chunk::{CHUNK_CAP, Chunk, Outcome, Ticket};
use crate::runtime::hop::{HOP_CHUNKS, hop};
use crate::runtime::{CancelWatch, RunCtx, Upstream, next_chunk};
use crate::store::guarded::Guarded;
use crate::store::{Reservation, Store};
use crate::util::time::after;

/// How long a reservation lasts unless [`Idempotent::ttl`] says otherwise. Short, because
/// it is renewed while its item is worked on: it only says how long a crashed holder's keys
/// stay blocked.
pub(crate) const DEFAULT_RESERVATION_TTL: Duration = Duration::from_secs(20);

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
    committed: Committed,
    on_skip: Option<OnSkip<T>>,
}

/// What `on_skip` is given: each item skipped because its key is done.
type OnSkip<T> = Box<dyn FnMut(T) + Send>;

impl<T, S, F> Idempotent<T, S, F> {
    /// How long a reservation lasts unless renewed (default 20 s, so a crashed run's keys are free well within half a minute); the stage renews the
    /// reservations of the items it is working on every third of it, so it need not cover
    /// the time an item takes, only a pause of the whole process (and the store's round
    /// trip). It is how long a crashed run's keys stay blocked. Must be more than zero.
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

    /// The barrier of this stage's commits: its [`wait`](Committed::wait) resolves once
    /// every item that ended before the call has its key written to the store. As a
    /// [`Limit`](crate::Limit) on a later stage, no call of that stage starts while an item
    /// that ended is not yet written, so that a crash repeats at most the calls in flight.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use flowline::MemoryStore;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let stage = Pipeline::from_iter(0..10u32).idempotent(MemoryStore::new(), |x| *x);
    /// let committed = stage.committed();
    /// let report = stage
    ///     .map_async("job", |x| async move { x })
    ///     .workers(2)
    ///     .limit(committed)
    ///     .run().await.unwrap();
    /// assert_eq!(report.delivered(), 10);
    /// # }
    /// ```
    pub fn committed(&self) -> Committed {
        self.committed.clone()
    }

    /// Calls `f` with each item skipped because its key is done (in this run or an earlier
    /// one), as it is dropped.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use flowline::MemoryStore;
    /// use std::sync::{Arc, Mutex};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let store = MemoryStore::new();
    /// Pipeline::from_iter([1, 2]).idempotent(store.clone(), |x| *x).run().await.unwrap();
    /// let skipped = Arc::new(Mutex::new(Vec::new()));
    /// let s = skipped.clone();
    /// Pipeline::from_iter([1, 2, 3])
    ///     .idempotent(store, |x| *x)
    ///     .on_skip(move |x| s.lock().unwrap().push(x))
    ///     .run().await.unwrap();
    /// assert_eq!(*skipped.lock().unwrap(), vec![1, 2]);
    /// # }
    /// ```
    pub fn on_skip(mut self, f: impl FnMut(T) + Send + 'static) -> Self {
        self.on_skip = Some(Box::new(f));
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
        committed: Committed::new(),
        on_skip: None,
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
            committed,
            on_skip,
        } = self;
        let busy_wait = busy_wait.unwrap_or(ttl);
        p.then(move |b, up| {
            let stats = b.stage("idempotent", "idempotent");
            let store: Arc<dyn Store> = Arc::new(store);
            let calls = Arc::new(Guarded::new(
                b.run.clone(),
                format!("idempotency store of stage `{}`", stats.name),
            ));
            let held = Arc::new(Held::default());
            let (done_tx, done_rx) = mpsc::unbounded_channel();
            b.spawn(committer(
                store.clone(),
                calls.clone(),
                held.clone(),
                ttl,
                done_rx,
                committed.clone(),
            ));
            let (tx, rx) = hop(HOP_CHUNKS, &stats);
            let stage = Reserver {
                stats,
                run: b.run.clone(),
                store,
                calls,
                held,
                ttl,
                busy_wait,
                done: done_tx,
                committed,
                on_skip,
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
    calls: Arc<Guarded>,
    held: Arc<Held>,
    ttl: Duration,
    busy_wait: Duration,
    done: mpsc::UnboundedSender<Finished>,
    committed: Committed,
    on_skip: Option<OnSkip<T>>,
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
    /// done ones dropped, busy ones kept waiting (or failed once their wait is over). The
    /// reservation is retried while the store fails (the job pauses meanwhile). `None`: the
    /// run was cancelled, or the store's outage ended it (the items are counted as left).
    async fn settle(
        &mut self,
        items: Vec<(T, Ticket, String, Instant)>,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Option<Chunk<T>> {
        let n = items.len();
        let keys: Vec<String> = items.iter().map(|i| i.2.clone()).collect();
        let (store, held, keys_ref, ttl) = (&self.store, &self.held, &keys, self.ttl);
        let mut tries = 0u32;
        let reserved = self
            .calls
            .call(Some(cancel), move || {
                tries += 1;
                let retry = tries > 1;
                async move {
                    let mut answers = store.reserve(keys_ref, ttl).await?;
                    if answers.len() != n {
                        // A store that miscounts cannot be trusted with these keys: retrying
                        // will not fix it, and no item may be passed over on its word.
                        return Err(BoxError::from(Permanent::new(format!(
                            "idempotency store answered {} reservations for {n} keys",
                            answers.len()
                        ))));
                    }
                    if retry {
                        reclaim(&**store, held, keys_ref, &mut answers, ttl).await?;
                    }
                    Ok(answers)
                }
            })
            .await;
        drop(keys);
        match reserved {
            Some(answers) => Some(self.sort(items, answers)),
            None => {
                self.stats.left(n);
                None
            }
        }
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
                    self.held.add(&key);
                    let (done, committed) = (self.done.clone(), self.committed.clone());
                    let on_done = Box::new(move |o: Outcome| {
                        committed.ended(|| {
                            let _ = done.send((key, o));
                        });
                    });
                    out.push(item, Ticket::with_parents(vec![ticket], Some(on_done)));
                }
                Reservation::AlreadyDone => {
                    dropped += 1;
                    ticket.finish(Outcome::Done);
                    if let Some(f) = self.on_skip.as_mut() {
                        f(item);
                    }
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

/// The keys this stage has reserved and not yet committed or released: the reservations it
/// renews. Counted, since a key released and reserved again may be in the map twice for a
/// moment.
#[derive(Default)]
struct Held(Mutex<HashMap<String, u32>>);

impl Held {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add(&self, key: &str) {
        *self.lock().entry(key.to_string()).or_insert(0) += 1;
    }

    fn remove(&self, keys: &[String]) {
        let mut map = self.lock();
        for k in keys {
            if let Some(n) = map.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    map.remove(k);
                }
            }
        }
    }

    fn keys(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }
}

/// After a reserve that failed and was tried again: a failed call may have reserved keys
/// before its answer was lost, and the store then answers `Busy` for them, this holder's own
/// reservations. Those this stage does not hold for another item are asked for with a
/// renewal, which succeeds only for this holder's reservations: they are taken as reserved
/// (the first copy of a key in the chunk only).
async fn reclaim(
    store: &dyn Store,
    held: &Held,
    keys: &[String],
    answers: &mut [Reservation],
    ttl: Duration,
) -> Result<(), BoxError> {
    let mut mine: std::collections::HashSet<&str> = keys
        .iter()
        .zip(answers.iter())
        .filter(|(_, a)| **a == Reservation::Reserved)
        .map(|(k, _)| k.as_str())
        .collect();
    let ask: Vec<usize> = {
        let in_flight = held.lock();
        let mut seen = std::collections::HashSet::new();
        (0..keys.len())
            .filter(|&i| answers[i] == Reservation::Busy)
            .filter(|&i| !in_flight.contains_key(&keys[i]) && !mine.contains(keys[i].as_str()))
            .filter(|&i| seen.insert(keys[i].as_str()))
            .collect()
    };
    if ask.is_empty() {
        return Ok(());
    }
    let asked: Vec<String> = ask.iter().map(|&i| keys[i].clone()).collect();
    let ours = store.renew(&asked, ttl).await?;
    for (&i, ours) in ask.iter().zip(ours) {
        if ours && mine.insert(keys[i].as_str()) {
            answers[i] = Reservation::Reserved;
        }
    }
    Ok(())
}

/// Keys per renewal call.
const RENEW_CHUNK: usize = 1024;

/// Commits the keys of items that finished well and releases the others, a batch at a
/// time, and renews the reservations still held every third of the TTL. Every call is
/// retried while the store fails, until the outage policy gives up. It ends when every
/// ticket it could hear from has finished (all senders dropped), which the run awaits: the
/// commits are written before the run returns.
async fn committer(
    store: Arc<dyn Store>,
    calls: Arc<Guarded>,
    held: Arc<Held>,
    ttl: Duration,
    mut done: mpsc::UnboundedReceiver<Finished>,
    committed: Committed,
) {
    let every = (ttl / 3).max(Duration::from_millis(1));
    let mut renew_at = after(Instant::now(), every);
    let mut buf = Vec::with_capacity(256);
    loop {
        tokio::select! {
            // The renewal first: a busy stream of finished items must not starve it.
            biased;
            _ = tokio::time::sleep_until(renew_at) => {
                renew(&*store, &calls, &held, ttl).await;
                renew_at = after(Instant::now(), every);
                continue;
            }
            n = done.recv_many(&mut buf, 1024) => if n == 0 { break },
        }
        let n = buf.len();
        let (mut commit, mut fail, mut release) = (Vec::new(), Vec::new(), Vec::new());
        for (key, outcome) in buf.drain(..) {
            match outcome {
                Outcome::Done => commit.push(key),
                Outcome::Failed => fail.push(key),
                Outcome::Cancelled => release.push(key),
            }
        }
        for (keys, what) in [(commit, "commit"), (fail, "fail"), (release, "release")] {
            if keys.is_empty() {
                continue;
            }
            let (store, k) = (&store, &keys);
            let written = calls
                .call(None, move || async move {
                    match what {
                        "commit" => store.commit(k).await,
                        "fail" => store.fail(k).await,
                        _ => store.release(k).await,
                    }
                })
                .await;
            if written.is_none() {
                tracing::error!(
                    keys = keys.len(),
                    "idempotency {what} not written: the store's outage ended the run"
                );
            }
            held.remove(&keys);
        }
        // Written, or given up on with the run (its outage ended it): no call waits longer.
        committed.settled(n);
    }
}

/// Renews every reservation still held, a chunk of keys per call.
async fn renew(store: &dyn Store, calls: &Guarded, held: &Held, ttl: Duration) {
    let keys = held.keys();
    for chunk in keys.chunks(RENEW_CHUNK) {
        let Some(held) = calls.call(None, || store.renew(chunk, ttl)).await else {
            return;
        };
        let lost = held.iter().filter(|h| !**h).count();
        if lost > 0 {
            // Finished meanwhile (their commit is on its way), or taken over after a pause
            // longer than the TTL: those items may run twice.
            tracing::debug!(lost, "reservations no longer held at renewal");
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;
    use crate::{MemoryStore, Reservation, Store, StoreFuture};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
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

    /// A holder that reserved keys with the default TTL and never finishes them: a process
    /// that crashed.
    async fn crashed_holder(store: &MemoryStore, range: std::ops::Range<u32>) {
        let dead = store.handle();
        let r = dead
            .reserve(&keys(range), super::DEFAULT_RESERVATION_TTL)
            .await;
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
        // The crashed holder's reservations ran out (the default TTL) before they were taken
        // over, and no later than that.
        let took = started.elapsed();
        let ttl = super::DEFAULT_RESERVATION_TTL;
        assert!(
            took >= ttl && took < ttl + Duration::from_secs(6),
            "{took:?}"
        );
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

    /// A [`MemoryStore`] whose server can be taken down: while `down`, every call fails with
    /// a lost connection, before or (`after_write`) after it has changed the state.
    #[derive(Clone)]
    struct Flaky {
        inner: MemoryStore,
        down: Arc<AtomicBool>,
        after_write: bool,
        failed: Arc<AtomicU64>,
    }

    impl Flaky {
        fn new(inner: MemoryStore) -> Self {
            Flaky {
                inner,
                down: Arc::default(),
                after_write: false,
                failed: Arc::default(),
            }
        }

        fn gate<'a, T: Send + 'a>(&'a self, op: StoreFuture<'a, T>) -> StoreFuture<'a, T> {
            Box::pin(async move {
                let down = self.down.load(Ordering::Relaxed);
                if down && !self.after_write {
                    self.failed.fetch_add(1, Ordering::Relaxed);
                    return Err(refused());
                }
                let r = op.await;
                if down {
                    self.failed.fetch_add(1, Ordering::Relaxed);
                    return Err(refused());
                }
                r
            })
        }
    }

    fn refused() -> crate::BoxError {
        Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connection refused",
        ))
    }

    impl Store for Flaky {
        fn reserve<'a>(
            &'a self,
            keys: &'a [String],
            ttl: Duration,
        ) -> StoreFuture<'a, Vec<Reservation>> {
            self.gate(self.inner.reserve(keys, ttl))
        }
        fn commit<'a>(&'a self, keys: &'a [String]) -> StoreFuture<'a, ()> {
            self.gate(self.inner.commit(keys))
        }
        fn release<'a>(&'a self, keys: &'a [String]) -> StoreFuture<'a, ()> {
            self.gate(self.inner.release(keys))
        }
        fn renew<'a>(&'a self, keys: &'a [String], ttl: Duration) -> StoreFuture<'a, Vec<bool>> {
            self.gate(self.inner.renew(keys, ttl))
        }
    }

    /// Takes `down` down at `from` and brings it back at `to` (paused clock).
    fn outage(down: Arc<AtomicBool>, from: Duration, to: Option<Duration>) {
        tokio::spawn(async move {
            tokio::time::sleep(from).await;
            down.store(true, Ordering::Relaxed);
            if let Some(to) = to {
                tokio::time::sleep(to - from).await;
                down.store(false, Ordering::Relaxed);
            }
        });
    }

    /// A source of `0..n`, one item per call, counting its pulls.
    fn counted(n: u32, pulls: Arc<AtomicU64>) -> Pipeline<u32> {
        let mut next = 0;
        Pipeline::from_fn(move || {
            let item = (next < n).then_some(next);
            next += 1;
            pulls.fetch_add(1, Ordering::Relaxed);
            std::future::ready(item)
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_outage_pauses_the_job_fails_nothing_and_it_resumes() {
        for after_write in [false, true] {
            let state = MemoryStore::new();
            let mut store = Flaky::new(state.clone());
            store.after_write = after_write;
            // Down from 1 s to 11 s, with 20,000 items of 10 ms each through 8 workers (800 a second).
            outage(
                store.down.clone(),
                Duration::from_secs(1),
                Some(Duration::from_secs(11)),
            );
            let pulls = Arc::new(AtomicU64::new(0));
            let p = pulls.clone();
            let watcher = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let at_2 = p.load(Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(8)).await;
                (at_2, p.load(Ordering::Relaxed))
            });
            let (mut out, report) = counted(20_000, pulls)
                .idempotent(store.clone(), |x| *x)
                .map_async("work", |x| async move {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    x
                })
                .workers(8)
                .collect_with_report()
                .await
                .unwrap();
            let (at_2, at_10) = watcher.await.unwrap();
            assert_eq!(at_2, at_10, "the source pulled while the store was down");
            assert!(at_10 < 20_000, "{at_10}");
            assert!(store.failed.load(Ordering::Relaxed) > 10);
            assert!(
                report.elapsed > Duration::from_secs(11),
                "{:?}",
                report.elapsed
            );
            out.sort_unstable();
            assert_eq!(
                out,
                (0..20_000).collect::<Vec<_>>(),
                "after_write {after_write}"
            );
            assert_eq!(
                (report.failures, report.outcome),
                (0, crate::RunOutcome::Completed)
            );
            let r = state
                .reserve(&keys(0..20_000), Duration::from_secs(1))
                .await;
            assert!(
                r.unwrap().iter().all(|a| *a == Reservation::AlreadyDone),
                "every key committed"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_past_the_policy_ends_the_run_with_its_items_unfinished_and_uncommitted() {
        let state = MemoryStore::new();
        let store = Flaky::new(state.clone());
        outage(store.down.clone(), Duration::from_secs(1), None);
        let delivered: Arc<Mutex<Vec<u32>>> = Arc::default();
        let d = delivered.clone();
        let started = tokio::time::Instant::now();
        let err = Pipeline::from_iter(0..20_000u32)
            .idempotent(store, |x| *x)
            .map_async("work", |x| async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                x
            })
            .workers(8)
            .for_each(move |x| {
                d.lock().unwrap().push(x);
                async {}
            })
            .outage(crate::Outage::keep_trying_for(Duration::from_secs(5)))
            .await
            .unwrap_err();
        let crate::Error::Outage { error, report } = &err else {
            panic!("{err}")
        };
        // Given up 5 s after the first failure, which came at 1 s.
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(6) && took < Duration::from_secs(8),
            "{took:?}"
        );
        assert!(
            error
                .to_string()
                .starts_with("idempotency store of stage `idempotent` unreachable for 5"),
            "{error}"
        );
        assert!(err.to_string().contains("connection refused"), "{err}");
        assert_eq!(report.outcome, crate::RunOutcome::Outage);
        assert_eq!(report.failures, 0, "nothing failed for the outage");
        assert!(report.is_balanced());
        let delivered = delivered.lock().unwrap().clone();
        assert!(delivered.len() < 20_000);
        // The source was held from the first failure on: it pulled no more.
        assert!(report.stages[0].passed < 20_000);
        // The keys done are those of delivered items, no other: a rerun does the rest.
        let delivered: std::collections::HashSet<u32> = delivered.into_iter().collect();
        let answers = state
            .reserve(&keys(0..20_000), Duration::from_secs(1))
            .await
            .unwrap();
        for (k, a) in answers.iter().enumerate() {
            if *a == Reservation::AlreadyDone {
                assert!(
                    delivered.contains(&(k as u32)),
                    "{k} committed, never delivered"
                );
            }
        }
        let done = answers
            .iter()
            .filter(|a| **a == Reservation::AlreadyDone)
            .count();
        assert!(done > 0 && done < 20_000, "{done}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_item_keeps_its_key_while_renewed_and_a_crashed_one_frees_it_within_the_ttl() {
        let store = MemoryStore::new();
        let other = store.handle();
        let ttl = Duration::from_secs(3);
        let k0 = keys(0..1);
        let o = other.clone();
        let probe = tokio::spawn(async move {
            // Every second for a minute, far past the TTL: the key stays the working run's.
            let mut answers = Vec::new();
            for _ in 0..60 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                answers.push(o.reserve(&keys(0..1), ttl).await.unwrap()[0]);
            }
            answers
        });
        let report = Pipeline::from_iter([0u32])
            .idempotent(store.clone(), |x| *x)
            .ttl(ttl)
            .map_async("slow", |x| async move {
                tokio::time::sleep(Duration::from_secs(90)).await;
                x
            })
            .run()
            .await
            .unwrap();
        assert_eq!(report.delivered(), 1);
        let answers = probe.await.unwrap();
        assert!(
            answers.iter().all(|a| *a == Reservation::Busy),
            "{answers:?}"
        );
        assert_eq!(
            other.reserve(&k0, ttl).await.unwrap(),
            vec![Reservation::AlreadyDone]
        );
    }

    /// A [`MemoryStore`] whose writes take `delay` (a slow disk), recording how many keys
    /// each kind of write was given.
    #[derive(Clone)]
    struct Slow {
        inner: MemoryStore,
        delay: Duration,
        committed: Arc<AtomicU64>,
        written: Arc<Mutex<Vec<Written>>>,
    }

    /// A write of [`Slow`]: its kind and its keys.
    type Written = (&'static str, Vec<String>);

    impl Slow {
        fn new(delay: Duration) -> Self {
            Slow {
                inner: MemoryStore::new(),
                delay,
                committed: Arc::default(),
                written: Arc::default(),
            }
        }

        fn write<'a>(
            &'a self,
            what: &'static str,
            keys: &'a [String],
            op: StoreFuture<'a, ()>,
        ) -> StoreFuture<'a, ()> {
            Box::pin(async move {
                tokio::time::sleep(self.delay).await;
                op.await?;
                self.written.lock().unwrap().push((what, keys.to_vec()));
                if what == "commit" {
                    self.committed
                        .fetch_add(keys.len() as u64, Ordering::SeqCst);
                }
                Ok(())
            })
        }
    }

    impl Store for Slow {
        fn reserve<'a>(
            &'a self,
            keys: &'a [String],
            ttl: Duration,
        ) -> StoreFuture<'a, Vec<Reservation>> {
            self.inner.reserve(keys, ttl)
        }
        fn commit<'a>(&'a self, keys: &'a [String]) -> StoreFuture<'a, ()> {
            self.write("commit", keys, self.inner.commit(keys))
        }
        fn release<'a>(&'a self, keys: &'a [String]) -> StoreFuture<'a, ()> {
            self.write("release", keys, self.inner.release(keys))
        }
        fn fail<'a>(&'a self, keys: &'a [String]) -> StoreFuture<'a, ()> {
            self.write("fail", keys, self.inner.fail(keys))
        }
        fn renew<'a>(&'a self, keys: &'a [String], ttl: Duration) -> StoreFuture<'a, Vec<bool>> {
            self.inner.renew(keys, ttl)
        }
    }

    /// 300 jobs of uneven length on 4 workers, each writing its own result, with commits
    /// that take 3 ms: when a job starts, every job that ended before is committed, so
    /// that the jobs started and not committed (what a crash would run again) are never
    /// more than the 4 in flight.
    #[tokio::test(start_paused = true)]
    async fn a_stage_gated_by_the_commits_starts_no_job_before_the_ended_ones_are_committed() {
        let store = Slow::new(Duration::from_millis(3));
        let committed = store.committed.clone();
        let stage = Pipeline::from_iter(0..300u32).idempotent(store.clone(), |x| *x);
        let barrier = stage.committed();
        let started = Arc::new(AtomicU64::new(0));
        let worst = Arc::new(AtomicU64::new(0));
        let (s, w) = (started.clone(), worst.clone());
        let report = stage
            .map_async("job", move |x| {
                let n = s.fetch_add(1, Ordering::SeqCst) + 1;
                let open = n - committed.load(Ordering::SeqCst);
                w.fetch_max(open, Ordering::SeqCst);
                async move {
                    tokio::time::sleep(Duration::from_millis(1 + u64::from(x % 7))).await;
                    x
                }
            })
            .workers(4)
            .done_if(|_| true)
            .limit(barrier.clone())
            .run()
            .await
            .unwrap();
        assert_eq!(report.stage("job").unwrap().dropped, 300);
        assert_eq!(store.committed.load(Ordering::SeqCst), 300);
        let worst = worst.load(Ordering::SeqCst);
        assert!(worst <= 4, "{worst} jobs started and not committed at once");
    }

    /// `wait` resolves at once with nothing pending, and otherwise once the items that
    /// ended before it are committed, not the ones that end after.
    #[tokio::test(start_paused = true)]
    async fn wait_resolves_once_the_items_ended_before_it_are_committed() {
        let store = Slow::new(Duration::from_secs(1));
        let stage = Pipeline::from_iter(0..2u32).idempotent(store.clone(), |x| *x);
        let barrier = stage.committed();
        let t0 = tokio::time::Instant::now();
        barrier.wait().await;
        assert_eq!(t0.elapsed(), Duration::ZERO, "nothing pending: at once");
        let b = barrier.clone();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let handle = stage
            .map_async("job", |x| async move {
                // Item 1 ends 5 s after item 0.
                tokio::time::sleep(Duration::from_secs(5 * u64::from(x))).await;
                x
            })
            .workers(2)
            .done_if(|_| true)
            .run()
            .spawn();
        let waiter = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await; // item 0 ended
            b.wait().await;
            s.lock().unwrap().push(t0.elapsed());
        });
        waiter.await.unwrap();
        // Item 0's commit took 1 s; item 1 (ended at 5 s) was not waited for.
        assert_eq!(*seen.lock().unwrap(), vec![Duration::from_secs(1)]);
        handle.join().await.unwrap();
        let t = tokio::time::Instant::now();
        barrier.wait().await;
        assert_eq!(
            t.elapsed(),
            Duration::ZERO,
            "all committed by the run's end"
        );
    }

    /// A failed item's key goes to `Store::fail`; an item left unfinished by a stop is
    /// released; a done one committed.
    #[tokio::test(start_paused = true)]
    async fn a_failed_item_is_failed_in_the_store_and_an_unfinished_one_released() {
        let store = Slow::new(Duration::from_millis(1));
        let handle = Pipeline::from_iter(0..4u32)
            .idempotent(store.clone(), |x| *x)
            .try_map_async("job", |x| async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if x == 1 { Err("no") } else { Ok(x) }
            })
            .workers(2)
            .run()
            .spawn();
        tokio::time::sleep(Duration::from_millis(500)).await;
        handle.stop();
        let report = handle.join().await.unwrap();
        assert_eq!((report.delivered(), report.failures), (1, 1));
        let mut written = store.written.lock().unwrap().clone();
        written.sort();
        assert_eq!(
            written,
            vec![
                ("commit", keys(0..1)),
                ("fail", keys(1..2)),
                ("release", keys(2..4)),
            ]
        );
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
