//! `merge`: several pipelines of one item type into one, fairly.

use std::sync::Arc;
use std::task::{Context, Poll};

use crate::error::Error;
use crate::plan::Settings;
use crate::report::StageStats;
use crate::runtime::chunk::Chunk;
use crate::runtime::hop::{HOP_CHUNKS, hop, pump};
use crate::runtime::{ChunkSource, Upstream};
use crate::{IntoPipeline, Pipeline};

/// Merges `inputs` into one pipeline (stage `merge`). An input that ends in a queue (a
/// stage running as a task of its own, a split's lane) is read directly by the merge's
/// consumer; any other input (a source, operators fused after a queue) is pumped by a task
/// of its own into one bounded channel, so that its work runs in parallel with the others,
/// and that channel is read like a queue. Why not pump every input: a pump is a task and a
/// channel more per input, so each chunk would cross two queues and wake two tasks where
/// one does.
///
/// Fairness: the consumer takes the queues in turn, starting after the one it took last, so
/// a busy input cannot starve the others; among the pumped inputs, tokio's bounded `mpsc`
/// hands out send permits first come first served. Output order within one input is kept;
/// across inputs, items interleave as they arrive.
pub(crate) fn merge<T: Send + 'static>(inputs: Vec<Pipeline<T>>) -> Pipeline<T> {
    let n = inputs.len();
    let total = inputs
        .iter()
        .map(|p| p.settings.total)
        .try_fold(0u64, |acc, t| t.map(|t| acc + t));
    let (builds, settings): (Vec<_>, Vec<_>) =
        inputs.into_iter().map(|p| (p.build, p.settings)).unzip();
    let mut settings = Settings::join(settings);
    settings.total = total;
    if n == 0 {
        settings.errors.push(Error::config(
            "merge",
            "inputs",
            0usize,
            "must be at least 1",
        ));
    }
    Pipeline {
        build: Box::new(move |b| {
            let ups: Vec<Upstream<T>> = builds.into_iter().map(|build| build(b)).collect();
            let stats = b.stage("merge", "merge");
            let (queues, pumped): (Vec<_>, Vec<_>) = ups.into_iter().partition(|u| u.is_queue());
            let mut queues: Vec<Option<Upstream<T>>> = queues.into_iter().map(Some).collect();
            let pumped_none = pumped.is_empty();
            if !pumped_none {
                let (tx, rx) = hop(HOP_CHUNKS.max(pumped.len()), &stats);
                for up in pumped {
                    let run = b.run.clone();
                    b.spawn(pump(up, tx.clone(), stats.clone(), run));
                }
                queues.push(Some(Box::new(rx) as Upstream<T>));
            }
            let open = queues.len();
            Box::new(Merged {
                pumped: (!pumped_none).then_some(open - 1),
                queues,
                next: 0,
                open,
                stats,
            }) as Upstream<T>
        }),
        settings,
    }
}

/// The consumer's side of a merge: its queues, read in turn.
struct Merged<T> {
    /// `None` once that queue has ended.
    queues: Vec<Option<Upstream<T>>>,
    /// The queue to try first at the next pull: the one after the last that gave a chunk.
    next: usize,
    /// Queues not ended yet.
    open: usize,
    /// The queue the pumps fill (the last), if any: its items were counted by the pumps as
    /// received and passed, so the merge hands them on without counting them again.
    pumped: Option<usize>,
    stats: Arc<StageStats>,
}

impl<T: Send + 'static> ChunkSource<T> for Merged<T> {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Chunk<T>>> {
        let n = self.queues.len();
        for k in 0..n {
            let i = (self.next + k) % n;
            let Some(queue) = self.queues[i].as_mut() else {
                continue;
            };
            // Every queue polled pending keeps this task's waker, so a chunk in any of
            // them wakes the consumer.
            match queue.poll_chunk(cx) {
                Poll::Ready(Some(chunk)) => {
                    self.next = i + 1;
                    if self.pumped != Some(i) {
                        let len = chunk.len();
                        StageStats::add(&self.stats.received, len);
                        StageStats::add(&self.stats.passed, len);
                        StageStats::add(&self.stats.emitted, len);
                    }
                    return Poll::Ready(Some(chunk));
                }
                Poll::Ready(None) => {
                    self.queues[i] = None;
                    self.open -= 1;
                }
                Poll::Pending => {}
            }
        }
        if self.open == 0 {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }

    /// What waits in the inputs' queues was never received by the merge: it counts those
    /// items as received and unfinished (as its pumps do with what they hold), and hands its
    /// consumer only what waits in its own channel, which the pumps counted as passed.
    fn discard(&mut self) -> usize {
        let mut own = 0;
        for (i, queue) in self.queues.iter_mut().enumerate() {
            let Some(queue) = queue.as_mut() else {
                continue;
            };
            let k = queue.discard();
            if self.pumped == Some(i) {
                own += k;
            } else {
                self.stats.discarded(k);
            }
        }
        own
    }

    fn is_queue(&self) -> bool {
        true
    }
}

impl<T: Send + 'static> Pipeline<T> {
    /// Merges several pipelines of the same item type into one (stage `merge`). Each input
    /// runs on a task of its own; when the consumer is slower than the inputs, they take
    /// turns chunk by chunk, so no input starves. Order within one
    /// input is kept. The merged pipeline runs with the inputs' settings combined: the
    /// shortest deadline, `ErrorPolicy::Stop` if any input asked for it, and the first
    /// dead-letter target set. No inputs at all is a configuration error.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let mut out = Pipeline::merge([
    ///     Pipeline::from_iter(0..3u32),
    ///     Pipeline::from_iter(10..13u32),
    /// ])
    /// .collect()
    /// .await
    /// .unwrap();
    /// out.sort();
    /// assert_eq!(out, vec![0, 1, 2, 10, 11, 12]);
    /// # }
    /// ```
    pub fn merge<P: IntoPipeline<Item = T>>(inputs: impl IntoIterator<Item = P>) -> Pipeline<T> {
        merge(
            inputs
                .into_iter()
                .map(IntoPipeline::into_pipeline)
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn inputs_of_different_speeds_both_progress() {
        // A fast endless input and a slow one, through a consumer slower than both.
        let fast = Pipeline::from_iter(std::iter::repeat(0u8));
        let slow = Pipeline::from_iter(std::iter::repeat(1u8)).map_async("slow", |x| async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            x
        });
        let seen = std::sync::Arc::new(std::sync::Mutex::new([0u64; 2]));
        let s = seen.clone();
        let handle = Pipeline::merge([fast, slow.into_pipeline()])
            .map_async("consumer", move |x| {
                let s = s.clone();
                async move {
                    tokio::time::sleep(Duration::from_micros(100)).await;
                    s.lock().unwrap()[x as usize] += 1;
                }
            })
            .spawn();
        tokio::time::sleep(Duration::from_secs(6)).await;
        handle.stop();
        let report = handle.join().await.unwrap();
        let [fast_n, slow_n] = *seen.lock().unwrap();
        // The consumer handles about 1 item/ms (tokio timers tick in ms). The fast input
        // fills the merge's queue at once (4 chunks: its first 2 s); after that the inputs
        // take turns chunk by chunk, so in 6 s each gets well over 1,000 items.
        assert!(
            slow_n > 1_000,
            "slow input starved: {slow_n} (fast {fast_n})"
        );
        assert!(
            fast_n > 1_000,
            "fast input starved: {fast_n} (slow {slow_n})"
        );
        assert!(report.is_balanced());
    }

    /// Two stages running as tasks (read directly by the merge) and a source (pumped): the
    /// slow stage is not starved by the fast one, and every item is accounted for once by
    /// the merge, whether it passed or was still queued when the run stopped.
    #[tokio::test(start_paused = true)]
    async fn queues_and_pumped_inputs_all_progress_and_balance() {
        let stage = |v: u8, ms: u64| {
            Pipeline::from_iter(std::iter::repeat(v)).map_async("s", move |x| async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                x
            })
        };
        let seen = std::sync::Arc::new(std::sync::Mutex::new([0u64; 3]));
        let s = seen.clone();
        let handle = Pipeline::merge([
            stage(0, 0).into_pipeline(),
            stage(1, 2).into_pipeline(),
            Pipeline::from_iter(std::iter::repeat(2u8)),
        ])
        .map_async("consumer", move |x| {
            let s = s.clone();
            async move {
                tokio::time::sleep(Duration::from_micros(100)).await;
                s.lock().unwrap()[x as usize] += 1;
            }
        })
        .spawn();
        tokio::time::sleep(Duration::from_secs(6)).await;
        handle.stop();
        let report = handle.join().await.unwrap();
        let counts = *seen.lock().unwrap();
        assert!(counts.iter().all(|&c| c > 1_000), "{counts:?}");
        assert!(report.is_balanced(), "{report:?}");
        let merge = report.stages.iter().find(|s| s.name == "merge").unwrap();
        let consumer = report.stages.iter().find(|s| s.name == "consumer").unwrap();
        assert_eq!(merge.passed, consumer.received);
    }

    #[tokio::test]
    async fn zero_inputs_is_a_config_error() {
        let err = Pipeline::<u8>::merge(Vec::<Pipeline<u8>>::new())
            .run()
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: stage `merge`: inputs = 0: must be at least 1"
        );
    }

    #[tokio::test]
    async fn merged_plans_keep_every_problem_and_the_known_total() {
        let a = Pipeline::from_iter(0..10u32).buffer(0);
        let b = Pipeline::from_iter(0..10u32)
            .map_async("m", |x| async move { x })
            .workers(0);
        let m = a.merge_with(Pipeline::from_iter(0..10u32));
        assert_eq!(m.settings.total, Some(20));
        let err = m.merge_with(b).run().await.unwrap_err();
        let Error::Config { problems } = err else {
            panic!("{err}")
        };
        let options: Vec<_> = problems.iter().map(|p| p.option).collect();
        assert_eq!(options, ["capacity", "workers"]);
    }
}
