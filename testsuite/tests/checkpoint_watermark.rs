//! Property: with random per-item delays and 8 unordered workers, the committed cursor never
//! passes an item that has not finished, and ends past every item.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flowline::prelude::*;
use flowline::{CheckpointStore, MemoryCheckpoints, Page, StoreFuture};
use proptest::prelude::*;

/// A store that checks, on every commit, that every id below the cursor has finished.
struct Checking {
    inner: MemoryCheckpoints,
    finished: Arc<Mutex<HashSet<u64>>>,
    commits: Arc<Mutex<Vec<u64>>>,
}

impl CheckpointStore for Checking {
    fn load<'a>(&'a self, name: &'a str) -> StoreFuture<'a, Option<String>> {
        self.inner.load(name)
    }
    fn commit<'a>(&'a self, name: &'a str, cursor: &'a str) -> StoreFuture<'a, ()> {
        let c: u64 = cursor.parse().unwrap();
        let done = self.finished.lock().unwrap();
        let missing: Vec<u64> = (0..c).filter(|i| !done.contains(i)).collect();
        assert!(
            missing.is_empty(),
            "committed {c} while {missing:?} unfinished"
        );
        self.commits.lock().unwrap().push(c);
        self.inner.commit(name, cursor)
    }
    fn clear<'a>(&'a self, name: &'a str) -> StoreFuture<'a, ()> {
        self.inner.clear(name)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn committed_cursor_never_passes_an_unfinished_item(
        delays in prop::collection::vec(0u64..50, 1..400),
        page in 1u64..40,
        fail_every in 0u64..9,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let n = delays.len() as u64;
        let finished = Arc::new(Mutex::new(HashSet::new()));
        let commits = Arc::new(Mutex::new(Vec::new()));
        let store = Checking {
            inner: MemoryCheckpoints::new(),
            finished: finished.clone(),
            commits: commits.clone(),
        };
        let delays = Arc::new(delays);
        let fetch = move |c: Option<u64>| {
            let from = c.unwrap_or(0);
            let to = (from + page).min(n);
            let items: Vec<u64> = (from..to).collect();
            async move {
                Ok::<_, String>(if to < n { Page::next(items, to) } else { Page::end_at(items, to) })
            }
        };
        let f2 = finished.clone();
        let report = rt.block_on(async move {
            Pipeline::from_cursor(store, "p", fetch)
                .try_map_async("work", move |id| {
                    let d = delays[id as usize];
                    let fin = f2.clone();
                    async move {
                        tokio::time::sleep(Duration::from_millis(d)).await;
                        // A failed item is finished too (it goes to the dead letters).
                        fin.lock().unwrap().insert(id);
                        if fail_every > 0 && id % fail_every == 0 { Err("bad") } else { Ok(id) }
                    }
                })
                .workers(8)
                .unordered()
                .run()
                .await
                .unwrap()
        });
        prop_assert!(report.is_balanced());
        let commits = commits.lock().unwrap().clone();
        prop_assert!(commits.windows(2).all(|w| w[0] < w[1]), "{:?}", commits);
        prop_assert_eq!(commits.last().copied(), Some(n));
    }
}
