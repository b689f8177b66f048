//! `merge`: several pipelines of one item type into one, fairly.

use crate::error::Error;
use crate::plan::Settings;
use crate::runtime::Upstream;
use crate::runtime::hop::{HOP_CHUNKS, hop, pump};
use crate::{IntoPipeline, Pipeline};

/// Merges `inputs` into one pipeline (stage `merge`). Each input is pumped by a task of its
/// own (so the stages fused into an input run in parallel with the others) into one bounded
/// channel. Fairness comes from that channel: tokio's bounded `mpsc` hands out send permits
/// first come first served, so when the channel is full, an input waits behind at most one
/// chunk of every other input: no input starves, whatever their speeds. Output order within
/// one input is kept; across inputs, items interleave as they arrive.
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
            let (tx, rx) = hop(HOP_CHUNKS.max(n), &stats);
            for up in ups {
                let run = b.run.clone();
                b.spawn(pump(up, tx.clone(), stats.clone(), run));
            }
            Box::new(rx) as Upstream<T>
        }),
        settings,
    }
}

impl<T: Send + 'static> Pipeline<T> {
    /// Merges several pipelines of the same item type into one (stage `merge`). Each input
    /// runs on a task of its own; when the consumer is slower than the inputs, they take
    /// turns chunk by chunk (first come, first served), so no input starves. Order within one
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

    /// Merges `inputs` (each item names its input) into a consumer that takes 100 µs an
    /// item, stops the run after 6 s; the items consumed per input, and the report.
    async fn consume_6s<const N: usize>(inputs: [Pipeline<u8>; N]) -> ([u64; N], Report) {
        let seen = std::sync::Arc::new(std::sync::Mutex::new([0u64; N]));
        let s = seen.clone();
        let handle = Pipeline::merge(inputs)
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
        (counts, report)
    }

    #[tokio::test(start_paused = true)]
    async fn inputs_of_different_speeds_both_progress() {
        // A fast endless input and a slow one, through a consumer slower than both.
        let fast = Pipeline::from_iter(std::iter::repeat(0u8));
        let slow = Pipeline::from_iter(std::iter::repeat(1u8)).map_async("slow", |x| async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            x
        });
        let ([fast_n, slow_n], report) = consume_6s([fast, slow.into_pipeline()]).await;
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

    /// Two stages running as tasks and a source, pumped into one channel: the slow stage is
    /// not starved by the fast ones, and every item is accounted for once by the merge, whether it passed or was
    /// still queued when the run stopped.
    #[tokio::test(start_paused = true)]
    async fn queues_and_pumped_inputs_all_progress_and_balance() {
        let stage = |v: u8, ms: u64| {
            Pipeline::from_iter(std::iter::repeat(v)).map_async("s", move |x| async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                x
            })
        };
        let (counts, report) = consume_6s([
            stage(0, 0).into_pipeline(),
            stage(1, 2).into_pipeline(),
            Pipeline::from_iter(std::iter::repeat(2u8)),
        ])
        .await;
        // Turns are taken per chunk, and the slow stage hands on small chunks (what ended
        // since its last send): fewer items, but never starved.
        assert!(counts.iter().all(|&c| c > 250), "{counts:?}");
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
