//! Property tests of the accounting rule: every item is accounted for exactly once, nothing
//! is delivered twice, and ordered stages keep input order.
//!
//! - `every_item_is_accounted_for_exactly_once`: random inputs, failures, panics, worker
//!   counts, orderings, per-item delays and cancel/stop points.
//! - `every_item_is_accounted_for_through_policies_stores_and_cursors`: the same through
//!   retry (with and without pausing the source), a circuit breaker (pause and fail-fast),
//!   a rate limit, adaptive concurrency, an idempotency stage whose store fails or answers
//!   busy, and a cursor source whose checkpoint must never pass an unfinished item.
//!
//! Both run on tokio's paused clock. A report's `unfinished` is counted where the run left
//! each item (not derived from the other counts), so a stage that loses an item leaves its
//! counts unbalanced and these tests fail.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flowline::prelude::*;
use proptest::prelude::*;

#[derive(Debug, Clone, Copy)]
enum Interrupt {
    None,
    Cancel(u64),
    Stop(u64),
}

#[derive(Debug, Clone)]
struct Case {
    n: u32,
    workers: usize,
    ordered: bool,
    drop_mod: u32,
    fail_mod: u32,
    panic_mod: u32,
    delay_seed: u64,
    boundary: bool,
    interrupt: Interrupt,
}

fn case() -> impl Strategy<Value = Case> {
    (
        0u32..600,
        1usize..12,
        any::<bool>(),
        2u32..9,
        3u32..13,
        5u32..17,
        any::<u64>(),
        any::<bool>(),
        prop_oneof![
            Just(Interrupt::None),
            (0u64..60).prop_map(Interrupt::Cancel),
            (0u64..60).prop_map(Interrupt::Stop),
        ],
    )
        .prop_map(
            |(
                n,
                workers,
                ordered,
                drop_mod,
                fail_mod,
                panic_mod,
                delay_seed,
                boundary,
                interrupt,
            )| Case {
                n,
                workers,
                ordered,
                drop_mod,
                fail_mod,
                panic_mod,
                delay_seed,
                boundary,
                interrupt,
            },
        )
}

fn delay(seed: u64, id: u32) -> Duration {
    let h = (id as u64 ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 59;
    Duration::from_millis(h) // 0..=31 ms
}

/// The plan under test, up to (and including) the async stage.
fn plan(c: &Case) -> Pipeline<u32> {
    let (fail_mod, panic_mod, seed, drop_mod) = (c.fail_mod, c.panic_mod, c.delay_seed, c.drop_mod);
    let mut plan = Pipeline::from_iter(0..c.n).filter(move |x| x % drop_mod != 0);
    if c.boundary {
        plan = plan.buffer(64);
    }
    let stage = plan
        .try_map_async("work", move |id: u32| async move {
            tokio::time::sleep(delay(seed, id)).await;
            if id % panic_mod == 1 {
                panic!("item {id} panics");
            }
            if id % fail_mod == 1 {
                return Err(format!("item {id} fails"));
            }
            Ok(id)
        })
        .workers(c.workers)
        .keep_input();
    if c.ordered {
        stage.into_pipeline()
    } else {
        stage.unordered().into_pipeline()
    }
}

async fn run_case(c: Case) -> Result<(), TestCaseError> {
    let delivered = Arc::new(Mutex::new(Vec::new()));
    let (at, cancel) = match c.interrupt {
        Interrupt::None => {
            let sink = delivered.clone();
            let report = plan(&c)
                .map(|x| x)
                .for_each(move |x| {
                    let sink = sink.clone();
                    async move { sink.lock().unwrap().push(x) }
                })
                .await
                .map_err(|e| TestCaseError::fail(format!("run failed: {e}")))?;
            return check(&c, &report, &delivered.lock().unwrap(), true);
        }
        Interrupt::Cancel(t) => (t, true),
        Interrupt::Stop(t) => (t, false),
    };
    let sink = delivered.clone();
    let handle = plan(&c)
        .inspect(move |x| sink.lock().unwrap().push(*x))
        .spawn();
    tokio::time::sleep(Duration::from_millis(at)).await;
    if cancel {
        handle.cancel();
    } else {
        handle.stop();
    }
    let report = match handle.join().await {
        Ok(r) => r,
        Err(Error::Cancelled { report }) => *report,
        Err(e) => return Err(TestCaseError::fail(format!("unexpected error: {e}"))),
    };
    // After a cancel, items seen by `inspect` may not have reached the sink.
    let seen = delivered.lock().unwrap().clone();
    check(&c, &report, &seen, report.outcome != RunOutcome::Cancelled)
}

fn check(
    c: &Case,
    report: &Report,
    delivered: &[u32],
    finished: bool,
) -> Result<(), TestCaseError> {
    // Nothing delivered twice, nothing invented.
    let set: HashSet<u32> = delivered.iter().copied().collect();
    prop_assert_eq!(set.len(), delivered.len(), "an item was delivered twice");
    prop_assert!(delivered.iter().all(|x| *x < c.n));
    if c.ordered {
        prop_assert!(
            delivered.windows(2).all(|w| w[0] < w[1]),
            "order broken: {:?}",
            delivered
        );
    }
    // Every stage balances, and what leaves one stage enters the next: no queue loses items.
    prop_assert!(report.is_balanced(), "unbalanced: {report}");
    for pair in report.stages.windows(2) {
        prop_assert_eq!(
            pair[0].emitted,
            pair[1].received,
            "{} -> {}",
            &pair[0].name,
            &pair[1].name
        );
    }
    let source = report.stage("source").unwrap();
    let dropped: u64 = report.stages.iter().map(|s| s.dropped).sum();
    let failed: u64 = report.stages.iter().map(|s| s.failed).sum();
    let unfinished: u64 = report.stages.iter().map(|s| s.unfinished).sum();
    // Each pulled item ended in exactly one of: delivered, dropped, failed, unfinished.
    prop_assert_eq!(
        source.passed,
        report.delivered() + dropped + failed + unfinished
    );
    prop_assert_eq!(failed, report.failures);
    if finished {
        prop_assert_eq!(unfinished, 0);
        prop_assert_eq!(report.delivered() as usize, delivered.len());
        // The failures are exactly the pulled items that were meant to fail or panic.
        let pulled = source.passed as u32;
        let expect_failed: HashSet<u32> = (0..pulled)
            .filter(|x| x % c.drop_mod != 0 && (x % c.panic_mod == 1 || x % c.fail_mod == 1))
            .collect();
        let got_failed: HashSet<u32> = report
            .failure_sample
            .iter()
            .map(|f| *f.input.as_ref().unwrap().downcast_ref::<u32>().unwrap())
            .collect();
        if expect_failed.len() <= Report::FAILURE_SAMPLE {
            prop_assert_eq!(got_failed, expect_failed);
        }
        if matches!(c.interrupt, Interrupt::None) {
            prop_assert_eq!(
                source.passed,
                c.n as u64,
                "a completed run pulls everything"
            );
        }
    }
    Ok(())
}

/// A runtime on tokio's paused clock, as every case runs on.
fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 160, ..ProptestConfig::default() })]

    #[test]
    fn every_item_is_accounted_for_exactly_once(c in case()) {
        let rt = paused_runtime();
        rt.block_on(run_case(c))?;
    }
}

// ---------------------------------------------------------------------------------------
// Policies, idempotency stores and cursor checkpoints.

use flowline::{BoxError, MemoryCheckpoints, MemoryStore, Page, Reservation, StageReport, Store};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Clone, Copy)]
enum Idem {
    None,
    /// A store that works.
    Memory,
    /// Every `k`-th reserve call fails (its items fail at the idempotency stage).
    Failing(u64),
    /// Keys `% m == 0` answer busy twice, then are free; keys `% 3m == 0` stay busy.
    Busy(u32),
}

#[derive(Debug, Clone)]
struct PolicyCase {
    n: u32,
    workers: usize,
    ordered: bool,
    drop_mod: u32,
    /// Items `% fail_mod == 1` always fail.
    fail_mod: u32,
    /// Items `% flaky_mod == 2` fail their first `flaky_times` attempts.
    flaky_mod: u32,
    flaky_times: u32,
    /// (max attempts, pause the source while backing off)
    retry: Option<(u32, bool)>,
    /// (consecutive failures to open, fail fast rather than pause)
    breaker: Option<(u32, bool)>,
    /// (per second, burst)
    rate: Option<(u64, u64)>,
    /// `Some(vegas)`: adaptive concurrency, AIMD or Vegas.
    adaptive: Option<bool>,
    idem: Idem,
    /// `Some(page size)`: a cursor source with a checkpoint.
    cursor: Option<u32>,
    delay_seed: u64,
    interrupt: Interrupt,
}

fn policy_case() -> impl Strategy<Value = PolicyCase> {
    let shape = (
        0u32..300,
        1usize..8,
        any::<bool>(),
        2u32..9,
        3u32..15,
        3u32..9,
        1u32..4,
        any::<u64>(),
    );
    let policies = (
        proptest::option::of((1u32..4, any::<bool>())),
        proptest::option::of((1u32..5, any::<bool>())),
        proptest::option::of((20u64..2000, 0u64..8)),
        proptest::option::of(any::<bool>()),
        prop_oneof![
            Just(Idem::None),
            Just(Idem::Memory),
            (2u64..5).prop_map(Idem::Failing),
            (2u32..7).prop_map(Idem::Busy),
        ],
        proptest::option::of(1u32..80),
        prop_oneof![
            Just(Interrupt::None),
            (0u64..3000).prop_map(Interrupt::Cancel),
            (0u64..3000).prop_map(Interrupt::Stop),
        ],
    );
    (shape, policies).prop_map(
        |(
            (n, workers, ordered, drop_mod, fail_mod, flaky_mod, flaky_times, delay_seed),
            (retry, breaker, rate, adaptive, idem, cursor, interrupt),
        )| PolicyCase {
            n,
            workers,
            ordered,
            drop_mod,
            fail_mod,
            flaky_mod,
            flaky_times,
            retry,
            breaker,
            rate,
            adaptive,
            idem,
            cursor,
            delay_seed,
            interrupt,
        },
    )
}

/// An idempotency store that fails some calls or answers busy for some keys, over a
/// [`MemoryStore`].
struct TestStore {
    inner: MemoryStore,
    mode: Idem,
    calls: AtomicU64,
    asks: Mutex<HashMap<String, u32>>,
}

type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send + 'a>>;

impl Store for TestStore {
    fn reserve<'a>(
        &'a self,
        keys: &'a [String],
        ttl: Duration,
    ) -> StoreFuture<'a, Vec<Reservation>> {
        Box::pin(async move {
            let call = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
            match self.mode {
                Idem::Failing(k) if call % k == 0 => return Err("store unavailable".into()),
                Idem::Busy(m) => {
                    let mut answers = self.inner.reserve(keys, ttl).await?;
                    let mut give_back = Vec::new();
                    {
                        let mut asks = self.asks.lock().unwrap();
                        for (key, answer) in keys.iter().zip(answers.iter_mut()) {
                            let id: u32 = key.parse().unwrap();
                            let asked = asks.entry(key.clone()).or_insert(0);
                            *asked += 1;
                            let busy = id % (3 * m) == 0 || (id % m == 0 && *asked <= 2);
                            if busy && *answer == Reservation::Reserved {
                                // Not ours after all: give the reservation back.
                                give_back.push(key.clone());
                                *answer = Reservation::Busy;
                            }
                        }
                    }
                    self.inner.release(&give_back).await?;
                    return Ok(answers);
                }
                _ => {}
            }
            self.inner.reserve(keys, ttl).await
        })
    }
    fn commit<'a>(&'a self, keys: &'a [String]) -> StoreFuture<'a, ()> {
        self.inner.commit(keys)
    }
    fn release<'a>(&'a self, keys: &'a [String]) -> StoreFuture<'a, ()> {
        self.inner.release(keys)
    }
    fn renew<'a>(&'a self, keys: &'a [String], ttl: Duration) -> StoreFuture<'a, Vec<bool>> {
        self.inner.renew(keys, ttl)
    }
}

/// What the run under test saw: delivered items, and the failures with their input.
#[derive(Default)]
struct Seen {
    delivered: Vec<u32>,
    failed: Vec<u32>,
    failed_without_input: u64,
}

fn policy_plan(c: &PolicyCase, checkpoints: &MemoryCheckpoints) -> Pipeline<u32> {
    let n = c.n;
    let source = match c.cursor {
        Some(page) => {
            Pipeline::from_cursor(checkpoints.clone(), "rows", move |after: Option<u32>| {
                let from = after.unwrap_or(0) + 1;
                let rows: Vec<u32> = (from..=n).take(page as usize).collect();
                async move {
                    Ok::<_, std::convert::Infallible>(match rows.last() {
                        Some(&last) if last < n => Page::next(rows, last),
                        Some(&last) => Page::end_at(rows, last),
                        None => Page::end(rows),
                    })
                }
            })
        }
        None => Pipeline::from_iter(1..=n),
    };
    let drop_mod = c.drop_mod;
    let mut plan = source.filter(move |x| x % drop_mod != 0);
    match c.idem {
        Idem::None => {}
        Idem::Memory => plan = plan.idempotent(MemoryStore::new(), |x| *x).into_pipeline(),
        mode => {
            let store = TestStore {
                inner: MemoryStore::new(),
                mode,
                calls: AtomicU64::new(0),
                asks: Mutex::new(HashMap::new()),
            };
            plan = plan
                .idempotent(store, |x| *x)
                .busy_wait(Duration::from_secs(2))
                .into_pipeline();
        }
    }
    let attempts: Arc<Mutex<HashMap<u32, u32>>> = Arc::default();
    let (seed, fail_mod, flaky_mod, flaky_times) =
        (c.delay_seed, c.fail_mod, c.flaky_mod, c.flaky_times);
    let mut stage = plan
        .try_map_async("work", move |id: u32| {
            let attempts = attempts.clone();
            async move {
                tokio::time::sleep(delay(seed, id)).await;
                let attempt = {
                    let mut a = attempts.lock().unwrap();
                    let k = a.entry(id).or_insert(0);
                    *k += 1;
                    *k
                };
                if id % fail_mod == 1 {
                    return Err(format!("item {id} fails"));
                }
                if id % flaky_mod == 2 && attempt <= flaky_times {
                    return Err(format!("item {id} fails attempt {attempt}"));
                }
                Ok(id)
            }
        })
        .workers(c.workers)
        .keep_input();
    if let Some((max, pause)) = c.retry {
        let mut retry = Retry::exponential(Duration::from_millis(10)).max_attempts(max);
        if pause {
            retry = retry.pause_source();
        }
        stage = stage.retry(retry);
    }
    if let Some((k, fail_fast)) = c.breaker {
        let mode = if fail_fast {
            OnOpen::FailFast
        } else {
            OnOpen::Pause
        };
        stage = stage.circuit_breaker(
            Breaker::consecutive_failures(k)
                .cooldown(Duration::from_millis(50))
                .on_open(mode),
        );
    }
    if let Some((per_second, burst)) = c.rate {
        let mut rate = Rate::per_second(per_second);
        if burst > 0 {
            rate = rate.burst(burst);
        }
        stage = stage.rate_limit(rate);
    }
    if let Some(vegas) = c.adaptive {
        let limit = if vegas {
            Adaptive::vegas(1..=16)
        } else {
            Adaptive::aimd(1..=16)
        };
        stage = stage.adaptive(limit);
    }
    if c.ordered {
        stage.into_pipeline()
    } else {
        stage.unordered().into_pipeline()
    }
}

async fn run_policy_case(c: PolicyCase) -> Result<(), TestCaseError> {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let checkpoints = MemoryCheckpoints::new();
    let (sink, dead) = (seen.clone(), seen.clone());
    let handle = policy_plan(&c, &checkpoints)
        .for_each(move |x| {
            let sink = sink.clone();
            async move { sink.lock().unwrap().delivered.push(x) }
        })
        .dead_letter(DeadLetter::callback(move |f| {
            let mut seen = dead.lock().unwrap();
            match f.input.as_ref().and_then(|i| i.downcast_ref::<u32>()) {
                Some(id) => seen.failed.push(*id),
                None => seen.failed_without_input += 1,
            }
        }))
        // A hang shows as a deadline on the paused clock, not as a test that never ends.
        .deadline(Duration::from_secs(24 * 3600))
        .spawn();
    match c.interrupt {
        Interrupt::None => {}
        Interrupt::Cancel(t) => {
            tokio::time::sleep(Duration::from_millis(t)).await;
            handle.cancel();
        }
        Interrupt::Stop(t) => {
            tokio::time::sleep(Duration::from_millis(t)).await;
            handle.stop();
        }
    }
    let report = match handle.join().await {
        Ok(r) => r,
        Err(Error::Cancelled { report }) => *report,
        Err(e) => return Err(TestCaseError::fail(format!("unexpected error: {e}"))),
    };
    let seen = seen.lock().unwrap();
    check_policy_case(&c, &report, &seen, &checkpoints)
}

fn check_policy_case(
    c: &PolicyCase,
    report: &Report,
    seen: &Seen,
    checkpoints: &MemoryCheckpoints,
) -> Result<(), TestCaseError> {
    let finished = report.outcome != RunOutcome::Cancelled;
    let delivered: HashSet<u32> = seen.delivered.iter().copied().collect();
    prop_assert_eq!(
        delivered.len(),
        seen.delivered.len(),
        "an item was delivered twice"
    );
    prop_assert!(seen.delivered.iter().all(|x| (1..=c.n).contains(x)));
    let failed: HashSet<u32> = seen.failed.iter().copied().collect();
    prop_assert_eq!(failed.len(), seen.failed.len(), "an item failed twice");
    prop_assert!(
        delivered.is_disjoint(&failed),
        "an item delivered and failed"
    );
    // Ordered output only among the items that were not held back by a busy key.
    if c.ordered && matches!(c.idem, Idem::None | Idem::Memory | Idem::Failing(_)) {
        prop_assert!(
            seen.delivered.windows(2).all(|w| w[0] < w[1]),
            "order broken"
        );
    }
    prop_assert!(report.is_balanced(), "unbalanced: {report}");
    for pair in report.stages.windows(2) {
        prop_assert_eq!(
            pair[0].emitted,
            pair[1].received,
            "{} -> {}",
            &pair[0].name,
            &pair[1].name
        );
    }
    let source = &report.stages[0];
    let sum = |f: fn(&StageReport) -> u64| report.stages.iter().map(f).sum::<u64>();
    let (dropped, failures, unfinished) =
        (sum(|s| s.dropped), sum(|s| s.failed), sum(|s| s.unfinished));
    prop_assert_eq!(
        source.passed,
        report.delivered() + dropped + failures + unfinished,
        "pulled = delivered + dropped + failed + unfinished"
    );
    prop_assert_eq!(failures, report.failures);
    prop_assert_eq!(
        report.failures,
        seen.failed.len() as u64 + seen.failed_without_input
    );
    prop_assert_eq!(report.delivered(), seen.delivered.len() as u64);
    // A graceful stop does not wait out keys another holder has reserved: their items are
    // left unfinished, at the idempotency stage and nowhere else.
    let left_waiting = match (report.outcome, c.idem) {
        (RunOutcome::Stopped, Idem::Busy(_)) => {
            report.stage("idempotent").map_or(0, |s| s.unfinished)
        }
        _ => 0,
    };
    if finished {
        prop_assert_eq!(
            unfinished,
            left_waiting,
            "a finished run left items: {}",
            report
        );
        if matches!(c.interrupt, Interrupt::None) {
            prop_assert_eq!(report.outcome, RunOutcome::Completed);
            prop_assert_eq!(
                source.passed,
                c.n as u64,
                "a completed run pulls everything"
            );
        }
        // Every pulled item is delivered, filtered or failed (by its input, or counted).
        let pulled = source.passed as u32;
        let filtered = (1..=pulled).filter(|x| x % c.drop_mod == 0).count() as u64;
        prop_assert_eq!(
            delivered.len() as u64
                + failed.len() as u64
                + seen.failed_without_input
                + filtered
                + left_waiting,
            pulled as u64
        );
        // With nothing to refuse items, the failures are exactly the items meant to fail for
        // good (and the flaky ones the retries could not save): a store that fails some
        // calls fails no item.
        if c.breaker.is_none() && matches!(c.idem, Idem::None | Idem::Memory | Idem::Failing(_)) {
            let attempts = c.retry.map_or(1, |(max, _)| max);
            let expect: HashSet<u32> = (1..=pulled)
                .filter(|x| x % c.drop_mod != 0)
                .filter(|x| {
                    x % c.fail_mod == 1 || (x % c.flaky_mod == 2 && attempts <= c.flaky_times)
                })
                .collect();
            prop_assert_eq!(&failed, &expect);
        }
    }
    if c.cursor.is_some() {
        // The checkpoint never passes an unfinished item: every row up to it was delivered,
        // filtered or failed. Failures without their input (refused by an open breaker,
        // or at the idempotency stage) are only counted, so they may stand for rows here.
        let at: u32 = checkpoints.get("rows").map_or(0, |s| s.parse().unwrap());
        prop_assert!(at <= c.n);
        let missing = (1..=at)
            .filter(|x| x % c.drop_mod != 0 && !delivered.contains(x) && !failed.contains(x))
            .count() as u64;
        prop_assert!(
            missing <= seen.failed_without_input,
            "checkpoint {} passes {} unfinished rows: {} delivered {:?} failed {:?} +{}",
            at,
            missing,
            report,
            &seen.delivered,
            &seen.failed,
            seen.failed_without_input
        );
        if report.outcome == RunOutcome::Completed {
            prop_assert_eq!(at, c.n, "a completed cursor run commits its last row");
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn every_item_is_accounted_for_through_policies_stores_and_cursors(c in policy_case()) {
        let rt = paused_runtime();
        rt.block_on(run_policy_case(c))?;
    }
}
