//! Property test of the rule that a fault of the servers around a run is never an item's
//! failure: a cursor source whose page fetches fail, a checkpoint store and an idempotency
//! store whose calls fail — before the call did anything, or after its write went through
//! and only the answer was lost — at random points, with items that fail or panic at random.
//!
//! Under an outage policy long enough to ride every fault out, every run must end
//! `Completed` with: every row ended exactly once (delivered or failed, never both, never
//! twice, none unfinished), each item's work done once, the keys done in the store exactly
//! the rows delivered, and every checkpoint written only past rows that had ended. On tokio's
//! paused clock.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flowline::prelude::*;
use flowline::{
    BoxError, CheckpointStore, CursorOptions, MemoryCheckpoints, MemoryStore, Outage, Page,
    Reservation, Store, StoreFuture,
};
use proptest::prelude::*;

/// Where a call fails.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    None,
    /// Before it reached the server: nothing changed.
    Before,
    /// After the server did it: only the answer was lost.
    After,
}

/// A seeded dice for faults, shared by every wrapper of one run.
struct Dice {
    state: AtomicU64,
    /// Chance of a fault per call, in percent.
    percent: u64,
}

impl Dice {
    fn roll(&self) -> Fault {
        // splitmix64: a fresh, well-mixed number per call.
        let mut z = self
            .state
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        match (z % 100 < self.percent, z >> 63) {
            (false, _) => Fault::None,
            (true, 0) => Fault::Before,
            (true, _) => Fault::After,
        }
    }
}

fn lost_connection() -> BoxError {
    Box::new(std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "connection reset by peer",
    ))
}

/// Runs `op` under a roll of the dice.
fn faulty<'a, T: Send + 'a>(dice: &'a Dice, op: StoreFuture<'a, T>) -> StoreFuture<'a, T> {
    Box::pin(async move {
        match dice.roll() {
            Fault::None => op.await,
            Fault::Before => Err(lost_connection()),
            Fault::After => {
                op.await?;
                Err(lost_connection())
            }
        }
    })
}

struct FaultyStore {
    inner: MemoryStore,
    dice: Arc<Dice>,
}

impl Store for FaultyStore {
    fn reserve<'a>(
        &'a self,
        keys: &'a [String],
        ttl: Duration,
    ) -> StoreFuture<'a, Vec<Reservation>> {
        faulty(&self.dice, self.inner.reserve(keys, ttl))
    }
    fn commit<'a>(&'a self, keys: &'a [String]) -> StoreFuture<'a, ()> {
        faulty(&self.dice, self.inner.commit(keys))
    }
    fn release<'a>(&'a self, keys: &'a [String]) -> StoreFuture<'a, ()> {
        faulty(&self.dice, self.inner.release(keys))
    }
    fn renew<'a>(&'a self, keys: &'a [String], ttl: Duration) -> StoreFuture<'a, Vec<bool>> {
        faulty(&self.dice, self.inner.renew(keys, ttl))
    }
}

/// Checkpoints that fail at random, and check every cursor written: each row up to it must
/// have ended (its work returned) before the cursor is written.
struct FaultyCheckpoints {
    inner: MemoryCheckpoints,
    dice: Arc<Dice>,
    worked: Arc<Mutex<HashSet<u32>>>,
    drop_mod: u32,
    /// A cursor written past a row that had not ended: the row.
    passed_unfinished: Arc<Mutex<Option<(u32, u32)>>>,
}

impl CheckpointStore for FaultyCheckpoints {
    fn load<'a>(&'a self, name: &'a str) -> StoreFuture<'a, Option<String>> {
        faulty(&self.dice, self.inner.load(name))
    }
    fn commit<'a>(&'a self, name: &'a str, cursor: &'a str) -> StoreFuture<'a, ()> {
        let at: u32 = cursor.parse().unwrap();
        let worked = self.worked.lock().unwrap();
        if let Some(row) = (1..=at).find(|r| r % self.drop_mod != 0 && !worked.contains(r)) {
            self.passed_unfinished
                .lock()
                .unwrap()
                .get_or_insert((at, row));
        }
        drop(worked);
        faulty(&self.dice, self.inner.commit(name, cursor))
    }
    fn clear<'a>(&'a self, name: &'a str) -> StoreFuture<'a, ()> {
        faulty(&self.dice, self.inner.clear(name))
    }
}

#[derive(Debug, Clone)]
struct Case {
    n: u32,
    page: u32,
    read_ahead: usize,
    commit_every_ms: u64,
    workers: usize,
    ordered: bool,
    drop_mod: u32,
    fail_mod: u32,
    panic_mod: u32,
    ttl_ms: u64,
    store_faults: u64,
    checkpoint_faults: u64,
    fetch_faults: u64,
    seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    (
        (
            0u32..700,
            1u32..80,
            0usize..3,
            prop_oneof![Just(0u64), Just(10), Just(200)],
            1usize..10,
            any::<bool>(),
            3u32..11,
        ),
        (
            4u32..15,
            5u32..19,
            prop_oneof![Just(300u64), Just(3_000), Just(30_000)],
            0u64..60,
            0u64..60,
            0u64..60,
            any::<u64>(),
        ),
    )
        .prop_map(
            |(
                (n, page, read_ahead, commit_every_ms, workers, ordered, drop_mod),
                (fail_mod, panic_mod, ttl_ms, store_faults, checkpoint_faults, fetch_faults, seed),
            )| Case {
                n,
                page,
                read_ahead,
                commit_every_ms,
                workers,
                ordered,
                drop_mod,
                fail_mod,
                panic_mod,
                ttl_ms,
                store_faults,
                checkpoint_faults,
                fetch_faults,
                seed,
            },
        )
}

fn delay(seed: u64, id: u32) -> Duration {
    let x = seed ^ (id as u64).wrapping_mul(0x2545_F491_4F6C_DD1D);
    Duration::from_millis((x >> 7) % 40)
}

async fn run_case(c: Case) -> Result<(), TestCaseError> {
    let dice = |percent: u64, salt: u64| {
        Arc::new(Dice {
            state: AtomicU64::new(c.seed ^ salt),
            percent,
        })
    };
    let keys = MemoryStore::new();
    let worked: Arc<Mutex<HashSet<u32>>> = Arc::default();
    let passed_unfinished: Arc<Mutex<Option<(u32, u32)>>> = Arc::default();
    let checkpoints = FaultyCheckpoints {
        inner: MemoryCheckpoints::new(),
        dice: dice(c.checkpoint_faults, 1),
        worked: worked.clone(),
        drop_mod: c.drop_mod,
        passed_unfinished: passed_unfinished.clone(),
    };
    let saved = checkpoints.inner.clone();
    let store = FaultyStore {
        inner: keys.clone(),
        dice: dice(c.store_faults, 2),
    };
    let fetch_dice = dice(c.fetch_faults, 3);
    let (n, page) = (c.n, c.page);
    let fetch = move |after: Option<u32>| {
        let fault = fetch_dice.roll();
        async move {
            if fault != Fault::None {
                return Err(lost_connection());
            }
            let after = after.unwrap_or(0);
            let rows: Vec<u32> = (after + 1..=n).take(page as usize).collect();
            Ok::<_, BoxError>(match rows.last() {
                Some(&last) if last < n => Page::next(rows, last),
                Some(&last) => Page::end_at(rows, last),
                None => Page::end(rows),
            })
        }
    };
    let opts = CursorOptions::new()
        .read_ahead(c.read_ahead)
        .commit_every(Duration::from_millis(c.commit_every_ms));
    let drop_mod = c.drop_mod;
    let (fail_mod, panic_mod, seed) = (c.fail_mod, c.panic_mod, c.seed);
    let runs: Arc<Mutex<HashMap<u32, u32>>> = Arc::default();
    let (r, w) = (runs.clone(), worked.clone());
    let stage = Pipeline::from_cursor_with(checkpoints, "rows", opts, fetch)
        .filter(move |x| x % drop_mod != 0)
        .idempotent(store, |x| *x)
        .ttl(Duration::from_millis(c.ttl_ms))
        .try_map_async("work", move |id: u32| {
            let (runs, worked) = (r.clone(), w.clone());
            async move {
                tokio::time::sleep(delay(seed, id)).await;
                *runs.lock().unwrap().entry(id).or_insert(0) += 1;
                // Ended as far as the checkpoint is concerned: its ticket ends after this.
                worked.lock().unwrap().insert(id);
                if id % panic_mod == 3 {
                    panic!("item {id} panics");
                }
                if id % fail_mod == 1 {
                    return Err(format!("item {id} fails"));
                }
                Ok(id)
            }
        })
        .workers(c.workers);
    let stage = if c.ordered {
        stage.into_pipeline()
    } else {
        stage.unordered().into_pipeline()
    };
    let (delivered, report) = stage
        .collect_with_report()
        .outage(Outage::keep_trying_for(Duration::from_secs(24 * 3600)))
        // A hang shows as a deadline on the paused clock, not as a test that never ends.
        .deadline(Duration::from_secs(7 * 24 * 3600))
        .await
        .map_err(|e| TestCaseError::fail(format!("run failed: {e}")))?;

    prop_assert_eq!(report.outcome, RunOutcome::Completed);
    prop_assert!(report.is_balanced(), "unbalanced: {}", report);
    let unfinished: u64 = report.stages.iter().map(|s| s.unfinished).sum();
    prop_assert_eq!(unfinished, 0, "items left unfinished: {}", report);
    let rows: Vec<u32> = (1..=c.n).filter(|x| x % c.drop_mod != 0).collect();
    let runs = runs.lock().unwrap().clone();
    for r in &rows {
        prop_assert_eq!(runs.get(r).copied(), Some(1), "row {} worked on", r);
    }
    prop_assert_eq!(runs.len(), rows.len());
    let failing = |x: &u32| x % c.panic_mod == 3 || x % c.fail_mod == 1;
    let expect_delivered: Vec<u32> = rows.iter().copied().filter(|x| !failing(x)).collect();
    let mut got = delivered.clone();
    got.sort_unstable();
    prop_assert_eq!(
        &got,
        &expect_delivered,
        "delivered once each, the others failed"
    );
    prop_assert_eq!(
        report.failures,
        (rows.len() - expect_delivered.len()) as u64,
        "failed: only the items meant to"
    );
    if c.ordered {
        prop_assert!(delivered.windows(2).all(|w| w[0] < w[1]), "order broken");
    }
    // The keys done are exactly the rows delivered.
    let all: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
    let answers = keys
        .handle()
        .reserve(&all, Duration::from_secs(1))
        .await
        .unwrap();
    for (r, a) in rows.iter().zip(answers) {
        let done = a == Reservation::AlreadyDone;
        prop_assert_eq!(done, !failing(r), "row {} key done: {}", r, done);
    }
    prop_assert_eq!(*passed_unfinished.lock().unwrap(), None);
    // The last page's cursor; an empty table's only page has none, so nothing is written.
    let last = (c.n > 0).then(|| c.n.to_string());
    prop_assert_eq!(saved.get("rows"), last, "last cursor");
    Ok(())
}

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn store_and_source_faults_lose_nothing_and_fail_nothing(c in case()) {
        let rt = paused_runtime();
        rt.block_on(run_case(c))?;
    }
}
