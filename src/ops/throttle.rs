//! `throttle(interval, mode)`: at most one item per interval; the rest are dropped (and
//! counted as `dropped`). Lossy by design, unlike `rate_limit`, which delays. Fused into
//! the task that pulls it; its timer only runs in trailing mode.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use crate::plan::Pipeline;
use crate::report::StageStats;
use crate::runtime::chunk::{Chunk, Outcome, Ticket};
use crate::runtime::{ChunkSource, Upstream};
use crate::util::time::{FAR, after};

/// Which item of an interval a [`throttle`](crate::Flow::throttle) lets through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Throttle {
    /// The first item passes at once; items within `interval` after it are dropped.
    #[default]
    Leading,
    /// The first item opens an interval; when it ends, the latest item seen in it passes.
    /// An interval too long to end within any run (30 years or more, `Duration::MAX`) ends
    /// when the input does, so its last item is not held forever.
    Trailing,
}

struct Throttled<T> {
    up: Upstream<T>,
    interval: Duration,
    mode: Throttle,
    stats: Arc<StageStats>,
    up_done: bool,
    /// Leading: when the last item passed.
    last_pass: Option<Instant>,
    /// Trailing: the open interval's end and its latest item.
    window_end: Option<Instant>,
    latest: Option<(T, Ticket)>,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl<T: Send + 'static> Throttled<T> {
    fn poll_leading(&mut self, cx: &mut Context<'_>) -> Poll<Option<Chunk<T>>> {
        loop {
            let chunk = match self.up.poll_chunk(cx) {
                Poll::Ready(Some(c)) => c,
                other => return other,
            };
            let now = Instant::now();
            let n = chunk.len();
            let mut out = Chunk::default();
            for (item, ticket) in chunk.into_pairs() {
                if self
                    .last_pass
                    .is_none_or(|l| now >= after(l, self.interval))
                {
                    self.last_pass = Some(now);
                    out.push(item, ticket);
                } else {
                    ticket.finish(Outcome::Done);
                }
            }
            let passed = out.len();
            self.stats.chunk(n, passed, passed, n - passed, 0);
            if passed > 0 {
                return Poll::Ready(Some(out));
            }
        }
    }

    fn poll_trailing(&mut self, cx: &mut Context<'_>) -> Poll<Option<Chunk<T>>> {
        loop {
            // An interval that has ended emits before anything newer is looked at.
            if let Some(end) = self.window_end {
                if Instant::now() >= end {
                    self.window_end = None;
                    if let Some((item, ticket)) = self.latest.take() {
                        self.stats.chunk(0, 1, 1, 0, 0);
                        let mut out = Chunk::default();
                        out.push(item, ticket);
                        return Poll::Ready(Some(out));
                    }
                }
            }
            let mut pulled = false;
            if !self.up_done {
                match self.up.poll_chunk(cx) {
                    Poll::Ready(Some(chunk)) => {
                        pulled = true;
                        let n = chunk.len();
                        let replaced = n - 1 + self.latest.is_some() as usize;
                        for pair in chunk.into_pairs() {
                            if let Some((_, old)) = self.latest.replace(pair) {
                                old.finish(Outcome::Done);
                            }
                        }
                        if self.window_end.is_none() {
                            self.window_end = Some(after(Instant::now(), self.interval));
                        }
                        self.stats.chunk(n, 0, 0, replaced, 0);
                    }
                    Poll::Ready(None) => self.up_done = true,
                    Poll::Pending => {}
                }
            }
            if pulled {
                continue;
            }
            if self.up_done && self.interval >= FAR {
                // An interval that cannot end within a run ends with the input.
                self.window_end = self.window_end.map(|_| Instant::now());
                if self.latest.is_some() {
                    continue;
                }
            }
            match self.window_end {
                None if self.up_done => return Poll::Ready(None),
                None => return Poll::Pending,
                Some(end) => {
                    let sleep = self
                        .sleep
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(end)));
                    sleep.as_mut().reset(end);
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                }
            }
        }
    }
}

impl<T: Send + 'static> ChunkSource<T> for Throttled<T> {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Chunk<T>>> {
        match self.mode {
            Throttle::Leading => self.poll_leading(cx),
            Throttle::Trailing => self.poll_trailing(cx),
        }
    }

    fn discard(&mut self) -> usize {
        // A held trailing item was counted as received: it stays unfinished.
        self.stats.left(self.latest.take().map_or(0, |_| 1));
        self.stats.discarded(self.up.discard());
        0
    }
}

pub(crate) fn throttle<T: Send + 'static>(
    mut p: Pipeline<T>,
    interval: Duration,
    mode: Throttle,
) -> Pipeline<T> {
    p.settings
        .require_positive("throttle", "interval", interval);
    p.then(move |b, up| {
        let stats = b.stage("throttle", "throttle");
        Box::new(Throttled {
            up,
            interval,
            mode,
            stats,
            up_done: false,
            last_pass: None,
            window_end: None,
            latest: None,
            sleep: None,
        }) as Upstream<T>
    })
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;
    use std::time::Duration;

    /// Items 0..10, one every 10 ms (item k at k·10 ms).
    fn ticking() -> Pipeline<u32> {
        let s = futures_util::stream::unfold(0u32, |k| async move {
            if k == 10 {
                return None;
            }
            if k > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Some((k, k + 1))
        });
        Pipeline::from_stream(s)
    }

    #[tokio::test(start_paused = true)]
    async fn leading_passes_the_first_of_each_interval() {
        let (out, report) = ticking()
            .throttle(Duration::from_millis(25), Throttle::Leading)
            .collect_with_report()
            .await
            .unwrap();
        assert_eq!(out, vec![0, 3, 6, 9]);
        let t = report.stage("throttle").unwrap();
        assert_eq!((t.received, t.passed, t.dropped), (10, 4, 6));
        assert!(report.is_balanced());
    }

    #[tokio::test(start_paused = true)]
    async fn trailing_passes_the_last_of_each_interval_at_its_end() {
        let start = tokio::time::Instant::now();
        let mut times = Vec::new();
        let report = ticking()
            .throttle(Duration::from_millis(25), Throttle::Trailing)
            .map(move |x| (x, start.elapsed().as_millis() as u64))
            .collect_with_report()
            .await
            .unwrap();
        times.extend(report.0);
        assert_eq!(times, vec![(2, 25), (5, 55), (8, 85), (9, 115)]);
        let t = report.1.stage("throttle").unwrap();
        assert_eq!((t.received, t.passed, t.dropped), (10, 4, 6));
        assert!(report.1.is_balanced());
    }

    #[tokio::test(start_paused = true)]
    async fn an_endless_trailing_interval_ends_with_the_input() {
        let start = tokio::time::Instant::now();
        let out = ticking()
            .throttle(Duration::MAX, Throttle::Trailing)
            .collect()
            .await
            .unwrap();
        assert_eq!(out, vec![9]);
        assert_eq!(start.elapsed(), Duration::from_millis(90));
    }

    #[tokio::test]
    async fn zero_interval_is_rejected() {
        let err = Pipeline::from_iter(0..3)
            .throttle(Duration::ZERO, Throttle::Leading)
            .run()
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: stage `throttle`: interval = 0ns: must be more than zero"
        );
    }
}
