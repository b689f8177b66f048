//! The latency sampler of an async stage: which calls are timed, and their latencies in a
//! local histogram merged into the stage's shared stats now and then.

use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::time::Instant;

use crate::report::{StageStats, latency_histogram};

/// How many calls one timed call stands for, by the call's sequence number: every one of
/// a stage's first 256 calls, then one in 16, then one in 128. Reading the clock twice
/// costs more than a trivial call (about 50 ns a read on a virtual machine), so a busy
/// stage times few of its calls — and a stage split into lanes pays the warm-up once per
/// lane; a timed call is recorded with this weight, so the percentiles stay those of all
/// calls.
pub(super) fn sample_stride(seq: u64) -> u64 {
    match seq {
        0..256 => 1,
        256..16_384 => 16,
        _ => 128,
    }
}

/// Every this many timed calls, the sampler checks whether its histogram is due to be
/// merged into the shared stats (for live snapshots).
const MERGE_EVERY: u64 = 64;
/// How stale the live latency of a stage may get. Merging adds whole histograms (thousands
/// of buckets), so a busy stage merges on time, not on every few hundred calls.
const MERGE_INTERVAL: Duration = Duration::from_millis(100);

/// The stage's sample of call latencies.
pub(super) struct LatencySampler {
    hist: Histogram<u64>,
    /// Timed calls recorded since the start.
    timed: u64,
    merged_at: Instant,
    /// Some policy wants every call timed: each counts once.
    every_call: bool,
}

impl LatencySampler {
    pub(super) fn new(every_call: bool) -> Self {
        LatencySampler {
            hist: latency_histogram(),
            timed: 0,
            merged_at: Instant::now(),
            every_call,
        }
    }

    /// Whether the call of item `seq` is timed.
    #[inline]
    pub(super) fn times(&self, seq: u64) -> bool {
        self.every_call || seq % sample_stride(seq) == 0
    }

    /// Records a timed call's latency with the weight of the calls it stands for.
    pub(super) fn record(&mut self, seq: u64, latency: Duration, stats: &StageStats) {
        let weight = if self.every_call {
            1
        } else {
            sample_stride(seq)
        };
        let nanos = latency.as_nanos().min(u64::MAX as u128) as u64;
        let _ = self.hist.record_n(nanos, weight);
        self.timed += 1;
        if self.timed % MERGE_EVERY == 0 && self.merged_at.elapsed() >= MERGE_INTERVAL {
            self.merged_at = Instant::now();
            stats.merge_latency(&mut self.hist);
        }
    }

    /// Hands what is recorded to the stage's stats (at the end of the stage).
    pub(super) fn merge_into(&mut self, stats: &StageStats) {
        stats.merge_latency(&mut self.hist);
    }

    #[cfg(test)]
    fn local(&self) -> &Histogram<u64> {
        &self.hist
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stride_thins_out_with_the_sequence_number() {
        assert_eq!(sample_stride(0), 1);
        assert_eq!(sample_stride(255), 1);
        assert_eq!(sample_stride(256), 16);
        assert_eq!(sample_stride(16_383), 16);
        assert_eq!(sample_stride(16_384), 128);
        assert_eq!(sample_stride(u64::MAX), 128);
    }

    #[test]
    fn sampled_calls_stand_for_the_calls_between_them() {
        let s = LatencySampler::new(false);
        let timed = (0..70_000u64).filter(|&seq| s.times(seq)).count() as u64;
        // 256 of the first, one in 16 up to 16,384, one in 128 after that.
        assert_eq!(
            timed,
            256 + (16_384 - 256) / 16 + (70_000u64 - 16_384).div_ceil(128)
        );
        let weight: u64 = (0..70_000u64)
            .filter(|&seq| s.times(seq))
            .map(sample_stride)
            .sum();
        // The weights add up to the calls (the last stride reaches past the end).
        assert_eq!(weight, 16_384 + (70_000u64 - 16_384).div_ceil(128) * 128);
    }

    #[tokio::test(start_paused = true)]
    async fn a_policy_that_times_every_call_gets_every_call_at_weight_one() {
        let stats = StageStats::new("s".into(), "async");
        let mut s = LatencySampler::new(true);
        assert!((0..100_000u64).all(|seq| s.times(seq)));
        s.record(70_000, Duration::from_millis(2), &stats);
        assert_eq!(s.local().len(), 1);
        let mut thin = LatencySampler::new(false);
        thin.record(70_000, Duration::from_millis(2), &stats);
        assert_eq!(thin.local().len(), 128);
    }

    #[cfg(feature = "metrics")]
    #[tokio::test(start_paused = true)]
    async fn what_is_recorded_reaches_the_stage_stats_at_the_end() {
        let stats = StageStats::new("s".into(), "async");
        let mut s = LatencySampler::new(true);
        s.record(0, Duration::from_millis(3), &stats);
        // The longest latency there is is recorded (at the top), not a panic.
        s.record(1, Duration::MAX, &stats);
        s.merge_into(&stats);
        assert!(s.local().is_empty());
        let merged = stats.latency_histogram().expect("merged");
        assert_eq!(merged.len(), 2);
        assert!(merged.max() >= u64::MAX / 2);
    }
}
