//! `batch_dedup_by(size, max_wait, key)`: a batch in which each key appears once — the first
//! item with a key is kept, later ones in the same batch are dropped (and counted). A
//! batch function's input: collect ids, fetch each once per batch.

use std::collections::HashSet;
use std::hash::Hash;
use std::time::Duration;

use crate::ops::batch::{Admit, batch_with};
use crate::plan::Pipeline;

struct DistinctKeys<K, F> {
    key: F,
    seen: HashSet<K>,
}

impl<T, K, F> Admit<T> for DistinctKeys<K, F>
where
    K: Hash + Eq + Send + 'static,
    F: FnMut(&T) -> K + Send + 'static,
{
    fn admit(&mut self, item: &T) -> bool {
        self.seen.insert((self.key)(item))
    }
    fn clear(&mut self) {
        self.seen.clear();
    }
}

pub(crate) fn batch_dedup_by<T, K, F>(
    p: Pipeline<T>,
    size: usize,
    max_wait: Duration,
    key: F,
) -> Pipeline<Vec<T>>
where
    T: Send + 'static,
    K: Hash + Eq + Send + 'static,
    F: FnMut(&T) -> K + Send + 'static,
{
    let admit = DistinctKeys {
        key,
        seen: HashSet::new(),
    };
    batch_with(p, "batch_dedup", size, max_wait, admit)
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn keys_are_distinct_within_a_batch_only() {
        let ids = [1u32, 2, 1, 3, 2, 4, 1, 5, 5, 6];
        let (out, report) = Pipeline::from_iter(ids)
            .batch_dedup_by(3, Duration::from_secs(1), |id| *id)
            .collect_with_report()
            .await
            .unwrap();
        // a batch closes at 3 distinct keys; duplicates inside it are dropped
        assert_eq!(out, vec![vec![1, 2, 3], vec![2, 4, 1], vec![5, 6]]);
        let s = report.stage("batch_dedup").unwrap();
        assert_eq!((s.received, s.passed, s.dropped, s.emitted), (10, 8, 2, 3));
        assert!(report.is_balanced());
    }
}
