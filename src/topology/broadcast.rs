//! `broadcast(n)`: every item to each of `n` pipelines.

use crate::error::Error;
use crate::plan::Pipeline;
use crate::runtime::chunk::Chunk;
use crate::topology::{rejected, split_by};

/// Splits `p` into `n` pipelines that each receive every item (`n - 1` clones per item; the
/// last branch gets the originals). A tracked item finishes when every branch finished it.
pub(crate) fn broadcast<T>(p: Pipeline<T>, n: usize) -> Vec<Pipeline<T>>
where
    T: Clone + Send + 'static,
{
    if n == 0 {
        return rejected(
            p,
            Error::config("broadcast", "branches", 0usize, "must be at least 1"),
        );
    }
    let labels = (0..n).map(|i| i.to_string()).collect();
    split_by(
        p,
        "broadcast",
        "broadcast",
        labels,
        true,
        move |chunk, parts, _, _| {
            let last = parts.len() - 1;
            for part in &mut parts[..last] {
                part.append(Chunk {
                    items: chunk.items.clone(),
                    tickets: chunk.tickets.clone(),
                });
            }
            parts[last].append(chunk);
        },
    )
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;
    use std::time::Duration;

    #[tokio::test]
    async fn every_branch_sees_every_item() {
        let branches = Pipeline::from_iter(0..5_000u32).broadcast(3);
        let outs: Vec<Collected<u32>> = (0..3).map(|_| Collected::new()).collect();
        let graph = branches
            .into_iter()
            .zip(&outs)
            .fold(Graph::new(), |g, (b, out)| g.collect(b, out));
        let report = graph.run().await.unwrap();
        for out in outs {
            assert_eq!(out.take(), (0..5_000).collect::<Vec<_>>());
        }
        let b = report.stage("broadcast").unwrap();
        assert_eq!((b.received, b.passed, b.emitted), (5_000, 5_000, 15_000));
        assert_eq!(report.delivered(), 15_000);
        assert!(report.is_balanced());
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_branch_slows_the_source_and_loses_nothing() {
        let pulled = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let seen = pulled.clone();
        let mut branches = Pipeline::from_iter(0..20_000u32)
            .inspect(move |_| {
                seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            })
            .broadcast(2);
        let slow = branches.pop().unwrap().map_async("slow", |x| async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            x
        });
        let fast = branches.pop().unwrap();
        let (fast_out, slow_out) = (Collected::new(), Collected::new());
        let handle = Graph::new()
            .collect(fast, &fast_out)
            .collect(slow, &slow_out)
            .spawn();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // ~100 items went through the slow branch; the source is held to what the hops
        // between it and the slow stage can hold (a few chunks), not run ahead to 20,000.
        let ahead = pulled.load(std::sync::atomic::Ordering::Relaxed);
        let bound = 8 * crate::runtime::chunk::CHUNK_CAP as u32;
        assert!(
            ahead < bound,
            "source ran ahead of the slow branch: {ahead} (bound {bound})"
        );
        let report = handle.join().await.unwrap();
        assert_eq!(fast_out.take(), (0..20_000).collect::<Vec<_>>());
        assert_eq!(slow_out.take(), (0..20_000).collect::<Vec<_>>());
        assert!(report.is_balanced());
    }

    #[tokio::test(start_paused = true)]
    async fn a_buffer_lets_the_other_branches_run_ahead() {
        let mut branches = Pipeline::from_iter(0..2_000u32).broadcast(2);
        let slow = branches
            .pop()
            .unwrap()
            .buffer(10_000)
            .map_async("slow", |x| async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                x
            });
        let fast = branches.pop().unwrap();
        let done_at = std::sync::Arc::new(std::sync::Mutex::new(None));
        let d = done_at.clone();
        let start = tokio::time::Instant::now();
        let mut n = 0;
        let graph = Graph::new().for_each(fast, move |_| {
            n += 1;
            if n == 2_000 {
                *d.lock().unwrap() = Some(start.elapsed());
            }
            async {}
        });
        let report = graph.discard(slow).run().await.unwrap();
        assert!(report.elapsed >= Duration::from_millis(2_000));
        // The fast branch finished long before the slow one: the buffer took the slack.
        assert!(done_at.lock().unwrap().unwrap() < Duration::from_millis(50));
    }

    #[tokio::test]
    async fn zero_branches_is_a_config_error() {
        let mut v = Pipeline::from_iter(0..3u32).broadcast(0);
        let err = v.pop().unwrap().run().await.unwrap_err();
        assert!(
            err.to_string().contains("stage `broadcast`: branches = 0"),
            "{err}"
        );
    }
}
