//! `pace(rate)`: items pass at most at `rate`, delayed, never dropped.
//! Fused into the task that pulls it; permits are taken for a whole chunk at a time and count
//! from the next pull, when the operators fused after it have handled the chunk.

use std::sync::Arc;
use std::task::{Context, Poll};

use crate::error::Error;
use crate::plan::Pipeline;
use crate::policy::rate::{Rate, RateWait};
use crate::report::StageStats;
use crate::runtime::chunk::Chunk;
use crate::runtime::{ChunkSource, Upstream};

struct RateLimited<T> {
    up: Upstream<T>,
    rate: Rate,
    wait: RateWait,
    held: Chunk<T>,
    stats: Arc<StageStats>,
}

/// Takes the first `n` items (and tickets) of `c`.
fn split_front<T>(c: &mut Chunk<T>, n: usize) -> Chunk<T> {
    if n >= c.len() {
        return std::mem::take(c);
    }
    let items = c.items.drain(..n).collect();
    let tickets = if c.tickets.is_empty() {
        Vec::new()
    } else {
        c.tickets.drain(..n).collect()
    };
    Chunk { items, tickets }
}

impl<T: Send + 'static> ChunkSource<T> for RateLimited<T> {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Chunk<T>>> {
        if self.held.is_empty() {
            match self.up.poll_chunk(cx) {
                Poll::Ready(Some(c)) => {
                    StageStats::add(&self.stats.received, c.len());
                    self.held = c;
                }
                other => {
                    self.rate.settle(&mut self.wait);
                    self.wait.idle();
                    return other;
                }
            }
        }
        match self.rate.poll_take(cx, self.held.len(), &mut self.wait) {
            Poll::Ready(n) => {
                let out = split_front(&mut self.held, n);
                StageStats::add(&self.stats.passed, out.len());
                StageStats::add(&self.stats.emitted, out.len());
                Poll::Ready(Some(out))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn discard(&mut self) -> usize {
        // Held items were counted as received: they stay unfinished.
        self.stats.left(std::mem::take(&mut self.held).len());
        self.stats.discarded(self.up.discard());
        0
    }
}

pub(crate) fn pace<T: Send + 'static>(mut p: Pipeline<T>, rate: Rate) -> Pipeline<T> {
    if let Some((option, value, reason)) = rate.invalid() {
        p.settings
            .errors
            .push(Error::config_text("pace", option, value, reason));
    }
    p.then(move |b, up| {
        let stats = b.stage("pace", "pace");
        Box::new(RateLimited {
            up,
            rate,
            wait: RateWait::default(),
            held: Chunk::default(),
            stats,
        }) as Upstream<T>
    })
}

#[cfg(test)]
mod tests {
    use crate::policy::rate::tests::{max_in_period, stall_every};
    use crate::prelude::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn n_items_take_n_minus_one_intervals() {
        let start = tokio::time::Instant::now();
        let (out, report) = Pipeline::from_iter(0..21u32)
            .pace(Rate::per_second(20))
            .map(move |x| (x, start.elapsed()))
            .collect_with_report()
            .await
            .unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        for (x, at) in out {
            assert_eq!(at, Duration::from_millis(50) * x);
        }
        assert!(report.is_balanced());
    }

    #[tokio::test(start_paused = true)]
    async fn accurate_at_100k_per_second_despite_the_1ms_timer() {
        let start = tokio::time::Instant::now();
        let out = Pipeline::from_iter(0..100_001u32)
            .pace(Rate::per_second(100_000))
            .map(move |_| start.elapsed())
            .collect()
            .await
            .unwrap();
        let last = *out.last().unwrap();
        assert!(
            last >= Duration::from_secs(1) && last <= Duration::from_millis(1001),
            "{last:?}"
        );
        // No 1 ms window gets more than its share (100) plus the slots owed by a late wake.
        let mut per_ms = std::collections::HashMap::<u128, u32>::new();
        for t in &out {
            *per_ms.entry(t.as_millis()).or_default() += 1;
        }
        assert!(
            per_ms.values().all(|n| *n <= 101),
            "{:?}",
            per_ms.values().max()
        );
        assert_eq!(max_in_period(&out, Duration::from_secs(1)), 100_000);
    }

    #[tokio::test(start_paused = true)]
    async fn late_wakes_never_let_n_plus_one_into_a_sliding_period() {
        let stall = stall_every(Duration::from_millis(30), Duration::from_millis(3));
        let start = tokio::time::Instant::now();
        let out = Pipeline::from_iter(0..121u32)
            .pace(Rate::per_second(20))
            .map(move |_| start.elapsed())
            .collect()
            .await
            .unwrap();
        stall.abort();
        assert_eq!(max_in_period(&out, Duration::from_secs(1)), 20);
        let last = *out.last().unwrap();
        assert!(last <= Duration::from_millis(6_010), "{last:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_then_never_more_than_n_plus_b_minus_1_per_period() {
        let stall = stall_every(Duration::from_millis(30), Duration::from_millis(3));
        let start = tokio::time::Instant::now();
        let out = Pipeline::from_iter(0..64u32)
            .pace(Rate::per_second(10).burst(4))
            .map(move |_| start.elapsed())
            .collect()
            .await
            .unwrap();
        stall.abort();
        assert_eq!(out[..4], [Duration::ZERO; 4]);
        assert_eq!(max_in_period(&out, Duration::from_secs(1)), 13);
    }

    #[tokio::test(start_paused = true)]
    async fn burst_passes_the_first_b_at_once() {
        let start = tokio::time::Instant::now();
        let out = Pipeline::from_iter(0..8u32)
            .pace(Rate::per_second(10).burst(5))
            .map(move |_| start.elapsed().as_millis() as u64)
            .collect()
            .await
            .unwrap();
        assert_eq!(out, vec![0, 0, 0, 0, 0, 100, 200, 300]);
    }

    #[tokio::test]
    async fn zero_rate_is_rejected() {
        let err = Pipeline::from_iter(0..3)
            .pace(Rate::per_second(0))
            .run()
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: stage `pace`: rate = 0 per 1s: count must be at least 1"
        );
    }
}
