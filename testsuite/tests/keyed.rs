//! Property test of keyed concurrency (`key_by`): under random latencies, failures (some
//! retried, some timed out, some routed as items), calls per key, orders and stop/cancel
//! points, every key's calls start in arrival order, never more than `per_key` of them are
//! in flight at once, every key's results leave in arrival order, and every item pulled
//! ends once (delivered, failed, or unfinished). On tokio's paused clock.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flowline::prelude::*;
use proptest::prelude::*;

mod support;
use support::interrupt::{Interrupt, join, paused_runtime};

#[derive(Debug, Clone)]
struct Case {
    n: u32,
    keys: u32,
    workers: usize,
    per_key: usize,
    max_waiting: usize,
    ordered: bool,
    fail_mod: u32,
    retry: bool,
    timeout: bool,
    routed: bool,
    seed: u64,
    interrupt: Interrupt,
}

fn case() -> impl Strategy<Value = Case> {
    (
        (0u32..400, 1u32..20, 1usize..12, 1usize..4, 1usize..40),
        (
            any::<bool>(),
            3u32..11,
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        ),
        any::<u64>(),
        prop_oneof![
            Just(Interrupt::None),
            (0u64..200).prop_map(Interrupt::Cancel),
            (0u64..200).prop_map(Interrupt::Stop),
        ],
    )
        .prop_map(
            |(
                (n, keys, workers, per_key, max_waiting),
                (ordered, fail_mod, retry, timeout, routed),
                seed,
                interrupt,
            )| Case {
                n,
                keys,
                workers,
                per_key,
                max_waiting,
                ordered,
                fail_mod,
                retry,
                timeout,
                routed,
                seed,
                interrupt,
            },
        )
}

/// 0..=31 ms, by item and attempt.
fn delay(seed: u64, id: u32, attempt: u32) -> Duration {
    let h = ((id as u64) << 8 ^ attempt as u64 ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 59;
    Duration::from_millis(h)
}

/// What the calls saw: each key's first starts in order, and the most in flight per key.
#[derive(Default)]
struct Seen {
    first_starts: HashMap<u32, Vec<u32>>,
    in_flight: HashMap<u32, usize>,
    most: usize,
}

/// An item's key: spread over the case's keys.
fn key(c: &Case, id: u32) -> u32 {
    (id.wrapping_mul(2_654_435_761) >> 7) % c.keys
}

async fn run_case(c: Case) -> Result<(), TestCaseError> {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let delivered = Arc::new(Mutex::new(Vec::new()));
    let (calls, cc, ck) = (seen.clone(), c.clone(), c.clone());
    let stage = Pipeline::from_iter(0..c.n)
        .try_map_async("work", move |id: u32| {
            let (calls, c) = (calls.clone(), cc.clone());
            let k = key(&c, id);
            let attempt = flowline::attempt();
            {
                let mut s = calls.lock().unwrap();
                if attempt <= 1 {
                    s.first_starts.entry(k).or_default().push(id);
                }
                let n = s.in_flight.entry(k).or_default();
                *n += 1;
                let n = *n;
                s.most = s.most.max(n);
            }
            async move {
                // Decrements even when the call is dropped (a timeout, a cancel).
                struct Out(Arc<Mutex<Seen>>, u32);
                impl Drop for Out {
                    fn drop(&mut self) {
                        *self.0.lock().unwrap().in_flight.get_mut(&self.1).unwrap() -= 1;
                    }
                }
                let _out = Out(calls, k);
                let d = delay(c.seed, id, attempt);
                tokio::time::sleep(d).await;
                // A retried item fails on its first attempt only; else it fails for good.
                if id % c.fail_mod == 1 && (!c.retry || attempt <= 1) {
                    return Err(format!("item {id} fails"));
                }
                Ok(id)
            }
        })
        .workers(c.workers)
        .key_by(move |id| key(&ck, *id))
        .per_key(c.per_key)
        .max_waiting(c.max_waiting);
    let mut stage = if c.ordered { stage } else { stage.unordered() };
    if c.retry {
        stage = stage.retry(Retry::constant(Duration::from_millis(7)).max_attempts(3));
    }
    if c.timeout {
        stage = stage.timeout(Duration::from_millis(25));
    }
    let sink = delivered.clone();
    let plan = if c.routed {
        stage
            .results()
            .map(|r| r.unwrap_or_else(|f| f.input))
            .inspect(move |x| sink.lock().unwrap().push(*x))
    } else {
        stage.inspect(move |x| sink.lock().unwrap().push(*x))
    };
    let report = join(plan.spawn(), c.interrupt)
        .await
        .map_err(TestCaseError::fail)?;
    let delivered = delivered.lock().unwrap().clone();
    let seen = seen.lock().unwrap();
    check(&c, &report, &delivered, &seen)
}

fn check(c: &Case, report: &Report, delivered: &[u32], seen: &Seen) -> Result<(), TestCaseError> {
    prop_assert!(
        seen.most <= c.per_key,
        "{} calls of one key at once",
        seen.most
    );
    for (k, starts) in &seen.first_starts {
        prop_assert!(
            starts.windows(2).all(|w| w[0] < w[1]),
            "key {}: started out of order {:?}",
            k,
            starts
        );
    }
    let set: HashSet<u32> = delivered.iter().copied().collect();
    prop_assert_eq!(set.len(), delivered.len(), "an item was delivered twice");
    if c.ordered {
        prop_assert!(
            delivered.windows(2).all(|w| w[0] < w[1]),
            "order: {:?}",
            delivered
        );
    }
    let mut by_key: HashMap<u32, Vec<u32>> = HashMap::new();
    for &id in delivered {
        by_key.entry(key(c, id)).or_default().push(id);
    }
    for (k, ids) in &by_key {
        prop_assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "key {}: results out of order {:?}",
            k,
            ids
        );
    }
    prop_assert!(report.is_balanced(), "unbalanced: {report}");
    let source = report.stage("source").unwrap();
    let work = report.stage("work").unwrap();
    prop_assert_eq!(source.emitted, work.received);
    // Each pulled item ended once: delivered, failed, or unfinished.
    prop_assert_eq!(work.received, work.passed + work.failed + work.unfinished);
    if report.outcome == RunOutcome::Completed {
        prop_assert_eq!(work.unfinished, 0);
        prop_assert_eq!(work.received, c.n as u64);
        prop_assert_eq!(delivered.len() as u64, work.passed);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn every_key_keeps_its_order_and_every_item_ends_once(c in case()) {
        paused_runtime().block_on(run_case(c))?;
    }
}
