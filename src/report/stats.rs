//! The live counters of a stage: updated on the hot path, read by snapshots and the report.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use hdrhistogram::Histogram;

use super::{BUILT_IN, FailureReasons, LatencySummary, StageReport};
use crate::failure::ItemError;

/// The counters of a stage that exactly one owner updates (a fused operator or a source:
/// whoever holds the stage by `&mut` is its only writer). The owner keeps running totals
/// and publishes them with plain stores: on the hottest path, a chain of fused operators
/// over small items, five locked atomic adds per operator per chunk were a measurable share
/// of the work (`core/fused8`). Readers (snapshots, the report) see the same values.
#[derive(Debug, Default)]
pub(crate) struct OwnedCounts {
    received: u64,
    passed: u64,
    emitted: u64,
    dropped: u64,
    failed: u64,
}

impl OwnedCounts {
    /// Counts one processed chunk and publishes the totals to `stats`.
    #[inline]
    pub(crate) fn chunk(
        &mut self,
        stats: &StageStats,
        received: usize,
        passed: usize,
        emitted: usize,
        dropped: usize,
        failed: usize,
    ) {
        self.received += received as u64;
        self.passed += passed as u64;
        self.emitted += emitted as u64;
        self.dropped += dropped as u64;
        self.failed += failed as u64;
        stats.publish(self);
    }
}

/// Live counters of one stage. Updated per chunk (never per item) with relaxed atomics.
pub struct StageStats {
    pub(crate) name: Arc<str>,
    pub(crate) kind: &'static str,
    pub(crate) received: AtomicU64,
    pub(crate) passed: AtomicU64,
    pub(crate) emitted: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) retried: AtomicU64,
    /// Items a window stage found late (also counted where they went: failed, or passed
    /// on a side output).
    pub(crate) late: AtomicU64,
    /// Calls that failed with an error the stage's `transient_if` calls transient, tried
    /// again after the outage waits (not attempts, not failures).
    pub(crate) transient_retries: AtomicU64,
    /// Items of a keyed async stage that waited behind a busy key.
    pub(crate) key_waits: AtomicU64,
    /// Failed items by reason, in [`FailureReasons::NAMES`] order. Counted where every
    /// failure passes (`RunCtx::fail`), so that the stages that count `failed` need not.
    failed_by: [AtomicU64; BUILT_IN],
    /// Failed items by the reasons of the policies that refused them (few: a list).
    refused_by: Mutex<Vec<(&'static str, u64)>>,
    /// Items counted where a run left them: in a stage's buffers, calls or queues when the
    /// run was cancelled. Counted, never derived from the other counters, so that an item a
    /// stage lost (neither passed on, dropped, failed, nor held) shows as an imbalance.
    pub(crate) unfinished: AtomicU64,
    latency: Mutex<Option<Histogram<u64>>>,
    /// When the oldest call still in flight started, as nanoseconds after the run's epoch
    /// plus one (0: none, or not tracked). Kept only while a stall watchdog asks.
    oldest_call: AtomicU64,
    /// Of the items this stage sent on through a queue (a hop), how many the next stage has
    /// taken; `u64::MAX` while the stage sends into no queue (its items go on in the same
    /// task). Counted by the queue's reader, per chunk.
    taken_on: AtomicU64,
}

impl StageStats {
    pub(crate) fn new(name: Arc<str>, kind: &'static str) -> Self {
        StageStats {
            name,
            kind,
            received: AtomicU64::new(0),
            passed: AtomicU64::new(0),
            emitted: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            late: AtomicU64::new(0),
            transient_retries: AtomicU64::new(0),
            key_waits: AtomicU64::new(0),
            failed_by: Default::default(),
            refused_by: Mutex::new(Vec::new()),
            unfinished: AtomicU64::new(0),
            latency: Mutex::new(None),
            oldest_call: AtomicU64::new(0),
            taken_on: AtomicU64::new(u64::MAX),
        }
    }

    /// The stage sends its items on through a queue, whose reader counts what it takes.
    pub(crate) fn sends_through_queue(&self) {
        let _ = self
            .taken_on
            .compare_exchange(u64::MAX, 0, Relaxed, Relaxed);
    }

    /// Counts `n` items the next stage took from this stage's queue.
    #[inline]
    pub(crate) fn taken_on(&self, n: usize) {
        Self::add(&self.taken_on, n);
    }

    /// Items this stage sent on that wait in the queue to the next stage, not yet taken
    /// (`None`: the stage sends into no queue). The stage counts what it sent after the
    /// send, so the figure may briefly read low, never high.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) fn queued(&self) -> Option<u64> {
        let taken = self.taken_on.load(Relaxed);
        (taken != u64::MAX).then(|| self.emitted.load(Relaxed).saturating_sub(taken))
    }

    #[inline]
    pub(crate) fn add(counter: &AtomicU64, n: usize) {
        if n > 0 {
            counter.fetch_add(n as u64, Relaxed);
        }
    }

    /// Counts one failed item's reason (its count in `failed` is the stage's own).
    pub(crate) fn failed_because(&self, error: &ItemError) {
        let reason = error.kind();
        if let Some(i) = FailureReasons::index(reason) {
            self.failed_by[i].fetch_add(1, Relaxed);
            return;
        }
        let mut refused = self.refused_by.lock().unwrap_or_else(|p| p.into_inner());
        match refused.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, n)) => *n += 1,
            None => refused.push((reason, 1)),
        }
    }

    /// Counts `n` items the stage still held when it ended: they stay unfinished.
    #[inline]
    pub(crate) fn left(&self, n: usize) {
        Self::add(&self.unfinished, n);
    }

    /// Counts `n` items thrown away from the queues in front of the stage when the run was
    /// cancelled: received by the stage, and left unfinished in it.
    #[inline]
    pub(crate) fn discarded(&self, n: usize) {
        Self::add(&self.received, n);
        Self::add(&self.unfinished, n);
    }

    /// Counts one processed chunk of a 1:1 (or 1:n) operator.
    #[inline]
    pub(crate) fn chunk(
        &self,
        received: usize,
        passed: usize,
        emitted: usize,
        dropped: usize,
        failed: usize,
    ) {
        Self::add(&self.received, received);
        Self::add(&self.passed, passed);
        Self::add(&self.emitted, emitted);
        Self::add(&self.dropped, dropped);
        Self::add(&self.failed, failed);
    }

    /// Publishes the running totals of a stage's only writer (see [`OwnedCounts`]).
    #[inline]
    fn publish(&self, c: &OwnedCounts) {
        self.received.store(c.received, Relaxed);
        self.passed.store(c.passed, Relaxed);
        self.emitted.store(c.emitted, Relaxed);
        self.dropped.store(c.dropped, Relaxed);
        self.failed.store(c.failed, Relaxed);
    }

    pub(crate) fn set_oldest_call(
        &self,
        at: Option<tokio::time::Instant>,
        epoch: tokio::time::Instant,
    ) {
        let v = at.map_or(0, |at| {
            at.saturating_duration_since(epoch).as_nanos() as u64 + 1
        });
        self.oldest_call.store(v, Relaxed);
    }

    /// When the oldest call in flight started (stages that time their calls, while watched).
    pub(crate) fn oldest_call(&self, epoch: tokio::time::Instant) -> Option<tokio::time::Instant> {
        match self.oldest_call.load(Relaxed) {
            0 => None,
            v => Some(epoch + Duration::from_nanos(v - 1)),
        }
    }

    /// Merges a task-local latency histogram (nanoseconds) into the stage's.
    pub(crate) fn merge_latency(&self, local: &mut Histogram<u64>) {
        if local.is_empty() {
            return;
        }
        let mut slot = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        match slot.as_mut() {
            Some(h) => {
                let _ = h.add(&*local);
            }
            None => *slot = Some(local.clone()),
        }
        local.reset();
    }

    /// A copy of the stage's latency histogram (nanoseconds), if any call was timed.
    #[cfg(feature = "metrics")]
    pub(crate) fn latency_histogram(&self) -> Option<Histogram<u64>> {
        self.latency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The stage's counts. While the run goes on (`ended` false), `unfinished` is what is
    /// in flight: received and not yet passed, dropped or failed. Once every task of the run
    /// has ended, it is what the stages counted as left behind, so that
    /// [`StageReport::is_balanced`] checks every item's end rather than restating it.
    pub(crate) fn snapshot(&self, ended: bool) -> StageReport {
        let received = self.received.load(Relaxed);
        let passed = self.passed.load(Relaxed);
        let dropped = self.dropped.load(Relaxed);
        let failed = self.failed.load(Relaxed);
        let latency = self
            .latency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(LatencySummary::from_histogram);
        let failed_by = FailureReasons::from_counts(
            std::array::from_fn(|i| self.failed_by[i].load(Relaxed)),
            self.refused_by
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        );
        StageReport {
            name: self.name.to_string(),
            kind: self.kind,
            received,
            passed,
            // What a sink delivered left the pipeline: its "out", as for any 1:1 stage.
            emitted: if self.kind == "sink" {
                passed
            } else {
                self.emitted.load(Relaxed)
            },
            dropped,
            failed,
            retried: self.retried.load(Relaxed),
            late: self.late.load(Relaxed),
            transient_retries: self.transient_retries.load(Relaxed),
            key_waits: self.key_waits.load(Relaxed),
            failed_by,
            unfinished: if ended {
                self.unfinished.load(Relaxed)
            } else {
                received.saturating_sub(passed + dropped + failed)
            },
            latency,
            limits: None,
        }
    }
}

/// A new latency histogram (nanoseconds, 3 significant digits, auto-resizing).
pub(crate) fn latency_histogram() -> Histogram<u64> {
    Histogram::new(3).expect("3 significant figures is a valid histogram precision")
}
