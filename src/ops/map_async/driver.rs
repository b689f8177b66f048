//! The driver task of an async stage: pulls input, starts calls within the limits, polls the
//! calls in flight, and sends results on in input order (or as they finish), with every item
//! accounted for.
//!
//! The driver knows its policies only as [`Admission`]s (asked in order before each call)
//! and a [`RetryPolicy`]; a stage without any pays one branch per item for them.

use std::collections::{BTreeSet, BinaryHeap, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt as _};
use hdrhistogram::Histogram;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::PollSender;

use crate::error::{FailedInput, Failure, ItemError};
use crate::policy::{Admission, Again, Failed, Finished, Held, RetryPolicy, Verdict};
use crate::report::{StageStats, latency_histogram};
use crate::runtime::chunk::{CHUNK_CAP, Chunk, Outcome, Ticket};
use crate::runtime::gate::GateHold;
use crate::runtime::{RunCtx, Upstream};

use super::builder::Options;
use super::call::{Call, Completion, Meta, Slot, StageFn, make, poll_slot};
use super::routed::{Route, with_attempt};
use super::transient::Down;

/// How many calls one timed call stands for, by the call's sequence number: every one of
/// a stage's first calls, then one in 8, then one in 64. Reading the clock twice costs
/// about as much as a trivial call, so a busy stage times few of its calls; a timed call
/// is recorded with this weight, so the percentiles stay those of all calls.
fn sample_stride(seq: u64) -> u64 {
    match seq {
        0..1_024 => 1,
        1_024..65_536 => 8,
        _ => 64,
    }
}
/// Every this many timed calls, the driver checks whether its latency sample is due to be
/// merged into the shared stats (for live snapshots).
const MERGE_EVERY: u64 = 64;
/// How stale the live latency of a stage may get. Merging adds whole histograms (thousands
/// of buckets), so a busy stage merges on time, not on every few hundred calls.
const MERGE_INTERVAL: Duration = Duration::from_millis(100);
/// The most items a stage keeps in retry backoff before it stops taking new ones.
const MAX_PARKED: usize = 4 * CHUNK_CAP;
/// The least reorder window of an ordered stage without `ordered_window`.
const DEFAULT_WINDOW: usize = CHUNK_CAP;

#[allow(clippy::too_many_arguments)]
pub(super) async fn drive<T, U, S>(
    up: Upstream<T>,
    call: S,
    options: Options,
    keep: Option<fn(&T) -> FailedInput>,
    copy: Option<fn(&T) -> T>,
    route: Option<Route<T, U>>,
    stats: Arc<StageStats>,
    run: Arc<RunCtx>,
    tx: tokio::sync::mpsc::Sender<Chunk<U>>,
) where
    T: Send + 'static,
    U: Send + 'static,
    S: StageFn<T, U>,
{
    let admissions: Vec<Box<dyn Admission>> =
        options.policies.iter().map(|p| p.admission()).collect();
    let retry = options.retry.as_ref().map(|r| r.stage());
    let plain = admissions.is_empty()
        && retry.is_none()
        && keep.is_none()
        && copy.is_none()
        && route.is_none()
        && !options.trace_calls;
    let mut driver = Driver {
        plain,
        up,
        up_done: false,
        waiting: VecDeque::new(),
        call,
        keep,
        copy,
        route,
        trace_calls: options.trace_calls,
        timeout: options.timeout,
        inflight: FuturesUnordered::new(),
        spare: None,
        waiting_calls: None,
        workers: options.workers.max(1),
        ordered: options.ordered,
        window: options.window,
        next_seq: 0,
        next_emit: 0,
        reorder: VecDeque::new(),
        out: Chunk::default(),
        tx: PollSender::new(tx),
        stats: stats.clone(),
        run: run.clone(),
        hist: latency_histogram(),
        timed: 0,
        merged_at: Instant::now(),
        limited: admissions.iter().any(|a| a.limit().is_some()),
        times_calls: admissions.iter().any(|a| a.times_calls()),
        admissions,
        granted: 0,
        next_call: 0,
        pause: None,
        held: VecDeque::new(),
        pause_job: retry.as_ref().is_some_and(|r| r.pauses_source()),
        retry,
        backoff: Backoff::default(),
        dead: None,
        down: options
            .transient
            .map(|t| Down::new(t, run.outage_policy.watch(stats.name.clone()))),
        stopping: false,
    };
    let (cancel, stopping) = (run.cancel.clone(), run.stopping.clone());
    // `stopping` fires on a stop and on a cancel: one wait for both, as cheap as the wait
    // for a cancel alone.
    let heard = tokio::select! {
        biased;
        _ = stopping.cancelled() => true,
        _ = std::future::poll_fn(|cx| driver.poll_drive(cx)) => false,
    };
    let cancelled = heard
        && (cancel.is_cancelled() || {
            // A graceful stop: nothing new starts, the calls in flight finish.
            driver.stop();
            tokio::select! {
                biased;
                _ = cancel.cancelled() => true,
                _ = std::future::poll_fn(|cx| driver.poll_drive(cx)) => false,
            }
        });
    // Cancelled, or the next stage is gone: what the stage holds is left unfinished.
    stats.left(driver.held());
    if cancelled {
        stats.discarded(driver.up.discard());
    }
    stats.merge_latency(&mut driver.hist);
}

/// An ordered stage's place for a result until the ones before it are out.
enum Done<U> {
    Ok(U, Ticket),
    Failed,
    /// Left unfinished by a stop (it was waiting to be tried again).
    Left,
}

/// What the admissions said about the next call.
enum Admitted {
    Go,
    Refuse,
    /// Not yet: admission `usize` is what the call waits for.
    Wait(usize),
}

/// An item waiting for its next attempt.
struct Parked<T> {
    at: Instant,
    id: u64,
    item: T,
    meta: Meta,
}

impl<T> PartialEq for Parked<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.id) == (other.at, other.id)
    }
}
impl<T> Eq for Parked<T> {}
impl<T> PartialOrd for Parked<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Parked<T> {
    /// Reversed: `BinaryHeap` pops the earliest first.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.at, other.id).cmp(&(self.at, self.id))
    }
}

/// The retry delay queue.
struct Backoff<T> {
    heap: BinaryHeap<Parked<T>>,
    /// Backoff over: start these before new items.
    due: VecDeque<(T, Meta)>,
    sleep: Option<Pin<Box<Sleep>>>,
    next_id: u64,
    /// Keeps the run's source paused while items wait (`Retry::pause_source`).
    hold: Option<GateHold>,
}

impl<T> Default for Backoff<T> {
    fn default() -> Self {
        Backoff {
            heap: BinaryHeap::new(),
            due: VecDeque::new(),
            sleep: None,
            next_id: 0,
            hold: None,
        }
    }
}

impl<T> Backoff<T> {
    fn len(&self) -> usize {
        self.heap.len() + self.due.len()
    }
}

/// A call that had to wait, in the in-flight set.
type Waiting<T, U, S> = Call<<S as StageFn<T, U>>::Future, T>;

struct Driver<T, U, S: StageFn<T, U>> {
    /// No policy, retry, kept input, result routing or call span: items start in
    /// [`Driver::start_plain`]'s tight loop.
    plain: bool,
    up: Upstream<T>,
    up_done: bool,
    /// Received, not yet started (at most one chunk).
    waiting: VecDeque<(T, Ticket)>,
    call: S,
    keep: Option<fn(&T) -> FailedInput>,
    copy: Option<fn(&T) -> T>,
    /// `results`: a failed item becomes an output.
    route: Option<Route<T, U>>,
    /// A span per call.
    trace_calls: bool,
    timeout: Option<Duration>,
    inflight: FuturesUnordered<Waiting<T, U, S>>,
    /// The slot of the last call that finished at its first poll, reused by the next call.
    spare: Option<Slot<S::Future>>,
    /// Calls waiting in `inflight`, oldest first, kept only while a stall watchdog asks
    /// for call ages (`RunCtx::watch_calls`): it then sees one stuck call even while the
    /// other workers keep completing.
    waiting_calls: Option<BTreeSet<(Instant, u64)>>,
    workers: usize,
    ordered: bool,
    /// `ordered_window`, if given.
    window: Option<usize>,
    next_seq: u64,
    /// Ordered mode: the sequence number of `reorder[0]`.
    next_emit: u64,
    reorder: VecDeque<Option<Done<U>>>,
    out: Chunk<U>,
    tx: PollSender<Chunk<U>>,
    stats: Arc<StageStats>,
    run: Arc<RunCtx>,
    hist: Histogram<u64>,
    timed: u64,
    merged_at: Instant,
    /// The stage's policies, in the order given: a call starts when each has let it through.
    admissions: Vec<Box<dyn Admission>>,
    /// `admissions[..granted]` have let the next call through.
    granted: usize,
    /// The id the next call is admitted under.
    next_call: u64,
    /// Some admission sets the limit on calls in flight (instead of `workers`).
    limited: bool,
    /// Some admission wants every call timed.
    times_calls: bool,
    /// Held while an admission wants the run's source paused.
    pause: Option<GateHold>,
    retry: Option<Box<dyn RetryPolicy>>,
    /// Items whose failed call an admission holds to be tried again (a pausing breaker).
    held: VecDeque<(T, Meta, ItemError)>,
    /// The retry pauses the job: no first attempt starts while an item is in backoff.
    pause_job: bool,
    backoff: Backoff<T>,
    /// Why the call can never be made (its service failed in `poll_ready`): every item left
    /// fails with it, without a call.
    dead: Option<ItemError>,
    /// `transient_if`: the server's state, and the items waiting for it.
    down: Option<Down<T>>,
    /// The run is stopping: no call starts; what comes in is left unfinished.
    stopping: bool,
}

impl<T, U, S> Driver<T, U, S>
where
    T: Send + 'static,
    U: Send + 'static,
    S: StageFn<T, U>,
{
    fn limit(&self) -> usize {
        if !self.limited {
            return self.workers;
        }
        self.admissions
            .iter()
            .filter_map(|a| a.limit())
            .min()
            .unwrap_or(self.workers)
    }

    /// Whether another call may start. Calls in flight count against the limit; an ordered
    /// stage also bounds its reorder window (items started and not yet emitted, whether in
    /// flight, finished, or waiting to be tried again). The window is its own bound, larger
    /// than the workers by default, so that one item held back (a slow call, a backoff)
    /// does not stop the others. An item to be tried again is already in the window, so
    /// only the calls in flight bound it — else a finished item waiting for it to be
    /// emitted could hold its place forever.
    fn can_start(&self) -> bool {
        let limit = self.limit();
        if self.out.len() >= CHUNK_CAP || self.inflight.len() >= limit {
            return false;
        }
        if !self.ordered || !self.backoff.due.is_empty() {
            return true;
        }
        let window = self
            .window
            .unwrap_or_else(|| limit.saturating_mul(4).max(DEFAULT_WINDOW));
        // A probe of the stage's server is already in the window (it was started before),
        // and the window may be full of items waiting for it.
        ((self.next_seq - self.next_emit) as usize) < window || self.probe_ready()
    }

    /// Whether new items wait: an item of a stage whose retry pauses the job is in backoff,
    /// so nothing new starts (the source is held too) until its wait is over.
    fn job_paused(&self) -> bool {
        self.pause_job && !self.backoff.heap.is_empty()
    }

    /// Whether the stage's server is down (`transient_if`): only a probe may start.
    fn server_down(&self) -> bool {
        self.down.as_ref().is_some_and(|d| d.watch.is_down())
    }

    fn probe_ready(&self) -> bool {
        self.down.as_ref().is_some_and(|d| d.ready.is_some())
    }

    /// How many items could start now (pulls a chunk if none is waiting).
    fn available(&mut self, cx: &mut Context<'_>) -> usize {
        if self.stopping {
            self.drain_upstream(cx);
            return 0;
        }
        if self.server_down() {
            return usize::from(self.probe_ready());
        }
        let due = self.backoff.due.len();
        if self.job_paused() {
            return due;
        }
        if self.waiting.is_empty() && !self.up_done && (due > 0 || self.backoff.len() < MAX_PARKED)
        {
            match self.up.poll_chunk(cx) {
                Poll::Ready(Some(chunk)) => {
                    StageStats::add(&self.stats.received, chunk.len());
                    self.waiting.extend(chunk.into_pairs());
                }
                Poll::Ready(None) => self.up_done = true,
                Poll::Pending => {}
            }
        }
        due + self.waiting.len()
    }

    /// The next item to start: a retry whose backoff is over, else a new one.
    fn pop_input(&mut self) -> Option<(T, Meta)> {
        if self.stopping {
            return None;
        }
        if let Some(d) = self.down.as_mut().filter(|d| d.watch.is_down()) {
            return d.ready.take();
        }
        if let Some(d) = self.backoff.due.pop_front() {
            return Some(d);
        }
        if self.job_paused() {
            return None;
        }
        let (item, ticket) = self.waiting.pop_front()?;
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.ordered {
            self.reorder.push_back(None);
        }
        Some((item, Meta::new(seq, ticket)))
    }

    fn start(&mut self, item: T, mut meta: Meta, cx: &mut Context<'_>) {
        meta.attempts += 1;
        let timed = self.times_calls || meta.seq % sample_stride(meta.seq) == 0;
        if meta.attempts == 1 {
            if let Some(r) = self.retry.as_mut() {
                r.first_attempt();
                if r.needs_first_at() {
                    meta.set_first_at(Instant::now());
                }
            }
        }
        if let Some(keep) = self.keep {
            if !meta.has_input() {
                meta.set_input(keep(&item));
            }
        }
        let again = self.copy.map(|c| c(&item));
        // In the call's span (`trace_calls`): making the future, its first poll here, and
        // every later poll (`Call::poll`).
        let _in_span = if self.trace_calls {
            let span = tracing::info_span!(
                target: "flowline",
                "call",
                seq = meta.seq,
                attempt = meta.attempts,
                outcome = tracing::field::Empty,
            );
            meta.set_span(span.clone());
            Some(span.entered())
        } else {
            None
        };
        let call = &mut self.call;
        // A stage that can try an item again tells the call which attempt it makes.
        let made = if again.is_some() {
            with_attempt(meta.attempts, || make(|| call.call(item)))
        } else {
            make(|| call.call(item))
        };
        let fut = match made {
            Ok(fut) => fut,
            Err(e) => return self.complete(meta, Err(e), None, again, true),
        };
        let mut slot = match self.spare.take() {
            Some(mut slot) => {
                slot.as_mut().set(Some(fut));
                slot
            }
            None => Box::pin(Some(fut)),
        };
        let start = timed.then(Instant::now);
        match poll_slot(&mut slot, cx) {
            Poll::Ready(result) => {
                self.spare = Some(slot);
                let latency = start.map(|s| s.elapsed());
                self.complete(meta, result, latency, again, true)
            }
            Poll::Pending => {
                let mut call = Call::waiting(slot, meta, again, self.timeout, start);
                if let Some(waiting) = self.waiting_calls.as_mut() {
                    let at = Instant::now();
                    if let Some(seq) = call.mark_waiting(at) {
                        waiting.insert((at, seq));
                    }
                }
                self.inflight.push(call)
            }
        }
    }

    /// Asks the admissions, in order, to let the next call (`call`) through. An admission's
    /// leave is kept until the call starts; if one refuses, the ones before it are told.
    fn admit(&mut self, cx: &mut Context<'_>, available: usize) -> Admitted {
        let call = self.next_call;
        let room = self.limit().saturating_sub(self.inflight.len()).max(1);
        let want = available.min(room);
        while let Some(a) = self.admissions.get_mut(self.granted) {
            match a.poll_admit(cx, call, want) {
                Poll::Ready(Verdict::Go) => self.granted += 1,
                Poll::Ready(Verdict::Refuse) => {
                    for a in &mut self.admissions[..self.granted] {
                        a.cancel(call);
                    }
                    self.granted = 0;
                    self.next_call += 1;
                    return Admitted::Refuse;
                }
                Poll::Pending => return Admitted::Wait(self.granted),
            }
        }
        self.granted = 0;
        self.next_call += 1;
        for a in &mut self.admissions {
            a.started(call);
        }
        Admitted::Go
    }

    /// Whether the next call may start: the call's own readiness (a tower service's
    /// `poll_ready`), a panic there counted as its error.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ItemError>> {
        let call = &mut self.call;
        match catch_unwind(AssertUnwindSafe(|| call.poll_ready(cx))) {
            Ok(Poll::Ready(Ok(()))) => Poll::Ready(Ok(())),
            Ok(Poll::Ready(Err(e))) => Poll::Ready(Err(ItemError::User(Arc::from(e)))),
            Ok(Poll::Pending) => Poll::Pending,
            Err(panic) => Poll::Ready(Err(ItemError::from_panic(&*panic))),
        }
    }

    /// The service said it cannot take calls any more: the stage reports it, and every item
    /// left fails with the same error.
    fn service_failed(&mut self, error: ItemError) {
        self.run.stage_failed(&self.stats.name, error.clone());
        self.dead = Some(error);
    }

    /// Fails the next item with `CircuitOpen` (refused by an admission).
    fn refuse(&mut self) {
        self.fail_next(ItemError::CircuitOpen);
    }

    /// Fails the next item without a call, keeping its input as a call would have.
    fn fail_next(&mut self, error: ItemError) {
        if let Some((item, mut meta)) = self.pop_input() {
            if let Some(keep) = self.keep {
                if !meta.has_input() {
                    meta.set_input(keep(&item));
                }
            }
            self.complete(meta, Err(error), None, Some(item), false);
        }
    }

    /// Holds the run's source paused while some admission wants it. True if the pause ended.
    fn poll_pause(&mut self, cx: &mut Context<'_>) -> bool {
        let mut wanted = false;
        for a in &mut self.admissions {
            wanted |= a.poll_pause(cx);
        }
        match (wanted, self.pause.is_some()) {
            (true, false) => {
                self.pause = Some(self.run.gate.hold());
                false
            }
            (false, true) => {
                self.pause = None;
                true
            }
            _ => false,
        }
    }

    /// Whether an admission holds the item of a failed call to be tried again.
    fn holds(&mut self, meta: &Meta, error: &ItemError, latency: Option<Duration>) -> bool {
        let finished = Finished {
            call: meta.call,
            error: Some(error),
            latency,
            in_flight: self.inflight.len() + 1,
            attempts: meta.attempts,
        };
        let mut hold = false;
        for a in &mut self.admissions {
            hold |= a.hold(&finished);
        }
        hold
    }

    /// Decides on the items held for an admission (a pausing breaker): tried again, failed,
    /// or kept. `idle`: nothing else in the stage can decide it (an undecided hold goes
    /// again). True if they moved.
    fn poll_held(&mut self, cx: &mut Context<'_>, idle: bool) -> bool {
        let mut verdict = Held::Fail;
        for a in &mut self.admissions {
            verdict = match (verdict, a.poll_held(cx)) {
                (Held::Wait, _) | (_, Held::Wait) => Held::Wait,
                (Held::Undecided, _) | (_, Held::Undecided) => Held::Undecided,
                (Held::Again, _) | (_, Held::Again) => Held::Again,
                _ => Held::Fail,
            };
        }
        match verdict {
            Held::Wait => false,
            Held::Undecided if !idle => false,
            Held::Undecided | Held::Again => {
                for (item, meta, _) in self.held.drain(..) {
                    self.backoff.due.push_back((item, meta));
                }
                true
            }
            Held::Fail => {
                while let Some((item, meta, error)) = self.held.pop_front() {
                    self.complete(meta, Err(error), None, Some(item), false);
                }
                true
            }
        }
    }

    /// Moves retries whose backoff is over to `due`. True if one moved.
    fn poll_backoff(&mut self, cx: &mut Context<'_>) -> bool {
        let b = &mut self.backoff;
        let mut changed = false;
        loop {
            let now = Instant::now();
            while b.heap.peek().is_some_and(|p| p.at <= now) {
                if let Some(p) = b.heap.pop() {
                    b.due.push_back((p.item, p.meta));
                    changed = true;
                }
            }
            let Some(at) = b.heap.peek().map(|p| p.at) else {
                b.hold = None;
                break;
            };
            let sleep = b
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
            if sleep.deadline() != at {
                sleep.as_mut().reset(at);
            }
            if sleep.as_mut().poll(cx).is_pending() {
                break;
            }
        }
        changed
    }

    /// Parks a failed call's item for another attempt if the retry policy allows; else
    /// gives its meta and its copy back, with the error to fail it with instead of the
    /// call's own, if the policy gave one.
    fn park(
        &mut self,
        meta: Meta,
        error: &ItemError,
        again: Option<T>,
    ) -> Option<(Meta, Option<T>, Option<ItemError>)> {
        let Some(r) = self.retry.as_mut() else {
            return Some((meta, again, None));
        };
        let failed = Failed {
            attempts: meta.attempts,
            first_at: meta.first_at(),
            error,
        };
        let at = match r.again(&failed) {
            Again::At(at) => at,
            Again::No => return Some((meta, again, None)),
            Again::GiveUp(instead) => return Some((meta, again, Some(instead))),
        };
        let pauses = r.pauses_source();
        let Some(item) = again else {
            return Some((meta, again, None));
        };
        if self.stopping {
            // No call starts after a stop: the item is left unfinished, not failed.
            self.leave(meta);
            self.stats.left(1);
            return None;
        }
        if pauses && self.backoff.hold.is_none() {
            self.backoff.hold = Some(self.run.gate.hold());
        }
        StageStats::add(&self.stats.retried, 1);
        let b = &mut self.backoff;
        let id = b.next_id;
        b.next_id += 1;
        b.heap.push(Parked { at, id, item, meta });
        None
    }

    /// Records a timed call's latency with the weight of the calls it stands for.
    fn record_latency(&mut self, seq: u64, latency: Duration) {
        let weight = if self.times_calls {
            1
        } else {
            sample_stride(seq)
        };
        let nanos = latency.as_nanos().min(u64::MAX as u128) as u64;
        let _ = self.hist.record_n(nanos, weight);
        self.timed += 1;
        if self.timed % MERGE_EVERY == 0 && self.merged_at.elapsed() >= MERGE_INTERVAL {
            self.merged_at = Instant::now();
            self.stats.merge_latency(&mut self.hist);
        }
    }

    /// Starts calls of a plain stage while the limits allow and input waits: the work of
    /// `pop_input`, `start` and `complete` for the common case in one loop, without the
    /// per-item questions a plain stage always answers the same way. A call ready at its
    /// first poll in input order goes straight to `out`; any other takes the general path
    /// (`complete`, the in-flight set). True if an item started.
    fn start_plain(&mut self, cx: &mut Context<'_>) -> bool {
        let mut started = false;
        loop {
            if !self.can_start() || (self.waiting.is_empty() && self.available(cx) == 0) {
                return started;
            }
            // A service must be ready before each call; a closure always is.
            if !S::ALWAYS_READY {
                match self.poll_ready(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(error)) => {
                        // The general path fails every item left with it.
                        self.service_failed(error);
                        return true;
                    }
                    Poll::Pending => return started,
                }
            }
            let Some((item, ticket)) = self.waiting.pop_front() else {
                return started;
            };
            started = true;
            let seq = self.next_seq;
            self.next_seq += 1;
            // Ordered: nothing started before it is still out, so it may go out at once.
            let in_order = !self.ordered || self.reorder.is_empty();
            let call = &mut self.call;
            let fut = match make(|| call.call(item)) {
                Ok(fut) => fut,
                Err(e) => {
                    self.plain_slow(seq, ticket, Err(e), None);
                    continue;
                }
            };
            let mut slot = match self.spare.take() {
                Some(mut slot) => {
                    slot.as_mut().set(Some(fut));
                    slot
                }
                None => Box::pin(Some(fut)),
            };
            let start = (seq % sample_stride(seq) == 0).then(Instant::now);
            match poll_slot(&mut slot, cx) {
                Poll::Ready(result) => {
                    self.spare = Some(slot);
                    let latency = start.map(|s| s.elapsed());
                    match result {
                        Ok(u) if in_order => {
                            if let Some(l) = latency {
                                self.record_latency(seq, l);
                            }
                            self.out.push(u, ticket);
                            if self.ordered {
                                self.next_emit += 1;
                            }
                        }
                        result => self.plain_slow(seq, ticket, result, latency),
                    }
                }
                Poll::Pending => {
                    if self.ordered {
                        self.reorder.push_back(None);
                    }
                    let mut meta = Meta::new(seq, ticket);
                    meta.attempts = 1;
                    let mut call = Call::waiting(slot, meta, None, self.timeout, start);
                    if let Some(waiting) = self.waiting_calls.as_mut() {
                        let at = Instant::now();
                        if let Some(seq) = call.mark_waiting(at) {
                            waiting.insert((at, seq));
                        }
                    }
                    self.inflight.push(call);
                }
            }
        }
    }

    /// A plain stage's call that finished at once but cannot go straight out (it failed,
    /// or an earlier item is still in flight): the general path.
    fn plain_slow(
        &mut self,
        seq: u64,
        ticket: Ticket,
        result: Result<U, ItemError>,
        latency: Option<Duration>,
    ) {
        if self.ordered {
            self.reorder.push_back(None);
        }
        let mut meta = Meta::new(seq, ticket);
        meta.attempts = 1;
        self.complete(meta, result, latency, None, true);
    }

    /// Accounts for a finished call (or an item refused without one: `called` false), and
    /// emits its result, fails it, or parks it for another attempt.
    fn complete(
        &mut self,
        meta: Meta,
        result: Result<U, ItemError>,
        latency: Option<Duration>,
        again: Option<T>,
        called: bool,
    ) {
        let mut meta = meta;
        if self.trace_calls {
            meta.end_span(match &result {
                Ok(_) => "ok",
                Err(e) => e.kind(),
            });
        }
        if let Some(l) = latency {
            self.record_latency(meta.seq, l);
        }
        if !self.admissions.is_empty() && called {
            let finished = Finished {
                call: meta.call,
                error: result.as_ref().err(),
                latency,
                in_flight: self.inflight.len() + 1,
                attempts: meta.attempts,
            };
            for a in &mut self.admissions {
                a.finished(&finished);
            }
        }
        let (mut meta, mut again, mut result) = (meta, again, result);
        if self.down.is_some() {
            match self.ride_out(meta, result, again, called) {
                Ok(()) => return,
                Err(back) => (meta, result, again) = back,
            }
        }
        if let (true, true, Err(e)) = (self.retry.is_some(), called, &result) {
            match self.park(meta, e, again) {
                Some((m, a, instead)) => {
                    (meta, again) = (m, a);
                    if let Some(error) = instead {
                        result = Err(error);
                    }
                }
                None => return,
            }
        }
        let (result, again) = match (called, again, result) {
            (true, Some(item), Err(error)) if self.holds(&meta, &error, latency) => {
                if self.stopping {
                    self.leave(meta);
                    self.stats.left(1);
                } else {
                    self.held.push_back((item, meta, error));
                }
                return;
            }
            (_, again, result) => (result, again),
        };
        let slot = match (result, self.route, again) {
            (Ok(u), _, _) => Done::Ok(u, meta.ticket),
            (Err(error), Some(route), Some(input)) => {
                let out = route(input, error, meta.attempts, &self.stats.name);
                Done::Ok(out, meta.ticket)
            }
            (Err(error), _, _) => {
                StageStats::add(&self.stats.failed, 1);
                let input = meta.take_input();
                meta.ticket.finish(Outcome::Failed);
                self.run.fail(Failure {
                    stage: self.stats.name.clone(),
                    error,
                    attempts: meta.attempts,
                    input,
                });
                Done::Failed
            }
        };
        if !self.ordered {
            if let Done::Ok(u, t) = slot {
                self.out.push(u, t);
            }
            return;
        }
        self.reorder[(meta.seq - self.next_emit) as usize] = Some(slot);
        self.emit_in_order();
    }

    /// `transient_if`: takes the item of a call that failed with a transient error, to be
    /// tried again when the server answers (Ok), and notes an answer of the server; gives
    /// back whatever it does not take.
    #[allow(clippy::type_complexity)]
    fn ride_out(
        &mut self,
        mut meta: Meta,
        result: Result<U, ItemError>,
        again: Option<T>,
        called: bool,
    ) -> Result<(), (Meta, Result<U, ItemError>, Option<T>)> {
        let Some(d) = self.down.as_mut() else {
            return Err((meta, result, again));
        };
        let is_probe = d.probe == Some(meta.seq);
        if !called {
            // Refused by an admission (a fail-fast breaker): no answer either way, but the
            // probe's place is free for the next one.
            if is_probe {
                d.probe = None;
            }
            return Err((meta, result, again));
        }
        let transient = matches!(&result, Err(e) if (d.transient.0)(e));
        let (true, Some(item)) = (transient, again.as_ref()) else {
            // An answer (a result, or an error that is not the server being down): the
            // server is up.
            if d.watch.is_down() || is_probe {
                self.server_back();
            }
            return Err((meta, result, again));
        };
        let _ = item;
        let (Err(error), Some(item)) = (result, again) else {
            unreachable!("checked above")
        };
        StageStats::add(&self.stats.transient_retries, 1);
        // Not an attempt: the next call of the item is its attempt again.
        meta.attempts = meta.attempts.saturating_sub(1);
        if self.stopping {
            self.leave(meta);
            self.stats.left(1);
            return Ok(());
        }
        if is_probe || !d.watch.is_down() {
            // The first failure of an outage, or the probe's: the watch says how long to
            // wait, or that the outage has lasted too long.
            d.probe = None;
            match d.watch.failed(error) {
                Ok(wait) => {
                    let at = crate::runtime::time::after(Instant::now(), wait);
                    match d.sleep.as_mut() {
                        Some(sleep) => sleep.as_mut().reset(at),
                        None => d.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
                    }
                }
                // Cancels the run: the items waiting here end unfinished.
                Err(outage) => self.run.outage_ended(outage),
            }
            if d.hold.is_none() {
                d.hold = Some(self.run.gate.hold());
            }
        }
        if is_probe {
            d.queue.push_front((item, meta));
        } else {
            d.queue.push_back((item, meta));
        }
        Ok(())
    }

    /// The server answered: the outage is over. The items that waited for it go first (in
    /// the order they failed), then the job resumes.
    fn server_back(&mut self) {
        let Some(d) = self.down.as_mut() else {
            return;
        };
        d.watch.succeeded();
        d.probe = None;
        d.sleep = None;
        d.hold = None;
        let due = &mut self.backoff.due;
        for waited in d.ready.take().into_iter().chain(d.queue.drain(..)).rev() {
            due.push_front(waited);
        }
    }

    /// While the server is down: when the wait is over, the first waiting item becomes the
    /// probe. True if one did.
    fn poll_outage(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(d) = self.down.as_mut() else {
            return false;
        };
        if !d.watch.is_down() || d.probe.is_some() || d.queue.is_empty() {
            return false;
        }
        if let Some(sleep) = d.sleep.as_mut() {
            if sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
        }
        let Some((item, meta)) = d.queue.pop_front() else {
            return false;
        };
        d.probe = Some(meta.seq);
        d.ready = Some((item, meta));
        true
    }

    /// A graceful stop: the items not started (received and not begun, waiting for a retry,
    /// for a breaker or for the server) end unfinished here; the calls in flight finish.
    fn stop(&mut self) {
        self.stopping = true;
        let mut left = self.waiting.len();
        self.waiting.clear();
        let mut metas: Vec<Meta> = Vec::new();
        metas.extend(self.backoff.heap.drain().map(|p| p.meta));
        metas.extend(self.backoff.due.drain(..).map(|(_, m)| m));
        metas.extend(self.held.drain(..).map(|(_, m, _)| m));
        self.backoff.hold = None;
        if let Some(d) = self.down.as_mut() {
            metas.extend(
                d.ready
                    .take()
                    .into_iter()
                    .chain(d.queue.drain(..))
                    .map(|(_, m)| m),
            );
            d.probe = None;
            d.sleep = None;
            d.hold = None;
        }
        left += metas.len();
        for meta in metas {
            self.leave(meta);
        }
        self.stats.left(left);
        self.emit_in_order();
    }

    /// An item started before is left unfinished (its ticket goes with it, unfinished): its
    /// place in the output order is passed over, and the results behind it that are done go
    /// out now (no later completion may come to send them). Counted by the caller.
    fn leave(&mut self, meta: Meta) {
        if self.ordered {
            let at = (meta.seq - self.next_emit) as usize;
            if let Some(slot) = self.reorder.get_mut(at) {
                *slot = Some(Done::Left);
            }
            self.emit_in_order();
        }
    }

    /// Stopping: what comes from upstream is received and left unfinished.
    fn drain_upstream(&mut self, cx: &mut Context<'_>) {
        while !self.up_done {
            match self.up.poll_chunk(cx) {
                Poll::Ready(Some(chunk)) => self.stats.discarded(chunk.len()),
                Poll::Ready(None) => self.up_done = true,
                Poll::Pending => break,
            }
        }
    }

    /// Ordered: sends on the results at the front of the order that are done.
    fn emit_in_order(&mut self) {
        while let Some(Some(_)) = self.reorder.front() {
            if let Some(Some(Done::Ok(u, t))) = self.reorder.pop_front() {
                self.out.push(u, t);
            }
            self.next_emit += 1;
        }
    }

    /// The items the stage holds: received and not yet passed on, dropped or failed.
    fn held(&self) -> usize {
        let finished_in_order = self
            .reorder
            .iter()
            .filter(|d| matches!(d, Some(Done::Ok(..))))
            .count();
        self.waiting.len()
            + self.inflight.len()
            + self.backoff.len()
            + self.held.len()
            + self.down.as_ref().map_or(0, Down::len)
            + finished_in_order
            + self.out.len()
    }

    /// Sends `out` if the hop has room. `Ready(Err)` means the downstream is gone.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, ()>> {
        if self.out.is_empty() {
            return Poll::Ready(Ok(false));
        }
        match self.tx.poll_reserve(cx) {
            Poll::Ready(Ok(())) => {
                let chunk = std::mem::take(&mut self.out);
                let n = chunk.len();
                if let Err(e) = self.tx.send_item(chunk) {
                    // Kept, so that the stage counts it as left in it.
                    if let Some(chunk) = e.into_inner() {
                        self.out = chunk;
                    }
                    return Poll::Ready(Err(()));
                }
                StageStats::add(&self.stats.passed, n);
                StageStats::add(&self.stats.emitted, n);
                Poll::Ready(Ok(true))
            }
            Poll::Ready(Err(_)) => Poll::Ready(Err(())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_drive(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.waiting_calls.is_none() && self.run.watch_calls.load(Ordering::Relaxed) {
            self.waiting_calls = Some(BTreeSet::new());
        }
        let r = self.poll_drive_inner(cx);
        if let Some(w) = &self.waiting_calls {
            self.stats
                .set_oldest_call(w.first().map(|&(at, _)| at), self.run.epoch);
        }
        r
    }

    fn poll_drive_inner(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let mut progress = false;
            match self.poll_flush(cx) {
                Poll::Ready(Err(())) => return Poll::Ready(()),
                Poll::Ready(Ok(sent)) => progress |= sent,
                Poll::Pending => {}
            }
            while !self.inflight.is_empty() {
                match self.inflight.poll_next_unpin(cx) {
                    Poll::Ready(Some(mut c)) => {
                        if let (Some(w), Some(at)) =
                            (self.waiting_calls.as_mut(), c.meta.take_waiting_since())
                        {
                            w.remove(&(at, c.meta.seq));
                        }
                        let Completion {
                            meta,
                            result,
                            latency,
                            again,
                            called,
                        } = c;
                        self.complete(meta, result, latency, again, called);
                        progress = true;
                    }
                    _ => break,
                }
            }
            if !self.admissions.is_empty() {
                progress |= self.poll_pause(cx);
            }
            if !self.backoff.heap.is_empty() {
                progress |= self.poll_backoff(cx);
            }
            if !self.held.is_empty() {
                progress |= self.poll_held(cx, false);
            }
            if self.server_down() {
                progress |= self.poll_outage(cx);
            }
            // A stage whose service failed leaves the plain loop: its items fail below; so
            // does a stopping one: it starts nothing.
            let plain = self.plain && self.dead.is_none() && !self.stopping;
            if plain {
                progress |= self.start_plain(cx);
            }
            // The admission the next call waits for, if any.
            let mut waits_on = None;
            while !plain && self.can_start() {
                let available = self.available(cx);
                if available == 0 {
                    break;
                }
                // The call itself must be ready before the gates let it through, so that a
                // permit is taken right when the call can start.
                if self.dead.is_none() {
                    match self.poll_ready(cx) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(error)) => self.service_failed(error),
                        Poll::Pending => break,
                    }
                }
                if let Some(error) = &self.dead {
                    self.fail_next(error.clone());
                } else if self.admissions.is_empty() {
                    if let Some((item, meta)) = self.pop_input() {
                        self.start(item, meta, cx);
                    }
                } else {
                    let call = self.next_call;
                    match self.admit(cx, available) {
                        Admitted::Go => {
                            if let Some((item, mut meta)) = self.pop_input() {
                                meta.call = call;
                                self.start(item, meta, cx);
                            }
                        }
                        Admitted::Refuse => self.refuse(),
                        Admitted::Wait(at) => {
                            waits_on = Some(at);
                            break;
                        }
                    }
                }
                progress = true;
            }
            if !self.admissions.is_empty() {
                for (i, a) in self.admissions.iter_mut().enumerate() {
                    if waits_on != Some(i) {
                        a.idle();
                    }
                }
                if waits_on.is_some() {
                    // A gate that just closed (a breaker that opened) pauses the source now.
                    progress |= self.poll_pause(cx);
                }
            }
            if !progress && !self.held.is_empty() && self.inflight.is_empty() {
                progress |= self.poll_held(cx, true);
            }
            if self.stopping && !self.up_done {
                self.drain_upstream(cx);
            }
            if self.up_done
                && self.waiting.is_empty()
                && self.inflight.is_empty()
                && self.held.is_empty()
                && self.backoff.len() == 0
                && self.down.as_ref().is_none_or(|d| d.len() == 0)
                && self.reorder.is_empty()
                && self.out.is_empty()
            {
                self.poll_pause(cx);
                return Poll::Ready(());
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// A plain stage (no policy, no retry) over 3,000 items whose calls are ready at once,
    /// wait (every 7th), fail (every 97th), or panic when made (100) or when polled (200):
    /// returns what came out, in order, and the report.
    async fn plain_mix(ordered: bool) -> (Vec<u32>, Report) {
        let out = Arc::new(Mutex::new(Vec::new()));
        let seen = out.clone();
        let stage = Pipeline::from_iter(0..3_000u32)
            .try_map_async("mix", |x| {
                assert_ne!(x, 100, "panics when made");
                async move {
                    assert_ne!(x, 200, "panics when polled");
                    if x % 7 == 0 {
                        tokio::time::sleep(Duration::from_millis(u64::from(x % 5) + 1)).await;
                    }
                    if x % 97 == 0 { Err("bad") } else { Ok(x) }
                }
            })
            .workers(8);
        let stage = if ordered { stage } else { stage.unordered() };
        let report = stage
            .inspect(move |x| seen.lock().unwrap().push(*x))
            .run()
            .await
            .unwrap();
        let out = out.lock().unwrap().clone();
        (out, report)
    }

    fn expected() -> Vec<u32> {
        (0..3_000u32)
            .filter(|x| x % 97 != 0 && *x != 100 && *x != 200)
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_plain_ordered_stage_mixes_quick_and_waiting_calls_in_input_order() {
        let (out, report) = plain_mix(true).await;
        assert_eq!(out, expected());
        assert_eq!(report.failures, 3_000 - expected().len() as u64);
        assert!(report.is_balanced());
    }

    #[tokio::test(start_paused = true)]
    async fn a_plain_unordered_stage_accounts_for_every_item() {
        let (mut out, report) = plain_mix(false).await;
        // Unordered: a waiting call does not hold the quick ones behind it.
        assert_ne!(out, expected());
        out.sort_unstable();
        assert_eq!(out, expected());
        assert_eq!(report.failures, 3_000 - expected().len() as u64);
        assert!(report.is_balanced());
    }

    /// An ordered stage stopped while its first item's call is in flight, the results behind
    /// it already done: the first call fails after the stop, and whether its item would be
    /// tried again (a retry) or held (a pausing breaker), it is left unfinished and the
    /// results behind it go out; the run ends.
    async fn stopped_with_a_failing_first_call(retry: Option<Retry>, breaker: Option<Breaker>) {
        let out = Arc::new(Mutex::new(Vec::new()));
        let seen = out.clone();
        let mut work = Pipeline::from_iter(1..=3u32)
            .try_map_async("work", |x| async move {
                let ms = if x == 1 { 30 } else { 5 };
                tokio::time::sleep(Duration::from_millis(ms)).await;
                if x == 1 { Err("down") } else { Ok(x) }
            })
            .workers(3);
        if let Some(retry) = retry {
            work = work.retry(retry);
        }
        if let Some(breaker) = breaker {
            work = work.circuit_breaker(breaker);
        }
        let handle = work
            .for_each(move |x| {
                seen.lock().unwrap().push(x);
                async {}
            })
            .deadline(Duration::from_secs(3600))
            .spawn();
        tokio::time::sleep(Duration::from_millis(10)).await;
        handle.stop();
        let report = handle.join().await.unwrap();
        assert_eq!(report.outcome, RunOutcome::Stopped);
        assert_eq!(*out.lock().unwrap(), vec![2, 3]);
        let work = report.stage("work").unwrap();
        assert_eq!((work.passed, work.failed, work.unfinished), (2, 0, 1));
        assert!(report.is_balanced(), "{report}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_leaves_an_item_due_for_a_retry_and_sends_the_results_behind_it() {
        let retry = Retry::exponential(Duration::from_millis(10)).max_attempts(3);
        stopped_with_a_failing_first_call(Some(retry), None).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_leaves_an_item_a_pausing_breaker_holds_and_sends_the_results_behind_it() {
        let breaker = Breaker::consecutive_failures(1)
            .cooldown(Duration::from_millis(50))
            .on_open(OnOpen::Pause);
        stopped_with_a_failing_first_call(None, Some(breaker)).await;
    }
}
