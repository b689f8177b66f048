//! `zip`: two pipelines pairwise.

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::plan::Pipeline;
use crate::plan::Settings;
use crate::report::StageStats;
use crate::runtime::chunk::{CHUNK_CAP, Chunk, Outcome, Ticket};
use crate::runtime::{ChunkSource, Upstream};

/// Pairs the items of `a` and `b` in order (stage `zip`, polled by the task that reads it).
/// Ends when either input ends; what the longer input had already produced is counted as
/// dropped at the zip, and the longer input is stopped.
pub(crate) fn zip<A: Send + 'static, B: Send + 'static>(
    a: Pipeline<A>,
    b: Pipeline<B>,
) -> Pipeline<(A, B)> {
    let total = match (a.settings.total, b.settings.total) {
        (Some(x), Some(y)) => Some(x.min(y)),
        _ => None,
    };
    let (build_a, build_b) = (a.build, b.build);
    let mut settings = Settings::join([a.settings, b.settings]);
    settings.total = total;
    Pipeline {
        build: Box::new(move |bld| {
            let a = build_a(bld);
            let b = build_b(bld);
            let stats = bld.stage("zip", "zip");
            Box::new(Zip {
                a,
                b,
                left: VecDeque::new(),
                right: VecDeque::new(),
                a_done: false,
                b_done: false,
                ended: false,
                stats,
            }) as Upstream<(A, B)>
        }),
        settings,
    }
}

struct Zip<A, B> {
    a: Upstream<A>,
    b: Upstream<B>,
    left: VecDeque<(A, Ticket)>,
    right: VecDeque<(B, Ticket)>,
    a_done: bool,
    b_done: bool,
    ended: bool,
    stats: Arc<StageStats>,
}

/// Polls one side into its buffer; true if something changed.
fn fill<X: Send + 'static>(
    up: &mut Upstream<X>,
    buf: &mut VecDeque<(X, Ticket)>,
    done: &mut bool,
    stats: &StageStats,
    cx: &mut Context<'_>,
) -> bool {
    if *done || buf.len() >= CHUNK_CAP {
        return false;
    }
    match up.poll_chunk(cx) {
        Poll::Ready(Some(c)) => {
            StageStats::add(&stats.received, c.len());
            buf.extend(c.into_pairs());
            true
        }
        Poll::Ready(None) => {
            *done = true;
            true
        }
        Poll::Pending => false,
    }
}

impl<A: Send + 'static, B: Send + 'static> Zip<A, B> {
    /// The shorter input ended: drop what the other side holds, stop it, count it all.
    fn end(&mut self) {
        self.ended = true;
        let held = self.left.len() + self.right.len();
        for (_, t) in self.left.drain(..) {
            t.finish(Outcome::Done);
        }
        for (_, t) in self.right.drain(..) {
            t.finish(Outcome::Done);
        }
        let queued = if self.a_done { 0 } else { self.a.discard() }
            + if self.b_done { 0 } else { self.b.discard() };
        StageStats::add(&self.stats.received, queued);
        StageStats::add(&self.stats.dropped, held + queued);
        self.a_done = true;
        self.b_done = true;
    }
}

impl<A: Send + 'static, B: Send + 'static> ChunkSource<(A, B)> for Zip<A, B> {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Chunk<(A, B)>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        loop {
            let moved_a = fill(
                &mut self.a,
                &mut self.left,
                &mut self.a_done,
                &self.stats,
                cx,
            );
            let moved_b = fill(
                &mut self.b,
                &mut self.right,
                &mut self.b_done,
                &self.stats,
                cx,
            );
            let k = self.left.len().min(self.right.len());
            if k > 0 {
                let mut out = Chunk::default();
                out.items.reserve(k);
                for ((x, tx), (y, ty)) in self.left.drain(..k).zip(self.right.drain(..k)) {
                    let t = if tx.is_some() || ty.is_some() {
                        Ticket::with_parents(vec![tx, ty], None)
                    } else {
                        Ticket::none()
                    };
                    out.push((x, y), t);
                }
                self.stats.chunk(0, 2 * k, k, 0, 0);
                return Poll::Ready(Some(out));
            }
            if (self.a_done && self.left.is_empty()) || (self.b_done && self.right.is_empty()) {
                self.end();
                return Poll::Ready(None);
            }
            if !moved_a && !moved_b {
                return Poll::Pending;
            }
        }
    }

    fn discard(&mut self) -> usize {
        // Cancelled: what the zip holds stays unfinished here; count what is queued upstream.
        let queued = if self.a_done { 0 } else { self.a.discard() }
            + if self.b_done { 0 } else { self.b.discard() };
        self.stats.discarded(queued);
        self.stats.left(self.left.len() + self.right.len());
        self.left.clear();
        self.right.clear();
        self.a_done = true;
        self.b_done = true;
        self.ended = true;
        0
    }
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;

    #[tokio::test]
    async fn pairs_in_order_and_ends_at_the_shorter() {
        let (out, report) = Pipeline::from_iter(0..1_000u32)
            .map_async("slow side", |x| async move { x })
            .zip(Pipeline::from_iter((0..600u32).map(|x| x * 10)))
            .collect_with_report()
            .await
            .unwrap();
        assert_eq!(out, (0..600).map(|x| (x, x * 10)).collect::<Vec<_>>());
        let zip = report.stage("zip").unwrap();
        assert_eq!(zip.emitted, 600);
        assert_eq!(zip.passed, 1_200);
        assert!(zip.is_balanced());
        assert!(report.is_balanced());
    }

    #[tokio::test]
    async fn zips_two_branches_of_one_broadcast() {
        let mut v = Pipeline::from_iter(0..5_000u64).broadcast(2);
        let squares = v.pop().unwrap().map(|x| x * x);
        let xs = v.pop().unwrap();
        let out = xs.zip(squares).collect().await.unwrap();
        assert_eq!(out, (0..5_000).map(|x| (x, x * x)).collect::<Vec<_>>());
    }
}
